// Chooses the PostgreSQL for the whole run and builds a migrated template database from it:
// DATABASE_URL if set; else a testcontainers PostgreSQL when a container runtime answers;
// else an embedded PostgreSQL (real binaries from npm). Test files clone the template.
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { migrate } from '../scripts/migrate.ts';

declare module 'vitest' {
  export interface ProvidedContext {
    adminUrl: string;
    templateDb: string;
    serverKind: string;
  }
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

async function startContainer(): Promise<{ url: string; stop: () => Promise<void> } | null> {
  try {
    const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
    const c = await new PostgreSqlContainer('postgres:16-alpine').start();
    return { url: c.getConnectionUri(), stop: async () => void (await c.stop()) };
  } catch (err) {
    const msg = (err as Error).message ?? String(err);
    process.stderr.write(`[healthetl tests] no container runtime (${msg.split('\n')[0]}); using the embedded PostgreSQL\n`);
    return null;
  }
}

export default async function setup(project: TestProject) {
  let adminUrl = process.env.DATABASE_URL;
  let kind = 'DATABASE_URL';
  let stop: () => Promise<void> = async () => undefined;
  let dataDir: string | undefined;
  if (!adminUrl) {
    const container = process.env.HEALTHETL_TEST_NO_CONTAINERS ? null : await startContainer();
    if (container) {
      adminUrl = container.url;
      kind = 'testcontainers';
      stop = container.stop;
    } else {
      const { startEmbedded } = await import('../scripts/embedded.ts');
      dataDir = await mkdtemp(path.join(os.tmpdir(), 'healthetl-test-pg-'));
      await import('node:fs/promises').then((fs) => fs.chmod(dataDir!, 0o755));
      const server = await startEmbedded({ dataDir: path.join(dataDir, 'data'), persistent: false });
      adminUrl = server.url;
      kind = 'embedded';
      stop = server.stop;
    }
  }
  const templateDb = `healthetl_tpl_${process.pid}_${Date.now().toString(36)}`;
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  const { rows } = await admin.query<{ v: string }>("SELECT current_setting('server_version') AS v");
  process.stderr.write(`[healthetl tests] PostgreSQL ${rows[0].v} (${kind})\n`);
  await admin.query(`CREATE DATABASE ${templateDb}`);
  await migrate(withDatabase(adminUrl, templateDb), 'up');
  await admin.end();

  project.provide('adminUrl', adminUrl);
  project.provide('templateDb', templateDb);
  project.provide('serverKind', kind);

  return async () => {
    const c = new pg.Client({ connectionString: adminUrl });
    await c.connect();
    // Test databases left behind by a failed file, and the template.
    const { rows: dbs } = await c.query<{ datname: string }>(`SELECT datname FROM pg_database WHERE datname LIKE $1 OR datname = $2`, [
      `healthetl_t_${process.pid}_%`,
      templateDb,
    ]);
    for (const d of dbs) await c.query(`DROP DATABASE IF EXISTS ${d.datname} WITH (FORCE)`).catch(() => undefined);
    // Login roles a failed file left (test/db.ts useLogin), once no database of the run is left.
    const { rows: roles } = await c.query<{ rolname: string }>(`SELECT rolname FROM pg_roles WHERE rolname LIKE $1`, [
      `he\\_t\\_${process.pid}\\_%`,
    ]);
    for (const r of roles) await c.query(`DROP ROLE IF EXISTS ${r.rolname}`).catch(() => undefined);
    await c.end();
    await stop();
    if (dataDir) await rm(dataDir, { recursive: true, force: true });
  };
}
