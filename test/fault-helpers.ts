// Shared by the fault, hostile-input and server-restart tests: the CLI as a real child process,
// polling the database (never sleeping a guessed time), generated datasets whose expected row
// counts come from the documents themselves, and a fingerprint of the clinical tables by natural
// keys so that two databases can be compared whatever surrogate keys they assigned.
import { spawn, type ChildProcess } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { expect } from 'vitest';
import { generatePatient, type PatientDocument } from '../scripts/generate.ts';

export const PROJECT_DIR = fileURLToPath(new URL('..', import.meta.url));
export const BIN = path.join(PROJECT_DIR, 'bin', 'healthetl.mjs');

export type CliResult = { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string };
export type LogLine = Record<string, unknown> & { level: number; msg: string };
export type Query = <R extends Record<string, any> = any>(text: string, values?: unknown[]) => Promise<R[]>;

/** The environment of a scheduler: no DATABASE_URL or PG* (the URL is passed explicitly), CI=true. */
export function childEnv(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, CI: 'true' };
  for (const k of [
    'DATABASE_URL',
    'PGHOST',
    'PGPORT',
    'PGUSER',
    'PGPASSWORD',
    'PGDATABASE',
    'PGSSLMODE',
    'HEALTHETL_LOCK_TIMEOUT_MS',
    'HEALTHETL_STATEMENT_TIMEOUT_MS',
  ]) {
    delete env[k];
  }
  for (const [k, v] of Object.entries(extra)) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

export type Running = { child: ChildProcess; done: Promise<CliResult> };

/** Starts `healthetl <args>` (stdin closed); `done` settles when it exits. A guard kills it after guardMs. */
export function startCli(args: string[], opts: { env?: NodeJS.ProcessEnv; guardMs?: number; nodeArgs?: string[] } = {}): Running {
  const child = spawn(process.execPath, [...(opts.nodeArgs ?? []), BIN, ...args], {
    cwd: PROJECT_DIR,
    env: opts.env ?? childEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (stdout += c));
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  const done = new Promise<CliResult>((resolve, reject) => {
    // Not a timing assertion: only keeps a hung child from hanging the suite (the test then fails on its exit code).
    const guard = setTimeout(() => child.kill('SIGKILL'), opts.guardMs ?? 90_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(guard);
      resolve({ code, signal, stdout, stderr });
    });
  });
  return { child, done };
}

export function runCli(args: string[], opts: { env?: NodeJS.ProcessEnv; guardMs?: number; nodeArgs?: string[] } = {}): Promise<CliResult> {
  return startCli(args, opts).done;
}

/** Every stdout line is a JSON object with a numeric level and a string msg. */
export function jsonLines(stdout: string): LogLine[] {
  return stdout
    .split('\n')
    .filter((l) => l.length > 0)
    .map((l) => {
      let parsed: unknown;
      expect(() => (parsed = JSON.parse(l)), `stdout line is not JSON: ${l.slice(0, 200)}`).not.toThrow();
      expect(parsed).toMatchObject({ level: expect.any(Number), msg: expect.any(String) });
      return parsed as LogLine;
    });
}

export function stderrLines(r: CliResult): string[] {
  return r.stderr.split('\n').filter((l) => l.trim().length > 0);
}

/** Polls until `check` returns a truthy value; gives up (throws) after limitMs so a broken test cannot hang. */
export async function pollUntil<T>(
  what: string,
  check: () => Promise<T | null | undefined | false>,
  limitMs = 60_000,
  everyMs = 15,
): Promise<T> {
  const give = Date.now() + limitMs;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > give) throw new Error(`gave up waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A query function on its own connection (for databases that are not the file's test database). */
export async function connect(url: string): Promise<{ query: Query; end: () => Promise<void>; client: pg.Client }> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => undefined); // a server stopped on purpose: the next query says so
  await client.connect();
  return {
    client,
    query: async (text, values) => (await client.query(text, values as unknown[])).rows,
    end: () => client.end().catch(() => undefined),
  };
}

// ---- generated datasets -----------------------------------------------------------------------

export type Expected = { patients: number; visits: number; diagnoses: number; treatments: number; provider_notes: number };

export function countRows(docs: PatientDocument[]): Expected {
  const e: Expected = { patients: 0, visits: 0, diagnoses: 0, treatments: 0, provider_notes: 0 };
  for (const d of docs) {
    e.patients++;
    for (const v of d.visits) {
      e.visits++;
      e.diagnoses += v.diagnoses.length;
      e.treatments += v.treatments.length;
      e.provider_notes += v.provider_notes.length;
    }
  }
  return e;
}

/** Patients [from, to) of a seed, as documents and as NDJSON text (one line each). */
export function patients(from: number, to: number, seed: number): { docs: PatientDocument[]; lines: string[] } {
  const docs: PatientDocument[] = [];
  for (let i = from; i < to; i++) docs.push(generatePatient(i, seed));
  return { docs, lines: docs.map((d) => JSON.stringify(d)) };
}

/** Writes files of generated patients (perFile each) into dir; returns the rows they imply. */
export async function writePatientFiles(dir: string, files: string[], perFile: number, seed: number): Promise<Expected> {
  const all: PatientDocument[] = [];
  for (let f = 0; f < files.length; f++) {
    const p = patients(f * perFile, (f + 1) * perFile, seed);
    await writeNdjson(path.join(dir, files[f]), p.lines);
    all.push(...p.docs);
  }
  return countRows(all);
}

export async function writeNdjson(file: string, lines: string[]): Promise<void> {
  await writeFile(file, lines.join('\n') + '\n');
}

// ---- comparing clinical tables ----------------------------------------------------------------

const TABLE_ROWS: Record<keyof Expected, { rows: string; key: string }> = {
  patients: {
    rows: `SELECT ROW(p.source_system, p.source_patient_id, p.mrn, p.ssn, p.name_prefix, p.given_name, p.family_name, p.name_suffix,
                      p.birth_date, p.sex, p.phone, p.email, p.address_lines, p.city, p.state, p.postal_code, p.country,
                      p.source_updated_at, encode(p.content_sha256, 'hex'))::text AS r,
                  ROW(p.source_system, p.source_patient_id)::text AS k
           FROM clinical.patients p`,
    key: 'k',
  },
  visits: {
    rows: `SELECT ROW(p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date, v.visit_start, v.discharge_date, v.visit_type,
                      v.facility_id, v.facility_name, v.provider_npi, v.provider_name, v.position)::text AS r,
                  ROW(p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date)::text AS k
           FROM clinical.visits v JOIN clinical.patients p USING (patient_key)`,
    key: 'k',
  },
  diagnoses: {
    rows: `SELECT ROW(p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date, c.position, c.code, c.code_system, c.description, c.is_primary)::text AS r,
                  ROW(p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date, c.position)::text AS k
           FROM clinical.diagnoses c
           JOIN clinical.visits v ON v.patient_key = c.patient_key AND v.visit_key = c.visit_key AND v.visit_date = c.visit_date
           JOIN clinical.patients p ON p.patient_key = c.patient_key`,
    key: 'k',
  },
  treatments: {
    rows: `SELECT ROW(p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date, c.position, c.source_treatment_id, c.treatment_type,
                      c.code, c.code_system, c.name, c.dose, c.route, c.frequency, c.start_date, c.end_date)::text AS r,
                  ROW(p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date, c.position)::text AS k
           FROM clinical.treatments c
           JOIN clinical.visits v ON v.patient_key = c.patient_key AND v.visit_key = c.visit_key AND v.visit_date = c.visit_date
           JOIN clinical.patients p ON p.patient_key = c.patient_key`,
    key: 'k',
  },
  provider_notes: {
    rows: `SELECT ROW(p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date, c.position, c.source_note_id, c.author, c.written_at, c.note_text)::text AS r,
                  ROW(p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date, c.position)::text AS k
           FROM clinical.provider_notes c
           JOIN clinical.visits v ON v.patient_key = c.patient_key AND v.visit_key = c.visit_key AND v.visit_date = c.visit_date
           JOIN clinical.patients p ON p.patient_key = c.patient_key`,
    key: 'k',
  },
};

export type TableFingerprint = { rows: number; joined: number; keys: number; md5: string };

/**
 * Per clinical table: its row count, the rows reachable through their visit and patient (orphans
 * would make `joined` smaller), the distinct natural keys (duplicates would make `keys` smaller)
 * and an md5 of all rows by natural key with every value except surrogate keys and load times.
 */
export async function fingerprint(query: Query): Promise<Record<keyof Expected, TableFingerprint>> {
  await query(`SET TimeZone = 'UTC'`);
  await query(`SET DateStyle = 'ISO, YMD'`);
  const out = {} as Record<keyof Expected, TableFingerprint>;
  for (const [table, t] of Object.entries(TABLE_ROWS) as [keyof Expected, { rows: string; key: string }][]) {
    const [r] = await query(`
      SELECT (SELECT count(*) FROM clinical.${table})::int AS rows, count(*)::int AS joined, count(DISTINCT x.k)::int AS keys,
             md5(coalesce(string_agg(x.r, E'\\n' ORDER BY x.r), '')) AS md5
      FROM (${t.rows}) x`);
    out[table] = r as TableFingerprint;
  }
  return out;
}

export function countsOf(fp: Record<keyof Expected, TableFingerprint>): Expected {
  return Object.fromEntries(Object.entries(fp).map(([t, f]) => [t, f.rows])) as Expected;
}

/** Rows reachable, no natural key twice: for every table rows = joined = keys. */
export function expectNoOrphansOrDuplicates(fp: Record<keyof Expected, TableFingerprint>): void {
  for (const [table, f] of Object.entries(fp)) {
    expect({ table, joined: f.joined, keys: f.keys }).toEqual({ table, joined: f.rows, keys: f.rows });
  }
}

// ---- batches ----------------------------------------------------------------------------------

export type BatchState = {
  batch_id: number;
  status: string;
  files_documents: number;
  landed: number;
  staged: number;
  loaded: number;
  rejected: number;
  duplicate: number;
  superseded: number;
  patients_from_batch: number;
};

export async function batchStates(query: Query): Promise<BatchState[]> {
  return query<BatchState>(`
    SELECT b.batch_id::int, b.status,
           (SELECT coalesce(sum(f.documents), 0) FROM etl.batch_files f WHERE f.batch_id = b.batch_id)::int AS files_documents,
           (SELECT count(*) FROM landing.raw_documents d WHERE d.batch_id = b.batch_id)::int AS landed,
           (SELECT count(*) FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'staged')::int AS staged,
           (SELECT count(*) FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'loaded')::int AS loaded,
           (SELECT count(*) FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'rejected')::int AS rejected,
           (SELECT count(*) FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'duplicate')::int AS duplicate,
           (SELECT count(*) FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'superseded')::int AS superseded,
           (SELECT count(*) FROM clinical.patients p WHERE p.batch_id = b.batch_id)::int AS patients_from_batch
    FROM etl.batches b ORDER BY b.batch_id`);
}

/**
 * All or nothing per batch: a batch that is not 'transformed' has no document with a transform
 * outcome and no patient row; a transformed one has no document left staged. And every batch's
 * loader count equals its landing rows.
 */
export function expectAllOrNothing(batches: BatchState[]): void {
  for (const b of batches) {
    expect(b.landed, `batch ${b.batch_id}: landing rows = what its loader counted`).toBe(b.files_documents);
    if (b.status === 'transformed') {
      expect(b.staged, `batch ${b.batch_id} is transformed: nothing left staged`).toBe(0);
    } else {
      expect({
        batch: b.batch_id,
        loaded: b.loaded,
        duplicate: b.duplicate,
        superseded: b.superseded,
        patients: b.patients_from_batch,
      }).toEqual({
        batch: b.batch_id,
        loaded: 0,
        duplicate: 0,
        superseded: 0,
        patients: 0,
      });
    }
  }
}

/** Other sessions in this database: running etl.transform_batch (`transform`), else any loader or transform session. */
export async function activeSessions(query: Query, opts: { transform?: boolean } = {}): Promise<number> {
  const [r] = await query(
    `SELECT count(*)::int AS n FROM pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid()
       AND ${opts.transform ? `query ILIKE '%transform_batch%' AND state = 'active'` : `(application_name = 'healthetl' OR query ILIKE '%transform_batch%')`}`,
  );
  return r.n as number;
}
