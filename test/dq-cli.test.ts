// `healthetl dq`, and the data-quality checks that `run` and `transform` run after each batch, as an
// operator runs them: real processes (node bin/healthetl.mjs), a real PostgreSQL, the pipeline and
// `dq` as a login of healthetl_loader, `dq set` as a login of healthetl_owner (the migrator's), what
// they did checked as the superuser. Expected numbers are worked out by hand from the documents
// written here; dates are relative to today, so that "the future" stays ahead.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { EXIT, EXIT_PRECEDENCE, exitCodeOf } from '../scripts/errors.ts';
import { useLogin, useTestDatabase } from './db.ts';
import { jsonLines, runCli, stderrLines, type CliResult, type LogLine } from './fault-helpers.ts';

const at = (url: string, ...args: string[]) => [...args, '--database-url', url];
const ndjson = (...docs: object[]) => docs.map((d) => JSON.stringify(d)).join('\n') + '\n';

const year = new Date().getUTCFullYear();
const FUTURE_BIRTH = `${year + 1}-03-01`; // ahead of today, inside the transform's plausible years (to the end of next year)
const NPI_OK = '1234567893'; // Luhn over 80840123456789: check digit 3

/** A plausible patient with one complete visit: passes every check (sex may be left out: a warn check). */
function patient(id: string, given: string, opts: { birth?: string; sex?: string | null; visits?: boolean } = {}) {
  return {
    patient_id: id,
    source_system: 'dq-cli-test',
    updated_at: '2024-06-01T00:00:00Z',
    name: { given, family: `Dq${id.replace(/[^A-Za-z]/g, '')}` },
    birth_date: opts.birth ?? '1970-01-01',
    ...(opts.sex === null ? {} : { sex: opts.sex ?? 'female' }),
    visits:
      opts.visits === false
        ? []
        : [
            {
              visit_id: `${id}-V`,
              visit_date: '2024-01-10',
              visit_type: 'outpatient',
              provider: { npi: NPI_OK, name: 'Dr. Placeholder' },
              diagnoses: [{ code: 'E11.9' }],
              treatments: [
                { treatment_id: `${id}-T`, type: 'medication', name: 'metformin', start_date: '2024-01-10', end_date: '2024-12-31' },
              ],
              provider_notes: [{ note_id: `${id}-N`, text: 'Fictional note.' }],
            },
          ],
  };
}

/** The one log line whose msg matches, among the JSON lines of stdout (or of stderr, for dq). */
function lineOf(text: string, msg: RegExp): LogLine {
  const found = jsonLines(text).filter((l) => msg.test(l.msg));
  expect(found, `${msg} in ${text}`).toHaveLength(1);
  return found[0];
}

// ---- exit-code precedence -------------------------------------------------------------------------

describe('exit-code precedence (errors.ts exitCodeOf)', () => {
  test('highest first: 3, 5, 6, 7, 8, 4; false and undefined are no outcome; nothing is 0', () => {
    const order = [EXIT.DB_UNREACHABLE, EXIT.NOT_MIGRATED, EXIT.UNBALANCED, EXIT.BATCH_FAILED, EXIT.DQ_FAILED, EXIT.REJECTED];
    expect(EXIT_PRECEDENCE.filter((c) => (order as number[]).includes(c))).toEqual(order);
    for (const [i, higher] of order.entries())
      for (const lower of order.slice(i + 1)) {
        expect(exitCodeOf([lower, higher])).toBe(higher);
        expect(exitCodeOf([higher, false, lower, undefined])).toBe(higher);
      }
    expect(exitCodeOf([EXIT.REJECTED, EXIT.DQ_FAILED])).toBe(8);
    expect(exitCodeOf([false, undefined])).toBe(EXIT.OK);
    expect(exitCodeOf([])).toBe(EXIT.OK);
    expect(EXIT.DQ_FAILED).toBe(8);
  });
});

// ---- run, dq, dq set ----------------------------------------------------------------------------

describe('run checks each batch; dq shows and tunes the checks', () => {
  const d = useTestDatabase();
  const loader = useLogin(d, 'healthetl_loader');
  const owner = useLogin(d, 'healthetl_owner');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-dq-cli-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));
  const write = (name: string, text: string) => {
    writeFileSync(path.join(tmp, name), text);
    return path.join(tmp, name);
  };
  const checkNames = async () => (await d.query(`SELECT check_name FROM dq.checks ORDER BY 1`)).map((r) => r.check_name as string);
  const runCount = async () => Number((await d.query(`SELECT count(*) AS n FROM dq.runs`))[0].n);
  const quality = (r: CliResult) => lineOf(r.stdout, /^data quality of batch/);

  // Batch 1: W-1 complete, W-2 without a sex (patients_sex_present, warn severity: 1 of 2 over 1 %).
  // Batch 2: F-1 born next year (patients_birth_date_not_future, error severity; and an age below 0,
  // patients_age_0_to_120, warn). Batch 3: F-2 born next year too, and a rejected document
  // (batch_reject_share, warn: 1 of 2 over 5 %).

  test('only warn-severity checks fail: run exits 0, with a one-line summary naming them', async () => {
    const r = await runCli(
      at(loader(), 'run', write('warn.ndjson', ndjson(patient('W-1', 'Wanda'), patient('W-2', 'Walt', { sex: null })))),
    );
    expect(r.code, r.stderr).toBe(EXIT.OK);
    expect(lineOf(r.stdout, /^run finished$/)).toMatchObject({ batch: 1, loaded: 2, rejected: 0 });
    expect(quality(r)).toMatchObject({
      level: 30,
      batch: 1,
      dq_run: 1,
      passed: 23,
      warned: 1,
      failed: 0,
      warned_checks: ['patients_sex_present'],
    });
    expect(quality(r).failed_checks).toBeUndefined();
    // The batch's run, as dq.run keeps it.
    expect(await d.query(`SELECT run_id, batch_id, run_by FROM dq.runs`)).toEqual([
      { run_id: '1', batch_id: '1', run_by: new URL(loader()).username },
    ]);
  });

  test('an error-severity check fails (a birth date next year): run exits 8', async () => {
    const r = await runCli(
      at(loader(), 'run', write('future.ndjson', ndjson(patient('F-1', 'Fiona', { birth: FUTURE_BIRTH, visits: false })))),
    );
    expect(r.code, r.stderr).toBe(EXIT.DQ_FAILED);
    expect(lineOf(r.stdout, /^run finished$/)).toMatchObject({ batch: 2, loaded: 1, rejected: 0 });
    expect(quality(r)).toMatchObject({
      level: 50,
      batch: 2,
      passed: 22,
      warned: 1,
      failed: 1,
      failed_checks: ['patients_birth_date_not_future'],
      warned_checks: ['patients_age_0_to_120'],
    });
    expect(quality(r).msg).toMatch(/exit 8/);
  });

  test('rejects and a failed error check: 8 wins over 4', async () => {
    const r = await runCli(
      at(
        loader(),
        'run',
        write('both.ndjson', ndjson(patient('F-2', 'Felix', { birth: FUTURE_BIRTH, visits: false }), { patient_id: '' })),
      ),
    );
    expect(r.code, r.stderr).toBe(EXIT.DQ_FAILED);
    expect(lineOf(r.stdout, /^run finished$/)).toMatchObject({ batch: 3, loaded: 1, rejected: 1 });
    expect(quality(r)).toMatchObject({
      batch: 3,
      failed_checks: ['patients_birth_date_not_future'],
      warned_checks: ['batch_reject_share', 'patients_age_0_to_120'],
    });
  });

  test('dq --all --format json: one object on stdout, every field of every check, its trend; numbers as worked out', async () => {
    const r = await runCli(at(loader(), 'dq', '--all', '--format', 'json'));
    expect(r.code, r.stderr).toBe(EXIT.DQ_FAILED);
    const report = JSON.parse(r.stdout);
    expect(r.stdout.trim().split('\n')).toHaveLength(1);
    expect(lineOf(r.stderr, /^data-quality checks ran on the whole database$/)).toMatchObject({ dq_run: 4, fail: 1, warn: 3, pass: 20 });

    const [run] = await d.query(`SELECT run_id, batch_id, started_at FROM dq.runs ORDER BY run_id DESC LIMIT 1`);
    const [data] = await d.query(`SELECT max(transformed_at) AS at FROM etl.batches WHERE status = 'transformed'`);
    expect(report).toMatchObject({
      run_id: 4,
      scope: 'all',
      batch_id: null,
      checked_at: run.started_at.toISOString(),
      data_as_of: data.at.toISOString(),
      summary: { checks: 24, fail: 1, warn: 3, pass: 20, not_run: 0 },
    });
    expect(run).toMatchObject({ run_id: '4', batch_id: null });
    expect(report.checks.map((c: { check_name: string }) => c.check_name).sort()).toEqual(await checkNames());
    // Failing first: fail, then warn, then pass.
    expect(report.checks.map((c: { status: string }) => c.status)).toEqual([
      'fail',
      ...Array<string>(3).fill('warn'),
      ...Array<string>(20).fill('pass'),
    ]);

    const byName = Object.fromEntries(report.checks.map((c: { check_name: string }) => [c.check_name, c]));
    const [run2] = await d.query(`SELECT started_at FROM dq.runs WHERE run_id = 2`);
    // 4 patients (W-1, W-2, F-1, F-2), 2 born next year.
    expect(byName.patients_birth_date_not_future).toEqual({
      check_name: 'patients_birth_date_not_future',
      dimension: 'validity',
      relation: 'clinical.patients',
      description: 'No birth date in the future.',
      measure: 'failing_ratio',
      threshold_meaning: 'the largest share of rows allowed a date more than a day ahead',
      enabled: true,
      severity: 'error',
      threshold: 0,
      rows_checked: 4,
      rows_failing: 2,
      failing_ratio: 0.5,
      measured: 0.5,
      status: 'fail',
      run_id: 4,
      batch_id: null,
      checked_at: run.started_at.toISOString(),
      failing_since: run2.started_at.toISOString(), // run 2 (batch 2) was the first of the streak
      trend: [
        expect.objectContaining({ run_id: 1, batch_id: 1, status: 'pass', rows_checked: 2, rows_failing: 0, failing_ratio: 0 }),
        expect.objectContaining({ run_id: 2, batch_id: 2, status: 'fail', rows_checked: 1, rows_failing: 1, failing_ratio: 1 }),
        expect.objectContaining({ run_id: 3, batch_id: 3, status: 'fail', rows_checked: 1, rows_failing: 1, failing_ratio: 1 }),
        expect.objectContaining({ run_id: 4, batch_id: null, status: 'fail', rows_checked: 4, rows_failing: 2, failing_ratio: 0.5 }),
      ],
    });
    expect(byName.patients_sex_present).toMatchObject({
      status: 'warn',
      severity: 'warn',
      rows_checked: 4,
      rows_failing: 1,
      failing_ratio: 0.25,
      threshold: 0.01,
    });
    expect(byName.patients_age_0_to_120).toMatchObject({ status: 'warn', rows_checked: 4, rows_failing: 2, failing_ratio: 0.5 });
    // With no batch named, the reject share is the latest transformed batch's: batch 3, 1 of 2.
    expect(byName.batch_reject_share).toMatchObject({
      status: 'warn',
      rows_checked: 2,
      rows_failing: 1,
      failing_ratio: 0.5,
      threshold: 0.05,
    });
    expect(byName.batches_reconcile).toMatchObject({ status: 'pass', rows_checked: 3, rows_failing: 0, failing_since: null });
    expect(byName.visits_have_patient).toMatchObject({ status: 'pass', rows_checked: 2, rows_failing: 0 });
    // Fewer than 3 earlier batches: no median to compare with, nothing measured.
    expect(byName.batch_documents_near_median).toMatchObject({
      status: 'pass',
      measure: 'ratio_to_median',
      measured: null,
      threshold: 0.5,
    });
    expect(byName.last_batch_recent.measure).toBe('hours');
    expect(byName.last_batch_recent.measured).toBeLessThan(1);
    for (const c of report.checks) expect(c.trend.map((t: { run_id: number }) => t.run_id)).toEqual([1, 2, 3, 4]);

    // Every field as dq.latest_results has it (failing_since worked out the same way).
    const view = await d.query(`SELECT * FROM dq.latest_results`);
    expect(view).toHaveLength(24);
    for (const v of view) {
      const c = byName[v.check_name];
      for (const [k, value] of Object.entries(v)) {
        const want =
          value === null ? null : value instanceof Date ? value.toISOString() : /^-?[0-9.]+$/.test(String(value)) ? Number(value) : value;
        expect(c[k], `${v.check_name}.${k}`).toEqual(want);
      }
    }
  });

  test('dq with no scope checks the latest transformed batch; --latest runs nothing and shows the latest results', async () => {
    const r = await runCli(at(loader(), 'dq', '--format', 'json'));
    expect(r.code, r.stderr).toBe(EXIT.DQ_FAILED);
    const report = JSON.parse(r.stdout);
    expect(report).toMatchObject({ run_id: 5, scope: 'batch', batch_id: 3, summary: { fail: 1, warn: 2, pass: 21 } });
    expect(report.checks.find((c: { check_name: string }) => c.check_name === 'patients_birth_date_not_future')).toMatchObject({
      rows_checked: 1,
      rows_failing: 1,
      batch_id: 3,
    });

    const before = await runCount();
    const latest = await runCli(at(loader(), 'dq', '--latest', '--format', 'json'));
    expect(latest.code, latest.stderr).toBe(EXIT.DQ_FAILED); // what it shows has a failed error check
    expect(await runCount()).toBe(before);
    expect(JSON.parse(latest.stdout)).toMatchObject({ run_id: 5, scope: 'latest', batch_id: null, summary: { fail: 1 } });
  });

  test('dq --format table: a readable table with every check name, failing ones first', async () => {
    const r = await runCli(at(loader(), 'dq', '--batch', '1'));
    expect(r.code, r.stderr).toBe(EXIT.OK); // batch 1: warn only
    const lines = r.stdout.split('\n');
    expect(lines[0]).toMatch(/^Data quality: run 6 of batch 1's patients, \d{4}-\d\d-\d\d \d\d:\d\d UTC; data as of \d{4}-/);
    expect(lines[1]).toBe('24 checks: 0 failed (error), 1 warned, 23 passed');
    expect(lines[3]).toMatch(/^STATUS +CHECK +DIMENSION +SEVERITY +FAILING\/CHECKED +MEASURED +ALLOWED +FAILING SINCE$/);
    expect(lines[4]).toMatch(/^WARN +patients_sex_present +completeness +warn +1\/2 +50 % +<= 1 % +\d{4}-\d\d-\d\d \d\d:\d\d UTC$/);
    for (const name of await checkNames()) expect(r.stdout, name).toMatch(new RegExp(`^(pass|WARN|FAIL) +${name} `, 'm'));
    expect(r.stdout).toMatch(/^pass +last_batch_recent +timeliness +warn +0\/1 +[0-9.]+ h +<= 36 h +-$/m);
    expect(r.stdout).toMatch(/^pass +batch_documents_near_median +volume +warn +0\/1 +- +0\.5 to 1\.5 x median +-$/m);
  });

  test('the loader login may not dq set: exit 1, permission denied with the role it takes, nothing changed', async () => {
    const r = await runCli(at(loader(), 'dq', 'set', 'patients_sex_present', '--threshold', '0.3'));
    expect(r.code, r.stderr).toBe(EXIT.FAILURE);
    expect(stderrLines(r)).toHaveLength(1);
    expect(r.stderr).toMatch(
      /permission denied for table checks \(SQLSTATE 42501\).*dq set run as the migrator's login \(a member of healthetl_owner\)/,
    );
    expect(await d.query(`SELECT threshold FROM dq.checks WHERE check_name = 'patients_sex_present'`)).toEqual([{ threshold: '0.01' }]);
    expect(await d.query(`SELECT * FROM dq.check_changes`)).toEqual([]);
  });

  test('dq set: an unknown check or a bad value is bad usage, nothing changed', async () => {
    const unknown = await runCli(at(owner(), 'dq', 'set', 'patients_sex_presnt', '--threshold', '0.3'));
    expect(unknown.code, unknown.stderr).toBe(EXIT.USAGE);
    expect(stderrLines(unknown)).toHaveLength(1);
    expect(unknown.stderr).toMatch(
      /no data-quality check named patients_sex_presnt; the checks are: batch_documents_near_median, .*patients_sex_present,/,
    );
    const shapeless = await runCli(at(owner(), 'dq', 'set', "x'; DROP TABLE dq.checks; --", '--enabled', 'false'));
    expect(shapeless.code).toBe(EXIT.USAGE);
    expect(shapeless.stderr).toMatch(/no data-quality check named \(not shown/);
    expect(shapeless.stderr).not.toContain('DROP');
    const share = await runCli(at(owner(), 'dq', 'set', 'patients_sex_present', '--threshold', '5'));
    expect(share.code).toBe(EXIT.USAGE);
    expect(share.stderr).toMatch(/from 0 to 1 \(0\.05: 5 %\)/);
    for (const args of [['--threshold', '-1'], ['--threshold', 'abc'], ['--severity', 'fatal'], ['--enabled', 'maybe'], []]) {
      const bad = await runCli(at(owner(), 'dq', 'set', 'patients_sex_present', ...args));
      expect(bad.code, `${args.join(' ')}: ${bad.stderr}`).toBe(EXIT.USAGE);
      expect(stderrLines(bad)).toHaveLength(1);
    }
    expect(await d.query(`SELECT * FROM dq.check_changes`)).toEqual([]);
  });

  test('dq set as the owner login: says what changed, the trigger records it, and the next dq judges by it', async () => {
    // 1 of 4 patients without a sex: 0.25. Under a threshold of 0.3 it passes (now with error severity) ...
    const set = await runCli(at(owner(), 'dq', 'set', 'patients_sex_present', '--threshold', '0.3', '--severity', 'error'));
    expect(set.code, set.stderr).toBe(EXIT.OK);
    expect(lineOf(set.stdout, /^patients_sex_present changed: severity warn -> error, threshold 0.01 -> 0.3 /)).toMatchObject({
      check: 'patients_sex_present',
      changes: [
        { setting: 'severity', old_value: 'warn', new_value: 'error' },
        { setting: 'threshold', old_value: '0.01', new_value: '0.3' },
      ],
    });
    const who = new URL(owner()).username;
    expect(await d.query(`SELECT check_name, setting, old_value, new_value, changed_by FROM dq.check_changes ORDER BY change_id`)).toEqual([
      { check_name: 'patients_sex_present', setting: 'severity', old_value: 'warn', new_value: 'error', changed_by: who },
      { check_name: 'patients_sex_present', setting: 'threshold', old_value: '0.01', new_value: '0.3', changed_by: who },
    ]);
    const again = await runCli(at(owner(), 'dq', 'set', 'patients_sex_present', '--threshold', '0.30'));
    expect(again.code).toBe(EXIT.OK);
    expect(lineOf(again.stdout, /^nothing changed/)).toMatchObject({ changes: [] });

    const pass = await runCli(at(loader(), 'dq', '--all', '--format', 'json'));
    expect(JSON.parse(pass.stdout).checks.find((c: { check_name: string }) => c.check_name === 'patients_sex_present')).toMatchObject({
      status: 'pass',
      severity: 'error',
      threshold: 0.3,
      failing_ratio: 0.25,
      failing_since: null,
    });

    // ... under 0.2 it fails, and with error severity that is exit 8; the birth date check, disabled, no longer runs.
    expect((await runCli(at(owner(), 'dq', 'set', 'patients_sex_present', '--threshold', '0.2'))).code).toBe(EXIT.OK);
    const off = await runCli(at(owner(), 'dq', 'set', 'patients_birth_date_not_future', '--enabled', 'false'));
    expect(lineOf(off.stdout, /changed: enabled true -> false/)).toBeTruthy();
    const fail = await runCli(at(loader(), 'dq', '--all', '--format', 'json'));
    expect(fail.code, fail.stderr).toBe(EXIT.DQ_FAILED);
    const report = JSON.parse(fail.stdout);
    expect(report.summary).toEqual({ checks: 24, fail: 1, warn: 2, pass: 20, not_run: 1 });
    expect(report.checks.map((c: { check_name: string; status: string }) => `${c.status} ${c.check_name}`).slice(0, 1)).toEqual([
      'fail patients_sex_present',
    ]);
    expect(report.checks.at(-1)).toMatchObject({
      check_name: 'patients_birth_date_not_future',
      enabled: false,
      status: null,
      rows_checked: null,
    });
    expect(await d.query(`SELECT count(*)::int AS n FROM dq.check_changes`)).toEqual([{ n: 4 }]);
    // --latest: a disabled check shows no result (its last one, a fail, is stale), as after a run.
    const latest = await runCli(at(loader(), 'dq', '--latest', '--format', 'json'));
    const shown = JSON.parse(latest.stdout);
    expect(shown.summary).toEqual(report.summary);
    expect(shown.checks.at(-1)).toMatchObject({ check_name: 'patients_birth_date_not_future', enabled: false, status: null });
  });
});

// ---- transform ----------------------------------------------------------------------------------

describe('transform checks each batch it transforms', () => {
  const d = useTestDatabase();
  const loader = useLogin(d, 'healthetl_loader');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-dq-transform-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  test('load two batches, then transform: one summary per batch, exit 8 for the one with a birth date next year', async () => {
    const clean = path.join(tmp, 'clean.ndjson');
    const future = path.join(tmp, 'future.ndjson');
    writeFileSync(clean, ndjson(patient('T-1', 'Tara')));
    writeFileSync(future, ndjson(patient('T-2', 'Theo', { birth: FUTURE_BIRTH })));
    for (const f of [clean, future]) expect((await runCli(at(loader(), 'load', f))).code).toBe(EXIT.OK);
    expect(await d.query(`SELECT count(*)::int AS n FROM dq.runs`)).toEqual([{ n: 0 }]); // load alone checks nothing

    const r = await runCli(at(loader(), 'transform'));
    expect(r.code, r.stderr).toBe(EXIT.DQ_FAILED);
    const lines = jsonLines(r.stdout).filter((l) => /^data quality of batch/.test(l.msg));
    expect(lines.map((l) => [l.batch, l.failed, l.failed_checks ?? []])).toEqual([
      [1, 0, []],
      [2, 2, ['patients_birth_date_not_future', 'visits_not_before_birth']], // its visit (2024) is before that birth too
    ]);
    expect(await d.query(`SELECT run_id::int, batch_id::int FROM dq.runs ORDER BY run_id`)).toEqual([
      { run_id: 1, batch_id: 1 },
      { run_id: 2, batch_id: 2 },
    ]);
    // Batch 1's patients only in run 1, batch 2's in run 2.
    const failed = await d.query(`SELECT run_id::int, check_name FROM dq.results WHERE status = 'fail' ORDER BY 1, 2`);
    expect(failed).toEqual([
      { run_id: 2, check_name: 'patients_birth_date_not_future' },
      { run_id: 2, check_name: 'visits_not_before_birth' },
    ]);

    // Nothing left to transform: nothing checked, exit 0.
    const none = await runCli(at(loader(), 'transform'));
    expect(none.code, none.stderr).toBe(EXIT.OK);
    expect(jsonLines(none.stdout).some((l) => /^data quality/.test(l.msg))).toBe(false);
  });
});
