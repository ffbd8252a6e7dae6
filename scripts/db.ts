// Database connections: where to connect, the two clients we use (slonik for typed queries,
// pg for COPY and session locks), session settings. Errors: errors.ts.
import { readFileSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { createPool, SchemaValidationError, sql, type DatabasePool, type Interceptor, type QuerySqlToken } from 'slonik';
import { z, type ZodTypeAny } from 'zod';

export { sql };

export type Timeouts = { statementTimeoutMs: number; lockTimeoutMs: number };

/** The timeout settings from the environment, and their defaults. */
export const TIMEOUT_SETTINGS = {
  HEALTHETL_STATEMENT_TIMEOUT_MS: 0, // 0: none (a transform may be long)
  HEALTHETL_LOCK_TIMEOUT_MS: 60_000,
} as const;

/** What PostgreSQL takes for a timeout in milliseconds: a whole number from 0 to 2^31 - 1. */
const MAX_TIMEOUT_MS = 2_147_483_647;

/** A setting's milliseconds, or NaN when it is not a whole number from 0 to 2147483647 (settingsProblem says so). */
function millisecondsOf(name: keyof typeof TIMEOUT_SETTINGS): number {
  const raw = process.env[name];
  if (raw === undefined) return TIMEOUT_SETTINGS[name];
  return /^[0-9]+$/.test(raw) && Number(raw) <= MAX_TIMEOUT_MS ? Number(raw) : NaN;
}

/** One line naming the first bad timeout setting and what it takes; null when they are fine. The CLI checks this at start. */
export function settingsProblem(): string | null {
  for (const name of Object.keys(TIMEOUT_SETTINGS) as (keyof typeof TIMEOUT_SETTINGS)[]) {
    if (Number.isNaN(millisecondsOf(name)))
      return `${name} must be a whole number of milliseconds from 0 to ${MAX_TIMEOUT_MS} (0: no timeout); fix or unset it`;
  }
  return null;
}

export const DEFAULT_TIMEOUTS: Timeouts = {
  statementTimeoutMs: millisecondsOf('HEALTHETL_STATEMENT_TIMEOUT_MS'),
  lockTimeoutMs: millisecondsOf('HEALTHETL_LOCK_TIMEOUT_MS'),
};

/** --database-url, else DATABASE_URL, else libpq's PG* variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE). */
export function resolveDatabaseUrl(cliUrl?: string): string {
  if (cliUrl) return cliUrl;
  if (process.env.DATABASE_URL) return process.env.DATABASE_URL;
  const env = process.env;
  const user = env.PGUSER ?? os.userInfo().username;
  const url = new URL('postgresql://');
  // A Unix socket directory goes in the host, percent-encoded: slonik reads a ?host= parameter
  // only when the URL has no host, and connected to localhost over TCP instead. (The host first:
  // a URL without one takes no user name.)
  const host = env.PGHOST ?? 'localhost';
  url.hostname = host.startsWith('/') ? encodeURIComponent(host) : host;
  url.username = encodeURIComponent(user);
  if (env.PGPASSWORD) url.password = encodeURIComponent(env.PGPASSWORD);
  url.pathname = '/' + encodeURIComponent(env.PGDATABASE ?? user);
  if (env.PGPORT) url.port = env.PGPORT;
  if (env.PGSSLMODE) url.searchParams.set('sslmode', env.PGSSLMODE);
  return url.toString();
}

/**
 * The URL with the password from ~/.pgpass (or PGPASSFILE) when it names none and PGPASSWORD is
 * unset, found as libpq finds it: the first line whose host, port, database and user match (`*`
 * matches any; backslash escapes `:` and itself), in a file no one else may read. Left to pg, the
 * file is read all the same, with a DeprecationWarning on every run (pg 8; pg 9 drops it).
 */
function withPgPass(databaseUrl: string): string {
  let u: URL;
  try {
    u = new URL(databaseUrl);
  } catch {
    return databaseUrl; // pg says what is wrong with it
  }
  if (u.password || process.env.PGPASSWORD) return databaseUrl;
  const file = process.env.PGPASSFILE ?? path.join(os.homedir(), '.pgpass');
  let text: string;
  try {
    if (statSync(file).mode & 0o077) return databaseUrl; // libpq ignores a file others may read
    text = readFileSync(file, 'utf8');
  } catch {
    return databaseUrl;
  }
  const user = decodeURIComponent(u.username) || process.env.PGUSER || os.userInfo().username;
  const want = [
    (u.searchParams.get('host') ?? decodeURIComponent(u.hostname)).startsWith('/') ? 'localhost' : u.hostname || 'localhost',
    u.port || '5432',
    decodeURIComponent(u.pathname.slice(1)) || user,
    user,
  ];
  for (const line of text.split(/\r?\n/)) {
    if (!line || line.startsWith('#')) continue;
    const fields = line.split(/(?<!\\):/).map((f) => f.replace(/\\([:\\])/g, '$1'));
    if (fields.length < 5) continue;
    if (want.every((w, i) => fields[i] === '*' || fields[i] === w)) {
      u.password = encodeURIComponent(fields.slice(4).join(':'));
      return u.toString();
    }
  }
  return databaseUrl;
}

/** host:port/database, for messages: never the password. */
export function describeTarget(databaseUrl: string): string {
  try {
    const u = new URL(databaseUrl);
    const host = u.searchParams.get('host') ?? (decodeURIComponent(u.hostname) || 'localhost');
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
  return createPool(withPgPass(databaseUrl), {
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
  const client = new pg.Client({
    connectionString: withPgPass(databaseUrl),
    application_name: 'healthetl',
    connectionTimeoutMillis: 10_000,
  });
  try {
    await client.connect();
    // A stuck lock must become a clear error, not a hang.
    await queryOn(
      client,
      sql.unsafe`SELECT set_config('statement_timeout', ${String(timeouts.statementTimeoutMs)}, false), set_config('lock_timeout', ${String(timeouts.lockTimeoutMs)}, false)`,
    );
  } catch (err) {
    // An open connection would keep the process alive after the error is reported.
    await client.end().catch(() => undefined);
    throw err;
  }
  return client;
}

/**
 * `lock_timeout` for the rest of the caller's transaction: a session that waits for the transform
 * lock (a transform, an erasure, a key rotation) gets a clear error (55P03), not a hang.
 */
export function localLockTimeout(timeouts: Timeouts = DEFAULT_TIMEOUTS) {
  return sql.unsafe`SELECT set_config('lock_timeout', ${String(timeouts.lockTimeoutMs)}, true)`;
}

/** The row type of a call whose result is not read (a function returning void). */
export const NoResult = z.object({});

/**
 * Runs a slonik query on a plain pg client and checks each row with the query's zod parser, as
 * the pool's interceptor does: for the sessions that must be one pg connection (the loader's
 * COPY in the same transaction, node-pg-migrate's runner, session advisory locks).
 */
export async function queryOn<T extends ZodTypeAny>(client: pg.Client, query: QuerySqlToken<T>): Promise<z.infer<T>[]> {
  // slonik's placeholders are $slonik_1..; it rewrites them to $1.. the same way before running a query.
  const text = query.sql.replaceAll('$slonik_', '$');
  const { rows } = await client.query(text, [...query.values]);
  const out: z.infer<T>[] = [];
  for (const row of rows) {
    const parsed = await query.parser.safeParseAsync(row);
    if (!parsed.success) throw new SchemaValidationError({ sql: text, values: query.values }, row, parsed.error.issues);
    out.push(parsed.data);
  }
  return out;
}
