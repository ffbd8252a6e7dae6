// sql/bootstrap.sql as a DBA runs it: psql as the test server's superuser, then every later step as
// the logins it made, over real connections with their passwords (checked on the embedded server,
// which uses scram-sha-256): the migrator, not a superuser, applies every migration; etl_loader
// loads fixtures/valid; bi_reader and research_reader read their views and nothing else. Unique
// database and login names; the group roles healthetl_* are the server's and shared, never dropped.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { afterAll, describe, expect, inject, test } from 'vitest';

const PROJECT_DIR = fileURLToPath(new URL('..', import.meta.url));
const BIN = path.join(PROJECT_DIR, 'bin', 'healthetl.mjs');
const BOOTSTRAP = path.join(PROJECT_DIR, 'sql', 'bootstrap.sql');

const psqlVersion = spawnSync('psql', ['--version'], { encoding: 'utf8' });
const hasPsql = !psqlVersion.error && psqlVersion.status === 0;
// psql 15 has \getenv: the bootstrap reads the passwords from the environment itself.
const psqlMajor = hasPsql ? Number(/(\d+)(?:\.\d+)?/.exec(psqlVersion.stdout)?.[1] ?? 0) : 0;
if (!hasPsql)
  process.stderr.write('[healthetl tests] test/bootstrap.test.ts skipped: psql is not on PATH (install the PostgreSQL client)\n');

type Result = { code: number | null; stdout: string; stderr: string };

const PASSWORD_ENV = ['HEALTHETL_MIGRATOR_PASSWORD', 'ETL_LOADER_PASSWORD', 'BI_READER_PASSWORD', 'RESEARCH_READER_PASSWORD'];

/** The environment without any connection or healthetl password setting, plus `extra`. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, CI: 'true' };
  for (const k of Object.keys(env)) if (k.startsWith('PG') || k === 'DATABASE_URL' || PASSWORD_ENV.includes(k)) delete env[k];
  return { ...env, ...extra };
}

function run(command: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs = 90_000): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: PROJECT_DIR, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

describe.skipIf(!hasPsql)(hasPsql ? 'sql/bootstrap.sql' : 'sql/bootstrap.sql (skipped: psql is not on PATH)', () => {
  const admin = new URL(inject('adminUrl'));
  // The template's creator pid, as test/db.ts names things: global teardown drops a database left behind.
  const tag = `${inject('templateDb').split('_')[2]}_${process.pid}_${randomBytes(3).toString('hex')}`;
  const dbname = `healthetl_t_${tag}_bootstrap`;
  const login = (kind: string) => `he_t_${tag}_${kind}`;
  const logins = { migrator: login('migrator'), loader: login('loader'), bi: login('bi'), research: login('research') };
  const password = () => randomBytes(24).toString('base64');
  const passwords = { migrator: password(), loader: password(), bi: password(), research: password() };
  const otherDb = `healthetl_t_${tag}_nopw`;
  const otherLogins = { migrator: login('m2'), loader: login('l2'), bi: login('b2'), research: login('r2') };
  const superuserRole = login('su');

  /** psql connects as the test's superuser through the PG* variables (its password is in PGPASSWORD, not argv). */
  const adminEnv = (extra: Record<string, string> = {}) =>
    cleanEnv({
      PGHOST: decodeURIComponent(admin.hostname),
      PGPORT: admin.port || '5432',
      PGUSER: decodeURIComponent(admin.username),
      ...(admin.password ? { PGPASSWORD: decodeURIComponent(admin.password) } : {}),
      PGDATABASE: decodeURIComponent(admin.pathname.slice(1)) || 'postgres',
      ...extra,
    });

  const nameVars = (db: string, names: typeof logins) => [
    ...['-v', `dbname=${db}`, '-v', `migrator_login=${names.migrator}`, '-v', `loader_login=${names.loader}`],
    ...['-v', `bi_login=${names.bi}`, '-v', `research_login=${names.research}`],
  ];
  const guardrailVars = ['-v', 'reader_connection_limit=7', '-v', 'reader_statement_timeout=4min'];
  const passwordVars = [
    ...['-v', `migrator_password=${passwords.migrator}`, '-v', `loader_password=${passwords.loader}`],
    ...['-v', `bi_password=${passwords.bi}`, '-v', `research_password=${passwords.research}`],
  ];
  const bootstrap = (args: string[], env: Record<string, string> = {}) => run('psql', ['-X', ...args, '-f', BOOTSTRAP], adminEnv(env));

  /** A URL without a password: the CLI gets it from PGPASSWORD, as the README has it. */
  const urlAs = (role: string) => {
    const u = new URL(admin.toString());
    u.username = role;
    u.password = '';
    u.pathname = `/${dbname}`;
    return u.toString();
  };
  const healthetl = (kind: keyof typeof logins, args: string[]) =>
    run(process.execPath, [BIN, ...args], cleanEnv({ DATABASE_URL: urlAs(logins[kind]), PGPASSWORD: passwords[kind] }));

  async function as<T>(kind: keyof typeof logins, fn: (c: pg.Client) => Promise<T>): Promise<T> {
    // In-process, the password may go in the URL (a connection string's fields win over pg's password option).
    const u = new URL(urlAs(logins[kind]));
    u.password = encodeURIComponent(passwords[kind]);
    const c = new pg.Client({ connectionString: u.toString() });
    await c.connect();
    try {
      return await fn(c);
    } finally {
      await c.end();
    }
  }
  const one = async (c: pg.Client, text: string) => (await c.query(text)).rows[0];
  const sqlState = (p: Promise<unknown>) =>
    p.then(
      () => 'no error',
      (e: { code?: string }) => e.code,
    );

  async function adminQuery<R extends pg.QueryResultRow = any>(text: string, values: unknown[] = [], db?: string): Promise<R[]> {
    const u = new URL(admin.toString());
    if (db) u.pathname = `/${db}`;
    const c = new pg.Client({ connectionString: u.toString() });
    await c.connect();
    try {
      return (await c.query<R>(text, values)).rows;
    } finally {
      await c.end();
    }
  }

  /** What the bootstrap made: the logins' attributes, settings and groups, the database's owner and rights. */
  const madeState = () =>
    adminQuery(
      `SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin, r.rolinherit, r.rolconnlimit, r.rolconfig,
              (SELECT array_agg(m.roleid::regrole::text ORDER BY 1) FROM pg_auth_members m WHERE m.member = r.oid) AS groups,
              a.rolpassword LIKE 'SCRAM-SHA-256$%' AS scram,
              (SELECT d.datdba::regrole::text || ' ' || d.datacl::text FROM pg_database d WHERE d.datname = $2) AS database
       FROM pg_roles r JOIN pg_authid a ON a.oid = r.oid WHERE r.rolname = ANY ($1) ORDER BY r.rolname`,
      [Object.values(logins), dbname],
    );

  afterAll(async () => {
    // The databases first (sessions included), then the logins: they own nothing once those are gone.
    for (const db of [dbname, otherDb]) await adminQuery(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`).catch(() => undefined);
    const roles = [...Object.values(logins), ...Object.values(otherLogins), superuserRole];
    await adminQuery(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY ($1)`, [roles]).catch(() => undefined);
    for (const r of roles) await adminQuery(`DROP ROLE IF EXISTS ${r}`);
  });

  test('without a password it stops before changing anything, naming what is missing', async () => {
    const r = await bootstrap(nameVars(otherDb, otherLogins));
    expect(r.code).toBe(3); // psql: a script error under ON_ERROR_STOP
    expect(r.stderr).toContain('no password for the migrator login: set HEALTHETL_MIGRATOR_PASSWORD or pass -v migrator_password=...');
    const loaderOnly = await bootstrap([
      ...nameVars(otherDb, otherLogins),
      ...['-v', `migrator_password=${password()}`, '-v', `bi_password=${password()}`, '-v', `research_password=${password()}`],
    ]);
    expect(loaderOnly.code).toBe(3);
    expect(loaderOnly.stderr).toContain('no password for the loader login: set ETL_LOADER_PASSWORD or pass -v loader_password=...');
    const short = await bootstrap([...nameVars(otherDb, otherLogins), ...passwordVars.slice(0, 6), '-v', 'research_password=tooshort']);
    expect(short.code).toBe(3);
    expect(short.stderr).toContain('research_password shorter than 16 characters');
    expect(await adminQuery(`SELECT 1 FROM pg_database WHERE datname = $1`, [otherDb])).toEqual([]);
    expect(await adminQuery(`SELECT rolname FROM pg_roles WHERE rolname = ANY ($1)`, [Object.values(otherLogins)])).toEqual([]);
  });

  test('it refuses to take over an existing superuser as a login, and does not demote it', async () => {
    await adminQuery(`CREATE ROLE ${superuserRole} SUPERUSER NOLOGIN`);
    const r = await bootstrap([...nameVars(otherDb, { ...otherLogins, bi: superuserRole }), ...passwordVars]);
    expect(r.code).toBe(3);
    expect(r.stderr).toContain(`role ${superuserRole} exists and is a superuser; healthetl's logins must not be`);
    expect(await adminQuery(`SELECT rolsuper FROM pg_roles WHERE rolname = $1`, [superuserRole])).toEqual([{ rolsuper: true }]);
    expect(await adminQuery(`SELECT 1 FROM pg_database WHERE datname = $1`, [otherDb])).toEqual([]);
  });

  test('it makes the database, owned by healthetl_owner, and four logins that are not superusers, passwords never in its output', async () => {
    const r = await bootstrap([...nameVars(dbname, logins), ...guardrailVars, ...passwordVars]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    for (const p of Object.values(passwords)) expect(r.stdout).not.toContain(p);
    const state = await madeState();
    expect(state.map((s) => [s.rolname, s.groups])).toEqual(
      [
        [logins.bi, ['healthetl_analyst']],
        [logins.loader, ['healthetl_loader']],
        [logins.migrator, ['healthetl_owner']],
        [logins.research, ['healthetl_researcher']],
      ].sort((a, b) => String(a[0]).localeCompare(String(b[0]))),
    );
    for (const s of state) {
      expect(s).toMatchObject({ rolsuper: false, rolcreaterole: false, rolcreatedb: false, rolcanlogin: true, scram: true });
      expect(s.database).toMatch(/^healthetl_owner \{/);
      expect(s.database).not.toMatch(/[{,]=/); // nothing for PUBLIC
    }
    const bi = state.find((s) => s.rolname === logins.bi);
    expect(bi.rolconnlimit).toBe(7);
    expect(bi.rolconfig).toEqual(
      expect.arrayContaining(['default_transaction_read_only=on', 'statement_timeout=4min', 'search_path=analytics']),
    );
    expect(state.find((s) => s.rolname === logins.research).rolconfig).toContain('search_path=deid');
    const groups = await adminQuery(
      `SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('healthetl_owner', 'healthetl_loader', 'healthetl_analyst', 'healthetl_researcher')`,
    );
    expect(groups.map((g) => g.rolcanlogin)).toEqual([false, false, false, false]);
    expect(await adminQuery(`SELECT has_schema_privilege('public', 'public', 'CREATE') AS create_in_public`, [], dbname)).toEqual([
      { create_in_public: false },
    ]);
  });

  test('the migrator, not a superuser, applies every migration with `healthetl migrate up`', { timeout: 180_000 }, async () => {
    expect(await adminQuery(`SELECT rolsuper FROM pg_roles WHERE rolname = $1`, [logins.migrator])).toEqual([{ rolsuper: false }]);
    const up = await healthetl('migrator', ['migrate', 'up', '--log-format', 'json']);
    expect(up.stderr).toBe('');
    expect(up.code).toBe(0);
    const status = await healthetl('migrator', ['migrate', 'status']);
    expect(status.code).toBe(0);
    const pending = await adminQuery(`SELECT count(*)::int AS applied FROM public.healthetl_migrations`, [], dbname);
    expect(pending[0].applied).toBe((await import('../scripts/migrate.ts')).migrationFiles().length);
    // Its sessions act as healthetl_owner: everything made, the migrations table and pgcrypto too,
    // belongs to the group role, not to the login.
    const owned = await adminQuery(
      `SELECT (SELECT count(*)::int FROM pg_class c WHERE c.relowner = r.oid) + (SELECT count(*)::int FROM pg_proc p WHERE p.proowner = r.oid)
              + (SELECT count(*)::int FROM pg_extension e WHERE e.extowner = r.oid) + (SELECT count(*)::int FROM pg_namespace n WHERE n.nspowner = r.oid) AS n
       FROM pg_roles r WHERE r.rolname = $1`,
      [logins.migrator],
      dbname,
    );
    expect(owned).toEqual([{ n: 0 }]);
    expect(await as('migrator', (c) => one(c, `SELECT session_user::text AS session_user, current_user::text AS current_user`))).toEqual({
      session_user: logins.migrator,
      current_user: 'healthetl_owner',
    });
  });

  test('etl_loader loads fixtures/valid with `healthetl run` and reads `healthetl status`', { timeout: 120_000 }, async () => {
    const r = await healthetl('loader', ['run', 'fixtures/valid', '--log-format', 'json']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const finished = JSON.parse(r.stdout.trim().split('\n').at(-1)!);
    expect(finished).toMatchObject({ msg: 'run finished', documents: 16, loaded: 16, rejected: 0 });
    expect((await healthetl('loader', ['status'])).code).toBe(0);
    expect(await adminQuery(`SELECT db_user FROM etl.batches`, [], dbname)).toEqual([{ db_user: logins.loader }]);
  });

  test('bi_reader reads the analytics views, read-only by default, and nothing of clinical; no temporary tables', async () => {
    await as('bi', async (c) => {
      expect(await one(c, 'SHOW default_transaction_read_only')).toEqual({ default_transaction_read_only: 'on' });
      expect(await one(c, 'SHOW search_path')).toEqual({ search_path: 'analytics' });
      expect(await one(c, 'SHOW statement_timeout')).toEqual({ statement_timeout: '4min' });
      expect(await one(c, 'SHOW idle_in_transaction_session_timeout')).toEqual({ idle_in_transaction_session_timeout: '2min' });
      // fixtures/EXPECTED.md: 15 visits; found without a schema name, as a BI tool lists them.
      expect(await one(c, 'SELECT count(*)::int AS n FROM visits')).toEqual({ n: 15 });
      expect(await one(c, 'SELECT count(*)::int AS n FROM analytics.visits')).toEqual({ n: 15 });
      expect(await sqlState(c.query('SELECT * FROM clinical.patients'))).toBe('42501');
      expect(await sqlState(c.query('SELECT * FROM deid.patients'))).toBe('42501');
      expect(await sqlState(c.query('CREATE TEMP TABLE t (i int)'))).toBe('25006'); // read-only transaction
      await c.query('BEGIN READ WRITE');
      expect(await sqlState(c.query('CREATE TEMP TABLE t (i int)'))).toBe('42501'); // no TEMP right, read-only or not
      await c.query('ROLLBACK');
    });
  });

  test.runIf(inject('serverKind') === 'embedded')(
    'a login with a wrong password is refused (the embedded server checks scram-sha-256)',
    async () => {
      const u = new URL(urlAs(logins.bi));
      u.password = encodeURIComponent(password());
      const c = new pg.Client({ connectionString: u.toString() });
      expect(await sqlState(c.connect())).toBe('28P01');
      await c.end().catch(() => undefined);
    },
  );

  test('research_reader reads the deid views and not analytics', async () => {
    await as('research', async (c) => {
      expect(await one(c, 'SHOW default_transaction_read_only')).toEqual({ default_transaction_read_only: 'on' });
      expect(await one(c, 'SELECT count(*)::int AS n FROM patients')).toEqual({ n: 16 });
      expect(await one(c, 'SELECT count(*)::int AS n FROM deid.patients')).toEqual({ n: 16 });
      expect(await sqlState(c.query('SELECT * FROM analytics.visits'))).toBe('42501');
      expect(await sqlState(c.query('SELECT * FROM clinical.patients'))).toBe('42501');
    });
  });

  test('running it again changes nothing and succeeds (passwords from the environment with psql 15+)', async () => {
    const before = await madeState();
    const r =
      psqlMajor >= 15
        ? await bootstrap([...nameVars(dbname, logins), ...guardrailVars], {
            HEALTHETL_MIGRATOR_PASSWORD: passwords.migrator,
            ETL_LOADER_PASSWORD: passwords.loader,
            BI_READER_PASSWORD: passwords.bi,
            RESEARCH_READER_PASSWORD: passwords.research,
          })
        : await bootstrap([...nameVars(dbname, logins), ...guardrailVars, ...passwordVars]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).not.toMatch(/CREATE ROLE|CREATE DATABASE|GRANT ROLE/);
    expect(await madeState()).toEqual(before);
    // The same passwords still work, and the migrated, loaded database is as it was.
    expect(await as('bi', (c) => one(c, 'SELECT count(*)::int AS n FROM visits'))).toEqual({ n: 15 });
    expect((await healthetl('migrator', ['migrate', 'status'])).code).toBe(0);
  });
});
