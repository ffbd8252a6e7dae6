// The command line as a scheduler meets it: every setting and numeric option checked before
// anything connects, exit codes for what goes wrong around the database, and output that never
// carries what the data (or a file name) could smuggle into a log or a terminal.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { InvalidInputError } from 'slonik';
import { afterAll, describe, expect, inject, test } from 'vitest';
import { createDbPool, sql } from '../scripts/db.ts';
import { batchFailure, explainError, failsOnlyTheBatch, isDataError, isServerError } from '../scripts/errors.ts';
import { useTestDatabase } from './db.ts';
import { BIN, childEnv, PROJECT_DIR, runCli, stderrLines, type CliResult } from './fault-helpers.ts';

const db = (d: { url: () => string }, ...args: string[]) => [...args, '--database-url', d.url()];

/** Exit 2, one line on stderr naming what is wrong, nothing on stdout, and quickly (a guard kills a hung child). */
function expectUsageError(r: CliResult, what: string, mentions: RegExp): void {
  expect(r.signal, `${what}: killed by the guard, so it hung`).toBeNull();
  expect(r.code, `${what}: ${r.stderr}`).toBe(2);
  expect(stderrLines(r), what).toHaveLength(1);
  expect(r.stderr, what).toMatch(/^healthetl: /);
  expect(r.stderr, what).toMatch(mentions);
  expect(r.stderr, what).not.toMatch(/^\s+at /m);
  expect(r.stdout, what).toBe('');
}

describe('every setting and numeric option is checked at start', () => {
  const d = useTestDatabase();
  const batches = async () => (await d.query(`SELECT count(*)::int AS n FROM etl.batches`))[0].n as number;

  test('a bad numeric option exits 2 with one line naming it and what it takes; nothing starts', async () => {
    const before = await batches();
    const cases: Array<[string[], RegExp]> = [
      [['run', 'fixtures/valid', '--max-document-mb', '0'], /--max-document-mb must be a number: more than 0 and at most 1024/],
      [['run', 'fixtures/valid', '--max-document-mb', '-1'], /--max-document-mb must be/],
      [['run', 'fixtures/valid', '--max-document-mb', 'Infinity'], /--max-document-mb must be/],
      [['load', 'fixtures/valid', '--max-document-mb', '1025'], /--max-document-mb must be/],
      [['status', '--limit', '0'], /--limit must be a number: a whole number of 1 or more/],
      [['status', '--limit', '2.5'], /--limit must be/],
      [['status', '--batch', '1.5'], /--batch must be a number: a whole number of 1 or more \(a batch id\)/],
      [['transform', '--batch', '1.5'], /--batch must be/],
      [['transform', '--batch', '99999999999999999999'], /--batch must be/],
      [['transform', '--batch', '0'], /--batch must be/],
      [['transform', '--shards', '0'], /--shards must be a number: a whole number from 1 to 64/],
      [['run', 'fixtures/valid', '--shards', '65'], /--shards must be/],
      [['transform', '--shard-min-documents', '0'], /--shard-min-documents must be a number: a whole number of 1 or more/],
      [['transform', '--shard-min-documents', '1.5'], /--shard-min-documents must be/],
      [['migrate', 'down', '--count', '0'], /--count must be a number: a whole number of 1 or more/],
      [['migrate', 'up', '--count', '-1'], /--count must be/],
    ];
    const results = await fewAtOnce(
      cases.map(
        ([args]) =>
          () =>
            runCli(db(d, ...args), { guardMs: 60_000 }),
      ),
    );
    results.forEach((r, i) => expectUsageError(r, cases[i][0].join(' '), cases[i][1]));
    expect(await batches()).toBe(before);
  }, 240_000);

  test('a bad timeout setting exits 2 at once for run and migrate up (it used to hang)', async () => {
    const before = await batches();
    const cases: Array<[string, string]> = [
      ['HEALTHETL_LOCK_TIMEOUT_MS', 'abc'],
      ['HEALTHETL_LOCK_TIMEOUT_MS', '-1'],
      ['HEALTHETL_LOCK_TIMEOUT_MS', '5s'],
      ['HEALTHETL_LOCK_TIMEOUT_MS', '2147483648'],
      ['HEALTHETL_STATEMENT_TIMEOUT_MS', '1.5'],
    ];
    const runs = cases.flatMap(([name, value]) =>
      [
        ['run', 'fixtures/valid'],
        ['migrate', 'up'],
      ].map((args) => ({ what: `${name}=${value} ${args.join(' ')}`, name, args, value })),
    );
    // The guard is not a timing assertion: it catches the hang this used to be.
    const results = await fewAtOnce(
      runs.map((c) => () => runCli(db(d, ...c.args), { env: childEnv({ [c.name]: c.value }), guardMs: 60_000 })),
    );
    results.forEach((r, i) => {
      expectUsageError(r, runs[i].what, new RegExp(`${runs[i].name} must be a whole number of milliseconds from 0 to 2147483647`));
      expect(r.stderr).not.toMatch(/please report it/);
    });
    expect(await batches()).toBe(before);
  }, 240_000);

  test('good values still run', async () => {
    const r = await runCli(db(d, 'run', 'fixtures/valid', '--max-document-mb', '0.5', '--shards', '3', '--shard-min-documents', '1'), {
      env: childEnv({ HEALTHETL_LOCK_TIMEOUT_MS: '0', HEALTHETL_STATEMENT_TIMEOUT_MS: '2147483647' }),
    });
    expect(r.code, r.stderr).toBe(0);
  });
});

describe('exit codes around the database', () => {
  const d = useTestDatabase();
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-clih-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  test('status against a schema one migration behind (a missing column, 42703) exits 5', async () => {
    const behind = await freshDatabase(d);
    try {
      await withClient(behind, async (c) => {
        await c.query(`DROP VIEW etl.batch_summary`);
        await c.query(`CREATE VIEW etl.batch_summary AS SELECT batch_id, status, started_at FROM etl.batches`);
      });
      const r = await runCli(['status', '--database-url', behind]);
      expect(r.code, r.stderr).toBe(5);
      expect(stderrLines(r)).toHaveLength(1);
      expect(r.stderr).toMatch(/42703.*healthetl migrate up/);
    } finally {
      await dropDatabase(behind);
    }
  });

  test('a Unix-socket directory that does not exist exits 3 with one line', async () => {
    const r = await runCli(['status'], {
      env: childEnv({ PGHOST: '/nonexistent', PGUSER: 'postgres', PGDATABASE: 'postgres' }),
      guardMs: 20_000,
    });
    expect(r.code, r.stderr).toBe(3);
    expect(stderrLines(r)).toHaveLength(1);
    expect(r.stderr).toMatch(/cannot reach PostgreSQL at \/nonexistent:5432\/postgres .*start the server/);
    expect(r.stderr).not.toMatch(/^\s+at /m);
  });

  test('a server that asks for a password when none was given exits 3, saying to set PGPASSWORD or ~/.pgpass', async () => {
    const server = await passwordAskingServer();
    try {
      const r = await runCli(['status', '--database-url', `postgresql://someone@127.0.0.1:${server.port}/db`], {
        env: childEnv({ HOME: tmp }),
        guardMs: 20_000,
      });
      expect(r.code, r.stderr).toBe(3);
      expect(stderrLines(r)).toHaveLength(1);
      expect(r.stderr).toMatch(/asks for a password and none was given: set PGPASSWORD or put it in ~\/\.pgpass/);
    } finally {
      await server.close();
    }
  });

  test('a password from ~/.pgpass is used without a DeprecationWarning', async () => {
    const home = mkdtempSync(path.join(os.tmpdir(), 'healthetl-home-'));
    const server = await passwordAskingServer();
    try {
      // A password made up for this run: none is kept in the repository.
      writeFileSync(path.join(home, '.pgpass'), `127.0.0.1:${server.port}:db:someone:${randomBytes(12).toString('hex')}\n`, {
        mode: 0o600,
      });
      const r = await runCli(['status', '--database-url', `postgresql://someone@127.0.0.1:${server.port}/db`], {
        env: childEnv({ HOME: home }),
        guardMs: 20_000,
      });
      // The password was sent (the server refused it, as this one always does), and pg did not warn.
      expect(r.code, r.stderr).toBe(3);
      expect(r.stderr).toMatch(/refused the login \(28P01\)/);
      expect(r.stderr).not.toMatch(/DeprecationWarning|pgpass support/);
      expect(stderrLines(r)).toHaveLength(1);
    } finally {
      await server.close();
      rmSync(home, { recursive: true, force: true });
    }
  });

  test('a path named on the command line that does not exist is bad usage, found before a batch is created', async () => {
    const before = (await d.query(`SELECT count(*)::int AS n FROM etl.batches`))[0].n;
    const r = await runCli(db(d, 'run', 'fixtures/valid', '/nonexistent/input.ndjson'));
    expect(r.code, r.stderr).toBe(2);
    expect(stderrLines(r)).toHaveLength(1);
    expect(r.stderr).toMatch(/\/nonexistent\/input\.ndjson does not exist/);
    expect((await d.query(`SELECT count(*)::int AS n FROM etl.batches`))[0].n).toBe(before);
  });

  test('migrate up as a role without CREATE on public exits 1 with one line, no stack trace unless --verbose', async () => {
    const role = `he_nc_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
    const empty = await freshDatabase(d, false);
    const password = randomBytes(12).toString('hex'); // made up for this run
    await withClient(inject('adminUrl'), (c) => c.query(`CREATE ROLE ${role} LOGIN PASSWORD '${password}'`));
    try {
      const u = new URL(empty);
      u.username = role;
      u.password = password;
      const r = await runCli(['migrate', 'up', '--database-url', u.toString()]);
      expect(r.code, r.stderr).toBe(1);
      expect(stderrLines(r)).toHaveLength(1);
      expect(r.stderr).toMatch(/may not create .*permission denied, SQLSTATE 42501.*GRANT CREATE ON SCHEMA public/);
      expect(r.stderr).not.toMatch(/^\s+at /m);
      const verbose = await runCli(['migrate', 'up', '--verbose', '--database-url', u.toString()]);
      expect(verbose.code).toBe(1);
      expect(verbose.stderr).toMatch(/^\s+at /m);
    } finally {
      await dropDatabase(empty);
      await withClient(inject('adminUrl'), (c) => c.query(`DROP ROLE IF EXISTS ${role}`));
    }
  });

  test('--version prints the version', async () => {
    const r = await runCli(['--version']);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe(JSON.parse(readFileSync(path.join(PROJECT_DIR, 'package.json'), 'utf8')).version);
  });
});

describe('errors are told apart by their type, and a data error never shows its value', () => {
  test('a file error whose code looks like a SQLSTATE (EPIPE, EBUSY) is not a server error', () => {
    for (const code of ['EPIPE', 'EBUSY']) {
      const err = Object.assign(new Error(`${code}: broken`), { code, syscall: 'write' });
      expect(isServerError(err), code).toBe(false);
      expect(failsOnlyTheBatch(err), code).toBe(false);
      expect(explainError(err).message).not.toMatch(/SQLSTATE/);
    }
  });

  test("the server's 22P02 that slonik turns into an InvalidInputError keeps its class and loses its value", async () => {
    const d = { url: () => inject('adminUrl') };
    const pool = await createDbPool(d.url(), 1);
    let err: unknown;
    try {
      await pool.query(sql.unsafe`SELECT ${'CANARY-VALUE-1'}::int`);
    } catch (e) {
      err = e;
    } finally {
      await pool.end();
    }
    expect(err).toBeInstanceOf(InvalidInputError);
    const { message } = explainError(err);
    expect(message).toMatch(/SQLSTATE 22P02/);
    expect(message).not.toContain('CANARY-VALUE-1');
    expect(isDataError(err)).toBe(true);
    expect(batchFailure(err)).toMatchObject({ sqlstate: '22P02' });
  });
});

describe('nothing from the data moves the cursor or fakes a line at a terminal', () => {
  const d = useTestDatabase();
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-esc-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  test('a file named with a line break and an ESC sequence prints on one line with the escapes visible', async () => {
    const name = path.join(tmp, 'a\n\u001b[31mFAKE.ndjson');
    writeFileSync(name, '{"patient_id":"ESC-1"}\n{"no_patient_id":true}\n');
    const r = await runCli(db(d, 'run', tmp, '--log-format', 'pretty'));
    expect(r.code, r.stderr).toBe(4);
    for (const out of [r.stdout, r.stderr]) {
      expect(out).not.toContain('\u001b');
      expect(out.split('\n').some((l) => l.startsWith('[31mFAKE') || l.startsWith('FAKE'))).toBe(false);
    }
    expect(r.stderr).toContain('a\\n\\x1b[31mFAKE.ndjson');
    expect(r.stdout).toMatch(/rejected: .*a\\n\\x1b\[31mFAKE\.ndjson line 2: /);
  });
});

describe('Ctrl-C at a terminal', () => {
  const d = useTestDatabase();
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-tty-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  test('gives the cursor back that the progress bar hid, and exits 130', async () => {
    // Enough documents that the load is still running when Ctrl-C comes.
    const big = path.join(tmp, 'big.ndjson');
    writeFileSync(big, Array.from({ length: 200_000 }, (_, i) => JSON.stringify({ patient_id: `TTY-${i}`, visits: [] })).join('\n') + '\n');
    // exec: the shell script(1) starts must not stay between the terminal and the CLI (Ctrl-C would end it, and with it the terminal).
    const command =
      'exec ' + [process.execPath, BIN, 'run', big, '--log-format', 'pretty', '--database-url', d.url()].map((a) => `'${a}'`).join(' ');
    // script(1) gives the CLI a terminal; ^C written to it is the terminal's interrupt.
    const child = spawn('script', ['-qfec', command, '/dev/null'], { cwd: PROJECT_DIR, env: childEnv({ TERM: 'xterm' }), stdio: 'pipe' });
    let out = '';
    let sent = false;
    child.stdout.setEncoding('utf8').on('data', (c: string) => {
      out += c;
      // Once the bar hid the cursor and has drawn a line with documents in it.
      const hidden = out.indexOf('\u001b[?25l');
      if (!sent && hidden >= 0 && /documents [1-9]/.test(out.slice(hidden))) {
        sent = true;
        child.stdin.write('\u0003');
      }
    });
    const guard = setTimeout(() => child.kill('SIGKILL'), 60_000);
    const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
    clearTimeout(guard);
    expect(sent, 'the progress bar hid the cursor').toBe(true);
    expect(code).toBe(130);
    expect(out.slice(out.indexOf('\u001b[?25l'))).toContain('\u001b[?25h');
  });
});

// ---- helpers ------------------------------------------------------------------------------------

/** Runs the jobs four at a time (a whole suite already keeps the machine busy), results in order. */
async function fewAtOnce<T>(jobs: (() => Promise<T>)[]): Promise<T[]> {
  const out: T[] = [];
  for (let i = 0; i < jobs.length; i += 4) out.push(...(await Promise.all(jobs.slice(i, i + 4).map((j) => j()))));
  return out;
}

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

/** A database of its own (a clone of the migrated template, or empty), for a test that breaks it. */
async function freshDatabase(d: { url: () => string }, migrated = true): Promise<string> {
  const name = `healthetl_t_${inject('templateDb').split('_')[2]}_${process.pid}_x_${Math.random().toString(36).slice(2, 8)}`;
  await withClient(inject('adminUrl'), (c) => c.query(`CREATE DATABASE ${name}${migrated ? ` TEMPLATE ${inject('templateDb')}` : ''}`));
  const u = new URL(d.url());
  u.pathname = `/${name}`;
  return u.toString();
}

async function dropDatabase(url: string): Promise<void> {
  const name = new URL(url).pathname.slice(1);
  await withClient(inject('adminUrl'), (c) => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`));
}

/**
 * Just enough of the PostgreSQL protocol to ask for a SCRAM password: the startup message gets
 * AuthenticationSASL, the client's first SCRAM message gets a server-first message; a client
 * without a password fails there.
 */
async function passwordAskingServer(): Promise<{ port: number; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const message = (type: string, body: Buffer) => {
    const head = Buffer.alloc(5);
    head.write(type, 0);
    head.writeInt32BE(body.length + 4, 1);
    return Buffer.concat([head, body]);
  };
  const int32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeInt32BE(n);
    return b;
  };
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => undefined);
    let step = 0;
    socket.on('data', (chunk) => {
      step++;
      if (step === 1) {
        socket.write(message('R', Buffer.concat([int32(10), Buffer.from('SCRAM-SHA-256\0\0')])));
      } else if (step === 2) {
        const nonce = /r=([^,]+)/.exec(chunk.toString('latin1'))?.[1] ?? 'x';
        const first = `r=${nonce}server,s=${Buffer.from('salt').toString('base64')},i=4096`;
        socket.write(message('R', Buffer.concat([int32(11), Buffer.from(first)])));
      } else {
        // A client that had a password sent its proof: refuse it as a server would.
        socket.end(message('E', Buffer.from('SFATAL\0C28P01\0Mpassword authentication failed\0\0')));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
