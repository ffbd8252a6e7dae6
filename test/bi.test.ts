// The bi/ query pack (issue 13), each file read from disk and run as the analyst role it is written
// for over a real connection, on a fixture built below whose right answers are worked out by hand in
// the comments. Each file run as the other tier's role is refused (permission denied for schema),
// and no file names a base-table schema. Dates are relative to this year (Y1 = last year, Y2 = the
// year before), so ages and "not in the future" stay true in later years.
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { beforeAll, describe, expect, test } from 'vitest';
import { expandInputs } from '../scripts/inputs.ts';
import { loadBatch } from '../scripts/stage.ts';
import { transformPending } from '../scripts/transform.ts';
import { failureAs, queryAs, useLogin, usePool, useTestDatabase } from './db.ts';

const Y = new Date().getUTCFullYear();
const Y1 = Y - 1;
const Y2 = Y - 2;

const NPI_OK = '1234567893'; // Luhn over 80840123456789: check digit 3
const NPI_BAD = '1234567890';
const F1 = { id: 'F1', name: 'North Hospital' };
const F2 = { id: 'F2', name: 'South Clinic' };

type Doc = Record<string, unknown>;

function patient(id: string, given: string, birth: string, sex: string, visits: Doc[] = []): Doc {
  return {
    patient_id: id,
    source_system: 'bi-test',
    updated_at: '2024-06-01T00:00:00Z',
    name: { given, family: 'Fixture' },
    birth_date: birth,
    sex,
    visits,
  };
}

function visit(id: string, date: string, type: string, facility: { id: string; name: string }, codes: string[], extra: Doc = {}): Doc {
  return { visit_id: id, visit_date: date, visit_type: type, facility, diagnoses: codes.map((code) => ({ code })), ...extra };
}

function med(id: string, name: string, start: string, end?: string): Doc {
  return { treatment_id: id, type: 'medication', name, start_date: start, ...(end ? { end_date: end } : {}) };
}

// Ages today (birth dates on days 1-28 of a month, so any year works): A 70-71, B 67-68, C 49-50,
// D 10-11, E 95-96, S01..S11 30-31.
const BIRTH: Record<string, string> = {
  A: `${Y - 71}-03-10`,
  B: `${Y - 68}-05-20`,
  C: `${Y - 51}-09-01`,
  D: `${Y - 11}-02-14`,
  E: `${Y - 96}-01-20`,
};
const S = Array.from({ length: 11 }, (_, i) => `S${String(i + 1).padStart(2, '0')}`);
S.forEach((s, i) => (BIRTH[s] = `${Y - 31}-04-${String(i + 1).padStart(2, '0')}`));

const DOCS: Doc[] = [
  // A: type 2 diabetic, readmitted exactly 30 days after a discharge (A1 -> A3).
  patient('BI-A', 'Arthur', BIRTH.A, 'male', [
    visit('A1', `${Y1}-01-05`, 'inpatient', F1, ['E11.9', 'I10'], {
      discharge_date: `${Y1}-01-10`,
      provider: { npi: NPI_OK, name: 'Dr. One' },
      treatments: [med('A1-T', 'metformin', `${Y1}-01-05`, `${Y1}-02-04`)], // 30 days
    }),
    // an outpatient visit 5 days after discharge is not a readmission
    visit('A2', `${Y1}-01-15`, 'outpatient', F2, ['E11.9'], {
      treatments: [med('A2-T', 'insulin glargine', `${Y1}-01-15`, `${Y1}-02-14`)], // 30 days
    }),
    // readmission: Y1-01-10 + 30 days = Y1-02-09; its NPI fails the check digit (the planted dq warn)
    visit('A3', `${Y1}-02-09`, 'inpatient', F1, ['I50.9'], {
      discharge_date: `${Y1}-02-12`,
      provider: { npi: NPI_BAD, name: 'Dr. Two' },
    }),
    visit('A4', `${Y2}-06-10`, 'outpatient', F2, ['E11.9'], {
      treatments: [med('A4-T', 'metformin', `${Y2}-06-10`, `${Y2}-09-08`)], // 20 + 31 + 31 + 8 = 90 days
    }),
  ]),
  // B: type 2 diabetic; B1 -> B2 is 31 days (not a readmission), B2 -> B3 is 10 days (a readmission).
  patient('BI-B', 'Bertram', BIRTH.B, 'male', [
    visit('B1', `${Y1}-04-01`, 'inpatient', F1, ['E11.65'], {
      discharge_date: `${Y1}-04-05`,
      treatments: [med('B1-T', ' Metformin ', `${Y1}-04-01`, `${Y1}-04-11`)], // 10 days; same drug as metformin
    }),
    visit('B2', `${Y1}-05-06`, 'inpatient', F1, ['J18.9'], { discharge_date: `${Y1}-05-10` }), // Apr 5 + 31 = May 6
    visit('B3', `${Y1}-05-20`, 'inpatient', F1, ['J18.9'], {
      discharge_date: `${Y1}-05-25`,
      treatments: [med('B3-T', 'lisinopril', `${Y1}-05-20`)], // no end date: no duration
    }),
  ]),
  // C: prediabetes, not in the cohort, on metformin.
  patient('BI-C', 'Cordelia', BIRTH.C, 'female', [
    visit('C1', `${Y1}-03-03`, 'outpatient', F2, ['R73.03'], {
      treatments: [med('C1-T', 'metformin', `${Y1}-03-03`, `${Y1}-05-02`)], // 28 + 30 + 2 = 60 days
    }),
  ]),
  // D: type 1 diabetic (E10), not in the type 2 cohort.
  patient('BI-D', 'Desmond', BIRTH.D, 'male', [
    visit('D1', `${Y1}-07-07`, 'emergency', F1, ['E10.9'], {
      treatments: [med('D1-T', 'insulin glargine', `${Y1}-07-07`, `${Y1}-07-17`)], // 10 days
    }),
  ]),
  // E: 95 or 96 years old, no visits.
  patient('BI-E', 'Eudora', BIRTH.E, 'female'),
  // S01..S11: 11 similar women aged 30-31, one telehealth visit each in August of Y1: Z00.00 each,
  // J06.9 for the first five, and one code of their own (S01 T11.0, ..., S11 T21.0).
  ...S.map((s, i) =>
    patient(`BI-${s}`, `Sister${s}`, BIRTH[s], 'female', [
      visit(`${s}-V`, `${Y1}-08-${String(i + 1).padStart(2, '0')}`, 'telehealth', F2, [
        'Z00.00',
        ...(i < 5 ? ['J06.9'] : []),
        `T${11 + i}.0`,
      ]),
    ]),
  ),
];

const db = useTestDatabase();
const loader = useLogin(db, 'healthetl_loader');
const analyst = useLogin(db, 'healthetl_analyst');
const researcher = useLogin(db, 'healthetl_researcher');
const loaderPool = usePool({ url: loader });

const BI = path.resolve('bi');
const FILES = readdirSync(BI)
  .filter((f) => f.endsWith('.sql'))
  .sort();
/** The role each file is written for: deid files for the researcher, the rest for the analyst. */
const TIER: Record<string, 'analytics' | 'deid'> = {
  'age_sex_counts_deid.sql': 'deid',
  'data_quality_freshness.sql': 'analytics',
  'diabetes_cohort_treatments.sql': 'analytics',
  'medication_utilisation.sql': 'analytics',
  'readmissions_30_day.sql': 'analytics',
  'top_diagnoses_per_quarter.sql': 'analytics',
  'visits_per_month.sql': 'analytics',
};

// Dates as 'YYYY-MM-DD' text and counts as numbers, so rows compare as plain values.
const types = {
  getTypeParser(oid: number, format?: string) {
    if (oid === pg.types.builtins.DATE) return (v: string) => v;
    if (oid === pg.types.builtins.INT8) return (v: string) => Number(v);
    return pg.types.getTypeParser(oid, format as 'text');
  },
};

const as = <T = any>(url: string, text: string): Promise<T[]> => queryAs<T>(url, text, undefined, types);

const sql = (file: string) => readFileSync(path.join(BI, file), 'utf8');
const run = (file: string) => as(TIER[file] === 'deid' ? researcher() : analyst(), sql(file));

/** Pseudonym -> fixture label (A, B, ..., S11), matched on the birth date the limited data set keeps. */
let label: Map<string, string>;
/** fixture label + visit date -> visit_key. */
let visitKey: Map<string, number>;

beforeAll(async () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-bi-'));
  const file = path.join(tmp, 'bi.ndjson');
  writeFileSync(file, DOCS.map((d) => JSON.stringify(d)).join('\n') + '\n');
  await loadBatch(loader(), expandInputs([file], 'ndjson'), {});
  await transformPending(loaderPool());
  const byBirth = new Map(Object.entries(BIRTH).map(([k, v]) => [v, k]));
  const pts = await as<{ p: string; b: string }>(analyst(), 'SELECT patient_pseudonym AS p, birth_date AS b FROM analytics.patients');
  label = new Map(pts.map((r) => [r.p, byBirth.get(r.b)!]));
  const vs = await as<{ p: string; d: string; k: number }>(
    analyst(),
    'SELECT patient_pseudonym AS p, visit_date AS d, visit_key AS k FROM analytics.visits',
  );
  visitKey = new Map(vs.map((r) => [`${label.get(r.p)} ${r.d}`, r.k]));
});

describe('the fixture', () => {
  test('all 16 patients and 20 visits loaded, each pseudonym matched to its fixture patient', async () => {
    expect([...label.values()].sort()).toEqual(Object.keys(BIRTH).sort());
    expect(visitKey.size).toBe(20); // A 4, B 3, C 1, D 1, S 11 (no patient has two visits on one day)
    expect(FILES).toEqual(Object.keys(TIER));
  });
});

describe('each bi/ query as its role, compared with the answer worked out by hand', () => {
  test('visits_per_month', async () => {
    const row = (m: string, type: string, f: { id: string; name: string }, visits: number, patients: number) => ({
      visit_month: m,
      visit_type: type,
      facility_id: f.id,
      facility_name: f.name,
      visit_count: visits,
      patient_count: patients,
    });
    expect(await run('visits_per_month.sql')).toEqual([
      row(`${Y2}-06-01`, 'outpatient', F2, 1, 1), // A4
      row(`${Y1}-01-01`, 'inpatient', F1, 1, 1), // A1
      row(`${Y1}-01-01`, 'outpatient', F2, 1, 1), // A2
      row(`${Y1}-02-01`, 'inpatient', F1, 1, 1), // A3
      row(`${Y1}-03-01`, 'outpatient', F2, 1, 1), // C1
      row(`${Y1}-04-01`, 'inpatient', F1, 1, 1), // B1
      row(`${Y1}-05-01`, 'inpatient', F1, 2, 1), // B2, B3: two visits of one patient
      row(`${Y1}-07-01`, 'emergency', F1, 1, 1), // D1
      row(`${Y1}-08-01`, 'telehealth', F2, 11, 11), // S01..S11
    ]);
  });

  test('top_diagnoses_per_quarter: distinct patients, at most 10 a quarter', async () => {
    const rows = await run('top_diagnoses_per_quarter.sql');
    const got = rows.map((r) => [r.quarter, r.rank, r.code, r.patient_count, r.diagnosis_count]);
    expect(got).toEqual([
      [`${Y2}-Q2`, 1, 'E11.9', 1, 1], // A4
      // Q1: E11.9 twice for A (A1, A2) counts one patient; then I10, I50.9, R73.03 once each, by code
      [`${Y1}-Q1`, 1, 'E11.9', 1, 2],
      [`${Y1}-Q1`, 2, 'I10', 1, 1],
      [`${Y1}-Q1`, 3, 'I50.9', 1, 1],
      [`${Y1}-Q1`, 4, 'R73.03', 1, 1],
      // Q2: J18.9 at B2 and B3 (one patient, two diagnoses) before E11.65 at B1
      [`${Y1}-Q2`, 1, 'J18.9', 1, 2],
      [`${Y1}-Q2`, 2, 'E11.65', 1, 1],
      // Q3: 14 codes (Z00.00 x 11, J06.9 x 5, E10.9 and T11.0..T21.0 once each); the ten kept are
      // Z00.00, J06.9, then the 1-patient codes by code: E10.9, T11.0 .. T17.0 (T18.0..T21.0 cut)
      [`${Y1}-Q3`, 1, 'Z00.00', 11, 11],
      [`${Y1}-Q3`, 2, 'J06.9', 5, 5],
      [`${Y1}-Q3`, 3, 'E10.9', 1, 1],
      ...[11, 12, 13, 14, 15, 16, 17].map((n, i) => [`${Y1}-Q3`, 4 + i, `T${n}.0`, 1, 1]),
    ]);
    expect(rows[0]).toMatchObject({ quarter_start: `${Y2}-04-01`, code_system: 'ICD-10-CM' });
    expect(rows.at(-1)).toMatchObject({ quarter_start: `${Y1}-07-01` });
  });

  test('readmissions_30_day: exactly two (30 days and 10 days), not the 31-day one nor the outpatient visit', async () => {
    const rows = await run('readmissions_30_day.sql');
    expect(rows.map((r) => ({ ...r, patient_pseudonym: label.get(r.patient_pseudonym) }))).toEqual([
      {
        patient_pseudonym: 'A',
        index_visit_key: visitKey.get(`A ${Y1}-01-05`),
        index_admission_date: `${Y1}-01-05`,
        index_discharge_date: `${Y1}-01-10`,
        readmission_visit_key: visitKey.get(`A ${Y1}-02-09`),
        readmission_date: `${Y1}-02-09`,
        days_after_discharge: 30,
      },
      {
        patient_pseudonym: 'B',
        index_visit_key: visitKey.get(`B ${Y1}-05-06`),
        index_admission_date: `${Y1}-05-06`,
        index_discharge_date: `${Y1}-05-10`,
        readmission_visit_key: visitKey.get(`B ${Y1}-05-20`),
        readmission_date: `${Y1}-05-20`,
        days_after_discharge: 10,
      },
    ]);
    expect(rows.every((r) => typeof r.index_visit_key === 'number')).toBe(true);
  });

  test('diabetes_cohort_treatments: A and B (E11), not C (R73) nor D (E10)', async () => {
    const rows = await run('diabetes_cohort_treatments.sql');
    const [pa, pb] = ['A', 'B'].map((l) => [...label].find(([, v]) => v === l)![0]);
    const r = (p: string, entry: string, year: number, name: string) => ({
      patient_pseudonym: p,
      cohort_entry_date: entry,
      treatment_year: year,
      treatment_type: 'medication',
      treatment_name: name,
      treatment_count: 1,
    });
    const a = [
      r(pa, `${Y2}-06-10`, Y2, 'metformin'), // A4; A's first E11 visit is A4 (two years ago)
      r(pa, `${Y2}-06-10`, Y1, 'insulin glargine'), // A2
      r(pa, `${Y2}-06-10`, Y1, 'metformin'), // A1
    ];
    const b = [
      r(pb, `${Y1}-04-01`, Y1, 'lisinopril'), // B3
      r(pb, `${Y1}-04-01`, Y1, 'metformin'), // B1, ' Metformin ' as sent
    ];
    // ordered by pseudonym (uuid order is the order of its lower-case hex text)
    expect(rows).toEqual(pa < pb ? [...a, ...b] : [...b, ...a]);
  });

  test('medication_utilisation: patients per drug and the median duration', async () => {
    expect(await run('medication_utilisation.sql')).toEqual([
      // A1 30, A4 90, B1 10, C1 60: sorted 10 30 60 90, median (30 + 60) / 2 = 45; patients A, B, C
      { drug_name: 'metformin', patient_count: 3, treatment_count: 4, with_duration_count: 4, median_duration_days: 45 },
      // A2 30, D1 10: median 20
      { drug_name: 'insulin glargine', patient_count: 2, treatment_count: 2, with_duration_count: 2, median_duration_days: 20 },
      // B3 has no end date
      { drug_name: 'lisinopril', patient_count: 1, treatment_count: 1, with_duration_count: 0, median_duration_days: null },
    ]);
  });

  test('age_sex_counts_deid: the 11-patient cell is shown, every smaller one suppressed', async () => {
    expect(await run('age_sex_counts_deid.sql')).toEqual([
      { age_band: '0-17', sex: 'male', patient_count: null, suppressed: true }, // D
      { age_band: '18-44', sex: 'female', patient_count: 11, suppressed: false }, // S01..S11
      { age_band: '45-64', sex: 'female', patient_count: null, suppressed: true }, // C
      { age_band: '65-89', sex: 'male', patient_count: null, suppressed: true }, // A, B
      { age_band: '90+', sex: 'female', patient_count: null, suppressed: true }, // E ('90+' in deid)
    ]);
  });

  test('data_quality_freshness: not checked before the checks run; then the one planted warning', async () => {
    const [{ t }] = await db.query(`SELECT max(transformed_at) AS t FROM etl.batches WHERE status = 'transformed'`);
    const before = await run('data_quality_freshness.sql');
    expect(before).toEqual([
      {
        data_as_of: t,
        quality_checked_at: null,
        quality_status: 'not checked',
        check_name: null,
        dimension: null,
        severity: null,
        status: null,
        failing_ratio: null,
        failing_since: null,
        description: null,
      },
    ]);

    await as(loader(), 'SELECT dq.run(NULL)');
    const after = await run('data_quality_freshness.sql');
    // Everything passes but the NPI check: of the 2 visits with an NPI (A1, A3), A3's is bad.
    expect(after.map((r) => [r.quality_status, r.check_name, r.severity, r.status, Number(r.failing_ratio)])).toEqual([
      ['warn', 'visits_provider_npi_check_digit', 'warn', 'warn', 0.5],
    ]);
    expect(after[0].data_as_of).toEqual(t);
    expect(after[0].quality_checked_at).toBeInstanceOf(Date);
    expect(after[0].failing_since).toEqual(after[0].quality_checked_at);
  });
});

describe('each bi/ query stays inside its tier', () => {
  test.each(Object.entries(TIER))("%s run as the other tier's role is refused", async (file, tier) => {
    const other = tier === 'deid' ? analyst() : researcher();
    expect(await failureAs(other, sql(file))).toContain(`permission denied for schema ${tier}`);
  });

  test.each(Object.keys(TIER))('%s names no base-table schema and uses no psql variables', (file) => {
    const text = sql(file);
    expect(text).not.toMatch(/\b(clinical|etl|landing|dq)\s*\./i);
    expect(text).not.toMatch(/^\s*\\/m); // no psql meta-commands
    expect(text).not.toMatch(/(?<!:):['"]?[A-Za-z_]/); // no :name variables (casts :: are fine)
    // a header: the question, then the grain of a row, the columns and the tier it needs
    expect(text).toMatch(/^-- [^\n]+\n(--[^\n]*\n)*-- Grain: [^]*\n-- Columns: [^]*\n-- Tier: (analytics|deid)/);
    expect(text).toMatch(new RegExp(`\\b${TIER[file]}\\.`));
    expect(text).not.toMatch(new RegExp(`\\b${TIER[file] === 'deid' ? 'analytics' : 'deid'}\\.`));
  });

  test('a base table is refused to both roles with permission denied, not answered', async () => {
    for (const url of [analyst(), researcher()])
      expect(await failureAs(url, 'SELECT count(*) FROM clinical.visits')).toContain('permission denied for schema clinical');
  });
});
