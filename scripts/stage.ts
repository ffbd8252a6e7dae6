// Stages input files into landing.raw_documents with binary COPY: one batch per invocation,
// one transaction per file (a killed loader leaves whole files or nothing), documents streamed
// in chunks so memory does not grow with file size.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import type pg from 'pg';
import { z } from 'zod';
import { copyRows, encodeRow, type FhirColumns, type StagedDoc } from './copy-binary.ts';
import { fhirPieces, type FhirMode, type FhirPiece } from './fhir-split.ts';
import { connectPg, NoResult, queryOn, sql, type Timeouts, DEFAULT_TIMEOUTS } from './db.ts';
import { fileErrorText, isConnectionError, isDataError, isServerError, serverRefusedReason } from './errors.ts';
import { maybeGunzip, type Input } from './inputs.ts';
import { DEFAULT_MAX_DOCUMENT_BYTES, readJson, readNdjson, type DocumentFormat, type ReadEvent } from './split-documents.ts';

export type FileOutcome = {
  /** The file's name as stored in landing and etl and as logged: its path, or under redactFileNames `sha256:…` (FileNames). */
  path: string;
  status: 'staged' | 'duplicate_file' | 'unreadable' | 'rejected' | 'skipped';
  documents: number;
  rejected: number;
  reason?: string;
};

export type LoadProgress = { files: number; documents: number; bytes: number; totalBytes: number };

export type LoadOptions = {
  maxDocumentBytes?: number;
  chunkBytes?: number; // documents per COPY statement, by size
  stdin?: Readable;
  stdinFormat?: DocumentFormat;
  timeouts?: Timeouts;
  onProgress?: (p: LoadProgress) => void;
  onFile?: (f: FileOutcome) => void;
  onWait?: (message: string) => void;
  /** The demo's batches say so in etl.batches.loader: it writes only where every batch is its own. */
  demo?: boolean;
  /** 'auto' (default): a document with a top-level resourceType is FHIR R4; 'fhir-r4': every document must be. */
  format?: FhirMode;
  /** The source system FHIR resources are loaded under (default 'fhir'); patient documents name their own. */
  sourceSystem?: string;
  /**
   * Store and report every file as `sha256:<first 16 hex of its sha256>` instead of its name, which
   * can be PHI (Synthea names a bundle after its patient): in landing.raw_documents, etl.batch_files,
   * etl.rejected_documents and every FileOutcome (so every log line). Standard input stays `-`.
   */
  redactFileNames?: boolean;
};

/** The setting that turns redactFileNames on for `load` and `run` (as --redact-file-names does). */
export const REDACT_FILE_NAMES_SETTING = 'HEALTHETL_REDACT_FILE_NAMES';

/** HEALTHETL_REDACT_FILE_NAMES: 1 on, 0 or unset (or empty) off; null for anything else (the CLI refuses it at start). */
export function redactFileNamesSetting(): boolean | null {
  const raw = process.env[REDACT_FILE_NAMES_SETTING];
  if (raw === undefined || raw === '' || raw === '0') return false;
  return raw === '1' ? true : null;
}

/**
 * The names files are stored and reported under in one batch. Without redaction, their paths.
 * With it, `sha256:<first 16 hex of the file's sha256>`: the fingerprint the loader computes before
 * reading a file anyway (to recognise bytes staged before), so a file is read twice as it always
 * was, and the name is known before its first row is written. Names stay unique in the batch (a
 * batch_files row per name; a second row for a name would add its documents to the first): two
 * different files whose hashes share 64 bits get the whole hash, and two copies of the same bytes
 * in one batch (a duplicate_file only across batches, once the first is transformed) get `#2`, `#3`.
 * A file never read (skipped, unreadable, listed twice) has no hash: `[unread file N]`, N its
 * place among the batch's inputs.
 */
export class FileNames {
  /** Name given -> the full sha256 (hex) of the file it names. */
  private readonly taken = new Map<string, string>();

  constructor(readonly redact: boolean) {}

  /** A file whose bytes were hashed (or standard input, `-`, which keeps its name). */
  ofFile(filePath: string, fingerprint: Fingerprint | undefined): string {
    if (!this.redact || !fingerprint) return filePath;
    const hex = fingerprint.sha.toString('hex');
    let name = `sha256:${hex.slice(0, 16)}`;
    if (this.taken.has(name) && this.taken.get(name) !== hex) name = `sha256:${hex}`;
    const base = name;
    for (let n = 2; this.taken.has(name); n++) name = `${base}#${n}`;
    this.taken.set(name, hex);
    return name;
  }

  /** A file or directory that was not read: its place among the inputs, not its name. */
  unread(filePath: string, ordinal: number): string {
    return this.redact ? `[unread file ${ordinal}]` : filePath;
  }

  /** A reason about a file with its path out of it: a file system error quotes the path ("ENOENT: ..., open '/in/Jane_Doe.json'"). */
  reason(text: string, filePath: string, name: string): string {
    if (!this.redact) return text;
    // Every quoted path (the file's, a link's target), then the path and its base name anywhere else
    // (not `.` or `..`, a directory named on the command line: every dot of the text would go).
    let t = text.replace(/'[^']*'/g, `'${name}'`);
    for (const s of [filePath, path.basename(filePath)]) if (!/^\.*$/.test(s)) t = t.split(s).join(name);
    return t;
  }
}

export type LoadResult = { batchId: number; files: FileOutcome[]; documents: number; rejected: number };

type Reject = { line: number | null; item: number | null; byteOffset: number; sha256: string; reason: string; fhir?: boolean };

/** The source system FHIR resources are loaded under when --source-system is not given. */
export const DEFAULT_FHIR_SOURCE_SYSTEM = 'fhir';

const ZERO_SHA = '0'.repeat(64);

/** What one read event stages: a patient document, a FHIR resource, or a reject. */
type Piece = FhirPiece | { kind: 'document'; bytes: Buffer; item: number | null };

/** One file's documents into its transaction: COPY in chunks, each under a savepoint; rejects through etl.stage_rejects. */
class FileStager {
  private docs: StagedDoc[] = [];
  private bytes = 0;
  private rejects: Reject[] = [];
  private chunkNo = 0;
  documents = 0;
  rejected = 0;
  private readonly file: Buffer;
  private readonly fmt: Buffer;

  constructor(
    private readonly client: pg.Client,
    private readonly batchId: number,
    private readonly sourceFile: string,
    private readonly format: DocumentFormat,
    private readonly chunkBytes: number,
    private readonly fhirMode: FhirMode,
    sourceSystem: string,
  ) {
    this.file = Buffer.from(sourceFile, 'utf8');
    this.fmt = Buffer.from(format, 'utf8');
    this.sourceSystem = Buffer.from(sourceSystem, 'utf8');
  }
  private readonly sourceSystem: Buffer;
  private readonly resourceTypes = new Map<string, FhirColumns>();

  /** The FHIR columns of a resource of this type (one buffer per type, not per row). */
  private columnsOf(resourceType: string): FhirColumns {
    let columns = this.resourceTypes.get(resourceType);
    if (!columns) {
      columns = { resourceType: Buffer.from(resourceType, 'utf8'), sourceSystem: this.sourceSystem };
      this.resourceTypes.set(resourceType, columns);
    }
    return columns;
  }

  /** One document, or a FHIR document's resources (a Bundle's entries): a landing row or a reject each. */
  async add(ev: ReadEvent): Promise<void> {
    if (ev.kind === 'file-error') throw new Error('file errors are handled by the caller');
    const fhir = ev.kind === 'document' ? fhirPieces(ev.bytes, this.fhirMode, ev.item) : null;
    const pieces: Piece[] = fhir ?? [ev.kind === 'reject' ? ev : { kind: 'document', bytes: ev.bytes, item: ev.item }];
    for (const piece of pieces) {
      this.documents++;
      const sha = piece.bytes ? createHash('sha256').update(piece.bytes).digest() : null;
      if (piece.kind === 'reject') {
        this.rejects.push({
          line: ev.line,
          item: piece.item,
          byteOffset: ev.byteOffset,
          sha256: sha ? sha.toString('hex') : ZERO_SHA,
          reason: piece.reason,
          fhir: fhir !== null,
        });
        continue;
      }
      const columns = piece.kind === 'resource' ? this.columnsOf(piece.resourceType) : undefined;
      this.docs.push({ line: ev.line, item: piece.item, byteOffset: ev.byteOffset, bytes: piece.bytes, sha256: sha!, fhir: columns });
      this.bytes += piece.bytes.length;
    }
    if (this.rejects.length >= 1000) await this.flushRejects();
    if (this.bytes >= this.chunkBytes) await this.flushDocs();
  }

  async finish(): Promise<void> {
    await this.flushDocs();
    await this.flushRejects();
  }

  private async flushDocs(): Promise<void> {
    if (this.docs.length === 0) return;
    const docs = this.docs;
    this.docs = [];
    this.bytes = 0;
    const sp = sql.identifier([`chunk_${++this.chunkNo}`]);
    await queryOn(this.client, sql.unsafe`SAVEPOINT ${sp}`);
    try {
      const withFhir = docs.some((d) => d.fhir !== undefined);
      await copyRows(
        this.client,
        docs.flatMap((d) => encodeRow(this.batchId, this.file, this.fmt, d, withFhir)),
        withFhir,
      );
      await queryOn(this.client, sql.unsafe`RELEASE SAVEPOINT ${sp}`);
      return;
    } catch (err) {
      if (!isDataError(err)) throw err;
      await queryOn(this.client, sql.unsafe`ROLLBACK TO SAVEPOINT ${sp}`);
    }
    // Rare path: the server refused something our checks let through. Find which, one by one.
    for (const d of docs) {
      await queryOn(this.client, sql.unsafe`SAVEPOINT one`);
      try {
        await copyRows(this.client, encodeRow(this.batchId, this.file, this.fmt, d, d.fhir !== undefined), d.fhir !== undefined);
        await queryOn(this.client, sql.unsafe`RELEASE SAVEPOINT one`);
      } catch (err) {
        if (!isDataError(err)) throw err;
        await queryOn(this.client, sql.unsafe`ROLLBACK TO SAVEPOINT one`);
        this.rejects.push({
          line: d.line,
          item: d.item,
          byteOffset: d.byteOffset,
          sha256: d.sha256.toString('hex'),
          reason: serverRefusedReason(err),
        });
      }
    }
  }

  async flushRejects(): Promise<void> {
    if (this.rejects.length === 0) return;
    const payload = this.rejects.map((r) => ({
      source_file: this.sourceFile,
      line: r.line,
      item: r.item,
      byte_offset: r.byteOffset,
      sha256: r.sha256,
      format: r.fhir ? ('fhir-r4' as const) : this.format,
      reason: r.reason,
    }));
    this.rejected += this.rejects.length;
    this.rejects = [];
    await stageRejects(this.client, this.batchId, payload);
  }
}

/** A file's sha256 and size, read before it is staged. */
type Fingerprint = { sha: Buffer; size: number };

async function sha256OfFile(p: string): Promise<Fingerprint> {
  const h = createHash('sha256');
  let size = 0;
  for await (const chunk of createReadStream(p, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
    h.update(chunk);
    size += chunk.length;
  }
  return { sha: h.digest(), size };
}

/** Stages all inputs as one new batch and returns what happened to each file. */
export async function loadBatch(databaseUrl: string, inputs: AsyncIterable<Input> | Input[], opts: LoadOptions = {}): Promise<LoadResult> {
  const maxDoc = opts.maxDocumentBytes ?? DEFAULT_MAX_DOCUMENT_BYTES;
  const chunkBytes = opts.chunkBytes ?? 4 * 1024 * 1024;
  const client = await connectPg(databaseUrl, opts.timeouts ?? DEFAULT_TIMEOUTS);
  // The server can end the session while no query is in flight (the loader is reading and parsing
  // between COPYs): pg then emits 'error' on the client, which without a listener crashed the
  // process with a stack trace. Keep the error: it is the real cause of whatever fails next.
  client.on('error', (err) => {
    if (!lostConnections.has(client)) lostConnections.set(client, err);
  });
  const files: FileOutcome[] = [];
  const progress: LoadProgress = { files: 0, documents: 0, bytes: 0, totalBytes: 0 };
  let documents = 0;
  let rejected = 0;
  try {
    // The session holds the batch's loader lock until etl.finish_staging: a transform that can
    // take it knows this loader is gone.
    const [{ batch_id: batchId }] = await queryOn(
      client,
      sql.type(z.object({ batch_id: z.coerce.number() }))`
        SELECT etl.start_batch(${`healthetl${opts.demo ? ' demo' : ''} on ${os.hostname()} (pid ${process.pid})`}) AS batch_id`,
    );

    const record = async (f: FileOutcome, fingerprint?: Fingerprint) => {
      files.push(f);
      // Staged, rejected and duplicate files were recorded in their own transaction.
      if (f.status === 'unreadable' || f.status === 'skipped')
        await recordFile(client, batchId, f.path, fingerprint, 0, f.status, f.reason ?? null);
      opts.onFile?.(f);
    };

    const names = new FileNames(opts.redactFileNames ?? false);
    const seen = new Set<string>();
    for await (const input of inputs) {
      progress.files++;
      if (input.kind === 'skipped' || input.kind === 'unreadable') {
        const name = names.unread(input.path, progress.files);
        await record({ path: name, status: input.kind, documents: 0, rejected: 0, reason: names.reason(input.reason, input.path, name) });
        continue;
      }
      // A path named twice (a directory and a file in it, overlapping globs) is read once: a file
      // is one row of etl.batch_files, and a second 'duplicate_file' row for it failed the batch.
      if (seen.has(input.path)) {
        const name = names.unread(input.path, progress.files);
        await record({ path: name, status: 'skipped', documents: 0, rejected: 0, reason: 'listed more than once: read once' });
        continue;
      }
      seen.add(input.path);
      // Same bytes as a file already staged: count its documents as duplicates without parsing.
      let fingerprint: Fingerprint | undefined;
      let name = input.path;
      if (input.kind === 'file') {
        try {
          fingerprint = await sha256OfFile(input.path);
        } catch (err) {
          name = names.unread(input.path, progress.files);
          await record({
            path: name,
            status: 'unreadable',
            documents: 0,
            rejected: 0,
            reason: names.reason(fileErrorText(err), input.path, name),
          });
          continue;
        }
        progress.totalBytes += fingerprint.size;
        name = names.ofFile(input.path, fingerprint);
        // Bytes staged before (etl.stage_known_file says when they count): recorded as a duplicate
        // file, its documents as duplicates; NULL: new bytes, to be read.
        const [{ n: count }] = await queryOn(
          client,
          sql.type(z.object({ n: z.coerce.number().nullable() }))`
            SELECT etl.stage_known_file(${batchId}, ${name}, ${fingerprint.size}, ${sql.binary(fingerprint.sha)}) AS n`,
        );
        if (count !== null) {
          documents += count;
          progress.documents += count;
          progress.bytes += fingerprint.size;
          opts.onProgress?.(progress);
          await record({ path: name, status: 'duplicate_file', documents: count, rejected: 0 });
          continue;
        }
      }
      const scrub = (reason: string) => names.reason(reason, input.path, name);
      const outcome = await stageFile(client, batchId, input, name, scrub, fingerprint, maxDoc, chunkBytes, opts, progress);
      documents += outcome.documents;
      rejected += outcome.rejected;
      await record(outcome, fingerprint);
    }

    await queryOn(client, sql.type(NoResult)`SELECT etl.finish_staging(${batchId})`);
    return { batchId, files, documents, rejected };
  } catch (err) {
    // "Client was closed and is not queryable" says less than the server's own reason (57P01: shut down).
    throw lostConnections.get(client) ?? err;
  } finally {
    await client.end().catch(() => undefined);
  }
}

const lostConnections = new WeakMap<pg.Client, Error>();

async function stageFile(
  client: pg.Client,
  batchId: number,
  input: Extract<Input, { kind: 'file' | 'stdin' }>,
  sourceFile: string,
  scrub: (reason: string) => string,
  fingerprint: Fingerprint | undefined,
  maxDoc: number,
  chunkBytes: number,
  opts: LoadOptions,
  progress: LoadProgress,
): Promise<FileOutcome> {
  let readBytes = 0;
  let rawEnded = false;
  // The bytes staged are hashed too: a file that changed between the fingerprint and this read
  // (truncated, rewritten or still growing) must not be recorded under the fingerprint's sha256,
  // or a later delivery of the complete file would be taken for a duplicate of this one.
  const hash = fingerprint ? createHash('sha256') : null;
  const raw: Readable = input.kind === 'stdin' ? (opts.stdin ?? process.stdin) : createReadStream(input.path, { highWaterMark: 1 << 20 });
  // Count bytes as the reader pulls them (a 'data' listener would race the reader for chunks).
  const counted = Readable.from(
    (async function* () {
      for await (const c of raw as AsyncIterable<Buffer>) {
        readBytes += c.length;
        hash?.update(c);
        yield c;
      }
      rawEnded = true;
    })(),
    { objectMode: false },
  );
  let source: Readable = counted;
  if (input.gzip) {
    const gunzip = createGunzip();
    counted.on('error', (e) => gunzip.destroy(e));
    source = counted.pipe(gunzip);
  } else if (input.kind === 'stdin') {
    // Sniff gzip on stdin by its magic bytes.
    source = await maybeGunzip(counted);
  }
  // An error emitted before the loop below starts reading (a corrupt gzip while BEGIN is in
  // flight) must not crash the process: the stream keeps it and the loop throws it.
  source.on('error', () => undefined);
  const events = input.format === 'json' ? readJson(source, maxDoc) : readNdjson(source, maxDoc);
  const stager = new FileStager(
    client,
    batchId,
    sourceFile,
    input.format,
    chunkBytes,
    opts.format ?? 'auto',
    opts.sourceSystem ?? DEFAULT_FHIR_SOURCE_SYSTEM,
  );
  const baseBytes = progress.bytes;
  await queryOn(client, sql.unsafe`BEGIN`);
  try {
    let fileError: { byteOffset: number; reason: string } | null = null;
    for await (const ev of events) {
      if (ev.kind === 'file-error') {
        fileError = ev;
        break;
      }
      await stager.add(ev);
      progress.documents++;
      progress.bytes = baseBytes + readBytes;
      if ((progress.documents & 255) === 0) opts.onProgress?.(progress);
    }
    if (fileError) {
      // A malformed .json file is refused whole: undo what was staged from it, keep one reject row.
      await queryOn(client, sql.unsafe`ROLLBACK`);
      progress.documents -= stager.documents;
      raw.destroy();
      await queryOn(client, sql.unsafe`BEGIN`);
      await stageRejects(client, batchId, [
        {
          source_file: sourceFile,
          line: null,
          item: null,
          byte_offset: 0,
          sha256: fingerprint?.sha.toString('hex') ?? ZERO_SHA,
          format: input.format,
          reason: fileError.reason,
        },
      ]);
      await recordFile(client, batchId, sourceFile, fingerprint, 1, 'rejected', fileError.reason);
      await queryOn(client, sql.unsafe`COMMIT`);
      progress.documents++;
      return { path: sourceFile, status: 'rejected', documents: 1, rejected: 1, reason: fileError.reason };
    }
    // Only when the reader consumed the whole file (a gzip stream may stop before trailing bytes).
    if (fingerprint && hash && rawEnded && (readBytes !== fingerprint.size || !hash.digest().equals(fingerprint.sha))) {
      throw new FileChangedError(fingerprint.size, readBytes);
    }
    await stager.finish();
    await recordFile(client, batchId, sourceFile, fingerprint, stager.documents, 'staged', null);
    await queryOn(client, sql.unsafe`COMMIT`);
    progress.bytes = baseBytes + readBytes;
    opts.onProgress?.(progress);
    return { path: sourceFile, status: 'staged', documents: stager.documents, rejected: stager.rejected };
  } catch (err) {
    await queryOn(client, sql.unsafe`ROLLBACK`).catch(() => undefined);
    raw.destroy();
    progress.documents -= stager.documents;
    if (isServerError(err)) throw err;
    if (isConnectionError(err) || lostConnections.has(client)) throw err;
    // A read error (corrupt gzip, file vanished, I/O error): nothing from this file is kept.
    const reason = err instanceof FileChangedError ? err.message : scrub(`${fileErrorText(err)} (after ${readBytes} bytes)`);
    return { path: sourceFile, status: 'unreadable', documents: 0, rejected: 0, reason };
  }
}

class FileChangedError extends Error {
  constructor(expected: number, read: number) {
    super(
      `the file changed while it was being read (${expected} bytes when fingerprinted, ${read} read): nothing from it was kept; load it again once it is complete`,
    );
  }
}

/** The file's row of etl.batch_files (etl.record_file: a second row for a path adds its documents when it was read). */
async function recordFile(
  client: pg.Client,
  batchId: number,
  sourceFile: string,
  fingerprint: Fingerprint | undefined,
  documents: number,
  status: 'staged' | 'rejected' | 'unreadable' | 'skipped',
  error: string | null,
): Promise<void> {
  await queryOn(
    client,
    sql.type(NoResult)`
      SELECT etl.record_file(${batchId}, ${sourceFile}, ${fingerprint?.size ?? null}, ${fingerprint ? sql.binary(fingerprint.sha) : null},
                             ${documents}, ${status}, ${error})`,
  );
}

type RejectRow = {
  source_file: string;
  line: number | null;
  item: number | null;
  byte_offset: number;
  sha256: string;
  format: DocumentFormat | 'fhir-r4';
  reason: string;
};

async function stageRejects(client: pg.Client, batchId: number, rejects: RejectRow[]): Promise<void> {
  await queryOn(client, sql.type(z.object({ n: z.coerce.number() }))`SELECT etl.stage_rejects(${batchId}, ${sql.jsonb(rejects)}) AS n`);
}
