// Data-quality checks (migrations/0011), run as the loader over a real connection: a clean set of
// patients passes every check; a set that breaks each check once is caught with the failing counts
// worked out by hand below; thresholds, severities and enabled are tuned by UPDATE and recorded;
// samples hold surrogate keys only. Dates are made relative to today, so "the future" stays ahead.
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { beforeAll, describe, expect, test } from 'vitest';
import { expandInputs } from '../scripts/inputs.ts';
import { loadBatch } from '../scripts/stage.ts';
import { transformPending } from '../scripts/transform.ts';
import { useLogin, usePool, useTestDatabase } from './db.ts';

const year = new Date().getUTCFullYear();
const FUTURE = `${year + 1}-03-01`; // inside the transform's plausible years (until the end of next year)

const NPI_OK = '1234567893'; // Luhn over 80840123456789: check digit 3
const NPI_BAD = '1234567890';

function visit(id: string, date: string, extra: Record<string, unknown> = {}) {
  return {
    visit_id: id,
    visit_date: date,
    visit_type: 'outpatient',
    provider: { npi: NPI_OK, name: 'Dr. Placeholder' },
    diagnoses: [{ code: 'E11.9', description: 'Type 2 diabetes' }],
    treatments: [{ treatment_id: `${id}-T`, type: 'medication', name: 'metformin', start_date: date, end_date: '2024-12-31' }],
    provider_notes: [{ note_id: `${id}-N`, text: 'Fictional note.' }],
    ...extra,
  };
}

function patient(id: string, given: string, family: string, birth: string | undefined, sex: string | undefined, visits: unknown[]) {
  return {
    patient_id: id,
    source_system: 'dq-test',
    updated_at: '2024-06-01T00:00:00Z',
    name: { given, family },
    ...(birth === undefined ? {} : { birth_date: birth }),
    ...(sex === undefined ? {} : { sex }),
    visits,
  };
}

// Three complete, plausible patients: every check passes.
const CLEAN = [
  patient('C-1', 'Ada', 'Clean', '1960-01-01', 'female', [
    visit('CV-1', '2024-01-10', { discharge_date: '2024-01-12', visit_type: 'inpatient' }),
  ]),
  patient('C-2', 'Bo', 'Clean', '1970-02-02', 'male', [visit('CV-2', '2024-02-10')]),
  patient('C-3', 'Cy', 'Clean', '1980-03-03', 'other', [visit('CV-3', '2024-03-10')]),
];

// Each breaks one check once (the comment says which, and what else it adds by construction).
const BROKEN = [
  patient('B-1', 'Nobirth', 'Broken', undefined, 'female', [visit('BV-1', '2024-01-01')]), // birth date missing
  patient('B-2', 'Nosex', 'Broken', '1990-01-01', undefined, [visit('BV-2', '2024-01-01')]), // sex missing
  patient('B-3', 'Badsex', 'Broken', '1990-01-01', 'x-unknown-code', [visit('BV-3', '2024-01-01')]), // sex code (and so sex missing too)
  patient('B-4', 'Notype', 'Broken', '1990-01-01', 'male', [visit('BV-4', '2024-01-01', { visit_type: undefined })]), // visit type missing
  patient('B-5', 'Badcode', 'Broken', '1990-01-01', 'male', [
    // one malformed ICD-10-CM code; a SNOMED CT code is not held to the ICD-10-CM shape
    visit('BV-5', '2024-01-01', { diagnoses: [{ code: '123.45' }, { code: '44054006', system: 'SNOMED CT' }] }),
  ]),
  patient('B-6', 'Badnpi', 'Broken', '1990-01-01', 'male', [visit('BV-6', '2024-01-01', { provider: { npi: NPI_BAD } })]), // NPI check digit
  patient('B-7', 'Unborn', 'Broken', FUTURE, 'female', []), // birth in the future (and so an age below 0)
  patient('B-8', 'Ancient', 'Broken', '1890-01-01', 'male', [visit('BV-8', '2020-01-01')]), // age over 120
  patient('B-9', 'Ahead', 'Broken', '1990-01-01', 'male', [
    // a visit in the future; its treatment starts then too, and ends before it starts (2024-12-31)
    visit('BV-9', FUTURE),
  ]),
  patient('B-10', 'Early', 'Broken', '1990-01-01', 'male', [
    visit('BV-10', '2024-01-05', { discharge_date: '2024-01-01', visit_type: 'inpatient' }), // discharge before admission
  ]),
  patient('B-11', 'Prenatal', 'Broken', '2000-06-01', 'female', [visit('BV-11', '2000-01-01')]), // a visit before birth
  patient('B-12', 'Ann', 'Twin', '1975-05-05', 'female', [visit('BV-12', '2024-01-01')]), // probable duplicates: B-12 and B-13
  patient('B-13', 'Ann', 'Twin', '1975-05-05', 'female', [visit('BV-13', '2024-01-01')]),
];

const db = useTestDatabase();
const loader = useLogin(db, 'healthetl_loader');
const pool = usePool({ url: loader });
const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-dq-'));

async function load(name: string, docs: unknown[]): Promise<number> {
  writeFileSync(path.join(tmp, name), docs.map((d) => JSON.stringify(d)).join('\n') + '\n');
  const r = await loadBatch(loader(), expandInputs([path.join(tmp, name)], 'ndjson'), {});
  await transformPending(pool());
  return r.batchId;
}

/** dq.run as the loader; each check's status and failing count from dq.latest_results. */
async function runChecks(batchId: number | null): Promise<Record<string, { status: string; failing: number; checked: number }>> {
  const c = new pg.Client({ connectionString: loader() });
  await c.connect();
  try {
    await c.query('SELECT dq.run($1)', [batchId]);
    const rows = (await c.query(`SELECT check_name, status, rows_failing, rows_checked FROM dq.latest_results`)).rows;
    return Object.fromEntries(
      rows.map((r) => [r.check_name, { status: r.status, failing: Number(r.rows_failing), checked: Number(r.rows_checked) }]),
    );
  } finally {
    await c.end();
  }
}

const failing = (r: Record<string, { status: string; failing: number }>) =>
  Object.fromEntries(
    Object.entries(r)
      .filter(([, v]) => v.status !== 'pass')
      .map(([k, v]) => [k, [v.status, v.failing]]),
  );

let cleanBatch: number;
let brokenBatch: number;

beforeAll(async () => {
  cleanBatch = await load('clean.ndjson', CLEAN);
});

describe('checks', () => {
  test('a clean set passes every check', async () => {
    const r = await runChecks(null);
    expect(Object.keys(r)).toHaveLength(24);
    expect(failing(r)).toEqual({});
    expect(r.diagnoses_have_visit).toMatchObject({ checked: 3, failing: 0 });
  });

  test('a set that breaks each check once: each is caught with the count worked out by hand', async () => {
    brokenBatch = await load('broken.ndjson', BROKEN);
    const r = await runChecks(brokenBatch);
    expect(failing(r)).toEqual({
      patients_birth_date_present: ['warn', 1], // B-1 (ratio 1/13 over the 0.01 threshold)
      patients_sex_present: ['warn', 2], // B-2, and B-3 whose unknown code loads as NULL
      patients_sex_code: ['warn', 1], // B-3
      visits_visit_type_present: ['warn', 1], // BV-4 (1 of 12 visits, over 0.05)
      diagnoses_icd10cm_code_shape: ['warn', 1], // 123.45; the SNOMED code is not checked
      visits_provider_npi_check_digit: ['warn', 1], // BV-6
      patients_birth_date_not_future: ['fail', 1], // B-7 (error severity: fail)
      patients_age_0_to_120: ['warn', 2], // B-7 (below 0) and B-8 (over 120)
      visits_dates_not_future: ['fail', 1], // BV-9
      treatments_dates_not_future: ['warn', 1], // BV-9's treatment
      treatments_end_not_before_start: ['warn', 1], // BV-9's treatment ends 2024-12-31, before it starts
      visits_discharge_not_before_admission: ['fail', 1], // BV-10
      visits_not_before_birth: ['fail', 1], // BV-11
      patients_probable_duplicates: ['warn', 2], // B-12 and B-13
      batch_reject_share: ['warn', 1], // B-3 loaded with a problem (its sex code): 1 of 13, over 0.05
    });
    // The batch's patients only: 13 patients, not the clean 3 as well.
    expect(r.patients_sex_present.checked).toBe(13);
  });

  test('the consistency checks stand in for foreign keys: a deleted visit leaves orphans, a deleted patient leaves visits', async () => {
    await db.query(`DELETE FROM clinical.visits WHERE source_visit_id = 'CV-2'`); // its diagnosis, treatment and note stay behind
    await db.query(`DELETE FROM clinical.patients WHERE source_patient_id = 'C-3'`); // its one visit stays behind
    await db.query(`UPDATE clinical.diagnoses SET visit_date = visit_date + 1
                    WHERE visit_key = (SELECT visit_key FROM clinical.visits WHERE source_visit_id = 'CV-1')`); // a date that differs from its visit's
    const r = await runChecks(null);
    expect(failing(r)).toMatchObject({
      diagnoses_have_visit: ['fail', 2], // CV-2's, and CV-1's with the wrong date
      treatments_have_visit: ['fail', 1],
      provider_notes_have_visit: ['fail', 1],
      visits_have_patient: ['fail', 1], // CV-3
    });
  });

  test('batches reconcile, and one that does not is caught', async () => {
    await db.query(`UPDATE etl.batch_files SET documents = documents + 1 WHERE batch_id = $1`, [cleanBatch]);
    const r = await runChecks(null);
    expect(r.batches_reconcile).toMatchObject({ status: 'fail', failing: 1, checked: 2 });
    const samples = await db.query(`SELECT sample FROM dq.result_samples WHERE check_name = 'batches_reconcile'
                                    AND run_id = (SELECT max(run_id) FROM dq.runs)`);
    expect(samples.map((s) => Number(s.sample))).toEqual([cleanBatch]);
    await db.query(`UPDATE etl.batch_files SET documents = documents - 1 WHERE batch_id = $1`, [cleanBatch]);
  });

  test('timeliness: the last batch older than the threshold in hours warns', async () => {
    await db.query(`UPDATE etl.batches SET transformed_at = transformed_at - interval '40 hours'`);
    const r = await runChecks(null);
    expect(r.last_batch_recent).toMatchObject({ status: 'warn' });
    const [m] = await db.query(`SELECT measured FROM dq.latest_results WHERE check_name = 'last_batch_recent'`);
    expect(Number(m.measured)).toBeGreaterThanOrEqual(40);
    await db.query(`UPDATE etl.batches SET transformed_at = transformed_at + interval '40 hours'`);
  });

  test('volume: a batch far from the median of the previous batches warns; the share of rejects too', async () => {
    // Batches so far: 3 and 13 documents. Two more of 10, then one of 2: median of (3, 13, 10, 10) is 10, 2/10 = 0.2.
    const ten = (p: string) => Array.from({ length: 10 }, (_, i) => patient(`${p}-${i}`, 'Vol', `Ume${p}${i}`, '1990-01-01', 'male', []));
    await load('v1.ndjson', ten('V1'));
    await load('v2.ndjson', ten('V2'));
    const small = await load('v3.ndjson', [patient('V3-0', 'Vol', 'Small', '1990-01-01', 'male', []), { patient_id: '' }]);
    const r = await runChecks(small);
    expect(r.batch_documents_near_median).toMatchObject({ status: 'warn', failing: 1 });
    const [m] = await db.query(`SELECT measured FROM dq.latest_results WHERE check_name = 'batch_documents_near_median'`);
    expect(Number(m.measured)).toBe(0.2);
    // loaded: 1 against a median of 10 loaded (3, 13 -> 13 loaded, 10, 10): 0.1
    expect(r.batch_loaded_near_median).toMatchObject({ status: 'warn', failing: 1 });
    // one of two documents rejected: 0.5 over 0.05
    expect(r.batch_reject_share).toMatchObject({ status: 'warn', failing: 1, checked: 2 });
  });
});

describe('tuning and samples', () => {
  test('an UPDATE of a threshold or severity takes effect and is recorded: who, when, old and new value', async () => {
    const owner = new pg.Client({ connectionString: db.url() });
    await owner.connect();
    try {
      await owner.query(`UPDATE dq.checks SET threshold = 0.5, severity = 'error' WHERE check_name = 'patients_sex_present'`);
      await owner.query(`UPDATE dq.checks SET enabled = false WHERE check_name = 'patients_probable_duplicates'`);
    } finally {
      await owner.end();
    }
    const changes = await db.query(`SELECT check_name, setting, old_value, new_value, changed_by FROM dq.check_changes ORDER BY change_id`);
    expect(changes).toEqual([
      { check_name: 'patients_sex_present', setting: 'severity', old_value: 'warn', new_value: 'error', changed_by: 'postgres' },
      { check_name: 'patients_sex_present', setting: 'threshold', old_value: '0.01', new_value: '0.5', changed_by: 'postgres' },
      { check_name: 'patients_probable_duplicates', setting: 'enabled', old_value: 'true', new_value: 'false', changed_by: 'postgres' },
    ]);
    const c = new pg.Client({ connectionString: loader() });
    await c.connect();
    try {
      const [{ run }] = (await c.query('SELECT dq.run($1) AS run', [brokenBatch])).rows;
      const rows = (await c.query(`SELECT check_name, status, severity FROM dq.results WHERE run_id = $1`, [run])).rows;
      // 2 of 13 is under the new 0.5: passes, now with error severity; the disabled check did not run.
      expect(rows.find((x) => x.check_name === 'patients_sex_present')).toEqual({
        check_name: 'patients_sex_present',
        status: 'pass',
        severity: 'error',
      });
      expect(rows.find((x) => x.check_name === 'patients_probable_duplicates')).toBeUndefined();
    } finally {
      await c.end();
    }
  });

  test('samples are surrogate keys only: no name, id from the source or value of the fixtures is in dq', async () => {
    const text = (
      await db.query(`SELECT concat_ws(' ', (SELECT string_agg(r::text, ' ') FROM dq.results r),
                                                        (SELECT string_agg(s::text, ' ') FROM dq.result_samples s)) AS t`)
    )[0].t as string;
    expect(text.length).toBeGreaterThan(100);
    for (const planted of ['Broken', 'Twin', 'Ann', 'B-12', 'BV-9', 'dq-test', '123.45', NPI_BAD, '1890', FUTURE])
      expect(text, planted).not.toContain(planted);
    // And the keys are those of the failing rows: the two twins' patient keys.
    const twins = await db.query(`SELECT patient_key FROM clinical.patients WHERE family_name = 'Twin' ORDER BY 1`);
    const sampled = await db.query(
      `SELECT s.sample FROM dq.result_samples s JOIN dq.results r USING (run_id, check_name)
                                    WHERE s.check_name = 'patients_probable_duplicates' AND r.run_id = (
                                      SELECT max(x.run_id) FROM dq.results x JOIN dq.runs u USING (run_id)
                                      WHERE x.check_name = 'patients_probable_duplicates' AND u.batch_id = $1) ORDER BY 1`,
      [brokenBatch],
    );
    expect(sampled.map((s) => s.sample)).toEqual(twins.map((t) => t.patient_key));
  });

  test("analysts see freshness and each check's status, nothing else of dq", async () => {
    const analyst = (
      await db.query(`SELECT has_schema_privilege('healthetl_analyst', 'dq', 'USAGE') AS dq,
                                            has_table_privilege('healthetl_analyst', 'analytics.data_quality', 'SELECT') AS q,
                                            has_table_privilege('healthetl_analyst', 'analytics.data_freshness', 'SELECT') AS f`)
    )[0];
    expect(analyst).toEqual({ dq: false, q: true, f: true });
    const [f] = await db.query(`SELECT quality_status, data_as_of IS NOT NULL AS has_date FROM analytics.data_freshness`);
    expect(f).toEqual({ quality_status: 'fail', has_date: true });
  });
});

describe('FHIR resources waiting for what they reference', () => {
  test('a resource waiting longer than the threshold (72 hours) warns; one waiting less does not', async () => {
    // A Condition whose Encounter (and Patient) never arrive: it waits, which is not a failure.
    const condition = (id: string) => ({
      resourceType: 'Condition',
      id,
      subject: { reference: 'Patient/dq-waiting-patient' },
      encounter: { reference: 'Encounter/dq-never-arrives' },
      code: { coding: [{ system: 'http://snomed.info/sct', code: '44054006' }] },
    });
    const batch = await load('waiting.ndjson', [condition('dq-w-1'), condition('dq-w-2')]);
    const [s] = await db.query(`SELECT waiting, balanced FROM etl.batch_summary WHERE batch_id = $1`, [batch]);
    expect(s).toEqual({ waiting: '2', balanced: true });
    let r = await runChecks(null);
    expect(r.landing_fhir_waiting_too_long).toMatchObject({ status: 'pass', failing: 0, checked: 2 });
    // One of them arrived 100 hours ago: 1 of the 2 waiting has waited more than 72 hours.
    await db.query(
      `UPDATE landing.raw_documents SET received_at = received_at - interval '100 hours'
       WHERE batch_id = $1 AND status = 'waiting' AND payload ->> 'id' = 'dq-w-1'`,
      [batch],
    );
    r = await runChecks(null);
    expect(r.landing_fhir_waiting_too_long).toMatchObject({ status: 'warn', failing: 1, checked: 2 });
    const [m] = await db.query(`SELECT measured FROM dq.latest_results WHERE check_name = 'landing_fhir_waiting_too_long'`);
    expect(Number(m.measured)).toBeGreaterThanOrEqual(100);
  });
});
