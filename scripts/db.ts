// Database connections: where to connect, the two clients we use (slonik for typed queries,
// pg for COPY and session locks), session settings. Errors: errors.ts.
import os from 'node:os';
import pg from 'pg';
import { createPool, SchemaValidationError, sql, type DatabasePool, type Interceptor, type QuerySqlToken } from 'slonik';
import { z, type ZodTypeAny } from 'zod';

export { sql };

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
  await queryOn(
    client,
    sql.unsafe`SELECT set_config('statement_timeout', ${String(timeouts.statementTimeoutMs)}, false), set_config('lock_timeout', ${String(timeouts.lockTimeoutMs)}, false)`,
  );
  return client;
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
