// Unit tests of the document splitter (no database). Every expected byte offset is worked out from
// the input written here (by hand, or as Buffer.byteLength of the prefix we wrote), and every input
// is read under many chunkings, which must all produce identical events.
import { createReadStream, readFileSync } from 'node:fs';
import { Readable } from 'node:stream';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { checkDocument } from '../scripts/check-document.ts';
import { DEFAULT_MAX_DOCUMENT_BYTES, readJson, readNdjson, type ReadEvent } from '../scripts/split-documents.ts';

// An invented name standing in for PHI: it must never appear in a reason.
const NAME = 'Zebulon Quackenbush';

type Reader = (input: Readable, maxBytes?: number) => AsyncGenerator<ReadEvent>;

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function splitEvery(buf: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < buf.length; i += size) out.push(buf.subarray(i, i + size));
  return out;
}

function splitRandom(buf: Buffer, seed: number, maxSize: number): Buffer[] {
  const rnd = mulberry32(seed);
  const out: Buffer[] = [];
  for (let i = 0; i < buf.length;) {
    const n = 1 + Math.floor(rnd() * maxSize);
    out.push(buf.subarray(i, i + n));
    i += n;
  }
  return out;
}

/** Empty chunks before, between and after the others (a stream may deliver them). */
function withEmptyChunks(chunks: Buffer[]): Buffer[] {
  const out: Buffer[] = [Buffer.alloc(0)];
  for (const c of chunks) out.push(c, Buffer.alloc(0));
  return out;
}

function chunkings(buf: Buffer): Array<[string, Buffer[]]> {
  return [
    ['whole', [buf]],
    ['1-byte chunks', splitEvery(buf, 1)],
    ['2-byte chunks', splitEvery(buf, 2)],
    ['3-byte chunks', splitEvery(buf, 3)],
    ['7-byte chunks', splitEvery(buf, 7)],
    ['random 1..5 bytes, seed 1', splitRandom(buf, 1, 5)],
    ['random 1..16 bytes, seed 42', splitRandom(buf, 42, 16)],
    ['random 1..64 bytes, seed 2024', splitRandom(buf, 2024, 64)],
    ['5-byte chunks with empty chunks around', withEmptyChunks(splitEvery(buf, 5))],
  ];
}

async function collect(events: AsyncIterable<ReadEvent>): Promise<ReadEvent[]> {
  const out: ReadEvent[] = [];
  for await (const ev of events) out.push(ev);
  return out;
}

function expectSafeReason(reason: string): void {
  expect(reason).not.toContain(NAME);
  expect(reason).not.toContain('Zebulon');
  expect(reason).not.toContain('Quackenbush');
  // A reason never quotes the document: no JSON string can be in it.
  expect(reason).not.toContain('"');
}

/** Reads `input` under every chunking; asserts they all agree and that no reason quotes content. */
async function readAll(reader: Reader, input: string | Buffer, maxBytes?: number): Promise<ReadEvent[]> {
  const buf = typeof input === 'string' ? Buffer.from(input, 'utf8') : input;
  let reference: ReadEvent[] | undefined;
  for (const [name, chunks] of chunkings(buf)) {
    const events = await collect(reader(Readable.from(chunks), maxBytes));
    if (reference === undefined) reference = events;
    else expect(events, `chunking: ${name}`).toEqual(reference);
  }
  for (const ev of reference!) if (ev.kind !== 'document') expectSafeReason(ev.reason);
  return reference!;
}

const ndjson = (input: string | Buffer, maxBytes?: number) => readAll(readNdjson, input, maxBytes);
const json = (input: string | Buffer, maxBytes?: number) => readAll(readJson, input, maxBytes);

const b = (s: string | Buffer): Buffer => (typeof s === 'string' ? Buffer.from(s, 'utf8') : s);
const len = (s: string): number => Buffer.byteLength(s, 'utf8');

type Where = { line?: number; item?: number; at: number };
const doc = (text: string | Buffer, w: Where) => ({
  kind: 'document',
  bytes: b(text),
  line: w.line ?? null,
  item: w.item ?? null,
  byteOffset: w.at,
});
const reject = (text: string | Buffer | null, reason: string | RegExp, w: Where) => ({
  kind: 'reject',
  bytes: text === null ? null : b(text),
  reason: typeof reason === 'string' ? reason : expect.stringMatching(reason),
  line: w.line ?? null,
  item: w.item ?? null,
  byteOffset: w.at,
});
const fileError = (at: number, reason: string) => ({ kind: 'file-error', byteOffset: at, reason });

const TOO_LARGE = /^\$: document is larger than the \d+ MiB limit \(--max-document-mb\)$/;
const notJson = (what: 'syntax error' | 'unexpected end of input', at: number) => `$: not valid JSON: ${what} (at byte ${at})`;
const nul = (at: number) => `$: contains \\u0000, which PostgreSQL cannot store (at byte ${at})`;
const surrogate = (at: number) => `$: contains an unpaired UTF-16 surrogate escape (at byte ${at})`;
const badUtf8 = (at: number) => `$: not valid UTF-8 (at byte ${at})`;

/**
 * Lays out a text from pieces; `[text]` marks a document (an array element or NDJSON line content)
 * and records its byte offset: the byte length of everything written before it.
 */
function layout(pieces: Array<string | [string]>): { input: string; docs: Array<{ text: string; at: number }> } {
  let input = '';
  const docs: Array<{ text: string; at: number }> = [];
  for (const p of pieces) {
    if (typeof p === 'string') input += p;
    else {
      docs.push({ text: p[0], at: len(input) });
      input += p[0];
    }
  }
  return { input, docs };
}

describe('readNdjson', () => {
  it('reads one document per line with 1-based lines and byte offsets', async () => {
    // {"id":1} is 8 bytes, so line 2 starts at byte 9.
    expect(await ndjson('{"id":1}\n{"id":2}\n')).toEqual([doc('{"id":1}', { line: 1, at: 0 }), doc('{"id":2}', { line: 2, at: 9 })]);
  });

  it('skips a leading BOM (counted in offsets), CRLF, blank and whitespace-only lines, and trims spaces', async () => {
    // Bytes: BOM 0-2 | line 1 {"n":1} 3-9, \r\n 10-11 | line 2 \r\n 12-13 | line 3 "   \n" 14-17 |
    // line 4 "  " 18-19, {"n":2} 20-26, " \t\r\n" 27-30 | line 5 "\n" 31 | line 6 {"n":3} 32-38 (no newline)
    const input = '\uFEFF{"n":1}\r\n\r\n   \n  {"n":2} \t\r\n\n{"n":3}';
    expect(len(input)).toBe(39);
    expect(await ndjson(input)).toEqual([
      doc('{"n":1}', { line: 1, at: 3 }),
      doc('{"n":2}', { line: 4, at: 20 }),
      doc('{"n":3}', { line: 6, at: 32 }),
    ]);
    // Without the BOM every offset is 3 smaller.
    expect(await ndjson(input.slice(1))).toEqual([
      doc('{"n":1}', { line: 1, at: 0 }),
      doc('{"n":2}', { line: 4, at: 17 }),
      doc('{"n":3}', { line: 6, at: 29 }),
    ]);
  });

  it('reads a last line without a newline, and ignores trailing blank lines', async () => {
    expect(await ndjson('{"a":1}\n{"b":2}')).toEqual([doc('{"a":1}', { line: 1, at: 0 }), doc('{"b":2}', { line: 2, at: 8 })]);
    expect(await ndjson('{"a":1}\r\n\r\n\n   \n')).toEqual([doc('{"a":1}', { line: 1, at: 0 })]);
  });

  it('yields nothing for an empty, blank, whitespace-only or BOM-only input', async () => {
    for (const input of ['', '\n', '\n\n\n', '  \r\n\t\n   ', '\r\n', '\uFEFF', '\uFEFF\n\r\n  ']) {
      expect(await ndjson(input), JSON.stringify(input)).toEqual([]);
    }
  });

  it('skips the BOM only at the very start of the stream', async () => {
    // Line 2 starts at byte 8 with a BOM, which is then not valid JSON at its first byte.
    expect(await ndjson('{"a":1}\n\uFEFF{"b":2}\n')).toEqual([
      doc('{"a":1}', { line: 1, at: 0 }),
      reject('\uFEFF{"b":2}', notJson('syntax error', 8), { line: 2, at: 8 }),
    ]);
  });

  it('treats a BOM that is cut short, or a second BOM, as content', async () => {
    // EF BB is a 3-byte sequence cut short: invalid UTF-8 at byte 0.
    const cut = Buffer.from([0xef, 0xbb]);
    expect(await ndjson(cut)).toEqual([reject(cut, badUtf8(0), { line: 1, at: 0 })]);
    // Only the first of two BOMs is skipped; the second is where the line stops being JSON.
    expect(await ndjson('\uFEFF\uFEFF{}\n')).toEqual([reject('\uFEFF{}', notJson('syntax error', 3), { line: 1, at: 3 })]);
    // A BOM alone on line 1: line 2 starts at byte 4.
    expect(await ndjson('\uFEFF\n{"a":1}')).toEqual([doc('{"a":1}', { line: 2, at: 4 })]);
  });

  it('rejects a malformed line alone, with its position, without quoting it; the next lines load', async () => {
    const l1 = `{"name":"${NAME}","mrn":"A1"}`; // 41 bytes: line 2 starts at 42
    const l2 = `{"name":"${NAME}", oops}`; // 36 bytes, the 'o' at 31: line 3 starts at 79
    const l3 = `{"name":"${NAME}","age":x}`; // 38 bytes, the x at 36: line 4 starts at 118
    const l4 = `{"name":"${NAME}"`; // 29 bytes, ends where a ',' or '}' is expected: line 5 at 148
    const l5 = '{"ok":1}';
    expect([l1, l2, l3, l4].map(len)).toEqual([41, 36, 38, 29]);
    const events = await ndjson([l1, l2, l3, l4, l5].join('\n') + '\n');
    expect(events).toEqual([
      doc(l1, { line: 1, at: 0 }),
      reject(l2, notJson('syntax error', 42 + 31), { line: 2, at: 42 }),
      reject(l3, notJson('syntax error', 79 + 36), { line: 3, at: 79 }),
      reject(l4, notJson('syntax error', 118 + 29), { line: 4, at: 118 }),
      doc(l5, { line: 5, at: 148 }),
    ]);
  });

  it('reports truncated lines as such', async () => {
    // '{"a":' ends the input early; '{"name":"Zeb' is an unterminated string (at its end, byte 12).
    expect(await ndjson('{"a":\n{"name":"Zeb\n')).toEqual([
      reject('{"a":', notJson('unexpected end of input', 5), { line: 1, at: 0 }),
      reject('{"name":"Zeb', notJson('syntax error', 6 + 12), { line: 2, at: 6 }),
    ]);
  });

  it('counts offsets in bytes, not characters, with multi-byte UTF-8 text', async () => {
    const l1 = '{"name":"José Müller","city":"東京"}'; // 9 + 13 + 10 + 6 + 2 = 40 bytes (34 chars)
    const l2 = '{"name":"Zoë", x}'; // the x is char 15 but byte 16; 18 bytes
    const l3 = '{"emoji":"😀","n":1}'; // 10 + 4 + 8 = 22 bytes
    // '{"n":"é' is 8 bytes, then C3 (a lead byte) followed by '(' which is not a continuation byte.
    const l4 = Buffer.concat([b('{"n":"é'), Buffer.from([0xc3, 0x28]), b('"}')]); // 12 bytes
    const l5 = '{"after":"ok"}';
    expect([len(l1), len(l2), len(l3), l4.length]).toEqual([40, 18, 22, 12]);
    const input = Buffer.concat([b(`${l1}\n${l2}\n${l3}\n`), l4, b(`\n${l5}`)]);
    expect(await ndjson(input)).toEqual([
      doc(l1, { line: 1, at: 0 }),
      reject(l2, notJson('syntax error', 41 + 16), { line: 2, at: 41 }),
      doc(l3, { line: 3, at: 60 }),
      reject(l4, badUtf8(83 + 8), { line: 4, at: 83 }),
      doc(l5, { line: 5, at: 96 }),
    ]);
  });

  it('rejects invalid UTF-8 with the position of the first bad byte', async () => {
    // Line 1 is 8 bytes; line 2 starts at 8 and has 0xFF at its byte 8 ('{"n":"ab' is 8 bytes).
    const bad = Buffer.concat([b('{"n":"ab'), Buffer.from([0xff]), b(`","who":"${NAME}"}`)]);
    const input = Buffer.concat([b('{"a":1}\n'), bad, b('\n{"c":3}\n')]);
    expect(await ndjson(input)).toEqual([
      doc('{"a":1}', { line: 1, at: 0 }),
      reject(bad, badUtf8(16), { line: 2, at: 8 }),
      doc('{"c":3}', { line: 3, at: 9 + bad.length }),
    ]);
  });

  it('rejects \\u0000 escapes but not an escaped backslash followed by u0000', async () => {
    const lines = [
      String.raw`{"a":"x\u0000y"}`, // the escape at byte 7 of the line
      String.raw`{"a":"x\\u0000y"}`, // a backslash, then the text u0000: fine
      String.raw`{"a":"x\\\u0000"}`, // a backslash, then a real \u0000 at byte 9
      String.raw`{"a":"\\\\u0000"}`, // two backslashes, then text: fine
      String.raw`{"\u0000":1}`, // in a key, at byte 2
    ];
    const { input, docs } = layout(lines.flatMap((l) => [[l] as [string], '\n']));
    expect(docs.map((d) => d.at)).toEqual([0, 17, 35, 53, 71]);
    expect(await ndjson(input)).toEqual([
      reject(lines[0], nul(0 + 7), { line: 1, at: 0 }),
      doc(lines[1], { line: 2, at: 17 }),
      reject(lines[2], nul(35 + 9), { line: 3, at: 35 }),
      doc(lines[3], { line: 4, at: 53 }),
      reject(lines[4], nul(71 + 2), { line: 5, at: 71 }),
    ]);
  });

  it('rejects lone surrogate escapes, accepts valid pairs', async () => {
    const lines = [
      String.raw`{"a":"\ud83d\ude00"}`, // pair: fine
      String.raw`{"a":"\ud83d"}`, // lone high at byte 6
      String.raw`{"a":"\ude00"}`, // lone low at byte 6
      String.raw`{"a":"\uD83D\uDE00"}`, // pair in upper case: fine
    ];
    const { input, docs } = layout(lines.flatMap((l) => [[l] as [string], '\r\n']));
    expect(docs.map((d) => d.at)).toEqual([0, 22, 38, 54]);
    expect(await ndjson(input)).toEqual([
      doc(lines[0], { line: 1, at: 0 }),
      reject(lines[1], surrogate(22 + 6), { line: 2, at: 22 }),
      reject(lines[2], surrogate(38 + 6), { line: 3, at: 38 }),
      doc(lines[3], { line: 4, at: 54 }),
    ]);
  });

  it('rejects a line over the limit with bytes null and reads the next one', async () => {
    const max = 20;
    const exact = '{"a":"0123456789ab"}'; // 20 bytes: at the limit, fine
    const over = '{"a":"0123456789abc"}'; // 21 bytes
    expect([len(exact), len(over)]).toEqual([20, 21]);
    // Offsets: line 1 at 0, line 2 at 21, line 3 at 43, line 4 (CRLF) at 51, line 5 at 73,
    // line 6 at 81 (a 5000-byte line), line 7 at 5082.
    const big = `{"pad":"${'x'.repeat(4990)}"}`;
    expect(len(big)).toBe(5000);
    const input = `${exact}\n${over}\n{"b":1}\n${exact}\r\n{"c":2}\n${big}\n{"d":3}`;
    expect(await ndjson(input, max)).toEqual([
      doc(exact, { line: 1, at: 0 }),
      reject(null, TOO_LARGE, { line: 2, at: 21 }),
      doc('{"b":1}', { line: 3, at: 43 }),
      doc(exact, { line: 4, at: 51 }), // the \r is not part of the document
      doc('{"c":2}', { line: 5, at: 73 }),
      reject(null, TOO_LARGE, { line: 6, at: 81 }),
      doc('{"d":3}', { line: 7, at: 5082 }),
    ]);
  });

  it('names the default limit in MiB', async () => {
    const over = Buffer.alloc(DEFAULT_MAX_DOCUMENT_BYTES + 1, 0x31); // a 16 MiB + 1 digit number
    const input = Buffer.concat([b('{"a":1}\n'), over, b('\n{"b":2}\n')]);
    for (const chunks of [[input], splitEvery(input, 65536)]) {
      expect(await collect(readNdjson(Readable.from(chunks)))).toEqual([
        doc('{"a":1}', { line: 1, at: 0 }),
        reject(null, '$: document is larger than the 16 MiB limit (--max-document-mb)', { line: 2, at: 8 }),
        doc('{"b":2}', { line: 3, at: 9 + over.length }),
      ]);
    }
  });

  it('reads any sequence of JSON lines under random chunkings (property)', async () => {
    const unit = fc.constantFrom(
      'a',
      'Z',
      ' ',
      '"',
      '\\',
      ']',
      '[',
      '{',
      '}',
      ',',
      ':',
      '\t',
      '\n',
      '\r',
      'é',
      '東',
      '😀',
      '\u2028',
      '\u0001',
    );
    const value = fc.jsonValue({ stringUnit: unit, maxDepth: 3 });
    const lineEnd = fc.constantFrom('\n', '\r\n', ' \n', '\n\n', '\r\n \t\r\n');
    const lead = fc.constantFrom('', ' ', '\t ');
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(lead, value, lineEnd)), fc.boolean(), async (rows, bom) => {
        const pieces: Array<string | [string]> = bom ? ['\uFEFF'] : [];
        const lines: number[] = [];
        let line = 1;
        for (const [sp, v, end] of rows) {
          pieces.push(sp, [JSON.stringify(v)], end);
          lines.push(line);
          line += end.split('\n').length - 1;
        }
        const { input, docs } = layout(pieces);
        expect(await ndjson(input)).toEqual(docs.map((d, i) => doc(d.text, { line: lines[i], at: d.at })));
      }),
      { numRuns: 60, seed: 7 },
    );
  });
});

describe('readJson: a single document', () => {
  it('reads one object, trimming surrounding whitespace, at the offset of its first byte', async () => {
    expect(await json('{"a":1}')).toEqual([doc('{"a":1}', { at: 0 })]);
    // "\n  " is 3 bytes before the object.
    expect(await json('\n  {"a":1}  \r\n')).toEqual([doc('{"a":1}', { at: 3 })]);
    const pretty = JSON.stringify({ name: NAME, visits: [{ id: 'V1', codes: ['a]', 'b}'] }] }, null, 2);
    expect(await json(`${pretty}\n`)).toEqual([doc(pretty, { at: 0 })]);
  });

  it('skips a BOM and counts it: byteOffset 3', async () => {
    expect(await json('\uFEFF{"a":1}\n')).toEqual([doc('{"a":1}', { at: 3 })]);
    expect(await json('\uFEFF  {"a":1}')).toEqual([doc('{"a":1}', { at: 5 })]);
  });

  it('passes a top-level scalar through as a document (its type is checked later)', async () => {
    expect(await json('  42  ')).toEqual([doc('42', { at: 2 })]);
    expect(await json('"x"')).toEqual([doc('"x"', { at: 0 })]);
  });

  it('yields nothing for an empty, whitespace-only or BOM-only file', async () => {
    for (const input of ['', ' ', '\n\n', ' \r\n\t ', '\uFEFF', '\uFEFF \n']) {
      expect(await json(input), JSON.stringify(input)).toEqual([]);
    }
  });

  it('is a file error when followed by garbage, or truncated', async () => {
    // '{"a":1} x': the x is at byte 8.
    expect(await json('{"a":1} x')).toEqual([fileError(0, notJson('syntax error', 8))]);
    // BOM (3) + '{"a":1}' (7) + '\n' (1): the stray '}' is at byte 11; the document starts at 3.
    expect(await json('\uFEFF{"a":1}\n}')).toEqual([fileError(3, notJson('syntax error', 11))]);
    expect(await json('{"a":1}{"b":2}')).toEqual([fileError(0, notJson('syntax error', 7))]);
    // Truncated after a property value: a ',' or '}' was expected at byte 29 (the end).
    expect(await json(`{"name":"${NAME}"`)).toEqual([fileError(0, notJson('syntax error', 29))]);
    expect(await json('  {"a":')).toEqual([fileError(2, notJson('unexpected end of input', 7))]);
    // An unexpected token (Node names no position for it): the x is at byte 9 ("\n" + 8).
    expect(await json(`\n{"who": x, "name":"${NAME}"}`)).toEqual([fileError(1, notJson('syntax error', 9))]);
  });

  it('rejects (not file-errors) a well-formed document that jsonb refuses', async () => {
    const d = String.raw`{"a":"\u0000"}`;
    expect(await json(`\uFEFF${d}\n`)).toEqual([reject(d, nul(3 + 6), { at: 3 })]);
    const s = String.raw`{"a":"\udc00"}`;
    expect(await json(s)).toEqual([reject(s, surrogate(6), { at: 0 })]);
    const u = Buffer.concat([b('{"a":"'), Buffer.from([0xc0, 0x80]), b('"}')]); // overlong NUL at byte 6
    expect(await json(u)).toEqual([reject(u, badUtf8(6), { at: 0 })]);
  });

  it('rejects a document over the limit with bytes null (trailing newline not counted)', async () => {
    expect(await json('{"a":"0123456789abc"}\n', 20)).toEqual([reject(null, TOO_LARGE, { at: 0 })]);
    expect(await json('{"a":"0123456789ab"}\r\n', 20)).toEqual([doc('{"a":"0123456789ab"}', { at: 0 })]);
  });
});

describe('readJson: a top-level array', () => {
  it('yields each element with its 0-based item and byte offset', async () => {
    // [ 0, 1 at 1, ',' 2, "a" 3-5, ',' 6, {"b":[2]} 7-15, ] 16
    expect(await json('[1,"a",{"b":[2]}]')).toEqual([
      doc('1', { item: 0, at: 1 }),
      doc('"a"', { item: 1, at: 3 }),
      doc('{"b":[2]}', { item: 2, at: 7 }),
    ]);
    expect(await json('[ 1 , 2 ]')).toEqual([doc('1', { item: 0, at: 2 }), doc('2', { item: 1, at: 6 })]);
    // [ 0, \r\n 1-2, spaces 3-4, true 5-8, ',' 9, \r\n 10-11, spaces 12-13, null 14-17
    expect(await json('[\r\n  true,\r\n  null\r\n]\r\n')).toEqual([doc('true', { item: 0, at: 5 }), doc('null', { item: 1, at: 14 })]);
    expect(await json('\uFEFF[{"a":1}]')).toEqual([doc('{"a":1}', { item: 0, at: 4 })]);
    // "é" is 4 bytes (1-4), ',' at 5
    expect(await json('["é",{"k":"東"}]')).toEqual([doc('"é"', { item: 0, at: 1 }), doc('{"k":"東"}', { item: 1, at: 6 })]);
  });

  it('yields nothing for an empty array', async () => {
    for (const input of ['[]', '[ ]', '[\n]', '  [ \r\n ]  \n', '\uFEFF[]']) {
      expect(await json(input), JSON.stringify(input)).toEqual([]);
    }
  });

  it('finds element boundaries through strings, escapes, nesting and whitespace, under any chunking', async () => {
    const elements = [
      String.raw`{"s":"a]b}c,d[e{f","q":"say \"hi\"","bs":"C:\\","n":[1,[2,{"x":[]}]],"e":{}}`,
      String.raw`"top \"level]\" string,"`,
      String.raw`"ends with a backslash\\"`,
      String.raw`"\\\"\\"`,
      '123',
      '-4.5e+6',
      'true',
      'false',
      'null',
      '0',
      '[ ]',
      '[]',
      '{}',
      '[[["deep"]],{"a":[{"b":"]]]"}]}]',
      String.raw`"tab\tseparated"`,
      `{"name":"${NAME}","note":"José, 東京 😀 \\u0041"}`,
      '""',
      String.raw`"\\"`,
      String.raw`{"k":"\\\\","l":"\\\""}`,
      String.raw`{"e":"\ud83d\ude00 \u00e9 \\u0000 \\\\ud800"}`,
      '7',
    ];
    for (const e of elements) expect(() => JSON.parse(e), e).not.toThrow();
    const seps = [',', ' , ', ',\n  ', '\r\n,\t', ',\n\n', ' ,', ',', '\t,\t'];
    const pieces: Array<string | [string]> = ['[\n  '];
    elements.forEach((e, i) => {
      if (i > 0) pieces.push(seps[i % seps.length]);
      pieces.push([e]);
    });
    pieces.push(']\n'); // the last element, 7, is directly followed by ']'
    const { input, docs } = layout(pieces);
    expect(docs[0].at).toBe(4); // '[\n  ' is 4 bytes
    expect(await json(input)).toEqual(docs.map((d, i) => doc(d.text, { item: i, at: d.at })));
  });

  it('reads any array of JSON values under random chunkings (property)', async () => {
    const unit = fc.constantFrom('a', 'Z', ' ', '"', '\\', ']', '[', '{', '}', ',', ':', '\t', '\n', 'é', '東', '😀', '\u2028', '\u0001');
    const value = fc.jsonValue({ stringUnit: unit, maxDepth: 3 });
    const ws = fc.constantFrom('', ' ', '\n', '\r\n', '\t ', '  \n  ');
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(ws, value, ws)), ws, fc.boolean(), async (items, tail, bom) => {
        const pieces: Array<string | [string]> = [bom ? '\uFEFF[' : '['];
        items.forEach(([before, v, after], i) => {
          if (i > 0) pieces.push(',');
          pieces.push(before, [JSON.stringify(v)], after);
        });
        pieces.push(tail, ']', tail);
        const { input, docs } = layout(pieces);
        expect(await json(input)).toEqual(docs.map((d, i) => doc(d.text, { item: i, at: d.at })));
      }),
      { numRuns: 60, seed: 11 },
    );
  });

  it('rejects elements jsonb refuses or that are not UTF-8, one by one, and reads the rest', async () => {
    // [ 0 | {"a":"\u0000"} 1-14 (the escape at 7) | , 15 | {"b":"\ud800"} 16-29 (escape at 22) |
    // , 30 | "<FF>" 31-33 (FF at 32) | , 34 | {"ok":true} 35-45 | ] 46
    const e0 = String.raw`{"a":"\u0000"}`;
    const e1 = String.raw`{"b":"\ud800"}`;
    const e2 = Buffer.from([0x22, 0xff, 0x22]);
    const input = Buffer.concat([b(`[${e0},${e1},`), e2, b(',{"ok":true}]')]);
    expect(input.length).toBe(47);
    expect(await json(input)).toEqual([
      reject(e0, nul(7), { item: 0, at: 1 }),
      reject(e1, surrogate(22), { item: 1, at: 16 }),
      reject(e2, badUtf8(32), { item: 2, at: 31 }),
      doc('{"ok":true}', { item: 3, at: 35 }),
    ]);
  });

  it('rejects an element over the limit with bytes null and reads the next one', async () => {
    // [ 0 | 21-byte object 1-21 | , 22 | 20-byte object 23-42 | , 43 | 21-byte string 44-64 | , 65 |
    // 21-digit number 66-86 | , 87 | 20-digit number 88-107 | ] 108
    const input = '[{"a":"0123456789abc"},{"a":"0123456789ab"},"0123456789012345678",123456789012345678901,12345678901234567890]';
    expect(len(input)).toBe(109);
    expect(await json(input, 20)).toEqual([
      reject(null, TOO_LARGE, { item: 0, at: 1 }),
      doc('{"a":"0123456789ab"}', { item: 1, at: 23 }),
      reject(null, TOO_LARGE, { item: 2, at: 44 }),
      reject(null, TOO_LARGE, { item: 3, at: 66 }),
      doc('12345678901234567890', { item: 4, at: 88 }),
    ]);
  });

  it('is a file error when truncated', async () => {
    const eof = (at: number) => fileError(at, `$: not valid JSON: unexpected end of input inside the top-level array (at byte ${at})`);
    expect(await json('[')).toEqual([eof(1)]);
    expect(await json('  [\n ')).toEqual([eof(5)]);
    expect(await json('[1')).toEqual([eof(2)]);
    expect(await json('["abc')).toEqual([eof(5)]);
    expect(await json('[{"a":"]"')).toEqual([eof(9)]);
    expect(await json('[1,')).toEqual([doc('1', { item: 0, at: 1 }), eof(3)]);
    // '[{"a":1},{"b":' is 1 + 7 + 1 + 5 = 14 bytes
    expect(await json('[{"a":1},{"b":')).toEqual([doc('{"a":1}', { item: 0, at: 1 }), eof(14)]);
    expect(await json(`\uFEFF[{"a":1}\n`)).toEqual([doc('{"a":1}', { item: 0, at: 4 }), eof(12)]);
  });

  it('is a file error when there is data after the array', async () => {
    const after = (at: number) => fileError(at, `$: not valid JSON: unexpected data after the top-level array (at byte ${at})`);
    expect(await json('[1] x')).toEqual([doc('1', { item: 0, at: 1 }), after(4)]);
    expect(await json('[1]]')).toEqual([doc('1', { item: 0, at: 1 }), after(3)]);
    expect(await json('[1][2]')).toEqual([doc('1', { item: 0, at: 1 }), after(3)]);
    expect(await json('[]{}')).toEqual([after(2)]);
    expect(await json('[ ]\n\n,')).toEqual([after(5)]);
  });

  it('is a file error when a separator or a value is missing', async () => {
    const sep = (item: number, at: number) =>
      fileError(at, `$: not valid JSON: expected ',' or ']' after array item ${item} (at byte ${at})`);
    const value = (item: number, at: number) => fileError(at, `$: not valid JSON: expected a value for array item ${item} (at byte ${at})`);
    expect(await json('[1 2]')).toEqual([doc('1', { item: 0, at: 1 }), sep(0, 3)]);
    expect(await json('[{"a":1}{"b":2}]')).toEqual([doc('{"a":1}', { item: 0, at: 1 }), sep(0, 8)]);
    expect(await json('["a" "b"]')).toEqual([doc('"a"', { item: 0, at: 1 }), sep(0, 5)]);
    expect(await json('[,1]')).toEqual([value(0, 1)]);
    expect(await json('[1,]')).toEqual([doc('1', { item: 0, at: 1 }), value(1, 3)]);
    expect(await json('[1, ]')).toEqual([doc('1', { item: 0, at: 1 }), value(1, 4)]);
    expect(await json('[1,,2]')).toEqual([doc('1', { item: 0, at: 1 }), value(1, 3)]);
  });

  it('is a file error when an element is malformed JSON, at the element, without quoting it', async () => {
    const bad = (item: number, at: number, what: 'syntax error' | 'unexpected end of input', errAt: number) =>
      fileError(at, `$[${item}]: not valid JSON: ${what} (at byte ${errAt})`);
    // '[{"a":1},' is 9 bytes; the element's trailing comma is followed by '}' at its byte 30.
    expect(await json(`[{"a":1},{"name":"${NAME}",},{"c":3}]`)).toEqual([
      doc('{"a":1}', { item: 0, at: 1 }),
      bad(1, 9, 'syntax error', 39),
    ]);
    expect(await json('[tru]')).toEqual([bad(0, 1, 'unexpected end of input', 4)]);
    expect(await json('[1x]')).toEqual([bad(0, 1, 'syntax error', 2)]);
    expect(await json('[01]')).toEqual([bad(0, 1, 'syntax error', 2)]);
    expect(await json('[{"a":[1}]]')).toEqual([bad(0, 1, 'syntax error', 8)]); // the '}' at 8
    expect(await json('[{"a": x}]')).toEqual([bad(0, 1, 'syntax error', 7)]); // the x at 7
    expect(await json('[1,[2,]]')).toEqual([doc('1', { item: 0, at: 1 }), bad(1, 3, 'syntax error', 6)]);
    expect(await json('["a\nb"]')).toEqual([bad(0, 1, 'syntax error', 3)]); // raw newline in a string
    expect(await json(String.raw`["\x"]`)).toEqual([bad(0, 1, 'syntax error', 3)]);
  });

  it('stops reading at the first file error', async () => {
    let pulled = 0;
    function* source(): Generator<Buffer> {
      yield b('[{"a": x},');
      for (let k = 0; k < 10_000; k++) {
        pulled++;
        yield b('{"b":1},');
      }
      yield b('{"b":1}]');
    }
    const events = await collect(readJson(Readable.from(source())));
    expect(events).toEqual([fileError(1, '$[0]: not valid JSON: syntax error (at byte 7)')]);
    expect(pulled).toBeLessThan(100); // at most what the stream buffered ahead
  });
});

describe('the fixtures (read as byte streams of 1, 7 and 64 KiB chunks)', () => {
  const fixture = (name: string) => new URL(`../fixtures/${name}`, import.meta.url);
  async function read(reader: Reader, name: string): Promise<ReadEvent[]> {
    const whole = await readAll(reader, readFileSync(fixture(name)));
    for (const highWaterMark of [1, 7, 65536]) {
      expect(await collect(reader(createReadStream(fixture(name), { highWaterMark }))), `highWaterMark ${highWaterMark}`).toEqual(whole);
    }
    return whole;
  }

  it('valid/patients.ndjson: 8 documents, lines 1-8, at each line start', async () => {
    const bytes = readFileSync(fixture('valid/patients.ndjson'));
    const starts = [0];
    for (let i = bytes.indexOf(10); i >= 0 && i + 1 < bytes.length; i = bytes.indexOf(10, i + 1)) starts.push(i + 1);
    expect(starts).toHaveLength(8);
    const events = await read(readNdjson, 'valid/patients.ndjson');
    expect(events.map((e) => e.kind === 'document' && [e.line, e.item, e.byteOffset])).toEqual(starts.map((at, i) => [i + 1, null, at]));
  });

  it('valid/array.json: items 0-2; valid/with-bom.json: one object at byte 3', async () => {
    const events = await read(readJson, 'valid/array.json');
    expect(events.map((e) => e.kind === 'document' && [e.line, e.item])).toEqual([
      [null, 0],
      [null, 1],
      [null, 2],
    ]);
    expect(events[0].byteOffset).toBe(4); // after '[\n  '
    const bom = await read(readJson, 'valid/with-bom.json');
    expect(bom).toHaveLength(1);
    expect(bom[0]).toMatchObject({ kind: 'document', line: null, item: null, byteOffset: 3 });
  });

  it('invalid/malformed.json: M-1 at byte 4, then a file error at its end (byte 183)', async () => {
    const events = await read(readJson, 'invalid/malformed.json');
    expect(events).toEqual([
      expect.objectContaining({ kind: 'document', item: 0, byteOffset: 4 }),
      fileError(183, '$: not valid JSON: unexpected end of input inside the top-level array (at byte 183)'),
    ]);
  });
});

describe('checkDocument', () => {
  const check = (text: string | Buffer, base = 0) => checkDocument(b(text), base);

  it('accepts good documents', () => {
    for (const t of ['{}', '[]', '0', '"x"', '{"a":[1,{"b":null}]}', String.raw`{"a":"\u00e9\ud83d\ude00\n"}`, '{"é":"東京"}']) {
      expect(check(t), t).toBeNull();
    }
  });

  it('adds the base offset to every position', () => {
    expect(check('{"a": x}', 100)).toBe(notJson('syntax error', 106));
    expect(check('{"a":', 100)).toBe(notJson('unexpected end of input', 105));
    expect(check(String.raw`{"a":"\u0000"}`, 100)).toBe(nul(106));
    expect(check(String.raw`{"a":"\udfff"}`, 100)).toBe(surrogate(106));
    expect(check(Buffer.from([0x22, 0xff, 0x22]), 100)).toBe(badUtf8(101));
  });

  it('locates syntax errors in bytes, including tokens Node names no position for', () => {
    expect(check('[1,]')).toBe(notJson('syntax error', 3));
    expect(check('[1,,2]')).toBe(notJson('syntax error', 3));
    expect(check('trux')).toBe(notJson('syntax error', 3));
    expect(check('\uFEFF{}')).toBe(notJson('syntax error', 0));
    // '{"é": ' is 6 chars but 7 bytes
    expect(check('{"é": x}')).toBe(notJson('syntax error', 7));
    expect(check('{"é": nope}')).toBe(notJson('syntax error', 8)); // 'no' cannot begin null past the n
    expect(check(`{"n":"${NAME}" "x":1}`)).toBe(notJson('syntax error', 27));
    expect(check('{"a":"b"')).toBe(notJson('syntax error', 8));
    expect(check('nul')).toBe(notJson('unexpected end of input', 3));
  });

  it('locates invalid UTF-8 at the first bad byte', () => {
    const at = (...bytes: Array<number | string>) =>
      checkDocument(Buffer.concat(bytes.map((x) => (typeof x === 'string' ? b(x) : Buffer.from([x])))), 0);
    expect(at('"ab', 0xff, '"')).toBe(badUtf8(3));
    expect(at('"ab', 0x80, '"')).toBe(badUtf8(3)); // a lone continuation byte
    expect(at('"', 0xc0, 0xaf, '"')).toBe(badUtf8(1)); // overlong 2-byte
    expect(at('"é', 0xc3, '"')).toBe(badUtf8(3)); // lead byte then '"'
    expect(at('"ab', 0xed, 0xa0, 0x80, '"')).toBe(badUtf8(3)); // an encoded surrogate (U+D800)
    expect(at('"ab', 0xe0, 0x80, 0xaf, '"')).toBe(badUtf8(3)); // overlong 3-byte
    expect(at('"ab', 0xf0, 0x80, 0x80, 0xaf, '"')).toBe(badUtf8(3)); // overlong 4-byte
    expect(at('"ab', 0xf4, 0x90, 0x80, 0x80, '"')).toBe(badUtf8(3)); // above U+10FFFF
    expect(at('"', 0xf0, 0x9f, 0x98, '"')).toBe(badUtf8(1)); // truncated 4-byte sequence
    expect(at('"ab', 0xf0, 0x9f, 0x98)).toBe(badUtf8(3)); // truncated at the end
    // A real U+FFFD (EF BF BD) is valid; the bad byte comes after it.
    expect(at('"', 0xef, 0xbf, 0xbd, 0xff, '"')).toBe(badUtf8(4));
    expect(at('"😀', 0xfe, '"')).toBe(badUtf8(5));
  });

  it('finds \\u0000 only where the backslash is not itself escaped', () => {
    expect(check(String.raw`{"a":"x\u0000y"}`)).toBe(nul(7));
    expect(check(String.raw`{"a":"x\\u0000y"}`)).toBeNull();
    expect(check(String.raw`{"a":"x\\\u0000y"}`)).toBe(nul(9));
    expect(check(String.raw`{"a":"x\\\\u0000y"}`)).toBeNull();
    expect(check(String.raw`{"a":"x\\\\\u0000y"}`)).toBe(nul(11));
    expect(check(String.raw`{"név":"é\u0000"}`)).toBe(nul(11)); // '{"név":"é' is 11 bytes
    expect(check(String.raw`{"a":"\u00000"}`)).toBe(nul(6));
    expect(check(String.raw`{"a":"\u0001\u0100"}`)).toBeNull();
  });

  it('finds unpaired surrogate escapes', () => {
    expect(check(String.raw`{"a":"\ud83d\ude00"}`)).toBeNull();
    expect(check(String.raw`{"a":"\udbff\udfff\ud800\udc00"}`)).toBeNull();
    expect(check(String.raw`{"a":"\ud7ff\ue000"}`)).toBeNull(); // just outside the surrogate range
    expect(check(String.raw`{"a":"\\ud83d"}`)).toBeNull(); // an escaped backslash, then text
    expect(check(String.raw`{"a":"\ud83d"}`)).toBe(surrogate(6));
    expect(check(String.raw`{"a":"\ude00"}`)).toBe(surrogate(6));
    expect(check(String.raw`{"a":"x\ud83dy"}`)).toBe(surrogate(7));
    expect(check(String.raw`{"a":"\ude00\ud83d"}`)).toBe(surrogate(6)); // reversed pair
    expect(check(String.raw`{"a":"\ud83d\ud83d\ude00"}`)).toBe(surrogate(6)); // high, high, low
    expect(check(String.raw`{"a":"\ud83d\ude00\ude00"}`)).toBe(surrogate(18)); // pair, then a lone low
    expect(check(String.raw`{"a":"\udc00\udc00"}`)).toBe(surrogate(6)); // low, low
    expect(check(String.raw`{"a":"\ud83d\\ude00"}`)).toBe(surrogate(6)); // high, then an escaped backslash
    expect(check(String.raw`{"a":"\\\ud83d"}`)).toBe(surrogate(8)); // escaped backslash, then a lone high
    expect(check(String.raw`{"a":"é\udc00"}`)).toBe(surrogate(8)); // '{"a":"é' is 8 bytes
    expect(check(String.raw`{"\ud800":1}`)).toBe(surrogate(2));
  });
});

describe('memory', () => {
  it('streams a large generated NDJSON without holding it', async () => {
    const TARGET = 200 * 1024 * 1024;
    const pad = 'x'.repeat(120);
    let produced = 0; // bytes generated so far
    let lines = 0;
    let lastLineAt = 0;
    function* generate(): Generator<Buffer> {
      let n = 0;
      while (produced < TARGET) {
        let text = '';
        for (let k = 0; k < 2000; k++, n++) {
          // Byte offset of this line: what was generated before plus what is pending in `text`.
          lastLineAt = produced + text.length; // ASCII only, so chars = bytes
          text += `{"patient_id":"P-${n}","name":"Test Person ${n}","pad":"${pad}","n":${n}}\n`;
          lines++;
        }
        const buf = Buffer.from(text, 'latin1');
        produced += buf.length;
        // Split at an odd point so that a line straddles the two chunks.
        const cut = Math.floor(buf.length / 2) + 17;
        yield buf.subarray(0, cut);
        yield buf.subarray(cut);
      }
    }
    const base = process.memoryUsage();
    let peak = 0;
    let count = 0;
    let last: ReadEvent | undefined;
    const started = Date.now();
    for await (const ev of readNdjson(Readable.from(generate()))) {
      if (ev.kind !== 'document') throw new Error(`unexpected ${ev.kind}`);
      count++;
      last = ev;
      if ((count & 0xffff) === 0) {
        const m = process.memoryUsage();
        peak = Math.max(peak, m.heapUsed + m.arrayBuffers - base.heapUsed - base.arrayBuffers);
      }
    }
    const seconds = (Date.now() - started) / 1000;
    expect(produced).toBeGreaterThanOrEqual(TARGET);
    expect(count).toBe(lines);
    expect(last!.kind === 'document' && last!.line).toBe(lines);
    expect(last!.byteOffset).toBe(lastLineAt);
    // Holding the input would take at least 200 MB; a streaming reader stays far below.
    expect(peak).toBeLessThan(128 * 1024 * 1024);
    console.log(
      `memory test: ${count} documents, ${(produced / 1048576).toFixed(0)} MiB in ${seconds.toFixed(1)} s, peak +${(peak / 1048576).toFixed(0)} MiB`,
    );
  }, 60_000);
});
