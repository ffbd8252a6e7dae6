// Splits an input stream into documents without holding more than one document in memory.
// NDJSON: one document per line. JSON: one document, or the elements of a top-level array,
// found by a byte scanner (strings, escapes, nesting) so each element's raw bytes and byte
// offset are kept for hashing, COPY and error positions.
import { isUtf8 } from 'node:buffer';
import type { Readable } from 'node:stream';

export type DocumentFormat = 'ndjson' | 'json';

export type Position = {
  line: number | null; // 1-based, NDJSON
  item: number | null; // 0-based, element of a JSON array
  byteOffset: number; // first byte of the document in the (decompressed) stream
};

/** A document whose bytes are valid UTF-8 JSON that PostgreSQL's jsonb will accept. */
export type GoodDocument = Position & { kind: 'document'; bytes: Buffer };
/** A document refused before staging; reason never quotes the document's content. */
export type BadDocument = Position & { kind: 'reject'; bytes: Buffer | null; reason: string };
/** The whole file is malformed (JSON files): nothing from it may be staged. */
export type BadFile = { kind: 'file-error'; byteOffset: number; reason: string };
export type ReadEvent = GoodDocument | BadDocument | BadFile;

export const DEFAULT_MAX_DOCUMENT_BYTES = 16 * 1024 * 1024;

const BOM = Buffer.from([0xef, 0xbb, 0xbf]);

// Room beyond the limit for a trailing \r\n (or a little whitespace) around a document of exactly
// the limit: parts are collected up to maxBytes + SLACK, and the trimmed document is held to maxBytes.
const SLACK = 2;

/**
 * The stream's chunks without a leading UTF-8 BOM, also when the BOM is split across chunks or comes
 * after empty chunks. `bom.skipped` (0 or 3) is set before the first chunk is yielded.
 */
async function* withoutBom(input: Readable, bom: { skipped: number }): AsyncGenerator<Buffer> {
  let head: Buffer | null = Buffer.alloc(0); // the start while it may still be a BOM; null once decided
  for await (const raw of input as AsyncIterable<Buffer>) {
    if (head === null) {
      yield raw;
      continue;
    }
    head = head.length === 0 ? raw : Buffer.concat([head, raw]);
    if (head.length < BOM.length && head.equals(BOM.subarray(0, head.length))) continue;
    const chunk: Buffer = head.subarray(0, BOM.length).equals(BOM) ? head.subarray(BOM.length) : head;
    bom.skipped = head.length - chunk.length;
    head = null;
    yield chunk;
  }
  if (head !== null && head.length > 0) yield head; // the whole input is a strict prefix of a BOM
}

/** Collects the byte parts of one document across stream chunks; refuses to grow past a limit. */
class Parts {
  private parts: Buffer[] = [];
  size = 0;
  overflow = false;
  constructor(private readonly max: number) {}
  push(b: Buffer): void {
    if (b.length === 0 || this.overflow) return;
    if (this.size + b.length > this.max) {
      this.overflow = true;
      this.parts = [];
      return;
    }
    this.parts.push(b);
    this.size += b.length;
  }
  take(): Buffer {
    const out = this.parts.length === 1 ? this.parts[0] : Buffer.concat(this.parts, this.size);
    this.parts = [];
    this.size = 0;
    this.overflow = false;
    return out;
  }
  reset(): void {
    this.parts = [];
    this.size = 0;
    this.overflow = false;
  }
}

function isSpace(c: number): boolean {
  return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
}

function tooLarge(max: number): string {
  return `$: document is larger than the ${Math.round(max / 1024 / 1024)} MiB limit (--max-document-mb)`;
}

/** Byte index of the first invalid UTF-8 sequence (only called once isUtf8 said there is one). */
function firstInvalidUtf8(b: Buffer): number {
  let i = 0;
  while (i < b.length) {
    const c = b[i];
    const n = c < 0x80 ? 1 : c >= 0xc2 && c < 0xe0 ? 2 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xf0 && c < 0xf5 ? 4 : 0;
    if (n === 0 || i + n > b.length) return i;
    for (let k = 1; k < n; k++) if ((b[i + k] & 0xc0) !== 0x80) return i;
    // The second byte has a narrower range after E0 (overlong), ED (surrogates), F0 (overlong), F4 (> U+10FFFF).
    const c1 = b[i + 1];
    if ((c === 0xe0 && c1 < 0xa0) || (c === 0xed && c1 > 0x9f) || (c === 0xf0 && c1 < 0x90) || (c === 0xf4 && c1 > 0x8f)) return i;
    i += n;
  }
  return b.length;
}

// A \u escape preceded by an even number of backslashes is a real escape, not an escaped backslash.
const NUL_ESCAPE = /(?<!\\)(?:\\\\)*\\u0000/;
const SURROGATE_ESCAPE = /(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})?/g;
const LOW_SURROGATE = /(?<!\\)(?:\\\\)*\\u[dD][c-fC-F][0-9a-fA-F]{2}/g;

/**
 * Index (UTF-16 units) of the first character at which `text` stops being JSON: for the errors
 * V8 gives no position for ("Unexpected token ..."). text.length if the text ends too early.
 */
function syntaxErrorIndex(text: string): number {
  let i = 0;
  const fail = (): never => {
    throw i;
  };
  const ws = () => {
    while (i < text.length && (text[i] === ' ' || text[i] === '\t' || text[i] === '\n' || text[i] === '\r')) i++;
  };
  const char = (c: string) => {
    if (text[i] !== c) fail();
    i++;
  };
  const digits = () => {
    const from = i;
    while (text[i] >= '0' && text[i] <= '9') i++;
    if (i === from) fail();
  };
  const string = () => {
    i++; // the opening quote
    for (;;) {
      if (i >= text.length || text.charCodeAt(i) < 0x20) fail();
      if (text[i] === '"') {
        i++;
        return;
      }
      if (text[i] === '\\') {
        i++;
        if (text[i] === 'u') {
          for (let k = 0; k < 4; k++) if (!/[0-9a-fA-F]/.test(text[++i] ?? '')) fail();
        } else if (!'"\\/bfnrt'.includes(text[i] ?? 'x')) fail();
      }
      i++;
    }
  };
  const value = (): void => {
    ws();
    const c = text[i];
    if (c === '{' || c === '[') {
      const close = c === '{' ? '}' : ']';
      i++;
      ws();
      if (text[i] === close) {
        i++;
        return;
      }
      for (;;) {
        if (c === '{') {
          ws();
          if (text[i] !== '"') fail();
          string();
          ws();
          char(':');
        }
        value();
        ws();
        if (text[i] !== ',') return char(close);
        i++;
      }
    }
    if (c === '"') return string();
    if (c === '-' || (c >= '0' && c <= '9')) {
      if (c === '-') i++;
      if (text[i] === '0') i++;
      else digits();
      if (text[i] === '.') {
        i++;
        digits();
      }
      if (text[i] === 'e' || text[i] === 'E') {
        i++;
        if (text[i] === '+' || text[i] === '-') i++;
        digits();
      }
      return;
    }
    for (const word of ['true', 'false', 'null']) {
      if (c === word[0]) {
        for (const w of word) char(w);
        return;
      }
    }
    fail();
  };
  try {
    value();
    ws();
    if (i < text.length) fail();
  } catch (at) {
    if (typeof at === 'number') return at;
  }
  return text.length; // not expected: JSON.parse refused it
}

/**
 * Checks one document's bytes: UTF-8, JSON syntax, and what jsonb refuses (\u0000, lone surrogates).
 * Returns null when good, else a reason naming the byte position (relative to the document start
 * plus `base`) but never quoting the content.
 */
export function checkDocument(bytes: Buffer, base: number): string | null {
  if (!isUtf8(bytes)) {
    return `$: not valid UTF-8 (at byte ${base + firstInvalidUtf8(bytes)})`;
  }
  const text = bytes.toString('utf8');
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    const message = (err as Error).message;
    const m = /position (\d+)/.exec(message);
    // V8 names no position for "Unexpected end of JSON input" nor for "Unexpected token 'x', ..."
    const end = !m && message.includes('end of JSON input');
    const chars = m ? Number(m[1]) : end ? text.length : syntaxErrorIndex(text);
    const at = base + Buffer.byteLength(text.slice(0, chars));
    const what = end ? 'unexpected end of input' : 'syntax error';
    return `$: not valid JSON: ${what} (at byte ${at})`;
  }
  if (text.includes('\\u')) {
    const nul = NUL_ESCAPE.exec(text);
    if (nul) {
      // The match starts with any escaped backslashes before the escape; point at the escape itself.
      const at = base + Buffer.byteLength(text.slice(0, nul.index + nul[0].length - 6));
      return `$: contains \\u0000, which PostgreSQL cannot store (at byte ${at})`;
    }
    const paired = new Set<number>();
    for (const s of text.matchAll(SURROGATE_ESCAPE)) {
      if (!s[2]) {
        return `$: contains an unpaired UTF-16 surrogate escape (at byte ${base + Buffer.byteLength(text.slice(0, s.index! + s[0].length - 6))})`;
      }
      paired.add(s.index! + s[0].length - s[2].length);
    }
    for (const s of text.matchAll(LOW_SURROGATE)) {
      const escAt = s.index! + s[0].length - 6;
      if (!paired.has(escAt)) {
        return `$: contains an unpaired UTF-16 surrogate escape (at byte ${base + Buffer.byteLength(text.slice(0, escAt))})`;
      }
    }
  }
  // Duplicate keys (JSON.parse and jsonb silently keep the last one: the document is ambiguous) and
  // numbers beyond a double (JSON.parse gives Infinity, jsonb's numeric would keep 1e400 exactly).
  // One walk of the parsed value counts its keys and finds non-finite numbers; a scan of the text
  // counts an upper bound of the raw keys. Equal counts prove there is no duplicate; only a
  // document where they differ is scanned exactly. About 5 us per 3.7 KB document (JSON.parse
  // itself is about 15 us).
  const parsedKeys = keysAndFiniteness(parsed);
  if (parsedKeys < 0 || keyUpperBound(text) !== parsedKeys) {
    const found = locateAmbiguity(text, parsedKeys < 0);
    if (found) {
      const at = base + Buffer.byteLength(text.slice(0, found.index));
      const field = found.path.length <= 200 ? found.path : '$'; // a deep path is no help in a reason
      return found.kind === 'duplicate'
        ? `${field}: duplicate key, the document is ambiguous (at byte ${at})`
        : `${field}: number too large for a double (at byte ${at})`;
    }
    if (parsedKeys < 0) return '$: number too large for a double'; // not expected: the scan found none
  }
  return null;
}

/** Number of object keys in a parsed JSON value, or -1 when it holds a non-finite number. Iterative (deep documents). */
function keysAndFiniteness(v: unknown): number {
  if (typeof v !== 'object' || v === null) return typeof v === 'number' && v - v !== 0 ? -1 : 0;
  let keys = 0;
  const stack: object[] = [v];
  while (stack.length > 0) {
    const x = stack.pop() as Record<string, unknown> | unknown[];
    const values = Array.isArray(x) ? x : Object.values(x);
    if (!Array.isArray(x)) keys += values.length;
    for (let i = 0; i < values.length; i++) {
      const e = values[i];
      if (typeof e === 'object') {
        if (e !== null) stack.push(e);
      } else if (typeof e === 'number' && e - e !== 0) return -1; // Infinity - Infinity is NaN
    }
  }
  return keys;
}

/**
 * Colons preceded (after whitespace) by an unescaped quote. Every key's colon is one of them; a
 * colon inside a string can be too (a string starting with ":"), so this is an upper bound of the
 * number of keys in the text: equal to the parsed key count means no key was dropped.
 */
function keyUpperBound(text: string): number {
  let n = 0;
  for (let i = text.indexOf(':'); i >= 0; i = text.indexOf(':', i + 1)) {
    let b = i - 1;
    let c = text.charCodeAt(b);
    while (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) c = text.charCodeAt(--b);
    if (c !== 0x22) continue;
    let e = b - 1;
    while (text.charCodeAt(e) === 0x5c) e--;
    if ((b - 1 - e) % 2 === 0) n++;
  }
  return n;
}

const PLAIN_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * The slow, exact pass for the rare document flagged above: the first duplicate key or (when
 * `numbers`) the first number that is not a finite double, with its path in the style of the
 * transform's reasons (visits[0].visit_date) and its index in `text`. Keys that are not plain
 * identifiers make the path '$' (a reason must not quote arbitrary document text). Iterative.
 */
function locateAmbiguity(text: string, numbers: boolean): { kind: 'duplicate' | 'number'; path: string; index: number } | null {
  type Frame = { keys: Set<string> | null; index: number; path: string | null };
  const stack: Frame[] = [];
  let key: string | null = null; // the key whose value comes next, in the innermost object
  const pathOf = (f: Frame | undefined, k: string | number | null): string | null => {
    if (!f) return '$';
    if (f.path === null) return null;
    if (typeof k === 'number') return `${f.path}[${k}]`;
    if (k === null || !PLAIN_KEY.test(k)) return null;
    return f.path === '$' ? k : `${f.path}.${k}`;
  };
  const valuePath = (): string | null => {
    const top = stack[stack.length - 1];
    return top ? pathOf(top, top.keys ? key : top.index) : '$';
  };
  let i = 0;
  while (i < text.length) {
    const c = text.charCodeAt(i);
    if (c === 0x22) {
      let j = i + 1;
      for (;;) {
        const d = text.charCodeAt(j);
        if (d === 0x5c) j += 2;
        else if (d === 0x22) break;
        else j++;
      }
      const top = stack[stack.length - 1];
      let k = j + 1;
      while (k < text.length && isSpaceCode(text.charCodeAt(k))) k++;
      if (top?.keys && text.charCodeAt(k) === 0x3a) {
        const name = JSON.parse(text.slice(i, j + 1)) as string;
        if (top.keys.has(name)) return { kind: 'duplicate', path: pathOf(top, name) ?? '$', index: i };
        top.keys.add(name);
        key = name;
      }
      i = j + 1;
      continue;
    }
    if (c === 0x7b || c === 0x5b) {
      stack.push({ keys: c === 0x7b ? new Set() : null, index: 0, path: valuePath() });
      key = null;
    } else if (c === 0x7d || c === 0x5d) {
      stack.pop();
    } else if (c === 0x2c) {
      const top = stack[stack.length - 1];
      if (top && !top.keys) top.index++;
    } else if (numbers && (c === 0x2d || (c >= 0x30 && c <= 0x39))) {
      let j = i + 1;
      while (j < text.length && /[0-9eE.+-]/.test(text[j])) j++;
      if (!Number.isFinite(Number(text.slice(i, j)))) return { kind: 'number', path: valuePath() ?? '$', index: i };
      i = j;
      continue;
    }
    i++;
  }
  return null;
}

function isSpaceCode(c: number): boolean {
  return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
}

function event(bytes: Buffer, pos: Position): GoodDocument | BadDocument {
  const reason = checkDocument(bytes, pos.byteOffset);
  return reason ? { kind: 'reject', bytes, reason, ...pos } : { kind: 'document', bytes, ...pos };
}

/** One document per line; blank lines are not documents. A bad line rejects that line only. */
export async function* readNdjson(input: Readable, maxBytes = DEFAULT_MAX_DOCUMENT_BYTES): AsyncGenerator<ReadEvent> {
  const parts = new Parts(maxBytes + SLACK);
  let line = 1;
  let lineStart = 0; // byte offset of the current line
  let offset = 0; // byte offset of the current chunk
  let first = true;
  const bom = { skipped: 0 };
  for await (const chunk of withoutBom(input, bom)) {
    if (first) {
      first = false;
      offset = lineStart = bom.skipped;
    }
    let from = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, from);
      if (nl < 0) {
        parts.push(chunk.subarray(from));
        break;
      }
      parts.push(chunk.subarray(from, nl));
      const ev = finishLine(parts, line, lineStart, maxBytes);
      if (ev) yield ev;
      line++;
      from = nl + 1;
      lineStart = offset + from;
    }
    offset += chunk.length;
  }
  const ev = finishLine(parts, line, lineStart, maxBytes);
  if (ev) yield ev;
}

function finishLine(parts: Parts, line: number, byteOffset: number, maxBytes: number): ReadEvent | null {
  const pos = { line, item: null, byteOffset };
  if (parts.overflow) {
    parts.reset();
    return { kind: 'reject', bytes: null, reason: tooLarge(maxBytes), ...pos };
  }
  let b = parts.take();
  let end = b.length;
  while (end > 0 && isSpace(b[end - 1])) end--;
  let start = 0;
  while (start < end && isSpace(b[start])) start++;
  if (start === end) return null;
  if (end - start > maxBytes) return { kind: 'reject', bytes: null, reason: tooLarge(maxBytes), ...pos, byteOffset: byteOffset + start };
  b = b.subarray(start, end);
  return event(b, { ...pos, byteOffset: byteOffset + start });
}

/**
 * A .json file: a single document, or an array whose elements are documents. Any syntax error
 * makes the whole file bad (a file-error event; the caller discards what it staged from it).
 */
export async function* readJson(input: Readable, maxBytes = DEFAULT_MAX_DOCUMENT_BYTES): AsyncGenerator<ReadEvent> {
  const parts = new Parts(maxBytes + SLACK);
  // Scanner state.
  type Mode = 'start' | 'single' | 'array-value' | 'array-after' | 'end';
  let mode = 'start' as Mode;
  let depth = 0; // nesting inside the current element
  let inString = false;
  let escaped = false;
  let scalar = false; // current element is a bare number/literal
  let elemStart = -1; // byte offset where the current element began, -1 when between elements
  let item = 0;
  let offset = 0;
  let singleStart = 0;
  let first = true;
  const bom = { skipped: 0 };

  for await (const chunk of withoutBom(input, bom)) {
    if (first) {
      first = false;
      offset = bom.skipped;
    }
    if (mode === 'single') {
      parts.push(chunk);
      offset += chunk.length;
      continue;
    }
    let segStart = elemStart >= 0 ? 0 : -1; // where the current element's bytes start in this chunk
    for (let i = 0; i < chunk.length; i++) {
      const c = chunk[i];
      if (mode === 'start') {
        if (isSpace(c)) continue;
        if (c === 0x5b /* [ */) {
          mode = 'array-value';
          continue;
        }
        mode = 'single';
        singleStart = offset + i;
        parts.push(chunk.subarray(i));
        break;
      }
      if (mode === 'end') {
        if (isSpace(c)) continue;
        yield { kind: 'file-error', byteOffset: offset + i, reason: `$: not valid JSON: unexpected data after the top-level array (at byte ${offset + i})` };
        return;
      }
      if (elemStart < 0) {
        // Between elements.
        if (isSpace(c)) continue;
        if ((mode as Mode) === 'array-after') {
          if (c === 0x2c /* , */) {
            mode = 'array-value';
            continue;
          }
          if (c === 0x5d /* ] */) {
            mode = 'end';
            continue;
          }
          yield { kind: 'file-error', byteOffset: offset + i, reason: `$: not valid JSON: expected ',' or ']' after array item ${item - 1} (at byte ${offset + i})` };
          return;
        }
        // mode === 'array-value'
        if (c === 0x5d && item === 0) {
          mode = 'end';
          continue;
        }
        if (c === 0x2c || c === 0x5d) {
          yield { kind: 'file-error', byteOffset: offset + i, reason: `$: not valid JSON: expected a value for array item ${item} (at byte ${offset + i})` };
          return;
        }
        elemStart = offset + i;
        segStart = i;
        depth = 0;
        inString = false;
        escaped = false;
        scalar = !(c === 0x7b || c === 0x5b || c === 0x22);
        if (scalar) continue;
        if (c === 0x22) {
          inString = true;
          continue;
        }
        depth = 1;
        continue;
      }
      // Inside an element.
      if (inString) {
        if (escaped) escaped = false;
        else if (c === 0x5c) escaped = true;
        else if (c === 0x22) {
          inString = false;
          if (depth === 0) {
            if (yield* emitElement(chunk.subarray(segStart, i + 1))) return;
            continue;
          }
        }
        continue;
      }
      if (scalar) {
        if (isSpace(c) || c === 0x2c || c === 0x5d) {
          if (yield* emitElement(chunk.subarray(segStart, i))) return;
          i--; // let the separator be read between elements
        }
        continue;
      }
      if (c === 0x22) inString = true;
      else if (c === 0x7b || c === 0x5b) depth++;
      else if (c === 0x7d || c === 0x5d) {
        depth--;
        if (depth === 0 && (yield* emitElement(chunk.subarray(segStart, i + 1)))) return;
      }
    }
    if (elemStart >= 0 && segStart >= 0) parts.push(chunk.subarray(segStart));
    offset += chunk.length;
  }

  if (mode === 'single') {
    if (parts.overflow) {
      yield { kind: 'reject', bytes: null, reason: tooLarge(maxBytes), line: null, item: null, byteOffset: singleStart };
      return;
    }
    const b = parts.take();
    let end = b.length;
    while (end > 0 && isSpace(b[end - 1])) end--;
    if (end > maxBytes) {
      yield { kind: 'reject', bytes: null, reason: tooLarge(maxBytes), line: null, item: null, byteOffset: singleStart };
      return;
    }
    const ev = event(b.subarray(0, end), { line: null, item: null, byteOffset: singleStart });
    // A single-document file that is not valid JSON is a malformed file; one that is valid JSON
    // but refused (\u0000, lone surrogate, bad UTF-8) is a rejected document, as in an array.
    if (ev.kind === 'reject' && ev.reason.startsWith('$: not valid JSON')) {
      yield { kind: 'file-error', byteOffset: singleStart, reason: ev.reason };
    } else yield ev;
    return;
  }
  if (mode === 'start') return; // empty or whitespace-only file: no documents
  if (mode !== 'end') {
    yield { kind: 'file-error', byteOffset: offset, reason: `$: not valid JSON: unexpected end of input inside the top-level array (at byte ${offset})` };
  }

  /** Yields the element's event; returns true after a file error (reading must stop). */
  function* emitElement(tail: Buffer): Generator<ReadEvent, boolean> {
    const pos = { line: null, item, byteOffset: elemStart };
    parts.push(tail);
    const overflow = parts.overflow;
    const bytes = parts.take();
    item++;
    elemStart = -1;
    mode = 'array-after';
    if (overflow || bytes.length > maxBytes) {
      yield { kind: 'reject', bytes: null, reason: tooLarge(maxBytes), ...pos };
      return false;
    }
    const ev = event(bytes, pos);
    if (ev.kind === 'reject') {
      // Inside a .json file a syntax error means the file is malformed as a whole.
      if (ev.reason.startsWith('$: not valid JSON')) {
        yield { kind: 'file-error', byteOffset: pos.byteOffset, reason: ev.reason.replace('$:', `$[${pos.item}]:`) };
        return true;
      }
    }
    yield ev;
    return false;
  }
}
