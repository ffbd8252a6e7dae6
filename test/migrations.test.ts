// Migrations: up / down / up gives the same schema, concurrent `up`s apply it once, released
// files never change (migrations/checksums.txt), and every file can be reverted.
import { createHash } from 'node:crypto';
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterAll, describe, expect, inject, test } from 'vitest';
import { migrate, MIGRATIONS_DIR, MIGRATIONS_TABLE } from '../scripts/migrate.ts';
import { urlFor } from './db.ts';
import { catalogSnapshot, SCHEMAS } from './schema-catalog.ts';

// node-pg-migrate's advisory lock id, which scripts/migrate.ts takes before running it.
const MIGRATE_LOCK_ID = '7241865325823964';

// ---- fresh, empty databases (not clones of the migrated template) ---------------------------

const created: string[] = [];

async function admin<T>(fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: inject('adminUrl') });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

/** A new empty database; named like test/db.ts's so the global teardown drops it if we do not. */
async function freshDatabase(): Promise<string> {
  const owner = inject('templateDb').split('_')[2];
  const name = `healthetl_t_${owner}_${process.pid}_mig_${Math.random().toString(36).slice(2, 8)}`;
  await admin((c) => c.query(`CREATE DATABASE ${name}`));
  created.push(name);
  return urlFor(name);
}

afterAll(async () => {
  await admin(async (c) => {
    for (const name of created) await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  });
});

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

function migrationNames(): string[] {
  return readdirSync(MIGRATIONS_DIR)
    .filter((f) => f.endsWith('.sql'))
    .sort()
    .map((f) => f.replace(/\.sql$/, ''));
}

// ---- tests ----------------------------------------------------------------------------------

describe('up, down, up', () => {
  test('down to nothing leaves no healthetl schema, and up again gives the identical schema', async () => {
    const url = await freshDatabase();
    const names = migrationNames();

    expect(await migrate(url, 'up')).toEqual(names);
    const first = await catalogSnapshot(url);
    // The snapshot sees what the migrations made (so comparing snapshots means something).
    expect(first.schemas.map((s: any) => s.nspname).sort()).toEqual([...SCHEMAS].sort());
    expect(first.relations.map((r: any) => `${r.nspname}.${r.relname}`)).toEqual(
      expect.arrayContaining(['landing.raw_documents', 'etl.batches', 'clinical.patients', 'clinical.visits', 'etl.batch_summary']),
    );
    expect(first.functions.map((f: any) => `${f.nspname}.${f.proname}`)).toContain('etl.transform_batch');
    expect(first.functions.find((f: any) => f.proname === 'transform_batch')!.definition).toMatch(
      /CREATE OR REPLACE FUNCTION etl\.transform_batch/,
    );
    expect(first.columns.length).toBeGreaterThan(50);
    expect(first.indexes.length).toBeGreaterThan(5);
    expect(first.constraints.length).toBeGreaterThan(5);

    // Use the schema the way the transform does: a yearly visits partition is created at run time.
    await withClient(url, (c) => c.query('SELECT etl.ensure_visit_partitions(ARRAY[2024])'));
    const [{ n: partitions }] = await withClient(
      url,
      async (c) => (await c.query(`SELECT count(*)::int AS n FROM pg_inherits WHERE inhparent = 'clinical.visits'::regclass`)).rows,
    );
    expect(partitions).toBe(1);

    expect(await migrate(url, 'down', { count: Infinity })).toEqual([...names].reverse());
    await withClient(url, async (c) => {
      const { rows: schemas } = await c.query(`SELECT nspname FROM pg_namespace WHERE nspname = ANY($1)`, [SCHEMAS]);
      expect(schemas).toEqual([]);
      const { rows: applied } = await c.query(`SELECT name FROM public.${MIGRATIONS_TABLE}`);
      expect(applied).toEqual([]);
      // Nothing else was left behind in public: only node-pg-migrate's own bookkeeping.
      const { rows: publicObjects } = await c.query(`
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relname NOT LIKE '${MIGRATIONS_TABLE}%' ORDER BY 1`);
      expect(publicObjects).toEqual([]);
      const { rows: publicFunctions } = await c.query(`
        SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'`);
      expect(publicFunctions).toEqual([]);
    });
    const empty = await catalogSnapshot(url);
    for (const [kind, rows] of Object.entries(empty)) expect(rows, kind).toEqual([]);

    expect(await migrate(url, 'up')).toEqual(names);
    expect(await catalogSnapshot(url)).toEqual(first);
  });

  test('the analyst views exist and answer after up, down past them, and up again (nothing drops them silently)', async () => {
    const url = await freshDatabase();
    const names = migrationNames();
    const views = [
      'analytics.patients',
      'analytics.visits',
      'analytics.diagnoses',
      'analytics.treatments',
      'analytics.provider_notes',
      'deid.patients',
      'deid.visits',
      'deid.diagnoses',
      'deid.treatments',
    ];
    const answer = async () => {
      const c = new pg.Client({ connectionString: url });
      await c.connect();
      try {
        const out: Record<string, number> = {};
        for (const v of views) out[v] = Number((await c.query(`SELECT count(*) AS n FROM ${v}`)).rows[0].n);
        return out;
      } finally {
        await c.end();
      }
    };
    await migrate(url, 'up');
    const zero = Object.fromEntries(views.map((v) => [v, 0]));
    expect(await answer()).toEqual(zero);
    const at0009 = names.findIndex((n) => n.startsWith('0009_'));
    await migrate(url, 'down', { count: names.length - at0009 });
    await expect(answer()).rejects.toThrow(/does not exist/);
    await migrate(url, 'up');
    expect(await answer()).toEqual(zero);
  });

  test("each migration's Down restores exactly the schema before it", async () => {
    // A Down that restates a function (0004 restores 0003's definitions) must restore it whole:
    // the catalog after up to N-1 equals the catalog after up to N and down one.
    const url = await freshDatabase();
    const names = migrationNames();
    const before: Record<string, any>[] = [];
    for (let i = 0; i < names.length; i++) {
      before.push(await catalogSnapshot(url));
      expect(await migrate(url, 'up', { count: 1 })).toEqual([names[i]]);
    }
    for (let i = names.length - 1; i >= 0; i--) {
      expect(await migrate(url, 'down', { count: 1 })).toEqual([names[i]]);
      expect(await catalogSnapshot(url), `after down of ${names[i]}`).toEqual(before[i]);
    }
  });

  test('migrating down one at a time works for every migration', async () => {
    const url = await freshDatabase();
    const names = migrationNames();
    await migrate(url, 'up');
    for (const name of [...names].reverse()) expect(await migrate(url, 'down')).toEqual([name]);
    expect(await migrate(url, 'down')).toEqual([]);
    expect(await migrate(url, 'up', { count: 1 })).toEqual(names.slice(0, 1));
  });
});

describe('0005: rejects stored once', () => {
  test('up folds the copies of a rejected content into one row with its deliveries; down restores one row per delivery', async () => {
    const url = await freshDatabase();
    const names = migrationNames();
    const at0005 = names.findIndex((n) => n.startsWith('0005_'));
    await migrate(url, 'up', { count: at0005 });
    const zero = '\\x' + '00'.repeat(32);
    const perDelivery = `SELECT d.document_id::int AS document_id, d.batch_id::int AS batch_id, d.line::int AS line, r.reason
                         FROM landing.raw_documents d JOIN etl.rejected_documents r USING (document_id) ORDER BY 1`;
    await withClient(url, async (c) => {
      // Two batches: the same bad bytes delivered three times (twice in batch 1), another bad
      // document once, and a document too large to keep (no bytes: the all-zero sha256) twice.
      await c.query(`INSERT INTO etl.batches (status) VALUES ('transformed'), ('transformed')`);
      await c.query(`INSERT INTO landing.raw_documents (batch_id, source_file, line, byte_offset, content_sha256, format, status)
                     VALUES (1, 'a.ndjson', 1, 0, '\\xaa', 'ndjson', 'rejected'), (1, 'a.ndjson', 2, 10, '\\xaa', 'ndjson', 'rejected'),
                            (1, 'a.ndjson', 3, 20, '\\xbb', 'ndjson', 'rejected'), (2, 'b.ndjson', 7, 70, '\\xaa', 'ndjson', 'rejected'),
                            (1, 'big.ndjson', 1, 0, '${zero}', 'ndjson', 'rejected'), (2, 'big.ndjson', 1, 0, '${zero}', 'ndjson', 'rejected')`);
      await c.query(`INSERT INTO etl.rejected_documents (document_id, batch_id, source_file, line, item, byte_offset, field, reason, all_reasons)
                     SELECT d.document_id, d.batch_id, d.source_file, d.line, d.item, d.byte_offset, '$', r, ARRAY[r]
                     FROM landing.raw_documents d
                     CROSS JOIN LATERAL (SELECT CASE WHEN d.source_file = 'big.ndjson' THEN '$: too large'
                                                     WHEN d.content_sha256 = '\\xaa' THEN 'patient_id: is required'
                                                     ELSE 'visits: must be an array (found string)' END AS r) x`);
    });
    const before = await withClient(url, async (c) => (await c.query(perDelivery)).rows);
    expect(before).toHaveLength(6);

    await migrate(url, 'up', { count: 1 });
    await withClient(url, async (c) => {
      const { rows } = await c.query(`SELECT document_id::int AS first, batch_id::int AS first_batch, last_document_id::int AS last,
                                             last_batch_id::int AS last_batch, deliveries::int AS deliveries, reason
                                      FROM etl.rejected_documents ORDER BY document_id`);
      expect(rows).toEqual([
        { first: 1, first_batch: 1, last: 4, last_batch: 2, deliveries: 3, reason: 'patient_id: is required' },
        { first: 3, first_batch: 1, last: 3, last_batch: 1, deliveries: 1, reason: 'visits: must be an array (found string)' },
        // Same file and position, no bytes: one content, two deliveries.
        { first: 5, first_batch: 1, last: 6, last_batch: 2, deliveries: 2, reason: '$: too large' },
      ]);
      // Every delivery is still listed, by batch, with its reason.
      const { rows: deliveries } =
        await c.query(`SELECT document_id::int AS document_id, batch_id::int AS batch_id, line::int AS line, reason
                                                  FROM etl.batch_rejects ORDER BY 1`);
      expect(deliveries).toEqual(before);
    });

    await migrate(url, 'down', { count: 1 });
    expect(await withClient(url, async (c) => (await c.query(perDelivery)).rows)).toEqual(before);
    const [{ zeros }] = await withClient(
      url,
      async (c) => (await c.query(`SELECT count(*)::int AS zeros FROM landing.raw_documents WHERE content_sha256 = '${zero}'`)).rows,
    );
    expect(zeros).toBe(2);
  });
});

describe('concurrent migrate up', () => {
  async function appliedOnce(url: string) {
    const rows = await withClient(
      url,
      async (c) => (await c.query(`SELECT name, count(*)::int AS n FROM public.${MIGRATIONS_TABLE} GROUP BY name ORDER BY name`)).rows,
    );
    expect(rows).toEqual(migrationNames().map((name) => ({ name, n: 1 })));
  }

  test('two ups started together both resolve and apply the schema once', async () => {
    const url = await freshDatabase();
    const results = await Promise.all([migrate(url, 'up'), migrate(url, 'up')]);
    // One applied everything; the other waited for its lock and found nothing to do.
    expect(results.map((r) => r.length).sort()).toEqual([0, migrationNames().length]);
    await appliedOnce(url);
  });

  test('while another session holds the migration lock, both wait, then one applies and one does nothing', async () => {
    const url = await freshDatabase();
    const holder = new pg.Client({ connectionString: url });
    await holder.connect();
    try {
      await holder.query(`SELECT pg_advisory_lock(${MIGRATE_LOCK_ID})`);
      const waited: string[] = [];
      const running = [1, 2].map((i) => migrate(url, 'up', { log: (m) => waited.push(`${i}: ${m}`) }));
      // Both are blocked on the lock (visible in pg_locks) before it is released.
      await expect
        .poll(
          async () =>
            (
              await holder.query(`SELECT count(*)::int AS n FROM pg_locks
                           WHERE locktype = 'advisory' AND NOT granted
                             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
            ).rows[0].n,
          { timeout: 10_000 },
        )
        .toBe(2);
      expect(waited.sort()).toEqual(['1: waiting for another migration to finish', '2: waiting for another migration to finish']);
      await holder.query(`SELECT pg_advisory_unlock(${MIGRATE_LOCK_ID})`);
      const results = await Promise.all(running);
      expect(results.map((r) => r.length).sort()).toEqual([0, migrationNames().length]);
    } finally {
      await holder.end();
    }
    await appliedOnce(url);
  });
});

// ---- immutability of released migrations ----------------------------------------------------

const MANIFEST = 'checksums.txt';

/** What is wrong with the migrations in dir against dir/checksums.txt (empty when all is well). */
function manifestProblems(dir: string): string[] {
  const problems: string[] = [];
  const listed = new Map<string, string>();
  const text = readFileSync(path.join(dir, MANIFEST), 'utf8');
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^([0-9a-f]{64}) {2}(\S+\.sql)$/.exec(line);
    if (!m) {
      problems.push(`${MANIFEST} line ${i + 1} is not "sha256  file.sql"`);
      continue;
    }
    if (listed.has(m[2])) problems.push(`${m[2]} is listed twice in ${MANIFEST}`);
    listed.set(m[2], m[1]);
  }
  const files = readdirSync(dir)
    .filter((f) => f.endsWith('.sql'))
    .sort();
  for (const [file, sha] of listed) {
    if (!files.includes(file)) {
      problems.push(`${file} is listed in ${MANIFEST} but missing: released migrations are never removed`);
      continue;
    }
    const actual = createHash('sha256')
      .update(readFileSync(path.join(dir, file)))
      .digest('hex');
    if (actual !== sha) {
      problems.push(
        `${file} changed (sha256 ${actual}, released as ${sha}): released migrations are immutable; ` +
          'put the change in a new migration (restate a function whole with CREATE OR REPLACE) and restore this file',
      );
    }
  }
  for (const f of files) {
    if (!listed.has(f)) problems.push(`${f} is not listed in ${MANIFEST}: append "sha256  ${f}" (see the file's header)`);
  }
  return problems;
}

describe('released migrations are immutable', () => {
  test('every migration file matches migrations/checksums.txt', () => {
    expect(manifestProblems(MIGRATIONS_DIR)).toEqual([]);
  });

  test('the check catches a changed, a missing and an unlisted file', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'healthetl-migrations-'));
    try {
      cpSync(MIGRATIONS_DIR, dir, { recursive: true });
      // Against the manifest of the copy itself, so this test does not depend on the real files' state.
      const files = readdirSync(dir)
        .filter((f) => f.endsWith('.sql'))
        .sort();
      const manifest = (names: string[]) =>
        names
          .map(
            (f) =>
              `${createHash('sha256')
                .update(readFileSync(path.join(dir, f)))
                .digest('hex')}  ${f}`,
          )
          .join('\n') + '\n';
      writeFileSync(path.join(dir, MANIFEST), `# header\n\n${manifest(files)}`);
      expect(manifestProblems(dir)).toEqual([]);

      writeFileSync(path.join(dir, files[0]), readFileSync(path.join(dir, files[0]), 'utf8') + '\n-- a small edit\n');
      expect(manifestProblems(dir)).toEqual([expect.stringMatching(new RegExp(`^${files[0]} changed .*immutable`))]);

      writeFileSync(path.join(dir, MANIFEST), manifest(files));
      unlinkSync(path.join(dir, files[1]));
      expect(manifestProblems(dir)).toEqual([expect.stringMatching(new RegExp(`^${files[1]} is listed .* but missing`))]);

      writeFileSync(path.join(dir, MANIFEST), manifest(files.filter((f) => f !== files[1])));
      writeFileSync(path.join(dir, '9999_new.sql'), '-- Up Migration\nSELECT 1;\n-- Down Migration\nSELECT 1;\n');
      expect(manifestProblems(dir)).toEqual([expect.stringMatching(/^9999_new\.sql is not listed/)]);

      writeFileSync(path.join(dir, MANIFEST), 'not a checksum line\n');
      unlinkSync(path.join(dir, '9999_new.sql'));
      expect(manifestProblems(dir)).toContain(`${MANIFEST} line 1 is not "sha256  file.sql"`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('every migration file has an Up and a Down section, in that order, each with SQL', () => {
    const files = readdirSync(MIGRATIONS_DIR).filter((f) => f.endsWith('.sql'));
    expect(files.length).toBeGreaterThanOrEqual(3);
    for (const f of files) {
      const lines = readFileSync(path.join(MIGRATIONS_DIR, f), 'utf8').split('\n');
      const up = lines.filter((l) => l.trim() === '-- Up Migration').length;
      const down = lines.filter((l) => l.trim() === '-- Down Migration').length;
      expect({ file: f, up, down }).toEqual({ file: f, up: 1, down: 1 });
      const upAt = lines.findIndex((l) => l.trim() === '-- Up Migration');
      const downAt = lines.findIndex((l) => l.trim() === '-- Down Migration');
      expect(upAt, f).toBeLessThan(downAt);
      const sql = (from: number, to: number) => lines.slice(from + 1, to).filter((l) => l.trim() && !l.trim().startsWith('--'));
      expect(sql(upAt, downAt).length, `${f}: Up section has no SQL`).toBeGreaterThan(0);
      expect(sql(downAt, lines.length).length, `${f}: Down section has no SQL`).toBeGreaterThan(0);
    }
  });
});
