// Splits an input stream into documents without holding more than one document in memory.
// NDJSON: one document per line. JSON: one document, or the elements of a top-level array,
// found by a byte scanner (strings, escapes, nesting) so each element's raw bytes and byte
// offset are kept for hashing, COPY and error positions.
import type { Readable } from 'node:stream';
import { checkDocument, isNotValidJson, notValidJson, tooLarge } from './check-document.ts';

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
        yield { kind: 'file-error', byteOffset: offset + i, reason: notValidJson('unexpected data after the top-level array', offset + i) };
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
          yield {
            kind: 'file-error',
            byteOffset: offset + i,
            reason: notValidJson(`expected ',' or ']' after array item ${item - 1}`, offset + i),
          };
          return;
        }
        // mode === 'array-value'
        if (c === 0x5d && item === 0) {
          mode = 'end';
          continue;
        }
        if (c === 0x2c || c === 0x5d) {
          yield { kind: 'file-error', byteOffset: offset + i, reason: notValidJson(`expected a value for array item ${item}`, offset + i) };
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
    if (ev.kind === 'reject' && isNotValidJson(ev.reason)) {
      yield { kind: 'file-error', byteOffset: singleStart, reason: ev.reason };
    } else yield ev;
    return;
  }
  if (mode === 'start') return; // empty or whitespace-only file: no documents
  if (mode !== 'end') {
    yield { kind: 'file-error', byteOffset: offset, reason: notValidJson('unexpected end of input inside the top-level array', offset) };
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
      if (isNotValidJson(ev.reason)) {
        yield { kind: 'file-error', byteOffset: pos.byteOffset, reason: ev.reason.replace('$:', `$[${pos.item}]:`) };
        return true;
      }
    }
    yield ev;
    return false;
  }
}
