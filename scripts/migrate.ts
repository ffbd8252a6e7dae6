// Schema migrations: node-pg-migrate over the SQL files in migrations/, under an advisory lock
// that a second `migrate up` waits for (node-pg-migrate's own lock only fails fast).
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import type pg from 'pg';
import { z } from 'zod';
import { connectPg, NoResult, queryOn, sql } from './db.ts';
import { EXIT, UserError } from './errors.ts';

export const MIGRATIONS_DIR = fileURLToPath(new URL('../migrations', import.meta.url));
export const MIGRATIONS_TABLE = 'healthetl_migrations';
// node-pg-migrate's lock id; holding it first makes its try-lock succeed on the same session.
const MIGRATE_LOCK_ID = '7241865325823964';

export type MigrationLog = (message: string) => void;

export function migrationFiles(): string[] {
  return readdirSync(MIGRATIONS_DIR)
    .filter((f) => f.endsWith('.sql'))
    .sort();
}

// Our files are numbered (0001_...), not timestamped; node-pg-migrate orders them by that
// number correctly but complains about each one.
function quietError(log: MigrationLog): MigrationLog {
  return (m) => {
    if (!/^Can't determine timestamp/.test(m)) log(m);
  };
}

async function withMigrateLock<T>(client: pg.Client, log: MigrationLog, fn: () => Promise<T>): Promise<T> {
  const [{ ok }] = await queryOn(
    client,
    sql.type(z.object({ ok: z.boolean() }))`SELECT pg_try_advisory_lock(${MIGRATE_LOCK_ID}::bigint) AS ok`,
  );
  if (!ok) {
    log('waiting for another migration to finish');
    await queryOn(client, sql.unsafe`SET lock_timeout = 0`);
    await queryOn(client, sql.type(NoResult)`SELECT pg_advisory_lock(${MIGRATE_LOCK_ID}::bigint)`);
  }
  try {
    return await fn();
  } finally {
    await queryOn(client, sql.type(NoResult)`SELECT pg_advisory_unlock(${MIGRATE_LOCK_ID}::bigint)`).catch(() => undefined);
  }
}

/** Our schemas: what a Down may drop. */
const OUR_SCHEMAS = ['landing', 'etl', 'clinical', 'analytics', 'dq', 'deid', 'crypto'];

/** A table of ours a Down would drop, with its rows (a partitioned table's include its partitions'). */
export type DroppedTable = { table: string; rows: number };

/** The Down section of a migration file, found as node-pg-migrate finds it. */
function downSqlOf(name: string): string {
  const text = readFileSync(path.join(MIGRATIONS_DIR, `${name}.sql`), 'utf8');
  const at = text.search(/^\s*--[\s-]*down\s+migration/im);
  if (at < 0) throw new Error(`migration ${name} has no "-- Down Migration" section: it cannot be reverted`);
  return text.slice(at);
}

// Relations, functions and constraints, and each relation's column count (a DROP ... CASCADE can
// take a column of a table elsewhere): a key that is gone after a dry run is an object dropped.
const CatalogObject = z.object({ key: z.string(), name: z.string(), ours: z.boolean(), is_table: z.boolean() });
const catalogObjects = sql.type(CatalogObject)`
  SELECT 'r' || c.oid || ':' || (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS key,
         format('%I.%I', n.nspname, c.relname) AS name, n.nspname = ANY (${sql.array(OUR_SCHEMAS, 'text')}) AS ours,
         c.relkind IN ('r', 'p') AND NOT c.relispartition AS is_table
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND left(n.nspname, 3) <> 'pg_'
  UNION ALL
  SELECT 'f' || p.oid, p.oid::regprocedure::text, false, false
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND left(n.nspname, 3) <> 'pg_' AND n.nspname <> ALL (${sql.array(OUR_SCHEMAS, 'text')})
  UNION ALL
  SELECT 'c' || k.oid, format('constraint %I on %s', k.conname, k.conrelid::regclass), false, false
  FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
  WHERE k.conrelid <> 0 AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND left(n.nspname, 3) <> 'pg_'
    AND n.nspname <> ALL (${sql.array(OUR_SCHEMAS, 'text')})`;

/**
 * What reverting the last `count` migrations would drop: a dry run of their Down sections in a
 * transaction on the migrator's session, rolled back. Our tables that would vanish, with their
 * rows (counted after the rollback), and objects outside our schemas that would go with them.
 */
async function dryRunDown(client: pg.Client, count: number): Promise<{ tables: DroppedTable[]; outside: string[] }> {
  const [{ exists }] = await queryOn(
    client,
    sql.type(z.object({ exists: z.boolean() }))`SELECT to_regclass(${`public.${MIGRATIONS_TABLE}`}) IS NOT NULL AS exists`,
  );
  if (!exists) return { tables: [], outside: [] };
  const applied = await queryOn(
    client,
    sql.type(z.object({ name: z.string() }))`SELECT name FROM ${sql.identifier(['public', MIGRATIONS_TABLE])} ORDER BY run_on, id`,
  );
  const toRevert = applied.slice(-count).reverse();
  let gone: z.infer<typeof CatalogObject>[];
  await queryOn(client, sql.unsafe`BEGIN`);
  try {
    const before = await queryOn(client, catalogObjects);
    for (const { name } of toRevert) await client.query(downSqlOf(name));
    const after = new Set((await queryOn(client, catalogObjects)).map((o) => o.key));
    gone = before.filter((o) => !after.has(o.key));
  } finally {
    await queryOn(client, sql.unsafe`ROLLBACK`);
  }
  const tables: DroppedTable[] = [];
  for (const t of gone.filter((o) => o.ours && o.is_table)) {
    const [{ n }] = await queryOn(
      client,
      sql.type(z.object({ n: z.coerce.number() }))`SELECT count(*) AS n FROM ${sql.identifier(t.name.split('.').map(unquote))}`,
    );
    tables.push({ table: t.name, rows: n });
  }
  return { tables, outside: gone.filter((o) => !o.ours).map((o) => o.name) };
}

/** format('%I') quotes only names that need it; ours do not, but be exact. */
const unquote = (part: string) => (part.startsWith('"') ? part.slice(1, -1).replaceAll('""', '"') : part);

/**
 * node-pg-migrate creates its table in public on first use, and when it may not, throws an error
 * without the server's (its message quotes that error's stack): say it first, in one line.
 */
async function checkMigrationsTable(client: pg.Client): Promise<void> {
  const [r] = await queryOn(
    client,
    sql.type(z.object({ missing: z.boolean(), may_create: z.boolean(), role: z.string() }))`
      SELECT to_regclass(${`public.${MIGRATIONS_TABLE}`}) IS NULL AS missing,
             has_schema_privilege('public', 'CREATE') AS may_create, current_user AS role`,
  );
  if (r.missing && !r.may_create) {
    throw new UserError(
      `role ${r.role} may not create healthetl's migrations table in schema public (permission denied, SQLSTATE 42501): run "healthetl migrate" as the database owner, or GRANT CREATE ON SCHEMA public TO ${r.role}`,
      EXIT.FAILURE,
    );
  }
}

export type DownGuard = {
  /** Revert even when tables that hold rows would be dropped. */
  destroyData: boolean;
  /** Each table of ours that holds rows and would be dropped: refused, or (destroyData) going. */
  onTable: (t: DroppedTable, going: boolean) => void;
};

/**
 * Refuses (UserError, exit 2) a revert that would drop tables holding rows, unless destroyData,
 * and always one that would take objects outside our schemas along (a DBA's view over ours).
 */
async function guardDown(client: pg.Client, count: number, guard: DownGuard): Promise<void> {
  const { tables, outside } = await dryRunDown(client, count);
  if (outside.length > 0) {
    throw new UserError(
      `migrate down would also drop ${outside.join(', ')}, outside healthetl's schemas (they depend on its objects): drop or move them first`,
      EXIT.USAGE,
    );
  }
  const full = tables.filter((t) => t.rows > 0);
  for (const t of full) guard.onTable(t, guard.destroyData);
  if (full.length > 0 && !guard.destroyData) {
    throw new UserError(
      `migrate down would drop ${full.length} table(s) holding rows (listed above): nothing was changed; add --destroy-data to revert anyway, after a backup`,
      EXIT.USAGE,
    );
  }
}

/**
 * Applies (up) or reverts (down) migrations; count defaults to all for up and 1 for down. With
 * `guard`, a revert first checks what it would drop (guardDown); the CLI always passes it.
 */
export async function migrate(
  databaseUrl: string,
  direction: 'up' | 'down',
  opts: { count?: number; log?: MigrationLog; guard?: DownGuard } = {},
): Promise<string[]> {
  const log = opts.log ?? (() => undefined);
  const client = await connectPg(databaseUrl);
  try {
    return await withMigrateLock(client, log, async () => {
      await checkMigrationsTable(client);
      if (direction === 'down' && opts.guard) await guardDown(client, opts.count ?? 1, opts.guard);
      const ran = await runner({
        dbClient: client,
        dir: MIGRATIONS_DIR,
        // Only the .sql files are migrations (the directory also holds checksums.txt).
        ignorePattern: '(?!.*\\.sql$).*',
        migrationsTable: MIGRATIONS_TABLE,
        direction,
        count: opts.count ?? (direction === 'up' ? Infinity : 1),
        checkOrder: true,
        // Each migration in its own transaction: a failed one leaves the previous ones applied.
        singleTransaction: false,
        logger: { debug: () => undefined, info: () => undefined, warn: log, error: quietError(log) },
      });
      return ran.map((m) => m.name);
    });
  } finally {
    await client.end();
  }
}

export type MigrationStatus = { name: string; appliedAt: Date | null };

/** Every migration file with when it was applied (null when pending). */
export async function migrationStatus(databaseUrl: string): Promise<MigrationStatus[]> {
  const client = await connectPg(databaseUrl);
  try {
    const [{ exists }] = await queryOn(
      client,
      sql.type(z.object({ exists: z.boolean() }))`SELECT to_regclass(${`public.${MIGRATIONS_TABLE}`}) IS NOT NULL AS exists`,
    );
    const applied = new Map<string, Date>();
    if (exists) {
      const rows = await queryOn(
        client,
        sql.type(
          z.object({ name: z.string(), run_on: z.date() }),
        )`SELECT name, run_on FROM ${sql.identifier(['public', MIGRATIONS_TABLE])}`,
      );
      for (const r of rows) applied.set(r.name, r.run_on);
    }
    return migrationFiles().map((f) => {
      const name = f.replace(/\.sql$/, '');
      return { name, appliedAt: applied.get(name) ?? null };
    });
  } finally {
    await client.end();
  }
}
