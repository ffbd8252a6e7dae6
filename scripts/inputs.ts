// The command line's paths as inputs: files as given, directories walked recursively, '-' for
// standard input; each file's format from its name. Also gzip sniffed on standard input.
import { readdir, realpath, stat } from 'node:fs/promises';
import path from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import { fileErrorText } from './errors.ts';
import type { DocumentFormat } from './split-documents.ts';

export type Input =
  | { kind: 'file'; path: string; format: DocumentFormat; gzip: boolean }
  | { kind: 'stdin'; path: '-'; format: DocumentFormat; gzip: boolean }
  | { kind: 'skipped'; path: string; reason: string }
  | { kind: 'unreadable'; path: string; reason: string };

const SUPPORTED = /\.(ndjson|jsonl|json)(\.gz)?$/i;

function classify(p: string): Input {
  const m = SUPPORTED.exec(p);
  if (!m) return { kind: 'skipped', path: p, reason: 'not a .json, .ndjson or .jsonl file (optionally .gz)' };
  return { kind: 'file', path: p, format: m[1].toLowerCase() === 'json' ? 'json' : 'ndjson', gzip: Boolean(m[2]) };
}

/** Expands the command-line paths: files as given, directories walked recursively (sorted), '-' for stdin. */
export async function* expandInputs(paths: string[], stdinFormat: DocumentFormat = 'ndjson'): AsyncGenerator<Input> {
  const seenDirs = new Set<string>();
  async function* walk(dir: string): AsyncGenerator<Input> {
    let real: string;
    try {
      real = await realpath(dir);
    } catch (err) {
      yield { kind: 'unreadable', path: dir, reason: fileErrorText(err) };
      return;
    }
    if (seenDirs.has(real)) {
      yield { kind: 'skipped', path: dir, reason: 'directory already visited (symbolic link loop)' };
      return;
    }
    seenDirs.add(real);
    let entries: string[];
    try {
      entries = (await readdir(dir)).sort();
    } catch (err) {
      yield { kind: 'unreadable', path: dir, reason: fileErrorText(err) };
      return;
    }
    for (const name of entries) yield* visit(path.join(dir, name), false);
  }
  async function* visit(p: string, explicit: boolean): AsyncGenerator<Input> {
    let st;
    try {
      st = await stat(p);
    } catch (err) {
      yield { kind: 'unreadable', path: p, reason: fileErrorText(err) };
      return;
    }
    if (st.isDirectory()) yield* walk(p);
    else if (st.isFile()) {
      const c = classify(p);
      // A file named explicitly with an unknown extension is read as NDJSON rather than dropped.
      yield explicit && c.kind === 'skipped' ? { kind: 'file', path: p, format: 'ndjson', gzip: false } : c;
    } else yield { kind: 'skipped', path: p, reason: 'not a regular file' };
  }
  for (const p of paths) {
    if (p === '-') yield { kind: 'stdin', path: '-', format: stdinFormat, gzip: false };
    else yield* visit(p, true);
  }
}

/** Standard input, gunzipped when it starts with gzip's magic bytes. */
export async function maybeGunzip(input: Readable): Promise<Readable> {
  const out = new PassThrough();
  const it = (input as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  const first = await it.next();
  if (first.done) {
    out.end();
    return out;
  }
  const head: Buffer = first.value;
  const gz = head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b;
  const target = gz ? createGunzip() : out;
  if (gz) target.pipe(out);
  (async () => {
    target.write(head);
    for (let r = await it.next(); !r.done; r = await it.next()) {
      if (!target.write(r.value)) await new Promise((res) => target.once('drain', res));
    }
    target.end();
  })().catch((e) => out.destroy(e));
  if (gz) target.on('error', (e) => out.destroy(e));
  return out;
}
