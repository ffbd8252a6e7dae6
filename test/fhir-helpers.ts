// Helpers for test/fhir.test.ts: the shared FHIR R4 test data (read where it lies, beside the
// checkout, never copied into the project), a database per scenario with a loader login, the CLI
// as a process, and a fingerprint of the clinical rows without surrogate keys or load times.
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expandInputs } from '../scripts/inputs.ts';
import { loadBatch, type LoadOptions, type LoadResult } from '../scripts/stage.ts';
import { transformPending } from '../scripts/transform.ts';
import { useLogin, usePool, useTestDatabase } from './db.ts';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROJECT_DIR = path.resolve(HERE, '..');
const BIN = path.join(PROJECT_DIR, 'bin', 'healthetl.mjs');

/** ../shared/data/fhir beside the project's checkout (its README says where each set comes from). */
export const FHIR_DIR = path.resolve(HERE, '../../shared/data/fhir');
export const BULK_DIR = path.join(FHIR_DIR, 'bulk-10-patients');
export const BUNDLE_DIR = path.join(FHIR_DIR, 'bundles');

/** Why the FHIR tests cannot run here, or null when the data is present. */
export function missingData(): string | null {
  for (const dir of [BULK_DIR, BUNDLE_DIR]) if (!existsSync(dir)) return `FHIR test data not found at ${dir}`;
  return null;
}

export type Resource = Record<string, any> & { resourceType: string; id: string };

/** The bulk export's NDJSON files, sorted by name (the order expandInputs walks them in). */
export function bulkFiles(): string[] {
  return readdirSync(BULK_DIR)
    .filter((f) => f.endsWith('.ndjson'))
    .sort()
    .map((f) => path.join(BULK_DIR, f));
}

export function bundleFiles(): string[] {
  return readdirSync(BUNDLE_DIR)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => path.join(BUNDLE_DIR, f));
}

/** One NDJSON file's lines (non-empty), as text. */
export function ndjsonLines(file: string): string[] {
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim().length > 0);
}

let bulkCache: Map<string, Resource[]> | undefined;

/** Every bulk resource by resourceType, read from the files (an independent count of what the database should hold). */
export function bulkByType(): Map<string, Resource[]> {
  if (!bulkCache) {
    bulkCache = new Map();
    for (const f of bulkFiles())
      for (const line of ndjsonLines(f)) {
        const r = JSON.parse(line) as Resource;
        bulkCache.set(r.resourceType, [...(bulkCache.get(r.resourceType) ?? []), r]);
      }
  }
  return bulkCache;
}

export function bulkOf(type: string): Resource[] {
  return bulkByType().get(type) ?? [];
}

/** Each bundle file with its entries' resources, in entry order. */
export function bundles(): { file: string; resources: Resource[] }[] {
  return bundleFiles().map((file) => {
    const b = JSON.parse(readFileSync(file, 'utf8'));
    return { file, resources: (b.entry as { resource: Resource }[]).map((e) => e.resource) };
  });
}

/** The id in `Type/<id>` or `urn:uuid:<id>`. */
export function refId(ref: string | undefined): string | undefined {
  if (ref === undefined) return undefined;
  const m = /^(?:urn:uuid:|[A-Za-z]+\/)([^/?|]+)$/.exec(ref);
  return m ? m[1] : undefined;
}

/** The encounter a child resource names (DocumentReference: context.encounter[0]). */
export function encounterOf(r: Resource): string | undefined {
  const ref = r.resourceType === 'DocumentReference' ? r.context?.encounter?.[0]?.reference : r.encounter?.reference;
  return refId(ref);
}

export type FhirDb = ReturnType<typeof useFhirDatabase>;

/**
 * A fresh migrated database for one describe block (its hooks are scoped to where this is called),
 * a healthetl_loader login and a pool on it; load() stages as the loader and transforms every
 * pending batch, as pipeline.test.ts does.
 */
export function useFhirDatabase() {
  const db = useTestDatabase();
  const loader = useLogin(db, 'healthetl_loader');
  const pool = usePool({ url: loader });
  async function load(paths: string[], opts: LoadOptions = {}): Promise<LoadResult> {
    const r = await loadBatch(loader(), expandInputs(paths), { sourceSystem: 'fhir', ...opts });
    await transformPending(pool());
    return r;
  }
  return { db, loader, pool, load };
}

export type CliResult = { code: number | null; stdout: string; stderr: string };

/** `healthetl <args>` as a process (CI=true: JSON log lines; no DATABASE_URL nor PG* from this environment). */
export function healthetl(args: string[], timeoutMs = 240_000): Promise<CliResult> {
  const env: NodeJS.ProcessEnv = { ...process.env, CI: 'true' };
  for (const k of ['DATABASE_URL', 'PGHOST', 'PGPORT', 'PGUSER', 'PGPASSWORD', 'PGDATABASE', 'PGSSLMODE']) delete env[k];
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: PROJECT_DIR, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

type Query = (text: string, values?: unknown[]) => Promise<any[]>;

/** Columns that differ between two loads of the same data by construction: surrogate keys, batches, load times, keyed ids. */
const NOT_CONTENT = [
  'patient_key',
  'visit_key',
  'diagnosis_key',
  'treatment_key',
  'note_key',
  'document_id',
  'batch_id',
  'loaded_at',
  'pseudonym',
  'research_id',
  'research_visit_id',
  'source_updated_at',
];

export type Fingerprint = Record<'patients' | 'visits' | 'diagnoses' | 'treatments' | 'provider_notes', string[]>;

/**
 * Every clinical row as `<natural key> <md5 of its other columns>`, sorted: two databases hold the
 * same rows exactly when their fingerprints are equal. A child's key names its patient, its visit
 * (by source ids, `?` when it has none) and its own source id. Hashes, not values, so a failing
 * comparison prints ids and hashes only.
 */
export async function fingerprint(query: Query): Promise<Fingerprint> {
  const child = (table: string, alias: string, idCol: string) => `
    SELECT coalesce(p.source_system, '?') || '/' || coalesce(p.source_patient_id, '?') || '/' || coalesce(v.source_visit_id, '?')
             || '/' || coalesce(${alias}.${idCol}, '?') || ' ' || md5((to_jsonb(${alias}) - $1::text[])::text) AS r
    FROM clinical.${table} ${alias}
    LEFT JOIN clinical.patients p ON p.patient_key = ${alias}.patient_key
    LEFT JOIN clinical.visits v ON v.patient_key = ${alias}.patient_key AND v.visit_key = ${alias}.visit_key AND v.visit_date = ${alias}.visit_date
   `;
  // sorted here (code unit order), so no collation of the server's matters
  const rows = async (text: string) => (await query(text, [NOT_CONTENT])).map((r) => r.r as string).sort();
  return {
    patients: await rows(`SELECT p.source_system || '/' || p.source_patient_id || ' ' || md5((to_jsonb(p) - $1::text[])::text) AS r
                          FROM clinical.patients p`),
    visits: await rows(`SELECT coalesce(p.source_system, '?') || '/' || coalesce(p.source_patient_id, '?') || '/' || v.source_visit_id
                                 || ' ' || md5((to_jsonb(v) - $1::text[])::text) AS r
                        FROM clinical.visits v LEFT JOIN clinical.patients p USING (patient_key)`),
    diagnoses: await rows(child('diagnoses', 'd', 'source_diagnosis_id')),
    treatments: await rows(child('treatments', 't', 'source_treatment_id')),
    provider_notes: await rows(child('provider_notes', 'n', 'source_note_id')),
  };
}

/** Per table, the rows only one side has (at most 5 each, ids and hashes only) and the two row counts. */
export function fingerprintDiff(
  a: Fingerprint,
  b: Fingerprint,
): Record<string, { counts: [number, number]; onlyA: string[]; onlyB: string[] }> {
  const out: Record<string, { counts: [number, number]; onlyA: string[]; onlyB: string[] }> = {};
  for (const t of Object.keys(a) as (keyof Fingerprint)[]) {
    const sa = new Set(a[t]);
    const sb = new Set(b[t]);
    const onlyA = a[t].filter((r) => !sb.has(r));
    const onlyB = b[t].filter((r) => !sa.has(r));
    if (onlyA.length || onlyB.length || a[t].length !== b[t].length)
      out[t] = { counts: [a[t].length, b[t].length], onlyA: onlyA.slice(0, 5), onlyB: onlyB.slice(0, 5) };
  }
  return out;
}

/** Row counts of the five clinical tables. */
export async function clinicalCounts(query: Query): Promise<Record<string, number>> {
  const [r] = await query(`SELECT
    (SELECT count(*) FROM clinical.patients)::int AS patients,
    (SELECT count(*) FROM clinical.visits)::int AS visits,
    (SELECT count(*) FROM clinical.diagnoses)::int AS diagnoses,
    (SELECT count(*) FROM clinical.treatments)::int AS treatments,
    (SELECT count(*) FROM clinical.provider_notes)::int AS provider_notes`);
  return r;
}

/** Children (diagnoses, treatments, notes) whose (patient_key, visit_key, visit_date) names no visit, per table. */
export async function orphans(query: Query): Promise<Record<string, number>> {
  const n = async (table: string) => {
    const [r] = await query(`SELECT count(*)::int AS n FROM clinical.${table} c WHERE NOT EXISTS (
      SELECT 1 FROM clinical.visits v WHERE v.patient_key = c.patient_key AND v.visit_key = c.visit_key AND v.visit_date = c.visit_date)`);
    return r.n as number;
  };
  return { diagnoses: await n('diagnoses'), treatments: await n('treatments'), provider_notes: await n('provider_notes') };
}

/** Landing rows of a batch (or all batches) by status. */
export async function outcomes(query: Query, batchId?: number): Promise<Record<string, number>> {
  const rows = await query(
    `SELECT status, count(*)::int AS n FROM landing.raw_documents WHERE $1::bigint IS NULL OR batch_id = $1 GROUP BY status ORDER BY status`,
    [batchId ?? null],
  );
  return Object.fromEntries(rows.map((r) => [r.status, r.n]));
}

/** Batches whose etl.batch_summary does not balance or that still have staged rows (ids only). */
export async function unbalanced(query: Query): Promise<number[]> {
  const rows = await query(`SELECT batch_id::int AS b FROM etl.batch_summary WHERE NOT balanced OR staged > 0 ORDER BY 1`);
  return rows.map((r) => r.b);
}
