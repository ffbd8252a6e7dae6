// The analyst queries of `npm run bench`: the same BI questions asked of the masked views
// (analytics.*, as healthetl_analyst, migrations/0009) and of the base tables (clinical.*, as the
// bench's own user), in one run on the loaded bench database. Runs alternate base and masked
// (ABBA order: neither side always runs second, on a cache the other warmed), after one warm-up
// of each; the figure is the median of the runs, client-side wall time (planning, execution and
// the rows' transfer), as an analyst's tool would see it. Target: masked within 1.2 times base.
// The two sides must return the same rows: a mismatch fails the bench, a slow ratio only flags it.
import pg from 'pg';
import type { QuerySqlToken } from 'slonik';
import { z, type ZodTypeAny } from 'zod';
import { queryOn, sql } from './db.ts';

export const ANALYST_TARGET_RATIO = 1.2;
export const DEFAULT_ANALYST_RUNS = 7;

export type AnalystQueryResult = {
  query: string;
  rows: number;
  base_median_ms: number;
  masked_median_ms: number;
  ratio: number;
  over_target: boolean;
  base_runs_ms: number[];
  masked_runs_ms: number[];
};

export type AnalystReport = {
  role: string;
  runs: number;
  year: number | 'all';
  patient_visits: number;
  target_ratio: number;
  queries: AnalystQueryResult[];
};

type Pair = { name: string; base: QuerySqlToken<ZodTypeAny>; masked: QuerySqlToken<ZodTypeAny> };

const MonthRow = z.object({ month: z.string(), visit_type: z.string().nullable(), visits: z.coerce.number() });
const QuarterRow = z.object({
  quarter: z.string(),
  rank: z.coerce.number(),
  code: z.string(),
  patients: z.coerce.number(),
  diagnoses: z.coerce.number(),
});
const HistoryRow = z.object({
  visit_key: z.coerce.number(),
  visit_date: z.string(),
  visit_type: z.string().nullable(),
  facility_name: z.string().nullable(),
  provider_name: z.string().nullable(),
  diagnoses: z.unknown(),
  treatments: z.unknown(),
});

/**
 * The three questions, each written once per side with the same shape; only the keys differ. The
 * third is timed twice: its base finding the patient as the issue has it (clinical.patients, no
 * index) and by the indexed identity (etl.patient_keys), so that a missing index on the base side
 * cannot pass for a fast view.
 */
function queries(year: number | 'all', patient: { sourceSystem: string; sourcePatientId: string; pseudonym: string }): Pair[] {
  // A visit_date range (not extract(year ...)), so that partitions are pruned and indexes used.
  const inYear = (col: 'v' | 'd') =>
    year === 'all'
      ? sql.fragment`TRUE`
      : sql.fragment`${sql.identifier([col, 'visit_date'])} >= ${`${year}-01-01`}::date AND ${sql.identifier([col, 'visit_date'])} < ${`${year + 1}-01-01`}::date`;

  const perMonth = (visits: string[]) => sql.type(MonthRow)`
    SELECT to_char(date_trunc('month', v.visit_date), 'YYYY-MM') AS month, v.visit_type, count(*) AS visits
    FROM ${sql.identifier(visits)} v
    WHERE ${inYear('v')}
    GROUP BY 1, 2
    ORDER BY 1, 2`;

  // Top 10 codes per quarter by distinct patients (ties by code); the patient is the table's key.
  const topDiagnoses = (diagnoses: string[], key: 'patient_key' | 'patient_pseudonym') => sql.type(QuarterRow)`
    SELECT quarter, rank, code, patients, diagnoses
    FROM (SELECT g.*, row_number() OVER (PARTITION BY g.quarter ORDER BY g.patients DESC, g.code) AS rank
          FROM (SELECT to_char(date_trunc('quarter', d.visit_date), 'YYYY-"Q"Q') AS quarter, d.code,
                       count(DISTINCT ${sql.identifier(['d', key])}) AS patients, count(*) AS diagnoses
                FROM ${sql.identifier(diagnoses)} d
                WHERE ${inYear('d')}
                GROUP BY 1, 2) g) x
    WHERE rank <= 10
    ORDER BY quarter, rank`;

  // One patient's visits, each with its diagnoses and treatments in order. Children are joined on
  // the patient and the visit: the keys each side has (patient_key, or the pseudonym).
  const children = (kind: 'diagnoses' | 'treatments', schema: string, key: 'patient_key' | 'patient_pseudonym') =>
    kind === 'diagnoses'
      ? sql.fragment`(SELECT coalesce(jsonb_agg(jsonb_build_object('code', d.code, 'code_system', d.code_system,
                        'description', d.description, 'is_primary', d.is_primary) ORDER BY d.position), '[]')
                      FROM ${sql.identifier([schema, 'diagnoses'])} d
                      WHERE ${sql.identifier(['d', key])} = ${sql.identifier(['v', key])} AND d.visit_key = v.visit_key)`
      : sql.fragment`(SELECT coalesce(jsonb_agg(jsonb_build_object('treatment_type', t.treatment_type, 'code', t.code,
                        'name', t.name, 'dose', t.dose, 'route', t.route, 'start_date', t.start_date, 'end_date', t.end_date)
                        ORDER BY t.position), '[]')
                      FROM ${sql.identifier([schema, 'treatments'])} t
                      WHERE ${sql.identifier(['t', key])} = ${sql.identifier(['v', key])} AND t.visit_key = v.visit_key)`;
  const historyColumns = sql.fragment`v.visit_key, to_char(v.visit_date, 'YYYY-MM-DD') AS visit_date, v.visit_type, v.facility_name, v.provider_name`;
  const history = (fromWhere: ReturnType<typeof sql.fragment>) => sql.type(HistoryRow)`
    SELECT ${historyColumns},
           ${children('diagnoses', 'clinical', 'patient_key')} AS diagnoses,
           ${children('treatments', 'clinical', 'patient_key')} AS treatments
    FROM ${fromWhere}
    ORDER BY v.visit_date, v.visit_key`;
  const maskedHistory = sql.type(HistoryRow)`
    SELECT ${historyColumns},
           ${children('diagnoses', 'analytics', 'patient_pseudonym')} AS diagnoses,
           ${children('treatments', 'analytics', 'patient_pseudonym')} AS treatments
    FROM analytics.visits v
    WHERE v.patient_pseudonym = ${patient.pseudonym}
    ORDER BY v.visit_date, v.visit_key`;

  return [
    {
      name: `a. visits per month by type (${year})`,
      base: perMonth(['clinical', 'visits']),
      masked: perMonth(['analytics', 'visits']),
    },
    {
      name: `b. top 10 diagnoses per quarter (${year})`,
      base: topDiagnoses(['clinical', 'diagnoses'], 'patient_key'),
      masked: topDiagnoses(['analytics', 'diagnoses'], 'patient_pseudonym'),
    },
    {
      // Base: the patient by their source identity in clinical.patients (which has no index on it:
      // a scan of the patients); masked: by their pseudonym (indexed).
      name: 'c. history, base by clinical.patients',
      base: history(sql.fragment`clinical.patients p JOIN clinical.visits v ON v.patient_key = p.patient_key
        WHERE p.source_system = ${patient.sourceSystem} AND p.source_patient_id = ${patient.sourcePatientId}`),
      masked: maskedHistory,
    },
    {
      // The same, the base finding the patient by the index that identity has (etl.patient_keys'
      // unique key), as the loader does: the comparison of the two sides' plans, not of an index.
      name: "c'. history, base by etl.patient_keys",
      base: history(sql.fragment`etl.patient_keys k JOIN clinical.visits v ON v.patient_key = k.patient_key
        WHERE k.source_system = ${patient.sourceSystem} AND k.source_patient_id = ${patient.sourcePatientId}`),
      masked: maskedHistory,
    },
  ];
}

async function timedQuery(c: pg.Client, q: QuerySqlToken<ZodTypeAny>): Promise<{ ms: number; rows: unknown[] }> {
  const t0 = process.hrtime.bigint();
  const rows = await queryOn(c, q);
  return { ms: Number(process.hrtime.bigint() - t0) / 1e6, rows };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

const r2 = (x: number) => Math.round(x * 100) / 100;

/**
 * Runs the analyst queries on the database at `url` (loaded, as the bench leaves it after its
 * run): base as the URL's user, masked as `role` (SET ROLE: the URL's user must be a member, as a
 * superuser is). `year`: a calendar year, 'all', or undefined for the last whole year of visits.
 */
export async function analystQueries(
  url: string,
  opts: { runs: number; year?: number | 'all'; role?: string; log?: (m: string) => void },
): Promise<AnalystReport> {
  const role = opts.role ?? 'healthetl_analyst';
  const log = opts.log ?? (() => undefined);

  // What to ask, found on a connection of its own: the two timed sessions start alike (a sort of
  // every patient on the base session made its later queries measurably slower).
  const setup = new pg.Client({ connectionString: url });
  await setup.connect();
  let year = opts.year;
  let patient;
  try {
    if (year === undefined) {
      // The last whole year: the year before the latest visit's (the latest may be partial).
      const [{ y }] = await queryOn(
        setup,
        sql.type(z.object({ y: z.coerce.number().nullable() }))`
          SELECT extract(year FROM max(visit_date))::int - 1 AS y FROM clinical.visits`,
      );
      year = y ?? 'all';
    }
    // The patient of question c: the one in the middle of the source ids (the same for a seed,
    // whatever order the shards gave out keys in), with their visit count.
    [patient] = await queryOn(
      setup,
      sql.type(z.object({ source_system: z.string(), source_patient_id: z.string(), pseudonym: z.string(), visits: z.coerce.number() }))`
        SELECT p.source_system, p.source_patient_id, p.pseudonym,
               (SELECT count(*) FROM clinical.visits v WHERE v.patient_key = p.patient_key) AS visits
        FROM clinical.patients p
        ORDER BY p.source_system, p.source_patient_id
        OFFSET (SELECT count(*) / 2 FROM clinical.patients) LIMIT 1`,
    );
  } finally {
    await setup.end().catch(() => undefined);
  }
  if (!patient) throw new Error('analyst queries: clinical.patients is empty');

  const base = new pg.Client({ connectionString: url, application_name: 'healthetl bench: base' });
  const masked = new pg.Client({ connectionString: url, application_name: 'healthetl bench: analyst' });
  await base.connect();
  try {
    await masked.connect();
    await queryOn(masked, sql.unsafe`SET ROLE ${sql.identifier([role])}`);
    // The masked side really is an analyst: it cannot read what the base side reads.
    const [who] = await queryOn(
      masked,
      sql.type(z.object({ user: z.string(), clinical: z.boolean(), analytics: z.boolean() }))`
        SELECT current_user AS user, has_schema_privilege('clinical', 'USAGE') AS clinical,
               has_table_privilege('analytics.visits', 'SELECT') AS analytics`,
    );
    if (who.user !== role || who.clinical || !who.analytics) {
      throw new Error(`analyst session: current_user ${who.user}, clinical usable ${who.clinical}, analytics readable ${who.analytics}`);
    }
    log(
      `6. analyst queries (${year}; the patient has ${patient.visits} visits): base as the bench's user, masked as ${role}; median of ${opts.runs}`,
    );

    const out: AnalystQueryResult[] = [];
    for (const q of queries(year, {
      sourceSystem: patient.source_system,
      sourcePatientId: patient.source_patient_id,
      pseudonym: patient.pseudonym,
    })) {
      // Warm-up, and the check that both sides answer the same.
      const wb = await timedQuery(base, q.base);
      const wm = await timedQuery(masked, q.masked);
      if (JSON.stringify(wb.rows) !== JSON.stringify(wm.rows)) {
        throw new Error(
          `analyst query ${q.name}: the masked views answered differently from the base tables (${wb.rows.length} vs ${wm.rows.length} rows)`,
        );
      }
      const b: number[] = [];
      const m: number[] = [];
      for (let i = 0; i < opts.runs; i++) {
        if (i % 2 === 0) {
          b.push((await timedQuery(base, q.base)).ms);
          m.push((await timedQuery(masked, q.masked)).ms);
        } else {
          m.push((await timedQuery(masked, q.masked)).ms);
          b.push((await timedQuery(base, q.base)).ms);
        }
      }
      const ratio = median(m) / median(b);
      out.push({
        query: q.name,
        rows: wb.rows.length,
        base_median_ms: r2(median(b)),
        masked_median_ms: r2(median(m)),
        ratio: r2(ratio),
        over_target: ratio > ANALYST_TARGET_RATIO,
        base_runs_ms: b.map(r2),
        masked_runs_ms: m.map(r2),
      });
    }
    return { role, runs: opts.runs, year, patient_visits: patient.visits, target_ratio: ANALYST_TARGET_RATIO, queries: out };
  } finally {
    await masked.end().catch(() => undefined);
    await base.end().catch(() => undefined);
  }
}

/** The table the bench prints: one line per query, a flag on each ratio over the target. */
export function analystTable(r: AnalystReport): string[] {
  const w = (s: string, n: number) => s.padEnd(n);
  const num = (x: number, n: number) => x.toFixed(2).padStart(n);
  return [
    `analyst queries: masked views (analytics.*, as ${r.role}) against the base tables (clinical.*); median of ${r.runs} runs each, alternated, after one warm-up; target: masked <= ${r.target_ratio} x base`,
    `| ${w('query', 40)} | rows | base ms | masked ms | ratio |`,
    `| ${'-'.repeat(40)} | ---- | ------- | --------- | ----- |`,
    ...r.queries.map(
      (q) =>
        `| ${w(q.query, 40)} | ${String(q.rows).padStart(4)} | ${num(q.base_median_ms, 7)} | ${num(q.masked_median_ms, 9)} | ${num(q.ratio, 5)} |${q.over_target ? ` OVER ${r.target_ratio}` : ''}`,
    ),
  ];
}
