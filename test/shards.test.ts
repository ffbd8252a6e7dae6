// Sharded transforms (migrations/0004, scripts/transform.ts): a batch split by patient over N
// sessions gives exactly what one transaction gives (the whole-batch transform is the oracle: its
// outcomes are held to the hand-written fixtures/EXPECTED.md by test/pipeline.test.ts); a shard is
// refused without a coordinator holding the transform lock; a shard that fails leaves the others
// committed and the batch unfinished, and the next run finishes it with the same result.
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createDbPool } from '../scripts/db.ts';
import type { PatientDocument } from '../scripts/generate.ts';
import { expandInputs } from '../scripts/inputs.ts';
import { loadBatch } from '../scripts/stage.ts';
import { transformPending, type BatchTransform, type ShardOptions } from '../scripts/transform.ts';
import { useTestDatabase } from './db.ts';
import {
  activeSessions,
  childEnv,
  connect,
  expectNoOrphansOrDuplicates,
  fingerprint,
  jsonLines,
  patients,
  pollUntil,
  PROJECT_DIR,
  runCli,
  startCli,
  stderrLines,
  writeNdjson,
} from './fault-helpers.ts';

type Db = ReturnType<typeof useTestDatabase>;
const whole = useTestDatabase();
const sharded = useTestDatabase();
const failing = useTestDatabase();
const killed = useTestDatabase();
const clean = useTestDatabase();
const lost = useTestDatabase();

let dir: string;
let batch1: string[];
let batch2: string[];
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'healthetl-shards-'));
  const { docs } = patients(0, 400, 7);
  const newer = (d: PatientDocument): PatientDocument => ({ ...d, updated_at: '2026-01-01T00:00:00Z', visits: d.visits.slice(0, -1) });
  const older = (d: PatientDocument): PatientDocument => ({ ...d, updated_at: '2000-01-01T00:00:00Z', mrn: `OLD-${d.mrn}` });
  const lines = (ds: PatientDocument[]) => ds.map((d) => JSON.stringify(d));
  // Batch 1: the hand-written fixtures (valid, warnings, rejects, snapshots) and 300 generated
  // patients, with byte-identical copies of 20 of them in another file, older snapshots of 20
  // more, and newer snapshots of 20 more that arrive before the documents they replace.
  await writeNdjson(path.join(dir, 'b1-main.ndjson'), [...lines(docs.slice(40, 60).map(newer)), ...lines(docs.slice(0, 300))]);
  await writeNdjson(path.join(dir, 'b1-copies.ndjson'), [...lines(docs.slice(0, 20)), ...lines(docs.slice(20, 40).map(older))]);
  batch1 = [path.join(PROJECT_DIR, 'fixtures'), path.join(dir, 'b1-main.ndjson'), path.join(dir, 'b1-copies.ndjson')];
  // Batch 2: newer snapshots replace 100 patients (their old visits and children must go), older
  // ones of 20 patients are superseded by what is loaded, 100 new patients, and a re-sent file.
  await writeNdjson(path.join(dir, 'b2-updates.ndjson'), [
    ...lines(docs.slice(0, 100).map(newer)),
    ...lines(docs.slice(100, 120).map(older)),
    ...lines(docs.slice(300, 400)),
  ]);
  batch2 = [path.join(dir, 'b2-updates.ndjson'), path.join(dir, 'b1-copies.ndjson')];
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function loadAndTransform(db: Db, paths: string[], opts: ShardOptions): Promise<BatchTransform[]> {
  await loadBatch(db.url(), expandInputs(paths));
  const pool = await createDbPool(db.url(), (opts.shards ?? 1) + 1);
  try {
    return await transformPending(pool, opts);
  } finally {
    await pool.end();
  }
}

/** Everything a transform decides, by position in the input files (no surrogate keys, no times). */
async function outcomes(db: Db) {
  const q = db.query;
  return {
    clinical: await fingerprint(q),
    landing: await q(`SELECT batch_id::int, source_file, line, item, status FROM landing.raw_documents ORDER BY 1, 2, 3, 4`),
    rejected: await q(`SELECT d.batch_id::int, d.source_file, d.line, d.item, r.field, r.reason, r.all_reasons
                       FROM etl.rejected_documents r JOIN landing.raw_documents d USING (document_id) ORDER BY 1, 2, 3, 4`),
    problems: await q(`SELECT d.batch_id::int, d.source_file, d.line, d.item, p.field, p.problem
                       FROM etl.document_problems p JOIN landing.raw_documents d USING (document_id) ORDER BY 1, 2, 3, 4, 5`),
    batches: await q(`SELECT batch_id::int, status, received::int, staged::int, loaded::int, rejected::int, duplicate::int, superseded::int
                      FROM etl.batch_summary ORDER BY 1`),
  };
}

const total = (rs: BatchTransform[]) =>
  rs.reduce(
    (a, r) => ({
      documents: a.documents + r.documents,
      loaded: a.loaded + r.loaded,
      rejected: a.rejected + r.rejected,
      duplicate: a.duplicate + r.duplicate,
      superseded: a.superseded + r.superseded,
      problems: a.problems + r.problems,
    }),
    { documents: 0, loaded: 0, rejected: 0, duplicate: 0, superseded: 0, problems: 0 },
  );

describe('a batch in shards gives what one transaction gives', () => {
  test('batch 1: fixtures, copies, older and newer snapshots, in 3 shards', async () => {
    const one = await loadAndTransform(whole, batch1, { shards: 1 });
    const three = await loadAndTransform(sharded, batch1, { shards: 3, shardMinDocuments: 1 });
    expect(one.map((r) => r.shards)).toEqual([1]);
    expect(three.map((r) => r.shards)).toEqual([3]);
    expect(total(three)).toEqual(total(one));
    // Every kind of outcome occurs, so the comparison below covers each path of the transform.
    expect(Math.min(...Object.values(total(one)))).toBeGreaterThan(0);
    // Every shard had documents (the split is by patient, so it is not even, but none is empty).
    const perShard =
      await sharded.query(`SELECT etl.shard_of(payload -> 'source_system', payload -> 'patient_id', 3) AS shard, count(*)::int AS n
                                          FROM landing.raw_documents WHERE payload IS NOT NULL GROUP BY 1 ORDER BY 1`);
    expect(perShard.map((r) => r.shard)).toEqual([0, 1, 2]);
    expect(Math.min(...perShard.map((r) => r.n))).toBeGreaterThan(50);

    const expected = await outcomes(whole);
    expect(await outcomes(sharded)).toEqual(expected);
    expectNoOrphansOrDuplicates(expected.clinical);
  });

  test('batch 2: replaced, superseded and new patients and a re-sent file, in 3 shards', async () => {
    const one = await loadAndTransform(whole, batch2, { shards: 1 });
    const three = await loadAndTransform(sharded, batch2, { shards: 3, shardMinDocuments: 1 });
    expect(total(three)).toEqual(total(one));
    // Counted by hand: 100 newer snapshots, of which 20 (patients 40-59) are byte-identical to
    // batch 1's newer ones (duplicates); 20 older snapshots (superseded); 100 new patients. The
    // re-sent file is recognised by the loader (40 duplicates without a transform).
    expect(total(one)).toEqual({ documents: 220, loaded: 180, rejected: 0, duplicate: 20, superseded: 20, problems: 0 });
    const expected = await outcomes(whole);
    expect(expected.batches[1]).toMatchObject({ received: 260, loaded: 180, duplicate: 60, superseded: 20, staged: 0 });
    expect(await outcomes(sharded)).toEqual(expected);
    expect(expected.batches.map((b) => b.status)).toEqual(['transformed', 'transformed']);
  });

  test('a batch smaller than --shard-min-documents is one transaction', async () => {
    await writeNdjson(path.join(dir, 'small.ndjson'), patients(1000, 1010, 7).lines);
    const r = await loadAndTransform(sharded, [path.join(dir, 'small.ndjson')], { shards: 3, shardMinDocuments: 11 });
    expect(r).toMatchObject([{ shards: 1, documents: 10, loaded: 10 }]);
  });
});

describe('shards and the pool', () => {
  test("shards are capped at the pool size - 1 (one connection is the coordinator's), not left waiting forever", async () => {
    await writeNdjson(path.join(dir, 'capped.ndjson'), patients(3000, 3010, 7).lines);
    await loadBatch(sharded.url(), expandInputs([path.join(dir, 'capped.ndjson')]));
    const pool = await createDbPool(sharded.url(), 3);
    try {
      expect(await transformPending(pool, { shards: 5, shardMinDocuments: 1 })).toMatchObject([{ shards: 2, documents: 10, loaded: 10 }]);
    } finally {
      await pool.end();
    }
  });
});

describe('a batch whose loader died', () => {
  test("is transformed in shards: the coordinator holds the dead loader's lock, and its shards accept that", async () => {
    await writeNdjson(path.join(dir, 'dead-loader.ndjson'), patients(4000, 4012, 7).lines);
    const { batchId } = await loadBatch(sharded.url(), expandInputs([path.join(dir, 'dead-loader.ndjson')]));
    // As a loader killed before it marked its batch staged leaves it (its advisory lock is free).
    await sharded.query(`UPDATE etl.batches SET status = 'loading' WHERE batch_id = $1`, [batchId]);
    const pool = await createDbPool(sharded.url(), 3);
    try {
      expect(await transformPending(pool, { batchIds: [batchId], shards: 2, shardMinDocuments: 1 })).toMatchObject([
        { batchId, shards: 2, documents: 12, loaded: 12 },
      ]);
    } finally {
      await pool.end();
    }
    expect((await sharded.query(`SELECT status FROM etl.batches WHERE batch_id = $1`, [batchId]))[0].status).toBe('transformed');
  });
});

describe('a shard is only transformed under its coordinator', () => {
  test('without one, or with a shard number out of range, the call is refused and nothing changes', async () => {
    await writeNdjson(path.join(dir, 'refused.ndjson'), patients(2000, 2005, 7).lines);
    const { batchId } = await loadBatch(sharded.url(), expandInputs([path.join(dir, 'refused.ndjson')]));
    const c = await connect(sharded.url());
    try {
      const attempt = async (sql: string) => {
        const e = await c.client.query(sql, [batchId]).then(
          () => null,
          (err: { code: string; message: string; hint?: string }) => err,
        );
        return e && { code: e.code, message: e.message, hint: e.hint };
      };
      // No coordinator, and a session that does not hold the transform lock (itself).
      expect(await attempt(`SELECT * FROM etl.transform_batch($1, 0, 2)`)).toMatchObject({
        code: 'HE004',
        hint: expect.stringContaining('healthetl transform'),
      });
      expect(await attempt(`SELECT * FROM etl.transform_batch($1, 1, 2, pg_backend_pid())`)).toMatchObject({ code: 'HE004' });
      expect(await attempt(`SELECT * FROM etl.transform_batch($1, 2, 2)`)).toMatchObject({
        code: 'HE003',
        message: expect.stringContaining('shard 2 of 2'),
      });
      expect(await attempt(`SELECT * FROM etl.transform_batch($1, 0, 0)`)).toMatchObject({ code: 'HE003' });
      const [b] = await c.query(
        `SELECT b.status, s.staged::int FROM etl.batches b JOIN etl.batch_summary s USING (batch_id) WHERE batch_id = $1`,
        [batchId],
      );
      expect(b).toEqual({ status: 'staged', staged: 5 });
      // Once this session holds the transform lock, shards in another session go ahead.
      const pid = (await c.query(`SELECT pg_backend_pid() AS pid`))[0].pid as number;
      await c.query(`SELECT pg_advisory_lock(etl.transform_lock_key())`);
      const other = await connect(sharded.url());
      try {
        // Both shards have documents (else the first would already be the last).
        const split = await other.query(
          `SELECT etl.shard_of(payload -> 'source_system', payload -> 'patient_id', 2) AS shard, count(*)::int AS n
                                         FROM landing.raw_documents WHERE batch_id = $1 GROUP BY 1 ORDER BY 1`,
          [batchId],
        );
        expect(split.map((r) => r.shard)).toEqual([0, 1]);
        const done = [];
        for (const shard of [0, 1]) {
          await other.query(`SELECT etl.ensure_batch_partitions($1, $2, 2)`, [batchId, shard]);
          done.push(
            ...(await other.query(`SELECT documents::int, loaded::int FROM etl.transform_batch($1, $2, 2, $3)`, [batchId, shard, pid])),
          );
          // The last shard to commit finishes the batch; the one before leaves it staged.
          const [{ status }] = await other.query(`SELECT status FROM etl.batches WHERE batch_id = $1`, [batchId]);
          expect({ shard, status }).toEqual({ shard, status: shard === 0 ? 'staged' : 'transformed' });
        }
        expect(done.map((r) => r.loaded)).toEqual(split.map((r) => r.n));
        // The coordinator's own finish_batch then has nothing left to do.
        expect((await other.query(`SELECT etl.finish_batch($1) AS finished`, [batchId]))[0].finished).toBe(false);
      } finally {
        await other.end();
        await c.query(`SELECT pg_advisory_unlock(etl.transform_lock_key())`);
      }
    } finally {
      await c.end();
    }
  });
});

describe('a shard that fails', () => {
  test('leaves the other shards committed and the batch unfinished; the next run finishes it with the same result', async () => {
    const on = (...args: string[]) => [
      ...args,
      '--database-url',
      failing.url(),
      '--log-format',
      'json',
      '--shards',
      '2',
      '--shard-min-documents',
      '1',
    ];
    const first = await runCli(on('run', ...batch1));
    expect(first.code, first.stderr).toBe(4); // the fixtures hold rejects

    // Another session holds the row of a patient that batch 2 replaces: that patient's shard
    // times out on the lock and rolls back; the other shard commits.
    const blocker = await connect(failing.url());
    let lockedShard: number;
    try {
      await blocker.query('BEGIN');
      const [p] = await blocker.query(
        `SELECT patient_key, etl.shard_of(to_jsonb(source_system), to_jsonb(source_patient_id), 2) AS shard
                                       FROM clinical.patients WHERE source_patient_id = $1 FOR UPDATE`,
        [patients(5, 6, 7).docs[0].patient_id],
      );
      lockedShard = p.shard;
      const blocked = await runCli(on('run', ...batch2), { env: childEnv({ HEALTHETL_LOCK_TIMEOUT_MS: '300' }) });
      expect(blocked.code).toBe(1);
      expect(stderrLines(blocked).join('\n') + blocked.stdout).toMatch(/lock_timeout/);
    } finally {
      await blocker.query('ROLLBACK');
      await blocker.end();
    }

    const [b2] = await failing.query(`SELECT status, staged::int, loaded::int FROM etl.batch_summary WHERE batch_id = 2`);
    expect(b2.status).toBe('staged');
    expect(b2.staged).toBeGreaterThan(0);
    expect(b2.loaded).toBeGreaterThan(0);
    // What is left staged is exactly the failed shard's documents.
    const left = await failing.query(`SELECT DISTINCT etl.shard_of(payload -> 'source_system', payload -> 'patient_id', 2) AS shard
                                      FROM landing.raw_documents WHERE batch_id = 2 AND status = 'staged'`);
    expect(left).toEqual([{ shard: lockedShard! }]);
    // The batch still adds up while half done, and says why it is not finished: status exits 7
    // (a batch failed to transform; the next run retries it).
    const status = await runCli(['status', '--batch', '2', '--database-url', failing.url(), '--log-format', 'json']);
    expect(status.code, status.stderr).toBe(7);
    expect(jsonLines(status.stdout).find((l) => l.msg === 'batch')).toMatchObject({
      balanced: true,
      error: expect.stringMatching(/^SQLSTATE 55P03 /),
    });

    const again = await runCli(on('transform'));
    expect(again.code, again.stderr).toBe(0);
    expect(jsonLines(again.stdout).find((l) => l.msg === 'batch transformed')).toMatchObject({ batch: 2, shards: 2 });
    expect(await outcomes(failing)).toEqual(await outcomes(whole));
  });
});

describe('a sharded run killed with SIGKILL during the transform', () => {
  test('the shards that committed are whole per patient; the next run completes with the rows of one clean run', async () => {
    const { docs, lines } = patients(0, 5000, 13);
    const pre = path.join(dir, 'killed-pre.ndjson');
    const file = path.join(dir, 'killed.ndjson');
    // Patient 7 is loaded first in an older version, so the main file replaces it; another
    // session holds its row, which keeps that patient's shard waiting while the others commit.
    const p7 = docs[7];
    await writeNdjson(pre, [JSON.stringify({ ...p7, updated_at: '2000-01-01T00:00:00Z', visits: [] })]);
    await writeNdjson(file, lines);
    const on = (d: Db, ...args: string[]) => [
      ...args,
      '--database-url',
      d.url(),
      '--log-format',
      'json',
      '--shards',
      '3',
      '--shard-min-documents',
      '1',
    ];
    for (const d of [killed, clean]) expect((await runCli(on(d, 'run', pre))).code).toBe(0);

    const blocker = await connect(killed.url());
    try {
      await blocker.query('BEGIN');
      await blocker.query(`SELECT 1 FROM clinical.patients WHERE source_patient_id = $1 FOR UPDATE`, [p7.patient_id]);
      const running = startCli(on(killed, 'run', file));
      await pollUntil("the other shards to commit while patient 7's shard waits on its row", async () => {
        const [r] =
          await killed.query(`SELECT (SELECT count(*) FROM landing.raw_documents WHERE batch_id = 2 AND status = 'loaded')::int AS loaded,
                                               (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                                                  AND query ILIKE '%transform_batch%' AND wait_event_type = 'Lock')::int AS waiting`);
        return r.loaded > 0 && r.waiting > 0;
      });
      running.child.kill('SIGKILL');
      expect((await running.done).signal).toBe('SIGKILL');
    } finally {
      await blocker.query('ROLLBACK');
      await blocker.end();
    }
    // The orphaned session gets the row, finishes its statement, finds its client gone and rolls back.
    await pollUntil('the orphaned sessions to end', async () => (await activeSessions(killed.query)) === 0);

    const [b] = await killed.query(`SELECT status, received::int, staged::int, loaded::int FROM etl.batch_summary WHERE batch_id = 2`);
    expect(b.status).toBe('staged');
    expect(b.loaded).toBeGreaterThan(0);
    expect(b.staged + b.loaded).toBe(b.received);
    // Each shard is all staged (rolled back) or all done (committed), and patient 7's shard,
    // which was waiting, is staged; every loaded patient has all its visits.
    const shards = await killed.query(`SELECT etl.shard_of(payload -> 'source_system', payload -> 'patient_id', 3) AS shard,
                                              count(*) FILTER (WHERE status = 'staged')::int AS staged, count(*)::int AS n
                                       FROM landing.raw_documents WHERE batch_id = 2 GROUP BY 1 ORDER BY 1`);
    for (const sh of shards) expect([0, sh.n]).toContain(sh.staged);
    const [mine] = await killed.query(`SELECT etl.shard_of($1::jsonb, $2::jsonb, 3) AS shard`, [
      JSON.stringify(p7.source_system),
      JSON.stringify(p7.patient_id),
    ]);
    expect(shards.find((sh) => sh.shard === mine.shard)!.staged).toBeGreaterThan(0);
    const visitsOf = new Map(docs.map((d) => [d.patient_id, d.visits.length]));
    const loaded = await killed.query(`SELECT p.source_patient_id AS id, count(v.*)::int AS visits
                                       FROM clinical.patients p LEFT JOIN clinical.visits v USING (patient_key)
                                       WHERE p.batch_id = 2 GROUP BY 1`);
    expect(loaded.length).toBe(b.loaded);
    for (const p of loaded) expect({ id: p.id, visits: p.visits }).toEqual({ id: p.id, visits: visitsOf.get(p.id) });
    expectNoOrphansOrDuplicates(await fingerprint(killed.query));

    const again = await runCli(on(killed, 'run', file));
    expect(again.code, again.stderr).toBe(0);
    const reference = await runCli(on(clean, 'run', file).concat(['--shards', '1']));
    expect(reference.code, reference.stderr).toBe(0);
    const fp = await fingerprint(killed.query);
    expect(fp).toEqual(await fingerprint(clean.query));
    expect(fp.patients.rows).toBe(5000);
    // Every document of the file was loaded exactly once over the two batches that read it.
    const [once] =
      await killed.query(`SELECT count(*) FILTER (WHERE status = 'loaded')::int AS loaded, count(*) FILTER (WHERE status = 'duplicate')::int AS duplicate,
                                              count(*) FILTER (WHERE status = 'staged')::int AS staged FROM landing.raw_documents WHERE batch_id > 1`);
    expect(once).toEqual({ loaded: 5000, duplicate: 5000, staged: 0 });
    // Each of the two runs of 5000 patients also runs the data-quality checks on them: a longer guard.
  }, 120_000);
});

describe('a coordinator lost while its shards run', () => {
  test('the next transform waits for the orphaned shards; the last of them finishes its batch; snapshots never mix', async () => {
    const { docs } = patients(0, 30, 17);
    const p7 = docs[7];
    const files = { pre: 'lost-pre.ndjson', a: 'lost-a.ndjson', b: 'lost-b.ndjson' };
    const visit = (id: string) => ({ visit_id: id, visit_date: '2024-03-03' });
    await writeNdjson(path.join(dir, files.pre), [
      JSON.stringify({ ...p7, updated_at: '2000-01-01T00:00:00Z', visits: [] }),
      ...docs.slice(0, 4).map((d) => JSON.stringify(d)),
    ]);
    await writeNdjson(path.join(dir, files.a), [
      JSON.stringify({ ...p7, updated_at: '2026-01-01T00:00:00Z', visits: [visit('VA')] }),
      ...docs.slice(10, 30).map((d) => JSON.stringify(d)),
    ]);
    await writeNdjson(path.join(dir, files.b), [JSON.stringify({ ...p7, updated_at: '2026-02-01T00:00:00Z', visits: [visit('VB')] })]);
    const on = (...args: string[]) => [
      ...args,
      '--database-url',
      lost.url(),
      '--log-format',
      'json',
      '--shards',
      '2',
      '--shard-min-documents',
      '1',
    ];
    expect((await runCli(on('run', path.join(dir, files.pre)))).code).toBe(0);

    const blocker = await connect(lost.url());
    let first: Awaited<ReturnType<typeof startCli>>['done'];
    let second: Awaited<ReturnType<typeof startCli>>['done'];
    try {
      await blocker.query('BEGIN');
      await blocker.query(`SELECT 1 FROM clinical.patients WHERE source_patient_id = $1 FOR UPDATE`, [p7.patient_id]);
      first = startCli(on('run', path.join(dir, files.a))).done;
      await pollUntil("patient 7's shard to wait on its row", async () => {
        const [r] = await lost.query(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database()
                                      AND query ILIKE '%transform_batch%' AND wait_event_type = 'Lock' AND wait_event = 'transactionid'`);
        return r.n > 0;
      });
      // The coordinator (the session holding the transform lock) is lost.
      const [coordinator] = await lost.query(`SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock'
                                               AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = etl.transform_lock_key()`);
      expect((await lost.query(`SELECT pg_terminate_backend($1) AS ok`, [coordinator.pid]))[0].ok).toBe(true);
      // Another run gets the transform lock, and must wait for the orphaned shards.
      second = startCli(on('run', path.join(dir, files.b))).done;
      await pollUntil('the second run to wait for the orphaned shards', async () => {
        const [r] = await lost.query(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database()
                                      AND wait_event_type = 'Lock' AND wait_event = 'advisory' AND query ILIKE '%shard_lock_key%'`);
        return r.n > 0;
      });
    } finally {
      await blocker.query('ROLLBACK');
      await blocker.end();
    }
    const [r1, r2] = [await first!, await second!];
    expect(r1.code).toBe(3); // its coordinator's connection was terminated: one line, exit 3
    expect(stderrLines(r1)).toHaveLength(1);
    expect(r2.code, r2.stderr).toBe(0);
    expect(jsonLines(r2.stdout).some((l) => String(l.msg).startsWith('waiting for the shards of an earlier transform'))).toBe(true);

    // The orphaned shard committed after the wait and, being the last, finished batch 2; the
    // second run's newer snapshot was applied after it: patient 7 has batch 3's visit only.
    expect(await lost.query(`SELECT batch_id::int, status FROM etl.batches ORDER BY 1`)).toEqual([
      { batch_id: 1, status: 'transformed' },
      { batch_id: 2, status: 'transformed' },
      { batch_id: 3, status: 'transformed' },
    ]);
    expect(
      await lost.query(
        `SELECT p.batch_id::int, array_agg(v.source_visit_id ORDER BY v.source_visit_id) AS visits
                             FROM clinical.patients p JOIN clinical.visits v USING (patient_key)
                             WHERE p.source_patient_id = $1 GROUP BY 1`,
        [p7.patient_id],
      ),
    ).toEqual([{ batch_id: 3, visits: ['VB'] }]);
    expectNoOrphansOrDuplicates(await fingerprint(lost.query));
    const status = await runCli(['status', '--database-url', lost.url(), '--log-format', 'json']);
    expect(status.code, status.stderr).toBe(0);
  });
});
