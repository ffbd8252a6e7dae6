// Nothing lost under faults: a batch's counts reconcile (and `status` says so by its exit code), a
// loader or a transform killed with SIGKILL is finished by the next run with the same result as
// one clean run, runs at once on overlapping inputs process every document exactly once, and a
// stuck lock is a clear error rather than a hang. Real processes (node bin/healthetl.mjs), real
// kills, a real PostgreSQL; expected row counts come from the generated documents themselves.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import {
  activeSessions,
  batchStates,
  childEnv,
  connect,
  countRows,
  countsOf,
  expectAllOrNothing,
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
  writePatientFiles,
  type CliResult,
  type Expected,
  type TableFingerprint,
} from './fault-helpers.ts';
import { createDbPool } from '../scripts/db.ts';
import { batchSummaries } from '../scripts/status.ts';
import type { PatientDocument } from '../scripts/generate.ts';
import { expandInputs } from '../scripts/inputs.ts';
import { loadBatch } from '../scripts/stage.ts';
import { transformBatch, transformPending } from '../scripts/transform.ts';
import { useTestDatabase } from './db.ts';

const FIX = path.join(PROJECT_DIR, 'fixtures');
const json = ['--log-format', 'json'];
const on = (d: { url: () => string }, ...args: string[]) => [...args, '--database-url', d.url(), ...json];

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'healthetl-faults-'));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function withPool<T>(url: string, body: (pool: Awaited<ReturnType<typeof createDbPool>>) => Promise<T>): Promise<T> {
  const pool = await createDbPool(url);
  try {
    return await body(pool);
  } finally {
    await pool.end();
  }
}

/** No stack trace, no document content (the generator's SSNs are 9xx-xx-xxxx, MRNs MRN-...). */
function expectCleanOutput(r: CliResult): void {
  const all = r.stdout + r.stderr;
  expect(all).not.toMatch(/\n\s+at .+:\d+:\d+/);
  expect(all).not.toMatch(/\b9\d\d-\d\d-\d{4}\b/);
  expect(all).not.toMatch(/MRN-\d{8}/);
}

// ---- 1. reconciliation ------------------------------------------------------------------------

describe('reconciliation: received = loaded + rejected + duplicate + superseded (+ staged)', () => {
  const db = useTestDatabase();

  test('status --batch N exits 0 while the batch adds up, and 6 once a landing row is gone', async () => {
    const batch = (await loadBatch(db.url(), expandInputs([path.join(FIX, 'valid')]))).batchId;
    await withPool(db.url(), (pool) => transformPending(pool));

    const ok = await runCli(on(db, 'status', '--batch', String(batch)));
    expect(ok.code, ok.stderr).toBe(0);
    const [line] = jsonLines(ok.stdout).filter((l) => l.msg === 'batch');
    // fixtures/EXPECTED.md: 16 documents in valid/, all loaded.
    expect(line).toMatchObject({ batch_id: batch, received: 16, landed: 16, loaded: 16, balanced: true });

    // Simulated corruption: a landing row disappears behind the pipeline's back (no code path of
    // healthetl deletes landing rows). The loader's own count, kept per file in etl.batch_files,
    // still says 16, so the batch no longer reconciles.
    const [gone] = await db.query(
      `DELETE FROM landing.raw_documents WHERE document_id = (
         SELECT min(document_id) FROM landing.raw_documents WHERE batch_id = $1 AND status = 'loaded')
       RETURNING document_id`,
      [batch],
    );
    expect(gone).toBeDefined();
    const bad = await runCli(on(db, 'status', '--batch', String(batch)));
    expect(bad.code, bad.stderr).toBe(6);
    const [badLine] = jsonLines(bad.stdout).filter((l) => l.msg === 'batch');
    expect(badLine).toMatchObject({ batch_id: batch, received: 16, landed: 15, loaded: 15, balanced: false });
    expect(jsonLines(bad.stdout).find((l) => l.level === 50)).toMatchObject({
      batches: [batch],
      msg: expect.stringContaining(`batch ${batch}`),
    });
    // Without --batch too: any unbalanced batch makes the exit code 6.
    expect((await runCli(on(db, 'status'))).code).toBe(6);

    // A row that appears from nowhere (a copy of another with a new id) is seen the same way.
    await db.query(
      `INSERT INTO landing.raw_documents (batch_id, source_file, line, item, byte_offset, content_sha256, format, status, payload)
       SELECT batch_id, source_file, line, item, byte_offset, content_sha256, format, status, payload
       FROM landing.raw_documents WHERE batch_id = $1 ORDER BY document_id LIMIT 2`,
      [batch],
    );
    const extra = await runCli(on(db, 'status', '--batch', String(batch)));
    expect(extra.code).toBe(6);
    expect(jsonLines(extra.stdout).find((l) => l.msg === 'batch')).toMatchObject({ received: 16, landed: 17, balanced: false });
  });
});

// ---- 2. SIGKILL -------------------------------------------------------------------------------

describe('a loader killed with SIGKILL mid-file, a transform killed with SIGKILL, then run again', () => {
  const clean = useTestDatabase();
  const db = useTestDatabase();
  let input: string;
  let expected: Expected;
  let cleanFp: Record<keyof Expected, TableFingerprint>;
  const FILES = ['part-0.ndjson', 'part-1.ndjson', 'part-2.ndjson'];
  const PER_FILE = 1000;
  let killedBatch: number;

  beforeAll(async () => {
    input = path.join(dir, 'kill');
    await mkdir(input);
    expected = await writePatientFiles(input, FILES, PER_FILE, 5);
    const r = await runCli(on(clean, 'run', input));
    expect(r.code, r.stderr).toBe(0);
    cleanFp = await fingerprint(clean.query);
  });

  test('one clean run has the rows the documents imply', () => {
    expect(expected.patients).toBe(FILES.length * PER_FILE);
    expect(countsOf(cleanFp)).toEqual(expected);
    expectNoOrphansOrDuplicates(cleanFp);
  });

  test('killed once landing has rows: the committed files are whole and accounted for, the file being read left nothing', async () => {
    const running = startCli(on(db, 'run', input));
    await pollUntil('landing rows', async () => {
      const [r] = await db.query(`SELECT count(*)::int AS n FROM landing.raw_documents`);
      return r.n > 0;
    });
    running.child.kill('SIGKILL');
    const r = await running.done;
    expect(r.signal).toBe('SIGKILL');
    // The server notices the closed connection and rolls back the file in flight.
    await pollUntil('the killed loader session to end', async () => (await activeSessions(db.query)) === 0);

    const batches = await batchStates(db.query);
    expect(batches).toHaveLength(1);
    killedBatch = batches[0].batch_id;
    expect(batches[0].status).toBe('loading'); // killed before its loader finished
    const files = await db.query(
      `SELECT f.source_file, f.status, f.documents::int AS documents,
              (SELECT count(*)::int FROM landing.raw_documents d WHERE d.batch_id = f.batch_id AND d.source_file = f.source_file) AS rows
       FROM etl.batch_files f WHERE f.batch_id = $1 ORDER BY f.source_file`,
      [killedBatch],
    );
    // Files are staged in order, one transaction each: a prefix of the list, each complete.
    expect(files.length).toBeGreaterThanOrEqual(1);
    expect(files.length).toBeLessThan(FILES.length);
    expect(files).toEqual(
      FILES.slice(0, files.length).map((f) => ({
        source_file: path.join(input, f),
        status: 'staged',
        documents: PER_FILE,
        rows: PER_FILE,
      })),
    );
    const [landed] = await db.query(`SELECT count(*)::int AS n, count(DISTINCT source_file)::int AS files FROM landing.raw_documents`);
    expect(landed).toEqual({ n: files.length * PER_FILE, files: files.length });
    expect(countsOf(await fingerprint(db.query))).toEqual({ patients: 0, visits: 0, diagnoses: 0, treatments: 0, provider_notes: 0 });
    expectAllOrNothing(batches);
  });

  test('the next run, killed during the transform: nothing half-transformed is visible', async () => {
    const running = startCli(on(db, 'run', input));
    await pollUntil('etl.transform_batch to be running', async () => (await activeSessions(db.query, { transform: true })) > 0);
    running.child.kill('SIGKILL');
    expect((await running.done).signal).toBe('SIGKILL');
    // The orphaned server session finishes its statement, finds its client gone and rolls back.
    await pollUntil('the orphaned transform to end', async () => (await activeSessions(db.query)) === 0);

    const batches = await batchStates(db.query);
    expect(batches).toHaveLength(2);
    expect(batches.map((b) => b.status)).toEqual(['loading', 'staged']); // neither transform committed
    expect(batches[1].staged).toBe(FILES.length * PER_FILE); // the second run staged every file again
    expectAllOrNothing(batches);
    expect(countsOf(await fingerprint(db.query))).toEqual({ patients: 0, visits: 0, diagnoses: 0, treatments: 0, provider_notes: 0 });
    const [keys] = await db.query(`SELECT count(*)::int AS n FROM etl.patient_keys`);
    expect(keys.n).toBe(0);
  });

  test('a third run completes: the same clinical rows as one clean run, every batch balanced', async () => {
    const r = await runCli(on(db, 'run', input));
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expectCleanOutput(r);
    const fp = await fingerprint(db.query);
    expect(fp).toEqual(cleanFp);

    const batches = await batchStates(db.query);
    expect(batches.map((b) => b.status)).toEqual(['transformed', 'transformed', 'transformed']);
    expectAllOrNothing(batches);
    // The killed loader's committed documents were transformed first (oldest batch first) and
    // loaded; every later copy of them is a duplicate. Each document loaded exactly once.
    const killed = batches.find((b) => b.batch_id === killedBatch)!;
    expect(killed.loaded).toBe(killed.landed);
    expect(batches.reduce((n, b) => n + b.loaded, 0)).toBe(expected.patients);
    const [once] = await db.query(
      `SELECT count(*)::int AS docs, count(*) FILTER (WHERE loaded <> 1)::int AS not_once
       FROM (SELECT content_sha256, count(*) FILTER (WHERE status = 'loaded') AS loaded FROM landing.raw_documents GROUP BY 1) s`,
    );
    expect(once).toEqual({ docs: expected.patients, not_once: 0 });

    expect((await withPool(db.url(), (pool) => batchSummaries(pool))).map((b) => b.balanced)).toEqual([true, true, true]);
  });
});

// ---- 4. concurrent runs -----------------------------------------------------------------------

describe('two, then four, runs at once on overlapping inputs', () => {
  const db = useTestDatabase();
  const PER = 200;
  let input: string;
  const docsByFile = new Map<string, ReturnType<typeof patients>>();

  beforeAll(async () => {
    input = path.join(dir, 'concurrent');
    await mkdir(input);
    // Round 1: c0..c2, patients 0..2399. Round 2: d0..d3, patients 2400..5599. mixN holds half of
    // the first and half of the last file of its round: the same document bytes in another file.
    for (let i = 0; i < 3; i++) docsByFile.set(`c${i}`, patients(i * PER, (i + 1) * PER, 9));
    for (let i = 0; i < 4; i++) docsByFile.set(`d${i}`, patients(3 * PER + i * PER, 3 * PER + (i + 1) * PER, 9));
    const mix = (a: string, b: string) => {
      const x = docsByFile.get(a)!;
      const y = docsByFile.get(b)!;
      return {
        docs: [...x.docs.slice(0, PER / 2), ...y.docs.slice(PER / 2)],
        lines: [...x.lines.slice(0, PER / 2), ...y.lines.slice(PER / 2)],
      };
    };
    docsByFile.set('mix1', mix('c0', 'c2'));
    docsByFile.set('mix2', mix('d0', 'd3'));
    for (const [name, p] of docsByFile) await writeNdjson(path.join(input, `${name}.ndjson`), p.lines);
  });

  const file = (n: string) => path.join(input, `${n}.ndjson`);

  /** Starts all runs at once; every one must exit 0 with nothing but info lines. */
  async function together(sets: string[][]): Promise<CliResult[]> {
    const results = await Promise.all(sets.map((s) => runCli(on(db, 'run', ...s.map(file)))));
    for (const r of results) {
      expect(r.code, r.stderr + r.stdout.slice(-2000)).toBe(0);
      expect(r.stderr).toBe('');
      expectCleanOutput(r);
      const lines = jsonLines(r.stdout);
      // No warning or error; the only lines besides the usual ones say that a run waits or leaves
      // a batch another process is still loading to that process.
      expect(lines.filter((l) => l.level >= 40)).toEqual([]);
      const usual = new Set([
        'file staged',
        'file already loaded: documents counted as duplicates',
        'batch staged',
        'batch transformed',
        'run finished',
        'nothing to transform',
      ]);
      // And the data-quality summary of each batch a run transformed: info, as no error-severity check failed.
      for (const l of lines.filter((x) => !usual.has(x.msg))) {
        expect(l.msg).toMatch(
          /^waiting for another run to finish transforming|^batch \d+ is still being loaded by another process; left for a later run$|^data quality of batch \d+: 0 failed, /,
        );
        expect(l.level).toBe(30);
      }
    }
    return results;
  }

  async function expectEachDocumentOnce(names: string[]): Promise<void> {
    const docs = new Map<string, PatientDocument>();
    for (const n of names) for (const d of docsByFile.get(n)!.docs) docs.set(d.patient_id, d);
    const expected = countRows([...docs.values()]);
    const fp = await fingerprint(db.query);
    expect(countsOf(fp)).toEqual(expected);
    expectNoOrphansOrDuplicates(fp);

    const batches = await batchStates(db.query);
    expect(batches.every((b) => b.status === 'transformed')).toBe(true);
    expectAllOrNothing(batches);
    // Every distinct document: exactly one landing row loaded, every other copy a duplicate, and the
    // loaded one is in the batch that was transformed first among those holding the document.
    const [r] = await db.query(`
      WITH d AS (SELECT d.content_sha256, d.status, b.transformed_at, b.batch_id
                 FROM landing.raw_documents d JOIN etl.batches b USING (batch_id))
      SELECT count(DISTINCT content_sha256)::int AS documents,
             count(*) FILTER (WHERE status NOT IN ('loaded', 'duplicate'))::int AS other,
             (SELECT count(*)::int FROM (SELECT content_sha256 FROM d GROUP BY 1 HAVING count(*) FILTER (WHERE status = 'loaded') <> 1) x) AS not_once,
             (SELECT count(*)::int FROM d l WHERE l.status = 'loaded' AND EXISTS (
                SELECT 1 FROM d o WHERE o.content_sha256 = l.content_sha256 AND o.batch_id <> l.batch_id AND o.transformed_at < l.transformed_at)) AS not_first
      FROM d`);
    expect(r).toEqual({ documents: expected.patients, other: 0, not_once: 0, not_first: 0 });
    const summaries = await withPool(db.url(), (pool) => batchSummaries(pool, { limit: 100 }));
    expect(summaries.filter((b) => !b.balanced)).toEqual([]);
  }

  test('two runs at once: every document loaded once, each batch balanced, both exit 0', async () => {
    await together([
      ['c0', 'c1', 'mix1'],
      ['c1', 'c2', 'mix1'],
    ]);
    await expectEachDocumentOnce(['c0', 'c1', 'c2']);
  });

  test('four runs at once: the same, no deadlock, all exit 0', async () => {
    await together([
      ['d0', 'd1', 'mix2'],
      ['d1', 'd2'],
      ['d2', 'd3', 'mix2'],
      ['d0', 'd1', 'd2', 'd3', 'mix2'],
    ]);
    await expectEachDocumentOnce(['c0', 'c1', 'c2', 'd0', 'd1', 'd2', 'd3']);
    // No deadlock was detected by the server either (it would have failed a run with 40P01).
    const [dl] = await db.query(`SELECT deadlocks::int AS n FROM pg_stat_database WHERE datname = current_database()`);
    expect(dl.n).toBe(0);
  });
});

// ---- 7. lock timeouts -------------------------------------------------------------------------

describe('a stuck lock is a clear error after HEALTHETL_LOCK_TIMEOUT_MS, not a hang', () => {
  const db = useTestDatabase();
  const env = childEnv({ HEALTHETL_LOCK_TIMEOUT_MS: '300' });

  async function holding<T>(table: string, body: () => Promise<T>): Promise<T> {
    const holder = await connect(db.url());
    try {
      await holder.query('BEGIN');
      await holder.query(`LOCK TABLE ${table} IN ACCESS EXCLUSIVE MODE`);
      return await body();
    } finally {
      await holder.query('ROLLBACK').catch(() => undefined);
      await holder.end();
    }
  }

  function expectLockTimeoutLine(r: CliResult): void {
    expect(r.code, r.stderr).toBe(1);
    const lines = stderrLines(r);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^healthetl: gave up waiting for a lock .*\(lock_timeout\).*HEALTHETL_LOCK_TIMEOUT_MS/);
    expectCleanOutput(r);
  }

  test('landing.raw_documents locked: run exits 1 with one line naming the lock timeout; once free, run loads everything', async () => {
    const r = await holding('landing.raw_documents', () => runCli(on(db, 'run', path.join(FIX, 'valid')), { env }));
    expectLockTimeoutLine(r);
    const again = await runCli(on(db, 'run', path.join(FIX, 'valid')), { env });
    expect(again.code, again.stderr).toBe(0);
    const [p] = await db.query(`SELECT count(*)::int AS n FROM clinical.patients`);
    expect(p.n).toBe(16); // fixtures/EXPECTED.md
  });

  test('a clinical table locked during the transform: the same clear line; the staged batch is transformed later', async () => {
    const file = path.join(FIX, 'snapshots', 'v1.ndjson');
    const r = await holding('clinical.patients', () => runCli(on(db, 'run', file), { env }));
    expectLockTimeoutLine(r);
    const [b] = await db.query(`SELECT batch_id::int, status FROM etl.batches ORDER BY batch_id DESC LIMIT 1`);
    expect(b.status).toBe('staged'); // loaded, not transformed: nothing half-done
    expect(await withPool(db.url(), (pool) => transformPending(pool))).toMatchObject([{ batchId: b.batch_id, loaded: 1 }]);
    const [after] = await db.query(`SELECT status FROM etl.batches WHERE batch_id = $1`, [b.batch_id]);
    expect(after.status).toBe('transformed');
    // fixtures/EXPECTED.md, snapshots step 1: S-1 with 2 visits.
    const visits = await db.query(`SELECT v.source_visit_id FROM clinical.visits v JOIN clinical.patients p USING (patient_key)
                                   WHERE p.source_patient_id = 'S-1' ORDER BY 1`);
    expect(visits.map((v) => v.source_visit_id)).toEqual(['S1-V1', 'S1-V2']);
  });
});

// ---- a transform meeting a live loader ---------------------------------------------------------

describe('a transform meets a batch whose loader is still staging a file', () => {
  const db = useTestDatabase();

  test('the batch is left to its loader at once, without waiting behind the open file transaction', async () => {
    const stdin = new PassThrough();
    const { lines } = patients(0, 20, 3);
    // chunkBytes 1: every document is COPYed as soon as it is read, inside the file's open transaction.
    const loading = loadBatch(db.url(), [{ kind: 'stdin', path: '-', format: 'ndjson', gzip: false }], { stdin, chunkBytes: 1 });
    stdin.write(lines.slice(0, 10).join('\n') + '\n');
    await pollUntil("landing rows in the loader's open transaction", async () => {
      const [r] = await db.query(`SELECT count(*)::int AS n FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                                  WHERE a.application_name = 'healthetl' AND l.relation = 'landing.raw_documents'::regclass
                                    AND l.mode = 'RowExclusiveLock' AND a.datname = current_database()`);
      return r.n > 0;
    });
    const [{ id }] = await db.query(`SELECT max(batch_id)::int AS id FROM etl.batches`);
    const pool = await createDbPool(db.url());
    let settled = false;
    try {
      const transform = transformBatch(pool, id).then(
        () => 'transformed',
        (e: { code?: string }) => e.code ?? String(e),
      );
      // Before the fix, etl.transform_batch's row lock on the batch waited for the loader's
      // transaction (its landing rows' foreign key holds a share lock on the batch row).
      const lockWait = (async () => {
        while (!settled) {
          const [r] = await db.query(`SELECT count(*)::int AS n FROM pg_stat_activity
                                      WHERE datname = current_database() AND wait_event_type = 'Lock'`);
          if (r.n > 0) return 'waited on a lock';
          await new Promise((res) => setTimeout(res, 15));
        }
        return 'stopped';
      })();
      const first = await Promise.race([transform, lockWait]);
      settled = true;
      expect(first).toBe('HE002');
      // What the open file staged is not visible yet: a plain transform finds nothing pending.
      expect(await transformPending(pool)).toEqual([]);
    } finally {
      settled = true;
      stdin.end(lines.slice(10).join('\n') + '\n');
      const loaded = await loading;
      expect(loaded.documents).toBe(20);
      await transformPending(pool);
      await pool.end();
    }
    const [p] = await db.query(`SELECT count(*)::int AS n FROM clinical.patients`);
    expect(p.n).toBe(20);
  });
});

// ---- one failing batch among several -----------------------------------------------------------

describe('a batch that fails does not hold back the batches after it', () => {
  const db = useTestDatabase();

  test('the later batch is transformed, the failed one stays staged and is named, exit 1; the next run finishes it', async () => {
    const [f1, f2, f3] = ['hold-1.ndjson', 'hold-2.ndjson', 'hold-3.ndjson'].map((f) => path.join(dir, f));
    await writeNdjson(f1, patients(0, 10, 11).lines);
    expect((await runCli(on(db, 'run', f1))).code).toBe(0);
    // Batch 2 replaces patient 3 (its row will be locked by another session); batch 3 is new patients.
    const [p3] = patients(3, 4, 11).docs;
    await writeNdjson(f2, [JSON.stringify({ ...p3, updated_at: '2026-01-01T00:00:00Z' })]);
    await writeNdjson(f3, patients(10, 20, 11).lines);
    for (const f of [f2, f3]) expect((await runCli(on(db, 'load', f))).code).toBe(0);

    const blocker = await connect(db.url());
    try {
      await blocker.query('BEGIN');
      await blocker.query(`SELECT 1 FROM clinical.patients WHERE source_patient_id = $1 FOR UPDATE`, [p3.patient_id]);
      const r = await runCli(on(db, 'transform'), { env: childEnv({ HEALTHETL_LOCK_TIMEOUT_MS: '300' }) });
      expect(r.code, r.stderr).toBe(1);
      const lines = jsonLines(r.stdout);
      expect(lines.find((l) => String(l.msg).startsWith('batch failed'))).toMatchObject({
        batch: 2,
        error: expect.stringContaining('lock_timeout'),
      });
      expect(lines.find((l) => l.msg === 'batch transformed')).toMatchObject({ batch: 3, loaded: 10 });
      expect(stderrLines(r)).toEqual([expect.stringContaining('lock_timeout')]);
    } finally {
      await blocker.query('ROLLBACK');
      await blocker.end();
    }
    expect(await db.query(`SELECT batch_id::int, status FROM etl.batches ORDER BY 1`)).toEqual([
      { batch_id: 1, status: 'transformed' },
      { batch_id: 2, status: 'staged' },
      { batch_id: 3, status: 'transformed' },
    ]);

    const again = await runCli(on(db, 'transform'));
    expect(again.code, again.stderr).toBe(0);
    const [p] = await db.query(
      `SELECT source_updated_at = '2026-01-01T00:00:00Z' AS newer, batch_id::int FROM clinical.patients WHERE source_patient_id = $1`,
      [p3.patient_id],
    );
    expect(p).toEqual({ newer: true, batch_id: 2 });
    expect((await db.query(`SELECT count(*)::int AS n FROM clinical.patients`))[0].n).toBe(20);
  });
});
