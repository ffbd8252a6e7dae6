// The FHIR run of `npm run bench` (issue 12): a seeded Synthea-shaped bulk export
// (generate-fhir.ts) loaded with `healthetl run <dir>` into a fresh database, as a scheduler would,
// measured end to end (stage + transform): resources/s and MB/s, beside the patient-document run.
// Reports what became of the resources (landing status by type) and the clinical rows against the
// generated counts, so a broken run is visible, and where the transform's time went
// (pg_stat_user_functions, track_functions = 'pl', when the bench's user may set it).
import pg from 'pg';
import { z } from 'zod';
import { queryOn, sql } from './db.ts';
import { generateFhirBulk, CLINICAL_TABLE_OF, FHIR_TYPES } from './generate-fhir.ts';
import { migrate } from './migrate.ts';

/** FHIR patients per patient-document patient of the bench: 50,000 -> 1,000 patients, 515,350 resources (seed 42). */
export const FHIR_PATIENTS_PER_DOCUMENT_PATIENT = 1 / 50;

export type RunCli = (args: string[], url: string) => Promise<{ code: number; maxRssKb: number; stderr: string }>;

export type FhirBenchReport = {
  patients: number;
  resources: number;
  mb: number;
  generate_seconds: number;
  exit_code: number;
  error?: string;
  seconds: number;
  stage_seconds: number;
  transform_seconds: number;
  resources_per_s: number;
  mb_per_s: number;
  loader_peak_rss_mb: number;
  /** landing.raw_documents by status (loaded, waiting, rejected, duplicate, superseded, staged). */
  landing: Record<string, number>;
  /** by resource type, then status (when the landing table has resource_type). */
  landing_by_type?: Record<string, Record<string, number>>;
  clinical: Record<string, { expected: number; got: number }>;
  /** the slowest PL/pgSQL functions of the run, self time, summed over shards. */
  functions?: Array<{ name: string; calls: number; self_ms: number; total_ms: number }>;
  problems: string[];
};

const round = (x: number): number => Math.round(x * 100) / 100;
const Count = z.object({ k: z.string().nullable(), status: z.string(), n: z.coerce.number() });

export async function benchFhir(
  url: string,
  o: { patients: number; seed: number; dir: string; cliArgs: string[]; runCli: RunCli; log: (m: string) => void },
): Promise<FhirBenchReport> {
  const t0 = performance.now();
  const info = await generateFhirBulk(o.dir, { patients: o.patients, seed: o.seed });
  const generateSeconds = (performance.now() - t0) / 1000;
  const mb = info.total.bytes / 1e6;
  o.log(`FHIR: ${o.patients} patients, ${info.total.resources} resources, ${mb.toFixed(1)} MB of NDJSON in ${FHIR_TYPES.length} files`);
  await migrate(url, 'up');
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    // Per-function timings of the run's own sessions (superuser only; skipped otherwise).
    const profiled = await queryOn(c, sql.unsafe`ALTER DATABASE ${sql.identifier([c.database!])} SET track_functions = 'pl'`).then(
      () => true,
      () => false,
    );
    await queryOn(c, sql.unsafe`CHECKPOINT`);
    o.log('FHIR: healthetl run <bulk export directory> (stage + transform)');
    const t1 = performance.now();
    const run = await o.runCli(['run', o.dir, '--source-system', 'bench-fhir', ...o.cliArgs], url);
    const seconds = (performance.now() - t1) / 1000;
    const problems: string[] = [];
    const error = run.code === 0 ? undefined : run.stderr.trim().split('\n').pop();
    if (run.code !== 0) problems.push(`healthetl run exited ${run.code}: ${error}`);

    const [phases] = await queryOn(
      c,
      sql.type(z.object({ stage: z.number().nullable(), transform: z.number().nullable() }))`
        SELECT extract(epoch FROM max(staged_at) - min(started_at))::float8 AS stage,
               extract(epoch FROM max(transformed_at) - max(staged_at))::float8 AS transform
        FROM etl.batches`,
    );
    const landing: Record<string, number> = {};
    for (const r of await queryOn(
      c,
      sql.type(Count)`SELECT NULL::text AS k, status, count(*) AS n FROM landing.raw_documents GROUP BY status`,
    ))
      landing[r.status] = r.n;
    let byType: Record<string, Record<string, number>> | undefined;
    try {
      byType = {};
      for (const r of await queryOn(
        c,
        sql.type(Count)`SELECT resource_type AS k, status, count(*) AS n FROM landing.raw_documents GROUP BY 1, 2 ORDER BY 1, 2`,
      ))
        (byType[r.k ?? '(none)'] ??= {})[r.status] = r.n;
    } catch {
      byType = undefined; // a landing table without resource_type
    }
    for (const s of ['waiting', 'rejected', 'staged']) if (landing[s]) problems.push(`${landing[s]} resources ${s}`);
    if ((landing.loaded ?? 0) !== info.total.resources) problems.push(`${landing.loaded ?? 0} of ${info.total.resources} resources loaded`);

    const clinical: FhirBenchReport['clinical'] = {};
    for (const [type, table] of Object.entries(CLINICAL_TABLE_OF))
      (clinical[table!] ??= { expected: 0, got: 0 }).expected += info.resources[type as keyof typeof info.resources];
    for (const t of Object.keys(clinical)) {
      const [{ n }] = await queryOn(
        c,
        sql.type(z.object({ n: z.coerce.number() }))`SELECT count(*) AS n FROM ${sql.identifier(['clinical', t])}`,
      );
      clinical[t]!.got = n;
      if (n !== clinical[t]!.expected)
        problems.push(`clinical.${t} has ${n} rows, the generator wrote ${clinical[t]!.expected} resources for it`);
    }

    let functions: FhirBenchReport['functions'];
    if (profiled) {
      await queryOn(c, sql.unsafe`SELECT pg_stat_clear_snapshot()`);
      functions = await queryOn(
        c,
        sql.type(z.object({ name: z.string(), calls: z.coerce.number(), self_ms: z.number(), total_ms: z.number() }))`
          SELECT schemaname || '.' || funcname AS name, calls, round(self_time::numeric, 1)::float8 AS self_ms,
                 round(total_time::numeric, 1)::float8 AS total_ms
          FROM pg_stat_user_functions WHERE schemaname IN ('etl', 'dq') ORDER BY self_time DESC LIMIT 15`,
      );
    }
    return {
      patients: o.patients,
      resources: info.total.resources,
      mb: round(mb),
      generate_seconds: round(generateSeconds),
      exit_code: run.code,
      error,
      seconds: round(seconds),
      stage_seconds: round(phases?.stage ?? NaN),
      transform_seconds: round(phases?.transform ?? NaN),
      resources_per_s: Math.round(info.total.resources / seconds),
      mb_per_s: round(mb / seconds),
      loader_peak_rss_mb: Math.round(run.maxRssKb / 1024),
      landing,
      landing_by_type: byType,
      clinical,
      functions,
      problems,
    };
  } finally {
    await c.end().catch(() => undefined);
  }
}

/** The FHIR lines of the bench's table. */
export function fhirTable(f: FhirBenchReport, ratio: number): string[] {
  return [
    `FHIR bulk export, ${f.patients} patients: ${f.resources} resources, ${f.mb} MB NDJSON (generated in ${f.generate_seconds} s)`,
    `| healthetl run (end to end) | ${f.seconds} s | ${f.resources_per_s} resources/s | ${f.mb_per_s} MB/s | stage ${f.stage_seconds} s + transform ${f.transform_seconds} s; loader peak RSS ${f.loader_peak_rss_mb} MB; exit ${f.exit_code}`,
    `ratio: FHIR MB/s / patient-document MB/s = ${ratio} (target >= 0.7${ratio >= 0.7 ? ': met' : ': NOT MET'})`,
    `landing: ${Object.entries(f.landing)
      .map(([s, n]) => `${s} ${n}`)
      .join(', ')}`,
    ...Object.entries(f.landing_by_type ?? {}).map(
      ([t, m]) =>
        `  ${t}: ${Object.entries(m)
          .map(([s, n]) => `${s} ${n}`)
          .join(', ')}`,
    ),
    `clinical rows (got / expected): ${Object.entries(f.clinical)
      .map(([t, x]) => `${t} ${x.got} / ${x.expected}`)
      .join(', ')}`,
    ...(f.functions?.length
      ? [
          'slowest functions (self ms / total ms, calls):',
          ...f.functions.map((x) => `  ${x.name}: ${x.self_ms} / ${x.total_ms} (${x.calls})`),
        ]
      : []),
    ...f.problems.map((p) => `FHIR PROBLEM: ${p}`),
  ];
}
