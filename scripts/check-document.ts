// Checks one document's bytes before staging: UTF-8, JSON syntax, what jsonb refuses (\u0000,
// lone surrogates), duplicate keys and numbers beyond a double. The reasons name the field and
// the byte position, never the document's content.
import { isUtf8 } from 'node:buffer';

/** A reason for a document that is not JSON. In a .json file it makes the whole file bad (split-documents.ts). */
export function notValidJson(what: string, at: number): string {
  return `$: not valid JSON: ${what} (at byte ${at})`;
}

export function isNotValidJson(reason: string): boolean {
  return reason.startsWith('$: not valid JSON');
}

export function tooLarge(max: number): string {
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
    return notValidJson(end ? 'unexpected end of input' : 'syntax error', at);
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
