// Schema migrations: node-pg-migrate over the SQL files in migrations/, under an advisory lock
// that a second `migrate up` waits for (node-pg-migrate's own lock only fails fast).
import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import type pg from 'pg';
import { z } from 'zod';
import { connectPg, NoResult, queryOn, sql } from './db.ts';

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

/** Applies (up) or reverts (down) migrations; count defaults to all for up and 1 for down. */
export async function migrate(
  databaseUrl: string,
  direction: 'up' | 'down',
  opts: { count?: number; log?: MigrationLog } = {},
): Promise<string[]> {
  const log = opts.log ?? (() => undefined);
  const client = await connectPg(databaseUrl);
  try {
    return await withMigrateLock(client, log, async () => {
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
