// `npm run bench -- --patients 50000`: healthetl against the lower bound, in one run, on one
// fresh database. Measures (1) `healthetl run` end to end, (2) COPY of the same rows already
// flattened (CSV) into the same clinical tables, (3) a row-by-row loader like the original
// design on a sample, extrapolated, (4) a second `run` of the same files, (5) the loader's peak
// RSS on a large file as NDJSON and as one JSON array, (6) analyst queries on the loaded data:
// the masked views (analytics.*, as healthetl_analyst) against the same questions on the base
// tables (bench-analyst.ts), (9) a FHIR R4 bulk export (generate-fhir.ts, ~515 resources per
// FHIR patient; --fhir-patients, default N/50) through `healthetl run` into a fresh database of its
// own, in resources/s and MB/s against the MB/s of (1) (bench-fhir.ts). Prints a table and the
// ratios; --json writes them with N, the PostgreSQL version and the machine. A benchmark, not a
// test: nothing here asserts a speed (a ratio over its target is flagged), but it fails when the
// loaded rows do not match the generated ones (the FHIR run: after printing its table), or the
// masked views answer differently from the base tables.
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { createInterface } from 'node:readline';
import { mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { fileURLToPath, pathToFileURL } from 'node:url';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { z } from 'zod';
import { analystQueries, analystTable, DEFAULT_ANALYST_RUNS, type AnalystReport } from './bench-analyst.ts';
import { biQueries, biTable, type BiQueryResult } from './bench-bi.ts';
import { benchFhir, fhirTable, FHIR_PATIENTS_PER_DOCUMENT_PATIENT, type FhirBenchReport } from './bench-fhir.ts';
import { queryOn, sql } from './db.ts';
import { migrate } from './migrate.ts';
import { DEFAULT_SHARDS } from './transform.ts';
import { CSV_COLUMNS, TABLES, writeDataset, type DatasetInfo, type PatientDocument } from './generate.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const CLI = path.join(ROOT, 'bin/healthetl.mjs');

type Args = {
  patients: number;
  seed: number;
  json?: string | true;
  smoke: boolean;
  rssMb: number;
  rowSample: number;
  keep: boolean;
  shards?: number;
  analystRuns: number;
  analystYear?: number | 'all';
  fhirPatients: number;
};

const USAGE =
  'usage: npm run bench -- [--patients N=50000] [--seed S=42] [--rss-mb MB=2048 (0 skips)] [--row-sample K=2000] [--json [file]] [--smoke] [--keep] [--shards N (default: as healthetl run)]\n' +
  `       [--analyst-runs N=${DEFAULT_ANALYST_RUNS} (0 skips the analyst queries)] [--analyst-year YEAR|all (default: the last whole year of visits)]\n` +
  '       [--fhir-patients N (default: patients / 50, at most 10 with --smoke; 0 skips the FHIR run)]\n' +
  'Uses DATABASE_URL (a server where the user may create databases), else an embedded PostgreSQL.\n';

function parseBenchArgs(argv: string[]): Args {
  // --json takes an optional file, which parseArgs cannot express: a bare --json becomes --json=
  // (the empty value meaning stdout).
  const args = argv.map((a, i) => (a === '--json' && (argv[i + 1] === undefined || argv[i + 1].startsWith('--')) ? '--json=' : a));
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        patients: { type: 'string', default: '50000' },
        seed: { type: 'string', default: '42' },
        'rss-mb': { type: 'string', default: '2048' },
        'row-sample': { type: 'string', default: '2000' },
        json: { type: 'string' },
        smoke: { type: 'boolean', default: false },
        keep: { type: 'boolean', default: false },
        shards: { type: 'string' },
        'analyst-runs': { type: 'string', default: String(DEFAULT_ANALYST_RUNS) },
        'analyst-year': { type: 'string' },
        'fhir-patients': { type: 'string' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (err) {
    throw new Error(`${(err as Error).message} (see --help)`, { cause: err });
  }
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const a: Args = {
    patients: Number(values.patients),
    seed: Number(values.seed),
    rssMb: Number(values['rss-mb']),
    rowSample: Number(values['row-sample']),
    json: values.json === undefined ? undefined : values.json || true,
    smoke: values.smoke,
    keep: values.keep,
    shards: values.shards === undefined ? undefined : Number(values.shards),
    analystRuns: Number(values['analyst-runs']),
    analystYear:
      values['analyst-year'] === undefined ? undefined : values['analyst-year'] === 'all' ? 'all' : Number(values['analyst-year']),
    fhirPatients:
      values['fhir-patients'] === undefined
        ? Math.max(1, Math.round(Number(values.patients) * FHIR_PATIENTS_PER_DOCUMENT_PATIENT))
        : Number(values['fhir-patients']),
  };
  if (!Number.isSafeInteger(a.patients) || a.patients < 1) throw new Error('--patients must be a whole number >= 1');
  if (!Number.isSafeInteger(a.analystRuns) || a.analystRuns < 0) throw new Error('--analyst-runs must be a whole number >= 0');
  if (!Number.isSafeInteger(a.fhirPatients) || a.fhirPatients < 0) throw new Error('--fhir-patients must be a whole number >= 0');
  if (a.analystYear !== undefined && a.analystYear !== 'all' && !(Number.isSafeInteger(a.analystYear) && a.analystYear >= 1900)) {
    throw new Error('--analyst-year must be a year (1900 or later) or all');
  }
  if (a.smoke) {
    a.rssMb = Math.min(a.rssMb, 8);
    a.rowSample = Math.min(a.rowSample, 100);
    a.analystRuns = Math.min(a.analystRuns, 3);
    a.fhirPatients = Math.min(a.fhirPatients, 10);
  }
  return a;
}

const log = (m: string) => process.stderr.write(`[bench] ${m}\n`);

async function timed<T>(fn: () => Promise<T>): Promise<{ seconds: number; value: T }> {
  const t0 = process.hrtime.bigint();
  const value = await fn();
  return { seconds: Number(process.hrtime.bigint() - t0) / 1e9, value };
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

/** Runs the CLI as a scheduler would, returning its exit code, last JSON line and peak RSS. */
function runCli(
  args: string[],
  url: string,
): Promise<{ code: number; last: Record<string, unknown> | null; maxRssKb: number; stderr: string }> {
  // Preloaded into the child: report the process's own peak RSS when it exits.
  const rss =
    'data:text/javascript,process.on("exit",()=>process.stderr.write("healthetl-bench-maxrss-kb="+process.resourceUsage().maxRSS+"\\n"))';
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', rss, CLI, ...args, '--database-url', url, '--log-format', 'json'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, DATABASE_URL: '' },
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('error', reject);
    child.on('close', (code) => {
      const lines = out.trim().split('\n').filter(Boolean);
      let last: Record<string, unknown> | null;
      try {
        last = lines.length ? JSON.parse(lines[lines.length - 1]) : null;
      } catch {
        last = null;
      }
      const m = /healthetl-bench-maxrss-kb=(\d+)/.exec(err);
      resolve({ code: code ?? -1, last, maxRssKb: m ? Number(m[1]) : 0, stderr: err.replace(/healthetl-bench-maxrss-kb=\d+\n?/, '') });
    });
  });
}

async function clinicalCounts(c: pg.Client): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const t of TABLES) {
    const [{ n }] = await queryOn(
      c,
      sql.type(z.object({ n: z.coerce.number() }))`SELECT count(*) AS n FROM ${sql.identifier(['clinical', t])}`,
    );
    out[t] = n;
  }
  return out;
}

const TRUNCATE_ALL = sql.unsafe`TRUNCATE clinical.patients, clinical.visits, clinical.diagnoses, clinical.treatments, clinical.provider_notes,
  etl.document_problems, etl.rejected_documents, landing.raw_documents, etl.batch_files, etl.batches, etl.patient_keys`;

/** The lower bound: the same rows, already flattened, COPYed into the same tables. */
async function copyLowerBound(c: pg.Client, info: DatasetInfo): Promise<void> {
  // Partitions for the generator's visit years (the transform creates its own as part of its time).
  await queryOn(c, sql.unsafe`SELECT etl.ensure_visit_partitions(ARRAY(SELECT generate_series(2010, 2030)))`);
  for (const t of TABLES) {
    const cols = CSV_COLUMNS[t].join(', ');
    const stream = c.query(copyFrom(`COPY clinical.${t} (${cols}) FROM STDIN (FORMAT csv, HEADER true)`));
    await pipeline(createReadStream(info.files.csv![t], { highWaterMark: 1 << 20 }), stream);
  }
}

/**
 * The original design: one INSERT per row, one transaction per patient (prepared statements).
 * Plain pg on purpose: named prepared statements are what such a loader would use, and what this
 * step measures.
 */
async function rowByRow(c: pg.Client, docs: PatientDocument[]): Promise<void> {
  for (const d of docs) {
    // As the transform does (migrations/0009): a pseudonym per patient, each note's text redacted
    // of the patient's identifiers (their MRN, birth date and names).
    const names = [[d.name.given].flat().join(' '), d.name.family].join(' ');
    await c.query('BEGIN');
    const k = await c.query({
      name: 'rb_key',
      text: `INSERT INTO etl.patient_keys (source_system, source_patient_id) VALUES ('rowbyrow', $1) RETURNING patient_key`,
      values: [d.patient_id],
    });
    const pk = k.rows[0].patient_key;
    const patient = await c.query({
      name: 'rb_patient',
      text: `INSERT INTO clinical.patients (patient_key, source_system, source_patient_id, mrn, ssn, given_name, family_name,
               birth_date, sex, phone, email, address_lines, city, state, postal_code, country, source_updated_at,
               document_id, content_sha256, batch_id, pseudonym)
             VALUES ($1, 'rowbyrow', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, 0, '\\x00', 0,
                     etl.keyed_uuid((SELECT key FROM etl.secret_keys WHERE purpose = 'pseudonym'), 'rowbyrow', $2))
             RETURNING pseudonym`,
      values: [
        pk,
        d.patient_id,
        d.mrn,
        d.ssn,
        [d.name.given].flat().join(' '),
        d.name.family,
        d.birth_date,
        d.sex,
        d.contact.phone,
        d.contact.email,
        d.address.line,
        d.address.city,
        d.address.state,
        d.address.postal_code,
        d.address.country,
        d.updated_at ?? null,
      ],
    });
    const pseudonym = patient.rows[0].pseudonym;
    for (const [vi, v] of d.visits.entries()) {
      const vk = await c.query({
        name: 'rb_visit',
        text: `INSERT INTO clinical.visits (patient_key, visit_key, visit_date, source_visit_id, discharge_date, visit_type,
                 facility_id, facility_name, provider_npi, provider_name, position, pseudonym)
               VALUES ($1, nextval('clinical.visits_visit_key_seq'), $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING visit_key`,
        values: [
          pk,
          v.visit_date,
          v.visit_id,
          v.discharge_date ?? null,
          v.visit_type,
          v.facility.id,
          v.facility.name,
          v.provider.npi,
          v.provider.name,
          vi,
          pseudonym,
        ],
      });
      const key = vk.rows[0].visit_key;
      for (const [i, x] of v.diagnoses.entries()) {
        await c.query({
          name: 'rb_dx',
          text: `INSERT INTO clinical.diagnoses (patient_key, visit_key, visit_date, position, code, code_system, description, is_primary,
                   pseudonym)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
          values: [pk, key, v.visit_date, i, x.code, x.system, x.description, x.primary, pseudonym],
        });
      }
      for (const [i, x] of v.treatments.entries()) {
        await c.query({
          name: 'rb_tx',
          text: `INSERT INTO clinical.treatments (patient_key, visit_key, visit_date, position, source_treatment_id, treatment_type,
                   code, code_system, name, dose, route, frequency, start_date, end_date, pseudonym)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)`,
          values: [
            pk,
            key,
            v.visit_date,
            i,
            x.treatment_id,
            x.type,
            x.code,
            x.system,
            x.name,
            x.dose,
            x.route,
            x.frequency,
            x.start_date,
            x.end_date,
            pseudonym,
          ],
        });
      }
      for (const [i, x] of v.provider_notes.entries()) {
        await c.query({
          name: 'rb_note',
          text: `INSERT INTO clinical.provider_notes (patient_key, visit_key, visit_date, position, source_note_id, author, written_at, note_text,
                   note_text_redacted, pseudonym)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, etl.redact_note($8, $9, $10, $11), $12)`,
          values: [pk, key, v.visit_date, i, x.note_id, x.author, x.written_at, x.text, d.mrn, d.birth_date, names, pseudonym],
        });
      }
    }
    await c.query('COMMIT');
  }
}

type Row = { step: string; seconds: number; patients_per_s?: number; rows_per_s?: number; mb_per_s?: number; note?: string };

async function main(): Promise<void> {
  const args = parseBenchArgs(process.argv.slice(2));
  const work = await mkdtemp(path.join(os.tmpdir(), 'healthetl-bench-'));
  await chmod(work, 0o755);
  let stopServer = async () => undefined as void;
  let adminUrl = process.env.DATABASE_URL;
  let serverKind = 'DATABASE_URL';
  try {
    if (!adminUrl) {
      const { startEmbedded } = await import('./embedded.ts');
      // persistent: true keeps fsync on, as a real server would run.
      const server = await startEmbedded({ dataDir: path.join(work, 'pgdata'), persistent: true });
      adminUrl = server.url;
      serverKind = 'embedded';
      stopServer = server.stop;
    }
    const admin = new pg.Client({ connectionString: adminUrl });
    await admin.connect();
    const [{ v: pgVersion }] = await queryOn(admin, sql.type(z.object({ v: z.string() }))`SELECT current_setting('server_version') AS v`);
    const dbName = `healthetl_bench_${Date.now().toString(36)}`;
    await queryOn(admin, sql.unsafe`CREATE DATABASE ${sql.identifier([dbName])}`);
    const url = withDatabase(adminUrl, dbName);
    const rows: Row[] = [];
    let info: DatasetInfo;
    const c = new pg.Client({ connectionString: url });
    try {
      log(`PostgreSQL ${pgVersion} (${serverKind}); generating ${args.patients} patients (seed ${args.seed})`);
      const shardArgs = args.shards ? ['--shards', String(args.shards)] : [];
      info = (
        await timed(() => writeDataset(path.join(work, 'data'), { patients: args.patients, seed: args.seed, forms: ['ndjson', 'csv'] }))
      ).value;
      const totalRows = Object.values(info.rows).reduce((a, b) => a + b, 0);
      const mb = info.bytes.ndjson / 1e6;
      log(`${totalRows} rows, ${mb.toFixed(1)} MB of NDJSON`);
      await migrate(url, 'up');
      await c.connect();
      const rate = (step: string, seconds: number, note?: string): Row => ({
        step,
        seconds: round(seconds),
        patients_per_s: Math.round(args.patients / seconds),
        rows_per_s: Math.round(totalRows / seconds),
        mb_per_s: round(mb / seconds),
        note,
      });

      // (2) lower bound, on the fresh database.
      // The generator's rows have no pseudonym, which the transform computes (migrations/0009) and
      // every clinical table requires: a random uuid stands in during the COPY. (Notes'
      // note_text_redacted is left NULL: the pre-flattened rows have none.)
      for (const t of ['patients', 'visits', 'diagnoses', 'treatments', 'provider_notes'])
        await queryOn(c, sql.unsafe`ALTER TABLE ${sql.identifier(['clinical', t])} ALTER COLUMN pseudonym SET DEFAULT gen_random_uuid()`);
      await queryOn(c, sql.unsafe`CHECKPOINT`);
      log('2. COPY of the pre-flattened rows (lower bound)');
      const lower = await timed(() => copyLowerBound(c, info));
      const lowerCounts = await clinicalCounts(c);
      expectCounts('COPY lower bound', lowerCounts, info.rows);
      for (const t of ['patients', 'visits', 'diagnoses', 'treatments', 'provider_notes'])
        await queryOn(c, sql.unsafe`ALTER TABLE ${sql.identifier(['clinical', t])} ALTER COLUMN pseudonym DROP DEFAULT`);
      await queryOn(c, TRUNCATE_ALL);
      await queryOn(c, sql.unsafe`VACUUM ANALYZE`);

      // (1) healthetl end to end.
      await queryOn(c, sql.unsafe`CHECKPOINT`);
      log('1. healthetl run (stage + transform)');
      const e2e = await timed(() => runCli(['run', info.files.ndjson!, ...shardArgs], url));
      if (e2e.value.code !== 0) throw new Error(`healthetl run exited ${e2e.value.code}: ${e2e.value.stderr.trim().split('\n').pop()}`);
      expectCounts('healthetl run', await clinicalCounts(c), info.rows);
      const [phases] = await queryOn(
        c,
        sql.type(z.object({ stage: z.number(), transform: z.number() }))`
          SELECT extract(epoch FROM staged_at - started_at)::float8 AS stage, extract(epoch FROM transformed_at - staged_at)::float8 AS transform
          FROM etl.batches ORDER BY batch_id DESC LIMIT 1`,
      );

      // (4) the same files again: all duplicates.
      await queryOn(c, sql.unsafe`CHECKPOINT`);
      log('4. healthetl run of the same file again');
      const again = await timed(() => runCli(['run', info.files.ndjson!, ...shardArgs], url));
      if (again.value.code !== 0 || Number(again.value.last?.duplicate) !== args.patients) {
        throw new Error(`second run: exit ${again.value.code}, duplicates ${again.value.last?.duplicate} (expected ${args.patients})`);
      }

      // (7) the data-quality checks on the rows of (1): the batch's patients (what `run` did after its
      // transform, included in (1)) and the whole database (the nightly `healthetl dq --all`).
      log('7. data-quality checks (dq.run): the batch of (1), then the whole database');
      const [first] = await queryOn(c, sql.type(z.object({ b: z.coerce.number() }))`SELECT min(batch_id) AS b FROM etl.batches`);
      const dqBatch = await timed(() => queryOn(c, sql.unsafe`SELECT dq.run(${first.b})`));
      const dqAll = await timed(() => queryOn(c, sql.unsafe`SELECT dq.run()`));

      // (6) analyst queries, on the rows of (1), before (3) empties the tables. Statistics and the
      // visibility map first, as after a nightly load's vacuum: the same for both sides.
      let analyst: AnalystReport | undefined;
      if (args.analystRuns > 0) {
        await queryOn(
          c,
          sql.unsafe`VACUUM (ANALYZE) clinical.patients, clinical.visits, clinical.diagnoses, clinical.treatments, clinical.provider_notes`,
        );
        analyst = await analystQueries(url, { runs: args.analystRuns, year: args.analystYear, log });
      }
      // (8) the bi/ query pack, each file as its role, on the same rows.
      let bi: BiQueryResult[] | undefined;
      if (args.analystRuns > 0) bi = await biQueries(url, { runs: args.analystRuns, log });

      // (3) row by row on a sample, extrapolated to N.
      const k = Math.min(args.rowSample, args.patients);
      const sample = await firstLines(info.files.ndjson!, k);
      await queryOn(c, TRUNCATE_ALL);
      await queryOn(c, sql.unsafe`CHECKPOINT`);
      log(`3. row by row, ${k} patients, extrapolated to ${args.patients}`);
      const rb = await timed(() => rowByRow(c, sample));
      const rbSeconds = (rb.seconds * args.patients) / k;

      rows.push(
        rate(
          '1. healthetl run (end to end)',
          e2e.seconds,
          `stage ${round(phases.stage)} s + transform ${round(phases.transform)} s (${args.shards ?? DEFAULT_SHARDS} shards); loader peak RSS ${Math.round(e2e.value.maxRssKb / 1024)} MB`,
        ),
        rate('2. COPY of flattened CSV (lower bound)', lower.seconds),
        rate('3. row by row (extrapolated)', rbSeconds, `${k} patients measured in ${round(rb.seconds)} s`),
        rate('4. second run, all duplicates', again.seconds),
        rate('7. dq checks, the batch of (1)', dqBatch.seconds, `${round(dqBatch.seconds / phases.transform)} x the transform of (1)`),
        rate('7. dq checks, whole database', dqAll.seconds, `${round(dqAll.seconds / phases.transform)} x the transform of (1)`),
      );

      // (5) loader peak RSS on a large file, both forms.
      const rss: Record<string, { mb: number; peak_rss_mb: number; seconds: number }> = {};
      if (args.rssMb > 0) {
        const n = Math.max(1, Math.round((args.rssMb * 1e6) / (info.bytes.ndjson / args.patients)));
        log(`5. loader peak RSS: generating ${n} patients (~${args.rssMb} MB) as NDJSON and as one JSON array`);
        const big = await writeDataset(path.join(work, 'big'), { patients: n, seed: args.seed + 1, forms: ['ndjson', 'json'] });
        for (const form of ['ndjson', 'json'] as const) {
          const file = big.files[form]!;
          await queryOn(c, TRUNCATE_ALL);
          const r = await timed(() => runCli(['load', file], url));
          if (r.value.code !== 0)
            throw new Error(`load of the large ${form} file exited ${r.value.code}: ${r.value.stderr.trim().split('\n').pop()}`);
          rss[form] = { mb: round(big.bytes[form] / 1e6), peak_rss_mb: Math.round(r.value.maxRssKb / 1024), seconds: round(r.seconds) };
          await rm(file);
        }
        await queryOn(c, TRUNCATE_ALL);
      }

      // (9) FHIR R4: a generated bulk export, `healthetl run` on its directory, in a fresh database.
      let fhir: FhirBenchReport | undefined;
      if (args.fhirPatients > 0) {
        const fhirDb = `${dbName}_fhir`;
        await queryOn(admin, sql.unsafe`CREATE DATABASE ${sql.identifier([fhirDb])}`);
        try {
          fhir = await benchFhir(withDatabase(adminUrl, fhirDb), {
            patients: args.fhirPatients,
            seed: args.seed,
            dir: path.join(work, 'fhir'),
            cliArgs: shardArgs,
            runCli,
            log,
          });
        } finally {
          if (!args.keep)
            await queryOn(admin, sql.unsafe`DROP DATABASE IF EXISTS ${sql.identifier([fhirDb])} WITH (FORCE)`).catch(() => undefined);
          await rm(path.join(work, 'fhir'), { recursive: true, force: true });
        }
      }
      const e2eMbPerS = mb / e2e.seconds;

      const ratios = {
        e2e_over_lower_bound: round(e2e.seconds / lower.seconds),
        row_by_row_over_e2e: round(rbSeconds / e2e.seconds),
        e2e_over_second_run: round(e2e.seconds / again.seconds),
        // The floor under the first ratio: staging alone (the jsonb parse of every document into
        // the landing table, before any transform) measured against the same lower bound.
        stage_over_lower_bound: round(phases.stage / lower.seconds),
        row_by_row_over_lower_bound: round(rbSeconds / lower.seconds),
        dq_batch_over_transform: round(dqBatch.seconds / phases.transform),
        dq_all_over_transform: round(dqAll.seconds / phases.transform),
        ...(fhir && { fhir_mb_per_s_over_documents: round(fhir.mb_per_s / e2eMbPerS) }),
      };
      const result = {
        date: new Date().toISOString(),
        patients: args.patients,
        shards: args.shards ?? DEFAULT_SHARDS,
        rows: info.rows,
        total_rows: totalRows,
        ndjson_mb: round(mb),
        postgres: `${pgVersion} (${serverKind})`,
        machine: {
          cpus: os.cpus().length,
          cpu_model: os.cpus()[0]?.model ?? 'unknown',
          memory_gb: round(os.totalmem() / 2 ** 30),
          node: process.version,
          platform: `${os.platform()} ${os.release()}`,
        },
        steps: rows,
        loader_peak_rss: rss,
        ratios,
        analyst_queries: analyst,
        bi_queries: bi,
        analyst_runs: args.analystRuns,
        fhir,
        targets: {
          e2e_over_lower_bound: '<= 1.5',
          row_by_row_over_e2e: '>= 30',
          e2e_over_second_run: '>= 10',
          loader_peak_rss_mb_for_2gb: '< 300',
          analyst_masked_over_base: '<= 1.2 (each query)',
          fhir_mb_per_s_over_documents: '>= 0.7',
        },
      };
      printTable(result);
      if (args.json === true) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
      else if (args.json) await writeFile(args.json, `${JSON.stringify(result, null, 2)}\n`);
      if (fhir?.problems.length) throw new Error(`the FHIR run is broken: ${fhir.problems.join('; ')}`);
    } finally {
      await c.end().catch(() => undefined);
      if (!args.keep)
        await queryOn(admin, sql.unsafe`DROP DATABASE IF EXISTS ${sql.identifier([dbName])} WITH (FORCE)`).catch(() => undefined);
      await admin.end();
    }
  } finally {
    await stopServer();
    if (!args.keep) await rm(work, { recursive: true, force: true });
  }
}

/** The first k documents of an NDJSON file, without reading the rest. */
async function firstLines(file: string, k: number): Promise<PatientDocument[]> {
  const out: PatientDocument[] = [];
  const rl = createInterface({ input: createReadStream(file), crlfDelay: Infinity });
  for await (const line of rl) {
    if (out.length >= k) break;
    out.push(JSON.parse(line) as PatientDocument);
  }
  rl.close();
  return out;
}

function round(x: number): number {
  return Math.round(x * 100) / 100;
}

function expectCounts(what: string, got: Record<string, number>, want: Record<string, number>): void {
  for (const t of TABLES) {
    if (got[t] !== want[t]) throw new Error(`${what}: clinical.${t} has ${got[t]} rows, the generator wrote ${want[t]}`);
  }
}

function printTable(r: {
  patients: number;
  total_rows: number;
  ndjson_mb: number;
  postgres: string;
  machine: { cpus: number; memory_gb: number; node: string };
  steps: Row[];
  loader_peak_rss: Record<string, { mb: number; peak_rss_mb: number; seconds: number }>;
  ratios: Record<string, number>;
  analyst_queries?: AnalystReport;
  bi_queries?: BiQueryResult[];
  analyst_runs: number;
  fhir?: FhirBenchReport;
  date: string;
}): void {
  const w = (s: string, n: number) => s.padEnd(n);
  const lines = [
    `healthetl bench, ${r.date.slice(0, 10)}: ${r.patients} patients, ${r.total_rows} rows, ${r.ndjson_mb} MB NDJSON; PostgreSQL ${r.postgres}; ${r.machine.cpus} cores, ${r.machine.memory_gb} GB, Node ${r.machine.node}`,
    '',
    `| ${w('step', 40)} | seconds | patients/s | rows/s | MB/s | note`,
    `| ${'-'.repeat(40)} | ------- | ---------- | ------ | ---- | ----`,
    ...r.steps.map(
      (s) =>
        `| ${w(s.step, 40)} | ${String(s.seconds).padStart(7)} | ${String(s.patients_per_s).padStart(10)} | ${String(s.rows_per_s).padStart(6)} | ${String(s.mb_per_s).padStart(4)} | ${s.note ?? ''}`,
    ),
    '',
    ...Object.entries(r.loader_peak_rss).map(
      ([form, x]) => `loader peak RSS, ${form} file of ${x.mb} MB: ${x.peak_rss_mb} MB (${x.seconds} s)`,
    ),
    `ratios: end to end / lower bound = ${r.ratios.e2e_over_lower_bound} (target <= 1.5); row by row / end to end = ${r.ratios.row_by_row_over_e2e} (target >= 30); first run / second run = ${r.ratios.e2e_over_second_run} (target >= 10)`,
    `floors: staging alone / lower bound = ${r.ratios.stage_over_lower_bound}; row by row / lower bound = ${r.ratios.row_by_row_over_lower_bound}`,
    ...(r.analyst_queries ? ['', ...analystTable(r.analyst_queries)] : []),
    ...(r.bi_queries ? ['', ...biTable(r.bi_queries, r.analyst_runs)] : []),
    ...(r.fhir ? ['', ...fhirTable(r.fhir, r.ratios.fhir_mb_per_s_over_documents!)] : []),
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main().catch((err) => {
    process.stderr.write(`bench failed: ${(err as Error).message}\n`);
    process.exit(1);
  });
}
