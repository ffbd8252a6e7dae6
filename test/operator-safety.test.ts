// What an operator must be able to trust: a batch that failed to transform is never shown as
// fine, what the snapshots deleted is counted where it is seen, and `migrate down` never drops
// data or other people's objects by mistake. Through the CLI, as an operator runs it.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { demoTarget, showDemo } from '../scripts/demo.ts';
import { useTestDatabase } from './db.ts';
import { childEnv, connect, jsonLines, PROJECT_DIR, runCli, stderrLines, type CliResult } from './fault-helpers.ts';

const db = (d: { url: () => string }, ...args: string[]) => [...args, '--database-url', d.url()];
const lines = (r: CliResult, msg: string) => jsonLines(r.stdout).filter((l) => l.msg === msg);

describe('a batch that cannot be transformed is never shown as fine', () => {
  const d = useTestDatabase();

  test('its error is kept, status prints it and exits 7 until a transform finishes the batch', async () => {
    // Another session holds a clinical table: the transform gives up after the lock timeout.
    const blocker = await connect(d.url());
    await blocker.query('BEGIN');
    await blocker.query('LOCK TABLE clinical.patients IN ACCESS EXCLUSIVE MODE');
    let failed: CliResult;
    try {
      failed = await runCli(db(d, 'run', 'fixtures/valid'), { env: childEnv({ HEALTHETL_LOCK_TIMEOUT_MS: '300' }) });
    } finally {
      await blocker.query('ROLLBACK');
      await blocker.end();
    }
    expect(failed.code, failed.stderr).toBe(1);
    const [failure] = lines(failed, 'batch failed; going on with the next one');
    expect(failure).toMatchObject({ level: 50, error: expect.stringContaining('lock_timeout') });

    const status = await runCli(db(d, 'status'));
    expect(status.code, status.stderr).toBe(7);
    const [batch] = lines(status, 'batch');
    expect(batch.batch_id).toBe(failure.batch);
    expect(batch.status).not.toBe('transformed');
    expect(batch.error).toMatch(/^SQLSTATE 55P03 at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: gave up waiting for a lock/);
    const last = jsonLines(status.stdout).at(-1)!;
    expect(last).toMatchObject({ level: 50, batches: [failure.batch] });
    expect(last.msg).toMatch(/failed to transform: its error says why; the next run retries it/);

    // A person at a terminal sees the error too.
    const pretty = await runCli(db(d, 'status', '--log-format', 'pretty'));
    expect(pretty.code).toBe(7);
    expect(pretty.stdout).toContain(`batch ${failure.batch}: SQLSTATE 55P03 at `);

    // The next transform finishes the batch: the error is gone, status is fine again.
    const retry = await runCli(db(d, 'transform'));
    expect(retry.code, retry.stderr).toBe(0);
    const after = await runCli(db(d, 'status'));
    expect(after.code, after.stderr).toBe(0);
    expect(lines(after, 'batch')[0]).toMatchObject({ batch_id: failure.batch, status: 'transformed', error: null, loaded: 16 });
  });
});

describe('what the snapshots deleted is counted where it is seen', () => {
  const d = useTestDatabase();
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-ops-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  test("'batch transformed' and status carry deleted_visits and deleted_children", async () => {
    const v1 = {
      patient_id: 'DEL-1',
      updated_at: '2024-01-01T00:00:00Z',
      visits: [
        { visit_id: 'V1', visit_date: '2020-01-01', diagnoses: [{ code: 'A00' }], treatments: [{ name: 'aspirin' }] },
        { visit_id: 'V2', visit_date: '2021-02-02', diagnoses: [{ code: 'B00' }] },
      ],
    };
    // The next snapshot has no visits: the contract says they all go.
    const v2 = { patient_id: 'DEL-1', updated_at: '2024-02-01T00:00:00Z' };
    writeFileSync(path.join(tmp, 'v1.ndjson'), JSON.stringify(v1) + '\n');
    writeFileSync(path.join(tmp, 'v2.ndjson'), JSON.stringify(v2) + '\n');

    const first = await runCli(db(d, 'run', path.join(tmp, 'v1.ndjson')));
    expect(first.code, first.stderr).toBe(0);
    expect(lines(first, 'batch transformed')[0]).toMatchObject({ loaded: 1, deleted_visits: 0, deleted_children: 0 });

    const second = await runCli(db(d, 'run', path.join(tmp, 'v2.ndjson')));
    expect(second.code, second.stderr).toBe(0);
    const [transformed] = lines(second, 'batch transformed');
    expect(transformed).toMatchObject({ loaded: 1, deleted_visits: 2, deleted_children: 3 });

    const status = await runCli(db(d, 'status', '--batch', String(transformed.batch)));
    expect(status.code, status.stderr).toBe(0);
    expect(lines(status, 'batch')).toEqual([
      expect.objectContaining({ batch_id: transformed.batch, deleted_visits: 2, deleted_children: 3, error: null }),
    ]);
  });
});

describe('migrate down cannot destroy data by mistake', () => {
  const d = useTestDatabase();
  const migrations = readdirSync(path.join(PROJECT_DIR, 'migrations')).filter((f) => f.endsWith('.sql')).length;
  const applied = async () => (await d.query(`SELECT count(*)::int AS n FROM public.healthetl_migrations`))[0].n as number;
  const patients = async () => (await d.query(`SELECT count(*)::int AS n FROM clinical.patients`))[0].n as number;

  beforeAll(async () => {
    const r = await runCli(db(d, 'run', 'fixtures/valid'));
    expect(r.code, r.stderr).toBe(0);
  });

  test('--count 0 (all, to node-pg-migrate) is bad usage: exit 2, nothing reverted', async () => {
    const r = await runCli(db(d, 'migrate', 'down', '--count', '0'));
    expect(r.code, r.stderr).toBe(2);
    expect(stderrLines(r)).toHaveLength(1);
    expect(r.stderr).toMatch(/--count must be a number: a whole number of 1 or more/);
    expect(await applied()).toBe(migrations);
  });

  test('down to 0001 with rows refuses, listing each table with its rows; nothing changes', async () => {
    const r = await runCli(db(d, 'migrate', 'down', '--count', String(migrations - 1)));
    expect(r.code, r.stderr).toBe(2);
    expect(stderrLines(r)).toHaveLength(1);
    expect(r.stderr).toMatch(/would drop \d+ table\(s\) holding rows .*add --destroy-data/);
    const listed = lines(r, 'would drop a table and its rows');
    expect(listed).toEqual(expect.arrayContaining([expect.objectContaining({ table: 'clinical.patients', rows: 16 })]));
    expect(listed.every((l) => (l.rows as number) > 0)).toBe(true);
    expect(await applied()).toBe(migrations);
    expect(await patients()).toBe(16);
  });

  test('an object outside our schemas that depends on ours makes it refuse even with --destroy-data; it survives', async () => {
    await d.query(`CREATE VIEW public.my_batches AS SELECT batch_id, status FROM etl.batches`);
    try {
      const r = await runCli(db(d, 'migrate', 'down', '--count', String(migrations), '--destroy-data'));
      expect(r.code, r.stderr).toBe(2);
      expect(stderrLines(r)).toHaveLength(1);
      expect(r.stderr).toMatch(/public\.my_batches.*drop or move them first/);
      expect(await d.query(`SELECT to_regclass('public.my_batches') IS NOT NULL AS kept`)).toEqual([{ kept: true }]);
      expect(await applied()).toBe(migrations);
      expect(await patients()).toBe(16);
    } finally {
      await d.query(`DROP VIEW IF EXISTS public.my_batches`);
    }
  });

  test('with --destroy-data it lists what goes, then reverts', async () => {
    const r = await runCli(db(d, 'migrate', 'down', '--count', String(migrations - 1), '--destroy-data'));
    expect(r.code, r.stderr).toBe(0);
    expect(lines(r, 'dropping a table and its rows')).toEqual(
      expect.arrayContaining([expect.objectContaining({ table: 'clinical.patients', rows: 16 })]),
    );
    expect(await applied()).toBe(1);
    expect(await d.query(`SELECT to_regclass('clinical.patients') IS NULL AS gone`)).toEqual([{ gone: true }]);
  });
});

describe('healthetl replay and purge', () => {
  const d = useTestDatabase();
  let validBatch: number;
  const counts = async () =>
    (
      await d.query(`
        SELECT (SELECT count(*) FROM clinical.patients)::int AS patients, (SELECT count(*) FROM clinical.visits)::int AS visits,
               (SELECT count(*) FROM clinical.diagnoses)::int AS diagnoses, (SELECT count(*) FROM clinical.treatments)::int AS treatments,
               (SELECT count(*) FROM clinical.provider_notes)::int AS provider_notes`)
    )[0];

  beforeAll(async () => {
    const valid = await runCli(db(d, 'run', 'fixtures/valid'));
    expect(valid.code, valid.stderr).toBe(0);
    validBatch = lines(valid, 'run finished')[0].batch as number;
    // Snapshots: v2 replaces v1, v0 arrives late (superseded): documents that are no longer current.
    for (const f of ['v1.ndjson', 'v2.ndjson', 'v0-late.ndjson']) {
      const r = await runCli(db(d, 'run', `fixtures/snapshots/${f}`));
      expect(r.code, r.stderr).toBe(0);
    }
  });

  test('replay takes exactly one of --all, --batch, --patient-id', async () => {
    const none = await runCli(db(d, 'replay'));
    const two = await runCli(db(d, 'replay', '--all', '--batch', '1'));
    const bad = await runCli(db(d, 'replay', '--batch', '1.5'));
    for (const r of [none, two, bad]) {
      expect(r.code, r.stderr).toBe(2);
      expect(stderrLines(r)).toHaveLength(1);
    }
    expect(none.stderr).toMatch(/exactly one of --all, --batch N or --patient-id/);
  });

  test('replay --all restores rows deleted by hand, one chunk per transaction', async () => {
    const before = await counts();
    await d.query(`DELETE FROM clinical.provider_notes`);
    await d.query(`DELETE FROM clinical.diagnoses WHERE position = 0`);
    expect(await counts()).not.toEqual(before);
    const r = await runCli(db(d, 'replay', '--all'));
    expect(r.code, r.stderr).toBe(0);
    expect(lines(r, 'replay finished')).toEqual([
      expect.objectContaining({ selected: before.patients, replayed: before.patients, kept: 0 }),
    ]);
    expect(await counts()).toEqual(before);
  });

  test('replay --patient-id takes the id in any spelling of its canonical form; --batch takes the batch of the current document', async () => {
    const [{ key }] = await d.query(
      `SELECT patient_key::int AS key FROM clinical.patients WHERE source_system = 'default' AND source_patient_id = 'P-1001'`,
    );
    await d.query(`DELETE FROM clinical.diagnoses WHERE patient_key = $1`, [key]);
    const one = await runCli(db(d, 'replay', '--patient-id', ' P-1001', 'NO-SUCH-PATIENT'));
    expect(one.code, one.stderr).toBe(0);
    expect(lines(one, 'replay finished')).toEqual([expect.objectContaining({ selected: 1, replayed: 1, kept: 0 })]);
    expect((await d.query(`SELECT count(*)::int AS n FROM clinical.diagnoses WHERE patient_key = $1`, [key]))[0].n).toBeGreaterThan(0);
    const other = await runCli(db(d, 'replay', '--patient-id', 'P-1001', '--source-system', 'elsewhere'));
    expect(lines(other, 'replay finished')).toEqual([expect.objectContaining({ selected: 0 })]);

    const batch = await runCli(db(d, 'replay', '--batch', String(validBatch)));
    expect(batch.code, batch.stderr).toBe(0);
    expect(lines(batch, 'replay finished')).toEqual([expect.objectContaining({ selected: 16, replayed: 16 })]);
  });

  test("a patient whose current snapshot today's rules reject keeps its rows: exit 4, its key and the field, never its id", async () => {
    const [{ key, document_id }] = await d.query(
      `SELECT patient_key::int AS key, document_id FROM clinical.patients WHERE source_system = 'default' AND source_patient_id = 'P-1001'`,
    );
    await d.query(
      `UPDATE landing.raw_documents SET payload = jsonb_set(payload, '{visits,0,visit_date}', '"2024-02-30"') WHERE document_id = $1`,
      [document_id],
    );
    const before = await counts();
    const r = await runCli(db(d, 'replay', '--all'));
    expect(r.code, r.stderr).toBe(4);
    expect(lines(r, 'replay finished')).toEqual([expect.objectContaining({ kept: 1, replayed: before.patients - 1 })]);
    const kept = jsonLines(r.stdout).filter((l) => l.level === 40);
    expect(kept).toEqual([expect.objectContaining({ patient_key: key, field: 'visits[0].visit_date' })]);
    expect(r.stdout + r.stderr).not.toMatch(/P-1001|2024-02-30/);
    expect(await counts()).toEqual(before);
  });

  test('purge --older-than 0 leaves payloads only on current snapshots; a negative age is bad usage', async () => {
    const notCurrent = `SELECT count(*)::int AS n FROM landing.raw_documents d WHERE d.payload IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM clinical.patients p WHERE p.document_id = d.document_id)`;
    const [{ n: before }] = await d.query(notCurrent);
    expect(before).toBeGreaterThan(0);
    const [{ n: current }] = await d.query(`SELECT count(*)::int AS n FROM clinical.patients`);

    const negative = await runCli(db(d, 'purge', '--older-than', '-1'));
    expect(negative.code, negative.stderr).toBe(2);
    expect(negative.stderr).toMatch(/--older-than must be a number: a whole number of 0 or more \(days\)/);

    const r = await runCli(db(d, 'purge', '--older-than', '0'));
    expect(r.code, r.stderr).toBe(0);
    expect(lines(r, 'purged')).toEqual([expect.objectContaining({ older_than_days: 0, payloads: before })]);
    expect((await d.query(notCurrent))[0].n).toBe(0);
    const [{ n: kept }] = await d.query(
      `SELECT count(*)::int AS n FROM clinical.patients p JOIN landing.raw_documents d ON d.document_id = p.document_id WHERE d.payload IS NOT NULL`,
    );
    expect(kept).toBe(current);
  });
});

describe('the demo never writes into a database that holds anything but its own demo data', () => {
  const real = useTestDatabase();
  const demo = useTestDatabase();

  test('by default it ignores DATABASE_URL and the PG* variables: only its own --database-url names another database', () => {
    const saved = process.env.DATABASE_URL;
    process.env.DATABASE_URL = real.url();
    try {
      expect(demoTarget(undefined)).toBeUndefined();
      expect(demoTarget(demo.url())).toBe(demo.url());
    } finally {
      if (saved === undefined) delete process.env.DATABASE_URL;
      else process.env.DATABASE_URL = saved;
    }
  });

  test('a database with a batch the demo did not load: exit 2, nothing changed', async () => {
    const r = await runCli(db(real, 'run', 'fixtures/valid/one-patient.json'));
    expect(r.code, r.stderr).toBe(0);
    const state = () =>
      real.query(`SELECT (SELECT count(*) FROM etl.batches)::int AS batches, (SELECT count(*) FROM clinical.patients)::int AS patients`);
    const before = await state();
    const refused = await runCli(db(real, 'demo'), { env: childEnv({ DATABASE_URL: real.url() }) });
    expect(refused.code, refused.stderr).toBe(2);
    // The demo's log lines are JSON on stderr (its summary is stdout's); then the one plain line.
    const plain = stderrLines(refused).filter((l) => !l.startsWith('{'));
    expect(plain).toHaveLength(1);
    expect(plain[0]).toMatch(/holds 1 batch\(es\) the demo did not load: run "healthetl demo" without --database-url/);
    expect(await state()).toEqual(before);
  });

  test("its batches are marked as the demo's; a database with demo data only can take the demo again; it shows only its own rows", async () => {
    const first = await runCli(db(demo, 'demo'));
    expect(first.code, first.stderr).toBe(0);
    const loaders = await demo.query(`SELECT loader FROM etl.batches`);
    expect(loaders).toEqual([{ loader: expect.stringMatching(/^healthetl demo on .+ \(pid \d+\)$/) }]);
    const again = await runCli(db(demo, 'demo'));
    expect(again.code, again.stderr).toBe(0);
    expect(await demo.query(`SELECT count(*)::int AS n FROM etl.batches WHERE loader LIKE 'healthetl demo on %'`)).toEqual([{ n: 2 }]);
    // Rows loaded by anything else are not shown: a patient loaded by a normal run is not counted.
    const shown = (r: CliResult) => Number(/clinical\.patients\s+(\d+)/.exec(r.stdout)?.[1]);
    const [{ n: patients }] = await demo.query(`SELECT count(*)::int AS n FROM clinical.patients`);
    expect(shown(again)).toBe(patients);

    // Should anything else be loaded beside it meanwhile, the demo shows only its own rows.
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-demo-'));
    try {
      writeFileSync(
        path.join(tmp, 'other.ndjson'),
        JSON.stringify({ patient_id: 'NOT-DEMO-1', visits: [{ visit_id: 'V', visit_date: `${new Date().getUTCFullYear()}-01-01` }] }) +
          '\n',
      );
      const other = await runCli(db(demo, 'run', path.join(tmp, 'other.ndjson')));
      expect(other.code, other.stderr).toBe(0);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
    const printed: string[] = [];
    await showDemo(demo.url(), 1, (t) => printed.push(t));
    const text = printed.join('\n');
    expect(Number(/clinical\.patients\s+(\d+)/.exec(text)?.[1])).toBe(patients);
    expect(text).not.toContain('NOT-DEMO-1');
  });
});

describe('migrate down on a database without data', () => {
  const d = useTestDatabase();
  const migrations = readdirSync(path.join(PROJECT_DIR, 'migrations')).filter((f) => f.endsWith('.sql')).length;
  const applied = async () => (await d.query(`SELECT count(*)::int AS n FROM public.healthetl_migrations`))[0].n as number;

  test('down of the last migrations on a database without data: only seed rows are at stake, listed; --destroy-data reverts; up again', async () => {
    // 0012's Down drops only an empty table (etl.fhir_resources): nothing is at stake, it goes.
    const first = await runCli(db(d, 'migrate', 'down'));
    expect(first.code, first.stderr).toBe(0);
    expect(await applied()).toBe(migrations - 1);
    // 0011's Down drops the data-quality checks, seeded by the migration itself (and maybe tuned since).
    const down = await runCli(db(d, 'migrate', 'down'));
    expect(down.code, down.stderr).toBe(2);
    expect(
      lines(down, 'would drop a table and its rows')
        .map((l) => l.table)
        .sort(),
    ).toEqual(['dq.check_kinds', 'dq.checks']);
    expect(await applied()).toBe(migrations - 1);
    const forced = await runCli(db(d, 'migrate', 'down', '--destroy-data'));
    expect(forced.code, forced.stderr).toBe(0);
    expect(await applied()).toBe(migrations - 2);
    const up = await runCli(db(d, 'migrate', 'up'));
    expect(up.code, up.stderr).toBe(0);
    expect(await applied()).toBe(migrations);
  });
});

describe('a role whose connection limit is below --shards + 1', () => {
  const d = useTestDatabase();
  const role = `he_lim_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
  const password = randomBytes(12).toString('hex'); // made up for this run: none is kept in the repository
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-lim-'));
  let url: string;

  beforeAll(async () => {
    // A loader login (member of healthetl_loader, migrations/0008) with room for two connections.
    await d.query(`CREATE ROLE ${role} LOGIN PASSWORD '${password}' CONNECTION LIMIT 2 IN ROLE healthetl_loader`);
    const u = new URL(d.url());
    u.username = role;
    u.password = password;
    url = u.toString();
  });
  afterAll(async () => {
    rmSync(tmp, { recursive: true, force: true });
    await d.query(`DROP OWNED BY ${role}`);
    await d.query(`DROP ROLE ${role}`);
  });

  test("the batch is transformed with fewer shards, in the end in the coordinator's transaction, and the run says so", async () => {
    const docs = Array.from({ length: 40 }, (_, i) => ({
      patient_id: `LIM-${i}`,
      visits: [{ visit_id: 'V1', visit_date: i % 2 ? '2020-05-01' : '2021-06-01', diagnoses: [{ code: 'A00' }] }],
    }));
    writeFileSync(path.join(tmp, 'lim.ndjson'), docs.map((x) => JSON.stringify(x)).join('\n') + '\n');
    const load = await runCli(['load', path.join(tmp, 'lim.ndjson'), '--database-url', url]);
    expect(load.code, load.stderr).toBe(0);
    const r = await runCli(['transform', '--shards', '3', '--shard-min-documents', '1', '--database-url', url]);
    expect(r.code, r.stderr).toBe(0);
    const said = jsonLines(r.stdout).map((l) => l.msg);
    expect(said.some((m) => /refused \d of 3 shard connections \(SQLSTATE 53300: connection limit\)/.test(m))).toBe(true);
    expect(jsonLines(r.stdout).find((l) => l.msg === 'batch transformed')).toMatchObject({ documents: 40, loaded: 40 });
    expect(await d.query(`SELECT status FROM etl.batches`)).toEqual([{ status: 'transformed' }]);
    expect((await d.query(`SELECT count(*)::int AS n FROM clinical.visits`))[0].n).toBe(40);
  });
});
