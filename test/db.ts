// One database per test file, cloned from the migrated template that global-setup built.
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { DatabasePool } from 'slonik';
import { afterAll, beforeAll, inject } from 'vitest';
import { createDbPool } from '../scripts/db.ts';

export function urlFor(db: string): string {
  const u = new URL(inject('adminUrl'));
  u.pathname = `/${db}`;
  return u.toString();
}

let counter = 0;

/** Creates a fresh migrated database for this file; dropped after the file's tests. */
export function useTestDatabase(): {
  url: () => string;
  query: <R extends pg.QueryResultRow = any>(text: string, values?: unknown[]) => Promise<R[]>;
} {
  // The template's creator process id keeps names unique per run (teardown drops leftovers).
  const owner = inject('templateDb').split('_')[2];
  const name = `healthetl_t_${owner}_${process.pid}_${++counter}_${Math.random().toString(36).slice(2, 8)}`;
  let client: pg.Client;
  beforeAll(async () => {
    const admin = new pg.Client({ connectionString: inject('adminUrl') });
    await admin.connect();
    await admin.query(`CREATE DATABASE ${name} TEMPLATE ${inject('templateDb')}`);
    await admin.end();
    client = new pg.Client({ connectionString: urlFor(name) });
    await client.connect();
    // Database rights are not copied from a template: take PUBLIC's away again (migrations/0008).
    await client.query('SELECT etl.restrict_database()');
  });
  afterAll(async () => {
    await client?.end();
    const admin = new pg.Client({ connectionString: inject('adminUrl') });
    await admin.connect();
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
    await admin.end();
  });
  return {
    url: () => urlFor(name),
    query: async (text, values) => (await client.query(text, values as unknown[])).rows,
  };
}

/** A slonik pool on a test file's database, opened before its tests and closed after them; call it inside a test. */
export function usePool(db: { url: () => string }): () => DatabasePool {
  let pool: DatabasePool | undefined;
  beforeAll(async () => {
    pool = await createDbPool(db.url());
  });
  afterAll(async () => {
    await pool?.end();
  });
  return () => {
    if (!pool) throw new Error('the pool is opened in beforeAll: use it inside a test or hook');
    return pool;
  };
}

/**
 * A login role of this run that is a member of `group` (healthetl_loader, healthetl_analyst, ...),
 * not a superuser, with a random password; returns a URL that connects to db as it. Roles belong to
 * the server, so each is dropped after the file's tests.
 */
export function useLogin(db: { url: () => string }, group: string): () => string {
  const role = `he_t_${inject('templateDb').split('_')[2]}_${process.pid}_${group.replace(/^healthetl_/, '')}_${Math.random().toString(36).slice(2, 8)}`;
  const password = randomBytes(18).toString('base64url');
  beforeAll(async () => {
    const admin = new pg.Client({ connectionString: inject('adminUrl') });
    await admin.connect();
    await admin.query(`CREATE ROLE ${role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE IN ROLE ${group} PASSWORD '${password}'`);
    await admin.end();
  });
  afterAll(async () => {
    const admin = new pg.Client({ connectionString: inject('adminUrl') });
    await admin.connect();
    // Its sessions first (a pool may linger); what it owns is nothing (objects belong to healthetl_owner).
    await admin.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1`, [role]);
    await admin.query(`DROP ROLE IF EXISTS ${role}`).catch(() => undefined);
    await admin.end();
  });
  return () => {
    const u = new URL(db.url());
    u.username = role;
    u.password = password;
    return u.toString();
  };
}

/** The rows of one statement, run on a connection of its own at url (a role's login) and closed after. */
export async function queryAs<T = any>(url: string, text: string, values?: unknown[], types?: pg.CustomTypesConfig): Promise<T[]> {
  const c = new pg.Client({ connectionString: url, types });
  await c.connect();
  try {
    return (await c.query(text, values as unknown[])).rows;
  } finally {
    await c.end();
  }
}

/** The error message a statement fails with at url ('' when it succeeds). */
export async function failureAs(url: string, text: string): Promise<string> {
  try {
    await queryAs(url, text);
    return '';
  } catch (e) {
    return (e as Error).message;
  }
}
