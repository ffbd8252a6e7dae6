// Database connections: where to connect, the two clients we use (slonik for typed queries,
// pg for COPY), session settings, and PostgreSQL errors turned into one clear line.
import os from 'node:os';
import pg from 'pg';
import { createPool, SchemaValidationError, type DatabasePool, type Interceptor } from 'slonik';

export { sql } from 'slonik';

/** Exit codes: documented in the README; a scheduler acts on them. */
export const EXIT = {
  OK: 0,
  FAILURE: 1, // unexpected error
  USAGE: 2, // bad command line
  DB_UNREACHABLE: 3, // cannot connect or authenticate
  REJECTED: 4, // ran to the end, but some documents or files were rejected
  NOT_MIGRATED: 5, // the schema is missing or behind: run `healthetl migrate up`
  UNBALANCED: 6, // a batch's counts do not reconcile
} as const;

export type Timeouts = { statementTimeoutMs: number; lockTimeoutMs: number };

export const DEFAULT_TIMEOUTS: Timeouts = {
  statementTimeoutMs: Number(process.env.HEALTHETL_STATEMENT_TIMEOUT_MS ?? 0), // 0: none (a transform may be long)
  lockTimeoutMs: Number(process.env.HEALTHETL_LOCK_TIMEOUT_MS ?? 60_000),
};

/** --database-url, else DATABASE_URL, else libpq's PG* variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE). */
export function resolveDatabaseUrl(cliUrl?: string): string {
  if (cliUrl) return cliUrl;
  if (process.env.DATABASE_URL) return process.env.DATABASE_URL;
  const env = process.env;
  const user = env.PGUSER ?? os.userInfo().username;
  const url = new URL('postgresql://');
  const host = env.PGHOST ?? 'localhost';
  url.username = encodeURIComponent(user);
  if (env.PGPASSWORD) url.password = encodeURIComponent(env.PGPASSWORD);
  url.pathname = '/' + encodeURIComponent(env.PGDATABASE ?? user);
  if (host.startsWith('/')) {
    url.hostname = 'localhost';
    url.searchParams.set('host', host); // a Unix socket directory
  } else {
    url.hostname = host;
  }
  if (env.PGPORT) url.port = env.PGPORT;
  if (env.PGSSLMODE) url.searchParams.set('sslmode', env.PGSSLMODE);
  return url.toString();
}

/** host:port/database, for messages: never the password. */
export function describeTarget(databaseUrl: string): string {
  try {
    const u = new URL(databaseUrl);
    const host = u.searchParams.get('host') ?? u.hostname ?? 'localhost';
    return `${host}:${u.port || 5432}${u.pathname || '/'}`;
  } catch {
    return '(unparseable database URL)';
  }
}

// Results typed with zod are checked at the boundary (slonik's documented interceptor).
const resultParser: Interceptor = {
  name: 'zod-result-parser',
  transformRowAsync: async (context, query, row) => {
    if (!context.resultParser) return row;
    const parsed = await context.resultParser.safeParseAsync(row);
    if (!parsed.success) throw new SchemaValidationError(query, row, parsed.error.issues);
    return parsed.data as typeof row;
  },
};

/** A slonik pool for typed queries. */
export async function createDbPool(databaseUrl: string, maximumPoolSize = 4): Promise<DatabasePool> {
  return createPool(databaseUrl, {
    interceptors: [resultParser],
    maximumPoolSize,
    connectionRetryLimit: 0,
    connectionTimeout: 10_000,
    idleTimeout: 'DISABLE_TIMEOUT',
    statementTimeout: 'DISABLE_TIMEOUT',
    // slonik's default (60 s) ended a sharded transform's coordinator, idle in its transaction
    // while its shards ran, and with it the transform lock.
    idleInTransactionSessionTimeout: 'DISABLE_TIMEOUT',
    captureStackTrace: false,
  });
}

/** A plain pg client, for COPY and for holding session-level advisory locks. */
export async function connectPg(databaseUrl: string, timeouts: Timeouts = DEFAULT_TIMEOUTS): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: databaseUrl, application_name: 'healthetl', connectionTimeoutMillis: 10_000 });
  await client.connect();
  // A stuck lock must become a clear error, not a hang.
  await client.query(`SELECT set_config('statement_timeout', $1, false), set_config('lock_timeout', $2, false)`, [
    String(timeouts.statementTimeoutMs),
    String(timeouts.lockTimeoutMs),
  ]);
  return client;
}

export class UserError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

type PgLikeError = Error & { code?: string; hint?: string; cause?: unknown; errno?: number };

function innermost(err: unknown): PgLikeError {
  let e = err as PgLikeError;
  for (let i = 0; i < 5 && e && typeof e === 'object' && e.cause && !e.code; i++) e = e.cause as PgLikeError;
  return e;
}

/** Turns a driver or server error into one line saying what to do, and an exit code. */
export function explainError(err: unknown, databaseUrl?: string): { message: string; exitCode: number } {
  if (err instanceof UserError) return { message: err.message, exitCode: err.exitCode };
  const e = innermost(err);
  const where = databaseUrl ? describeTarget(databaseUrl) : 'the database';
  const code = e?.code ?? '';
  const unreachable = ['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'ETIMEDOUT', 'ECONNRESET', 'EAI_AGAIN'];
  if (unreachable.includes(code) || /connect|Connection terminated|timeout expired/i.test(e?.message ?? '') && !code) {
    return {
      message: `cannot reach PostgreSQL at ${where} (${code || e?.message}): start the server or set --database-url / DATABASE_URL`,
      exitCode: EXIT.DB_UNREACHABLE,
    };
  }
  if (code === '28P01' || code === '28000') {
    return { message: `PostgreSQL at ${where} refused the login (${code}): check the user and password in the connection settings`, exitCode: EXIT.DB_UNREACHABLE };
  }
  if (code === '3D000') {
    return { message: `database ${where} does not exist: create it (createdb) or point --database-url at an existing one`, exitCode: EXIT.DB_UNREACHABLE };
  }
  if (code === '57P01' || code === '57P02' || code === '57P03') {
    return { message: `PostgreSQL at ${where} shut down or restarted during the command (${code}): nothing half-done was committed; run the same command again`, exitCode: EXIT.DB_UNREACHABLE };
  }
  if (code === '42P01' || code === '3F000' || code === '42883') {
    return { message: `the healthetl schema is missing or out of date in ${where} (${code}): run "healthetl migrate up" first`, exitCode: EXIT.NOT_MIGRATED };
  }
  if (code === '55P03') {
    return { message: `gave up waiting for a lock in ${where} (lock_timeout): another session holds it; retry later or raise HEALTHETL_LOCK_TIMEOUT_MS`, exitCode: EXIT.FAILURE };
  }
  if (code === '57014') {
    return { message: `a statement ran longer than statement_timeout in ${where}: raise HEALTHETL_STATEMENT_TIMEOUT_MS (0 disables it)`, exitCode: EXIT.FAILURE };
  }
  if (code.startsWith('22')) {
    // A data exception's message quotes the value (e.g. 'invalid input syntax for type date: "..."'),
    // which may be patient data: say what happened without it.
    return {
      message: `PostgreSQL could not convert a value in the data (SQLSTATE ${code}); nothing of what failed was committed. The value is not shown: it may be patient data. A document passed validation that should not have: please report it, with the batch id`,
      exitCode: EXIT.FAILURE,
    };
  }
  if (code.startsWith('HE')) {
    return { message: `${e.message}${e.hint ? `: ${e.hint}` : ''}`, exitCode: EXIT.FAILURE };
  }
  return { message: `${e?.message ?? String(err)}${code ? ` (SQLSTATE ${code})` : ''}`, exitCode: EXIT.FAILURE };
}
