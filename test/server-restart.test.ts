// PostgreSQL stopped in the middle of a `healthetl run`: a dedicated embedded server (its own data
// directory and port, so stopping it disturbs no other test) is shut down while the loader stages
// files, and again while the transform runs. Each time the command exits 3 with one clear line and
// no stack trace; after restarting the server on the same data directory and port, a plain re-run
// completes and the clinical tables equal those of one clean run. No batch is ever half-transformed.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createDbPool } from '../scripts/db.ts';
import { startEmbedded, type EmbeddedServer } from '../scripts/embedded.ts';
import { migrate } from '../scripts/migrate.ts';
import { batchSummaries } from '../scripts/status.ts';
import {
  activeSessions,
  batchStates,
  connect,
  countsOf,
  expectAllOrNothing,
  expectNoOrphansOrDuplicates,
  fingerprint,
  pollUntil,
  runCli,
  startCli,
  stderrLines,
  writePatientFiles,
  type CliResult,
  type Expected,
  type TableFingerprint,
} from './fault-helpers.ts';

const FILES = ['part-0.ndjson', 'part-1.ndjson', 'part-2.ndjson'];
const PER_FILE = 600;
const NONE = { patients: 0, visits: 0, diagnoses: 0, treatments: 0, provider_notes: 0 };

let tmp: string;
let dataDir: string;
let server: EmbeddedServer;
let port: number;
let input: string;
let expected: Expected;
let cleanFp: Record<keyof Expected, TableFingerprint>;

const url = () => server.url; // the postgres database of the dedicated server
const cleanUrl = () => {
  const u = new URL(server.url);
  u.pathname = '/clean';
  return u.toString();
};

async function withDb<T>(u: string, body: (q: Awaited<ReturnType<typeof connect>>['query']) => Promise<T>): Promise<T> {
  const c = await connect(u);
  try {
    return await body(c.query);
  } finally {
    await c.end();
  }
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'healthetl-restart-'));
  await import('node:fs/promises').then((fs) => fs.chmod(tmp, 0o755)); // the server may run as another user
  dataDir = path.join(tmp, 'pgdata');
  server = await startEmbedded({ dataDir, persistent: true });
  port = server.port;
  await migrate(url(), 'up');
  await withDb(url(), (q) => q('CREATE DATABASE clean'));
  await migrate(cleanUrl(), 'up');

  input = path.join(tmp, 'in');
  await mkdir(input);
  expected = await writePatientFiles(input, FILES, PER_FILE, 13);
  const r = await runCli(['run', input, '--database-url', cleanUrl(), '--log-format', 'json']);
  expect(r.code, r.stderr).toBe(0);
  cleanFp = await withDb(cleanUrl(), fingerprint);
}, 180_000);

afterAll(async () => {
  await server?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

/** Stops the server (fast shutdown, what `pg_ctl stop` does) once `ready` says so; returns the run's result. */
async function stopDuring(ready: (q: Awaited<ReturnType<typeof connect>>['query']) => Promise<boolean>): Promise<CliResult> {
  const running = startCli(['run', input, '--database-url', url(), '--log-format', 'json']);
  await withDb(url(), (q) => pollUntil('the moment to stop the server', () => ready(q)));
  await server.stop();
  const r = await running.done;
  server = await startEmbedded({ dataDir, persistent: true, port });
  return r;
}

function expectOneClearLine(r: CliResult): void {
  expect(r.code, r.stderr).toBe(3);
  const lines = stderrLines(r);
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(
    new RegExp(
      `^healthetl: PostgreSQL at 127\\.0\\.0\\.1:${port}/postgres shut down or restarted during the command \\(57P01\\): .*run the same command again$`,
    ),
  );
  expect(r.stdout + r.stderr).not.toMatch(/\n\s+at .+:\d+:\d+/); // no stack trace
  expect(r.stdout + r.stderr).not.toMatch(/\b9\d\d-\d\d-\d{4}\b/); // no document content (generated SSNs)
}

describe('PostgreSQL stopped during a run', () => {
  test('the clean run has the rows the documents imply', () => {
    expect(countsOf(cleanFp)).toEqual(expected);
    expectNoOrphansOrDuplicates(cleanFp);
  });

  test('stopped while the loader stages files: exit 3 with one line; the committed files are whole, the file in flight left nothing', async () => {
    const r = await stopDuring(async (q) => (await q(`SELECT count(*)::int AS n FROM landing.raw_documents`))[0].n > 0);
    expectOneClearLine(r);
    await withDb(url(), async (q) => {
      const batches = await batchStates(q);
      expect(batches).toHaveLength(1);
      expect(batches[0].status).toBe('loading');
      expectAllOrNothing(batches);
      const files = await q(`SELECT source_file, documents::int AS documents FROM etl.batch_files ORDER BY source_file`);
      expect(files.length).toBeGreaterThanOrEqual(1);
      expect(files.length).toBeLessThan(FILES.length);
      expect(files).toEqual(FILES.slice(0, files.length).map((f) => ({ source_file: path.join(input, f), documents: PER_FILE })));
      expect(batches[0].landed).toBe(files.length * PER_FILE);
      expect(countsOf(await fingerprint(q))).toEqual(NONE);
    });
  });

  test('stopped while the transform runs: exit 3 with one line; nothing of any batch is transformed', async () => {
    const r = await stopDuring(async (q) => (await activeSessions(q, { transform: true })) > 0);
    expectOneClearLine(r);
    await withDb(url(), async (q) => {
      const batches = await batchStates(q);
      expect(batches.map((b) => b.status)).toEqual(['loading', 'staged']);
      expectAllOrNothing(batches);
      expect(countsOf(await fingerprint(q))).toEqual(NONE);
    });
  });

  test('after the restarts, a re-run completes and the result equals one clean run', async () => {
    const r = await runCli(['run', input, '--database-url', url(), '--log-format', 'json']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    await withDb(url(), async (q) => {
      expect(await fingerprint(q)).toEqual(cleanFp);
      const batches = await batchStates(q);
      expect(batches.map((b) => b.status)).toEqual(['transformed', 'transformed', 'transformed']);
      expectAllOrNothing(batches);
      expect(batches.reduce((n, b) => n + b.loaded, 0)).toBe(expected.patients);
    });
    const pool = await createDbPool(url());
    try {
      expect((await batchSummaries(pool)).map((b) => b.balanced)).toEqual([true, true, true]);
    } finally {
      await pool.end();
    }
  });
});
