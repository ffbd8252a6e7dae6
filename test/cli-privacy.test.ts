// The PHI commands as an operator runs them: real processes (node bin/healthetl.mjs), a real
// PostgreSQL, loads and runs as a login of healthetl_loader, erase and key rotation as a login of
// healthetl_owner (the migrator's), what they did checked as the superuser. Expected numbers are
// worked out by hand from the documents written here.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { createDbPool, sql } from '../scripts/db.ts';
import { EXIT, explainError } from '../scripts/errors.ts';
import { FileNames } from '../scripts/stage.ts';
import { useLogin, useTestDatabase } from './db.ts';
import { BIN, childEnv, jsonLines, PROJECT_DIR, runCli, stderrLines, type CliResult, type LogLine } from './fault-helpers.ts';

const at = (url: string, ...args: string[]) => [...args, '--database-url', url];

/** Runs `healthetl <args>` with `input` on its standard input (runCli closes stdin). */
function runWithInput(args: string[], input: string): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: PROJECT_DIR, env: childEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const guard = setTimeout(() => child.kill('SIGKILL'), 90_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(guard);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}

/** The one line of a run or command whose msg matches. */
function lineOf(r: CliResult, msg: RegExp): LogLine {
  const found = jsonLines(r.stdout).filter((l) => msg.test(l.msg));
  expect(found, `${msg} in ${r.stdout}`).toHaveLength(1);
  return found[0];
}

const ndjson = (...docs: object[]) => docs.map((d) => JSON.stringify(d)).join('\n') + '\n';

// ---- erase ------------------------------------------------------------------------------------

describe('erase: a patient is gone everywhere, later deliveries are counted erased, --lift lets them load again', () => {
  const d = useTestDatabase();
  const loader = useLogin(d, 'healthetl_loader');
  const owner = useLogin(d, 'healthetl_owner');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-erase-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  const ID = 'ERASE-ME-7391';
  const SOURCE = 'clinic-erasable';
  // 1 patient + 2 visits + 2 diagnoses + 1 treatment + 1 note = 7 clinical rows.
  const erasable = (updatedAt: string) => ({
    patient_id: ID,
    source_system: SOURCE,
    updated_at: updatedAt,
    name: { given: 'Eunice', family: 'Erasmus' },
    birth_date: '1970-01-01',
    sex: 'female',
    visits: [
      {
        visit_id: 'EV1',
        visit_date: '2023-01-01',
        diagnoses: [{ code: 'I10' }],
        treatments: [{ name: 'aspirin' }],
        provider_notes: [{ text: 'Eunice Erasmus is doing well.' }],
      },
      { visit_id: 'EV2', visit_date: '2023-02-01', diagnoses: [{ code: 'E11.9' }] },
    ],
  });
  const keep = (id: string) => ({
    patient_id: id,
    updated_at: '2024-01-01T00:00:00Z',
    visits: [{ visit_id: 'K', visit_date: '2023-03-01' }],
  });
  const write = (name: string, text: string) => {
    writeFileSync(path.join(tmp, name), text);
    return path.join(tmp, name);
  };
  /** Neither the id nor the source system in anything the CLI wrote. */
  const expectNoIdentity = (r: CliResult) => {
    for (const s of [r.stdout, r.stderr]) {
      expect(s).not.toContain(ID);
      expect(s).not.toContain(SOURCE);
    }
  };
  const erasedPatient = () =>
    d.query(`SELECT patient_key FROM clinical.patients WHERE source_system = $1 AND source_patient_id = $2`, [SOURCE, ID]);
  const batchStatus = async (batch: number) => {
    const r = await runCli(at(loader(), 'status', '--batch', String(batch)));
    expect(r.code, r.stderr).toBe(0);
    return lineOf(r, /^batch$/);
  };

  test('loaded first, as the loader login', async () => {
    const r = await runCli(at(loader(), 'run', write('first.ndjson', ndjson(erasable('2024-01-01T00:00:00Z'), keep('KEEP-1')))));
    expect(r.code, r.stderr).toBe(0);
    expect(lineOf(r, /^run finished$/)).toMatchObject({ loaded: 2, erased: 0 });
    expect(await erasedPatient()).toHaveLength(1);
    const [{ db_user }] = await d.query(`SELECT db_user FROM etl.batch_summary WHERE batch_id = 1`);
    expect(db_user).toBe(new URL(loader()).username);
  });

  test('the loader login may not erase: exit 1, a line naming the role it takes, no id', async () => {
    const r = await runCli(at(loader(), 'erase', '--patient-id', ID, '--source-system', SOURCE));
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/permission denied .*42501.*healthetl_owner/);
    expectNoIdentity(r);
    expect(await erasedPatient()).toHaveLength(1);
  });

  test('an id typed without --patient-id is a usage error that does not repeat it', async () => {
    const alone = await runCli(at(owner(), 'erase', ID, '--source-system', SOURCE));
    expect(alone.code, alone.stderr).toBe(2);
    expect(stderrLines(alone)).toHaveLength(1);
    expectNoIdentity(alone);
    const stray = await runCli(at(owner(), 'erase', '--patient-id', 'ERASE', `${ID}-stray`));
    expect(stray.code, stray.stderr).toBe(2);
    expect(stderrLines(stray)).toHaveLength(1);
    expect(stray.stderr).toMatch(/erase was given an argument or option it does not know \(not shown/);
    expect(stray.stderr).not.toContain('stray');
    expectNoIdentity(stray);
    const empty = await runCli(at(owner(), 'erase', '--patient-id', ' '));
    expect(empty.code).toBe(2);
    expect(empty.stderr).toMatch(/--patient-id must not be empty/);
    expect(await erasedPatient()).toHaveLength(1);
  });

  test('etl.erase_patient without an id (HE010) is explained as bad usage', async () => {
    const pool = await createDbPool(owner(), 1);
    try {
      const err = await pool.query(sql.unsafe`SELECT * FROM etl.erase_patient('default', NULL)`).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).not.toBeNull();
      const { message, exitCode } = explainError(err);
      expect(exitCode).toBe(EXIT.USAGE);
      expect(message).toMatch(/^erase needs a patient id and a source system: healthetl erase --patient-id ID/);
    } finally {
      await pool.end();
    }
  });

  test('erase as the migrator login: the receipt, and nothing of the patient left', async () => {
    const r = await runCli(at(owner(), 'erase', '--patient-id', ID, '--source-system', SOURCE));
    expect(r.code, r.stderr).toBe(0);
    expectNoIdentity(r);
    expect(lineOf(r, /^patient erased/)).toMatchObject({
      erasure_id: 1,
      documents_scrubbed: 1,
      clinical_rows_deleted: 7,
      file_names_cleared: 1,
    });
    // As the superuser: no clinical row, identity, payload, or file name of theirs.
    expect(await erasedPatient()).toEqual([]);
    expect(await d.query(`SELECT 1 FROM etl.patient_keys WHERE source_patient_id = $1`, [ID])).toEqual([]);
    expect(await d.query(`SELECT 1 FROM landing.raw_documents WHERE payload::text LIKE $1`, [`%${ID}%`])).toEqual([]);
    expect(await d.query(`SELECT 1 FROM landing.raw_documents WHERE payload::text LIKE '%Erasmus%'`)).toEqual([]);
    expect(await d.query(`SELECT 1 FROM clinical.provider_notes WHERE note_text LIKE '%Erasmus%'`)).toEqual([]);
    expect(await d.query(`SELECT source_file FROM etl.batch_files WHERE source_file LIKE '%first.ndjson%'`)).toEqual([]);
    // The other patient of the same file stays, and the batch still balances.
    expect(await d.query(`SELECT source_patient_id FROM clinical.patients`)).toEqual([{ source_patient_id: 'KEEP-1' }]);
    expect(await batchStatus(1)).toMatchObject({ received: 2, loaded: 1, erased: 1, balanced: true });
    // The receipt holds no PHI.
    const receipts = await d.query(`SELECT * FROM etl.erasures`);
    expect(receipts).toHaveLength(1);
    expect(JSON.stringify(receipts)).not.toContain(ID);
    expect(receipts[0]).toMatchObject({ documents: '1', clinical_rows: '7', erased_by: new URL(owner()).username, lifted_at: null });
  });

  test('a re-delivery in a new file (newer updated_at) is counted erased and the batch balances', async () => {
    const r = await runCli(at(loader(), 'run', write('second.ndjson', ndjson(erasable('2024-06-01T00:00:00Z'), keep('KEEP-2')))));
    expect(r.code, r.stderr).toBe(0);
    const done = lineOf(r, /^run finished$/);
    expect(done).toMatchObject({ documents: 2, loaded: 1, rejected: 0, duplicate: 0, superseded: 0, erased: 1, staged: 0 });
    expect(await erasedPatient()).toEqual([]);
    expect(await batchStatus(Number(done.batch))).toMatchObject({ received: 2, landed: 2, loaded: 1, erased: 1, balanced: true });
    expect(await d.query(`SELECT 1 FROM landing.raw_documents WHERE payload::text LIKE $1`, [`%${ID}%`])).toEqual([]);
  });

  test('--lift, and the next delivery loads', async () => {
    const lift = await runCli(at(owner(), 'erase', '--lift', '--patient-id', ID, '--source-system', SOURCE));
    expect(lift.code, lift.stderr).toBe(0);
    expectNoIdentity(lift);
    expect(lineOf(lift, /^erasure lifted/)).toMatchObject({ lifted: 1 });
    const again = await runCli(at(owner(), 'erase', '--lift', '--patient-id', ID, '--source-system', SOURCE));
    expect(again.code, again.stderr).toBe(0);
    expect(lineOf(again, /^nothing to lift/)).toMatchObject({ lifted: 0 });

    const r = await runCli(at(loader(), 'run', write('third.ndjson', ndjson(erasable('2024-07-01T00:00:00Z')))));
    expect(r.code, r.stderr).toBe(0);
    const done = lineOf(r, /^run finished$/);
    expect(done).toMatchObject({ documents: 1, loaded: 1, erased: 0 });
    expect(await erasedPatient()).toHaveLength(1);
    expect(await batchStatus(Number(done.batch))).toMatchObject({ received: 1, loaded: 1, erased: 0, balanced: true });
  });
});

// ---- rotate-pseudonym-key ---------------------------------------------------------------------

describe('rotate-pseudonym-key', () => {
  const d = useTestDatabase();
  const loader = useLogin(d, 'healthetl_loader');
  const owner = useLogin(d, 'healthetl_owner');
  const pseudonyms = async () =>
    new Map(
      (await d.query<{ patient_key: string; pseudonym: string }>(`SELECT patient_key, pseudonym FROM clinical.patients`)).map((r) => [
        r.patient_key,
        r.pseudonym,
      ]),
    );
  const key = async () => (await d.query(`SELECT encode(key, 'hex') AS k FROM etl.secret_keys WHERE purpose = 'pseudonym'`))[0].k as string;

  test('without --yes: exit 2, one line saying what it would do, nothing changed', async () => {
    const run = await runCli(at(loader(), 'run', 'fixtures/valid'));
    expect(run.code, run.stderr).toBe(0);
    const before = await pseudonyms();
    expect(before.size).toBe(16); // fixtures/EXPECTED.md
    const keyBefore = await key();
    const r = await runCli(at(owner(), 'rotate-pseudonym-key'));
    expect(r.code, r.stderr).toBe(2);
    expect(stderrLines(r)).toHaveLength(1);
    expect(r.stderr).toMatch(/every patient a new pseudonym.*stop matching.*--yes/);
    expect(r.stdout).toBe('');
    expect(await pseudonyms()).toEqual(before);
    expect(await key()).toBe(keyBefore);
  });

  test('with --yes: every pseudonym changes, and the output says how many', async () => {
    const before = await pseudonyms();
    const r = await runCli(at(owner(), 'rotate-pseudonym-key', '--yes'));
    expect(r.code, r.stderr).toBe(0);
    expect(lineOf(r, /^pseudonym key rotated/)).toMatchObject({ patients: 16 });
    const after = await pseudonyms();
    expect([...after.keys()].sort()).toEqual([...before.keys()].sort());
    for (const [k, p] of after) {
      expect(p).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/); // a uuid: 128 bits of the keyed hash
      expect(p, `patient ${k}`).not.toBe(before.get(k));
    }
    expect(new Set(after.values()).size).toBe(16);
    expect([...after.values()].some((p) => [...before.values()].includes(p))).toBe(false);
  });
});

// ---- privacy-report ---------------------------------------------------------------------------

describe('privacy-report', () => {
  const d = useTestDatabase();
  const loader = useLogin(d, 'healthetl_loader');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-kanon-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  // Quasi-identifiers as deid.patients shows them: birth year (or 90+), sex, 3-digit ZIP.
  let n = 0;
  const p = (birth: string, sex: string, address: object) => ({
    patient_id: `K-${++n}`,
    updated_at: '2024-01-01T00:00:00Z',
    birth_date: birth,
    sex,
    address,
  });
  const docs = [
    // group 1980/female/100: 3 patients (a ZIP+4 cut to 3 digits too)
    p('1980-01-01', 'female', { postal_code: '10001' }),
    p('1980-06-15', 'female', { postal_code: '10001-1234' }),
    p('1980-12-31', 'female', { postal_code: '10099', country: 'US' }),
    // group 1980/male/100: 1
    p('1980-03-03', 'male', { postal_code: '10002' }),
    // group 90+/female/021: 2 (born 1920 and 1933: both over 89, so their birth years are one group)
    p('1920-05-01', 'female', { postal_code: '02139' }),
    p('1933-01-01', 'female', { postal_code: '02101' }),
    // group 1975/male/000: 2 (036 and 059 are restricted prefixes: both shown as 000)
    p('1975-07-07', 'male', { postal_code: '03601' }),
    p('1975-08-08', 'male', { postal_code: '05901' }),
    // group 1990/female/no ZIP (not a US postal code): 1
    p('1990-07-04', 'female', { postal_code: '75001', country: 'FR' }),
  ];
  // Groups 3, 1, 2, 2, 1: 9 patients in 5 groups, the smallest 1; below k = 3: the groups of 1, 2, 2, 1 (6 patients).
  const K3 = { k: 3, patients: 9, groups: 5, smallest_group: 1, groups_below_k: 4, patients_below_k: 6 };
  const K11 = { k: 11, patients: 9, groups: 5, smallest_group: 1, groups_below_k: 5, patients_below_k: 9 };

  test('--format json: one JSON object on stdout, the numbers worked out by hand', async () => {
    writeFileSync(path.join(tmp, 'k.ndjson'), ndjson(...docs));
    const run = await runCli(at(loader(), 'run', path.join(tmp, 'k.ndjson')));
    expect(run.code, run.stderr).toBe(0);
    expect(lineOf(run, /^run finished$/)).toMatchObject({ loaded: 9, problems: 0 });

    const r = await runCli(at(loader(), 'privacy-report', '--format', 'json', '--k', '3'));
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.endsWith('\n')).toBe(true);
    expect(r.stdout.trim().split('\n')).toHaveLength(1);
    expect(JSON.parse(r.stdout)).toEqual(K3);

    const byDefault = await runCli(at(loader(), 'privacy-report', '--format', 'json'));
    expect(byDefault.code, byDefault.stderr).toBe(0);
    expect(JSON.parse(byDefault.stdout)).toEqual(K11);
  });

  test('text: a few readable lines with the same numbers', async () => {
    const r = await runCli(at(loader(), 'privacy-report', '--k', '3'));
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^Privacy report of the deid views \(k = 3\)$/m);
    expect(r.stdout).toMatch(/patients: +9$/m);
    expect(r.stdout).toMatch(/groups: +5 \(patients alike in birth year or 90\+, sex and 3-digit ZIP\)$/m);
    expect(r.stdout).toMatch(/smallest group: +1 patient$/m);
    expect(r.stdout).toMatch(/in groups smaller than k: 6 patients in 4 groups \(66\.7% of them\)$/m);
    expect(r.stdout.trim().split('\n').length).toBeLessThanOrEqual(8);
  });

  test('a k below 2 is bad usage', async () => {
    const r = await runCli(at(loader(), 'privacy-report', '--k', '1'));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--k must be a number: a whole number from 2/);
  });
});

// ---- --redact-file-names ----------------------------------------------------------------------

describe('--redact-file-names: file names (which can be PHI) are neither stored nor shown', () => {
  const d = useTestDatabase();
  const loader = useLogin(d, 'healthetl_loader');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-redact-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  const dir = path.join(tmp, 'Bundles_of_Wilhelmina_Pennyworth');
  // Files named after patients, as Synthea names its bundles.
  const NAMES = [
    'Zebulon_Marchbanks.json', // loads
    'Zebulon_Marchbanks_copy.json', // the same bytes in the same batch
    'Henrietta_Vandersloot.ndjson', // loads one, the loader rejects a line, the transform rejects one
    'Ottoline_Brackenridge.json', // malformed: the file is rejected
    'Agatha_Fenwick.txt', // skipped
    'Dangling_Dorothea.json', // a symbolic link to nothing: unreadable
  ];
  const STEMS = [
    'Wilhelmina',
    'Pennyworth',
    'Zebulon',
    'Marchbanks',
    'Henrietta',
    'Vandersloot',
    'Ottoline',
    'Brackenridge',
    'Agatha',
    'Fenwick',
    'Dangling',
    'Dorothea',
  ];
  const sha16 = (name: string) =>
    createHash('sha256')
      .update(readFileSync(path.join(dir, name)))
      .digest('hex')
      .slice(0, 16);

  const leaks = (r: CliResult) =>
    STEMS.filter((s) => r.stdout.includes(s) || r.stderr.includes(s) || r.stdout.includes(tmp) || r.stderr.includes(tmp));
  const stored = async () => {
    const rows = await d.query<{ where: string; name: string }>(`
      SELECT 'landing.raw_documents' AS where, source_file AS name FROM landing.raw_documents
      UNION ALL SELECT 'etl.batch_files', source_file FROM etl.batch_files
      UNION ALL SELECT 'etl.batch_files.error', error FROM etl.batch_files WHERE error IS NOT NULL
      UNION ALL SELECT 'etl.rejected_documents', source_file FROM etl.rejected_documents`);
    return rows;
  };

  test('run: sha256:<16 hex> in landing, batch files, rejects, logs and the reject listing', async () => {
    const { mkdirSync } = await import('node:fs');
    mkdirSync(dir);
    writeFileSync(
      path.join(dir, NAMES[0]),
      JSON.stringify({ patient_id: 'R-1', updated_at: '2024-01-01T00:00:00Z', visits: [{ visit_id: 'V', visit_date: '2023-01-01' }] }),
    );
    copyFileSync(path.join(dir, NAMES[0]), path.join(dir, NAMES[1]));
    writeFileSync(
      path.join(dir, NAMES[2]),
      ndjson({ patient_id: 'R-2', updated_at: '2024-01-01T00:00:00Z' }, { patient_id: 'R-3', visits: [{ visit_id: 'V' }] }) + 'not json\n',
    );
    writeFileSync(path.join(dir, NAMES[3]), '[{"patient_id": "R-4"');
    writeFileSync(path.join(dir, NAMES[4]), 'notes\n');
    symlinkSync(path.join(dir, 'nowhere'), path.join(dir, NAMES[5]));

    const r = await runCli(at(loader(), 'run', dir, '--redact-file-names', '--verbose'));
    expect(r.code, r.stderr).toBe(4); // rejects
    expect(leaks(r)).toEqual([]);
    const done = lineOf(r, /^run finished$/);
    // R-1 and its copy (a duplicate in the batch), R-2; rejected: R-3 (visit_date), 'not json', the malformed file.
    expect(done).toMatchObject({ documents: 6, loaded: 2, duplicate: 1, rejected: 3, failed_files: 2 });

    const files = await d.query(`SELECT source_file, status, error FROM etl.batch_files WHERE batch_id = $1 ORDER BY source_file`, [
      done.batch,
    ]);
    const z = `sha256:${sha16(NAMES[0])}`;
    expect(files).toEqual(
      [
        { source_file: z, status: 'staged', error: null },
        { source_file: `${z}#2`, status: 'staged', error: null },
        { source_file: `sha256:${sha16(NAMES[2])}`, status: 'staged', error: null },
        { source_file: `sha256:${sha16(NAMES[3])}`, status: 'rejected', error: expect.stringMatching(/^\$: not valid JSON/) },
        // Directory order: Agatha (skipped), Dangling (unreadable) are the first two inputs.
        { source_file: '[unread file 1]', status: 'skipped', error: expect.any(String) },
        { source_file: '[unread file 2]', status: 'unreadable', error: expect.stringMatching(/^ENOENT/) },
      ].sort((a, b) => (a.source_file < b.source_file ? -1 : 1)),
    );
    // Different files, different names; the file named in the log lines is the stored one.
    expect(new Set(files.map((f) => f.source_file)).size).toBe(files.length);
    expect(
      jsonLines(r.stdout)
        .filter((l) => l.file !== undefined)
        .map((l) => l.file)
        .sort(),
    ).toEqual(files.map((f) => f.source_file).sort());
    for (const s of await stored()) {
      for (const stem of STEMS) expect(s.name, `${s.where}: ${s.name}`).not.toContain(stem);
      expect(s.name).not.toContain(tmp);
    }
    expect(await d.query(`SELECT DISTINCT source_file FROM etl.rejected_documents ORDER BY 1`)).toEqual(
      [`sha256:${sha16(NAMES[2])}`, `sha256:${sha16(NAMES[3])}`].sort().map((source_file) => ({ source_file })),
    );

    const status = await runCli(at(loader(), 'status', '--log-format', 'pretty'));
    expect(status.code, status.stderr).toBe(0);
    expect(leaks(status)).toEqual([]);
  });

  test('HEALTHETL_REDACT_FILE_NAMES=1 does the same for load, at a terminal format too; standard input stays -', async () => {
    const env = childEnv({ HEALTHETL_REDACT_FILE_NAMES: '1' });
    const load = await runCli(at(loader(), 'load', dir, '--log-format', 'pretty'), { env });
    expect(load.code, load.stderr).toBe(4);
    expect(load.stderr).toMatch(/file staged {2}file=sha256:[0-9a-f]{16} /);
    expect(leaks(load)).toEqual([]);
    const run = await runCli(at(loader(), 'run', dir, '--log-format', 'pretty'), { env });
    expect(run.code, run.stderr).toBe(4);
    // The reject listing (read back from the database) names files by their hashes.
    expect(run.stdout).toContain(`rejected: sha256:${sha16(NAMES[2])} line 2: visits[0].visit_date`);
    expect(leaks(run)).toEqual([]);
    for (const s of await stored()) for (const stem of STEMS) expect(s.name).not.toContain(stem);

    const stdin = await runWithInput(at(loader(), 'run', '-', '--redact-file-names'), ndjson({ patient_id: 'R-STDIN' }));
    expect(stdin.code, stdin.stderr).toBe(0);
    const batch = lineOf(stdin, /^run finished$/).batch;
    expect(await d.query(`SELECT source_file FROM etl.batch_files WHERE batch_id = $1`, [batch])).toEqual([{ source_file: '-' }]);
    const balanced = await d.query(`SELECT bool_and(balanced) AS ok FROM etl.batch_summary`);
    expect(balanced).toEqual([{ ok: true }]);
  });

  test('a path that does not exist is named by its place, not its name; a bad setting is refused at start', async () => {
    const r = await runCli(at(loader(), 'run', dir, path.join(tmp, 'Missing_Millicent.json'), '--redact-file-names'));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/path 2 of the command line does not exist/);
    expect(r.stdout + r.stderr).not.toContain('Millicent');
    const bad = await runCli(at(loader(), 'run', dir), { env: childEnv({ HEALTHETL_REDACT_FILE_NAMES: 'yes' }) });
    expect(bad.code).toBe(2);
    expect(stderrLines(bad)).toEqual([
      expect.stringMatching(/^healthetl: HEALTHETL_REDACT_FILE_NAMES must be 1 \(redact file names\) or 0/),
    ]);
  });

  test('the leak check finds a name when one is there (without redaction)', async () => {
    const r = await runCli(at(loader(), 'load', path.join(dir, NAMES[0]), '--no-redact-file-names'), {
      env: childEnv({ HEALTHETL_REDACT_FILE_NAMES: '1' }),
    });
    expect(r.code, r.stderr).toBe(0);
    expect(leaks(r)).toEqual(expect.arrayContaining(['Zebulon', 'Marchbanks']));
  });
});

describe('FileNames: the names of redacted files are unique in a batch', () => {
  const fp = (hex: string) => ({ sha: Buffer.from(hex, 'hex'), size: 1 });
  const a = 'ab'.repeat(8) + '01'.repeat(24);
  const b = 'ab'.repeat(8) + '02'.repeat(24); // the same first 16 hex digits, another file

  test('16 hex digits; the whole hash when two files share them; #2 for the same bytes again; paths without redaction', () => {
    const names = new FileNames(true);
    expect(names.ofFile('/in/Jane_Doe.json', fp(a))).toBe(`sha256:${a.slice(0, 16)}`);
    expect(names.ofFile('/in/John_Roe.json', fp(b))).toBe(`sha256:${b}`);
    expect(names.ofFile('/in/Jane_Doe copy.json', fp(a))).toBe(`sha256:${a.slice(0, 16)}#2`);
    expect(names.ofFile('-', undefined)).toBe('-');
    expect(names.unread('/in/Jane_Doe.txt', 4)).toBe('[unread file 4]');
    expect(names.reason("ENOENT: no such file or directory, stat '/in/Jane_Doe.json'", '/in/Jane_Doe.json', '[unread file 5]')).toBe(
      "ENOENT: no such file or directory, stat '[unread file 5]'",
    );
    expect(names.reason('not a .json, .ndjson or .jsonl file', '.', '[unread file 1]')).toBe('not a .json, .ndjson or .jsonl file');
    const plain = new FileNames(false);
    expect(plain.ofFile('/in/Jane_Doe.json', fp(a))).toBe('/in/Jane_Doe.json');
    expect(plain.reason("stat '/in/Jane_Doe.json'", '/in/Jane_Doe.json', 'x')).toBe("stat '/in/Jane_Doe.json'");
  });
});
