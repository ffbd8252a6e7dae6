// Hardening of the in-database transform (migration 0006): limits checked up front, updated_at
// and patient identity rules, the documents the server refuses isolated inside the transaction,
// duplicates without payloads, and functions that objects in `public` cannot hijack. Expected
// reasons are written from docs/patient-document-v1.md, not copied from output.
import { Readable } from 'node:stream';
import pg from 'pg';
import { describe, expect, inject, test } from 'vitest';
import { createDbPool, sql } from '../scripts/db.ts';
import { migrate, migrationFiles } from '../scripts/migrate.ts';
import { loadBatch, type LoadResult } from '../scripts/stage.ts';
import { transformPending } from '../scripts/transform.ts';
import { urlFor, usePool, useTestDatabase } from './db.ts';

const db = useTestDatabase();
const pool = usePool(db);

type Shards = { shards?: number; shardMinDocuments?: number };

async function stage(url: string, docs: unknown[]): Promise<LoadResult> {
  const ndjson = docs.map((d) => (typeof d === 'string' ? d : JSON.stringify(d))).join('\n') + '\n';
  return loadBatch(url, [{ kind: 'stdin', path: '-', format: 'ndjson', gzip: false }], { stdin: Readable.from([ndjson]) });
}

async function run(docs: unknown[], shards: Shards = {}): Promise<LoadResult> {
  const r = await stage(db.url(), docs);
  await transformPending(pool(), shards);
  return r;
}

async function reset(): Promise<void> {
  await db.query(`TRUNCATE clinical.patients, clinical.visits, clinical.diagnoses, clinical.treatments, clinical.provider_notes,
    etl.document_problems, etl.rejected_documents, landing.raw_documents, etl.batch_files, etl.batches, etl.patient_keys`);
}

/** Per line of the batch: its outcome and, for a reject, the reason. */
async function outcomes(batchId: number): Promise<{ line: number; status: string; reason: string | null }[]> {
  return db.query(
    `SELECT d.line::int AS line, d.status, r.reason FROM landing.raw_documents d
     LEFT JOIN etl.batch_rejects r ON r.document_id = d.document_id
     WHERE d.batch_id = $1 ORDER BY d.line`,
    [batchId],
  );
}

const visit = (id: string, date: string, extra: Record<string, unknown> = {}) => ({ visit_id: id, visit_date: date, ...extra });
const YEAR = new Date().getUTCFullYear();

describe('limits are checked up front: a reject naming the field, never a failed batch', () => {
  const docs = [
    { patient_id: 'L-OK', visits: [visit('V1', '2020-01-01')] },
    { patient_id: 'x'.repeat(1001), visits: [] },
    { patient_id: 'L-V', visits: [visit('v'.repeat(1001), '2020-01-01')] },
    { patient_id: 'L-C', visits: [visit('V1', '2020-01-01', { diagnoses: [{ code: 'é'.repeat(501) }] })] },
    // 400 two-byte characters: 800 bytes, under the limit although the cheap screen looks at it.
    { patient_id: 'L-C2', visits: [visit('V1', '2020-01-01', { diagnoses: [{ code: 'é'.repeat(400) }] })] },
    { patient_id: 'L-N', visits: [visit('V1', '2020-01-01', { treatments: [{ name: 'n'.repeat(1001) }] })] },
    { patient_id: 'L-Y', visits: [visit('V1', '1850-06-01')] },
    { patient_id: 'L-Y2', visits: [visit('V1', `${YEAR + 2}-01-01`)] },
    { patient_id: 'L-Y3', visits: [visit('V1', `${YEAR + 1}-12-31`), visit('V2', '1900-01-01')] },
    // 600 distinct years: each would have been a partition.
    { patient_id: 'L-MANY', visits: Array.from({ length: 600 }, (_, i) => visit(`V${i}`, `${1000 + i}-01-01`)) },
    { patient_id: 'L-S', source_system: 's'.repeat(1001), visits: [] },
  ];
  const expected = [
    { line: 1, status: 'loaded', reason: null },
    { line: 2, status: 'rejected', reason: 'patient_id: is longer than 1000 bytes' },
    { line: 3, status: 'rejected', reason: 'visits[0].visit_id: is longer than 1000 bytes' },
    { line: 4, status: 'rejected', reason: 'visits[0].diagnoses[0].code: is longer than 1000 bytes' },
    { line: 5, status: 'loaded', reason: null },
    { line: 6, status: 'loaded', reason: null },
    { line: 7, status: 'rejected', reason: `visits[0].visit_date: "1850-06-01" is outside the years 1900 to ${YEAR + 1}` },
    { line: 8, status: 'rejected', reason: `visits[0].visit_date: "${YEAR + 2}-01-01" is outside the years 1900 to ${YEAR + 1}` },
    { line: 9, status: 'loaded', reason: null },
    { line: 10, status: 'rejected', reason: 'visits[0].visit_date: "1000-01-01" is outside the years 1900 to ' + (YEAR + 1) },
    { line: 11, status: 'rejected', reason: 'source_system: is longer than 1000 bytes' },
  ];

  for (const shards of [{ shards: 1 }, { shards: 3, shardMinDocuments: 1 }]) {
    test(`in ${shards.shards === 1 ? 'one transaction' : '3 shards'}: the good documents load, each limit is a reject, no partition for a year out of range`, async () => {
      await reset();
      await db.query(`DO $$ DECLARE r record; BEGIN
        FOR r IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'clinical.visits'::regclass LOOP
          EXECUTE format('DROP TABLE clinical.%I', r.relname); END LOOP; END $$`);
      const r = await run(docs, shards);
      expect(await outcomes(r.batchId)).toEqual(expected);
      const [batch] = await db.query(`SELECT status, balanced FROM etl.batch_summary WHERE batch_id = $1`, [r.batchId]);
      expect(batch).toEqual({ status: 'transformed', balanced: true });
      // The long treatment name (optional) loads as NULL with a problem naming the field.
      expect(
        await db.query(
          `SELECT t.name FROM clinical.treatments t JOIN clinical.patients p USING (patient_key) WHERE p.source_patient_id = 'L-N'`,
        ),
      ).toEqual([{ name: null }]);
      expect(await db.query(`SELECT field, problem FROM etl.document_problems`)).toEqual([
        { field: 'visits[0].treatments[0].name', problem: 'longer than 1000 bytes' },
      ]);
      const partitions = await db.query(`SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                                         WHERE i.inhparent = 'clinical.visits'::regclass ORDER BY 1`);
      expect(partitions.map((p) => p.relname)).toEqual(['visits_y1900', 'visits_y2020', `visits_y${YEAR + 1}`]);
    });
  }
});

describe('updated_at: RFC 3339 with an offset, at most 24 hours after the batch was received', () => {
  test('a malformed or far-future updated_at is a reject, never a silent "superseded"', async () => {
    await reset();
    const iso = (ms: number) => new Date(ms).toISOString();
    const r = await run([
      { patient_id: 'U-1', updated_at: '2024-06-01T00:00:00', visits: [] },
      { patient_id: 'U-2', updated_at: '2024-06-01T00:00:00+0200', visits: [] },
      { patient_id: 'U-3', updated_at: '2024-06-01T00:00:00.1234567891Z', visits: [] },
      { patient_id: 'U-4', updated_at: '9999-12-31T23:59:60-15:59', visits: [] },
      { patient_id: 'U-5', updated_at: iso(Date.now() + 23 * 3600_000), visits: [] },
      { patient_id: 'U-6', updated_at: iso(Date.now() + 25 * 3600_000), visits: [] },
      { patient_id: 'U-7', visits: [] },
    ]);
    const rows = await outcomes(r.batchId);
    expect(rows.map((x) => x.status)).toEqual(['rejected', 'rejected', 'rejected', 'rejected', 'loaded', 'rejected', 'loaded']);
    expect(rows[0].reason).toBe('updated_at: "2024-06-01T00:00:00" is not an RFC 3339 timestamp with an offset');
    expect(rows[1].reason).toBe('updated_at: "2024-06-01T00:00:00+0200" is not an RFC 3339 timestamp with an offset');
    expect(rows[2].reason).toBe('updated_at: "2024-06-01T00:00:00.1234567891Z" is not an RFC 3339 timestamp with an offset');
    expect(rows[3].reason).toBe('updated_at: "9999-12-31T23:59:60-15:59" is more than 24 hours after the document was received');
    expect(rows[5].reason).toMatch(/^updated_at: ".*" is more than 24 hours after the document was received$/);
  });

  test('the limit is the time the batch was received, not the clock at transform (a replay decides the same way)', async () => {
    await reset();
    const anHourAgo = new Date(Date.now() - 3600_000).toISOString();
    const r = await stage(db.url(), [{ patient_id: 'R-1', updated_at: anHourAgo, visits: [] }]);
    // Received long ago: an updated_at an hour before now is years after it.
    await db.query(`UPDATE landing.raw_documents SET received_at = '2020-01-01T00:00:00Z' WHERE batch_id = $1`, [r.batchId]);
    await transformPending(pool());
    expect((await outcomes(r.batchId)).map((x) => x.status)).toEqual(['rejected']);
  });
});

describe('patient identity: one canonical form', () => {
  test('12, 12.0, 1.2e1, "12" and " 12" are one patient; 12.5 is a reject; NFC and NFD spellings are one patient', async () => {
    await reset();
    const at = (m: number) => `2024-0${m}-01T00:00:00Z`;
    const r1 = await run([
      '{"patient_id": 12, "updated_at": "' + at(1) + '", "visits": [{"visit_id": "A", "visit_date": "2020-01-01"}]}',
      '{"patient_id": "Jose\u0301", "updated_at": "' + at(1) + '", "visits": []}',
    ]);
    const r2 = await run([
      '{"patient_id": 12.0, "updated_at": "' + at(2) + '", "visits": [{"visit_id": "B", "visit_date": "2020-01-01"}]}',
      '{"patient_id": 1.2e1, "updated_at": "' + at(3) + '", "visits": [{"visit_id": "C", "visit_date": "2020-01-01"}]}',
      '{"patient_id": "12", "updated_at": "' + at(4) + '", "visits": [{"visit_id": "D", "visit_date": "2020-01-01"}]}',
      '{"patient_id": " 12\\t", "updated_at": "' + at(5) + '", "visits": [{"visit_id": "E", "visit_date": "2020-01-01"}]}',
      '{"patient_id": 12.5, "visits": []}',
      '{"patient_id": "   ", "visits": []}',
      '{"patient_id": "Jos\u00e9", "updated_at": "' + at(2) + '", "visits": []}',
    ]);
    expect((await outcomes(r1.batchId)).map((x) => x.status)).toEqual(['loaded', 'loaded']);
    const second = await outcomes(r2.batchId);
    // Within the batch the newest snapshot of "12" (line 4) wins; the others are superseded.
    expect(second.map((x) => x.status)).toEqual(['superseded', 'superseded', 'superseded', 'loaded', 'rejected', 'rejected', 'loaded']);
    expect(second[4].reason).toBe('patient_id: must be an integer when it is a number (found 12.5)');
    expect(second[5].reason).toBe('patient_id: is required');
    const patients = await db.query(`SELECT p.source_patient_id AS id, array_agg(v.source_visit_id ORDER BY v.source_visit_id) AS visits
                                     FROM clinical.patients p LEFT JOIN clinical.visits v USING (patient_key)
                                     GROUP BY p.source_patient_id ORDER BY 1`);
    expect(patients).toEqual([
      { id: '12', visits: ['E'] },
      { id: 'Jos\u00e9', visits: [null] },
    ]);
    expect(await db.query(`SELECT source_patient_id AS id FROM etl.patient_keys ORDER BY 1`)).toEqual([{ id: '12' }, { id: 'Jos\u00e9' }]);
  });

  test('migrating to 0006 merges the patients that collide under the canonical form; the newest snapshot wins', async () => {
    const name = `healthetl_t_${inject('templateDb').split('_')[2]}_${process.pid}_ident_${Math.random().toString(36).slice(2, 8)}`;
    const admin = new pg.Client({ connectionString: inject('adminUrl') });
    await admin.connect();
    await admin.query(`CREATE DATABASE ${name}`);
    const url = urlFor(name);
    const client = new pg.Client({ connectionString: url });
    try {
      const all = migrationFiles().map((f) => f.replace(/\.sql$/, ''));
      const at0006 = all.findIndex((n) => n.startsWith('0006_'));
      await migrate(url, 'up', { count: at0006 });
      const p = await createDbPool(url);
      try {
        // The transform of 0005 itself (today's TypeScript expects the counts of later migrations).
        const load = async (docs: string[]) => {
          const r = await stage(url, docs);
          await p.query(sql.unsafe`SELECT * FROM etl.transform_batch(${r.batchId})`);
        };
        // Under 0005 these are six patients: 12.0 and "12", NFD and NFC, " 7" and "7".
        await load([
          '{"patient_id": 12.0, "updated_at": "2024-01-01T00:00:00Z", "visits": [{"visit_id": "OLD", "visit_date": "2020-01-01"}]}',
          '{"patient_id": "Jose\u0301", "updated_at": "2024-05-01T00:00:00Z", "visits": [{"visit_id": "NFD", "visit_date": "2020-01-01"}]}',
          '{"patient_id": " 7", "updated_at": "2024-01-01T00:00:00Z", "visits": []}',
          // Blank ids (accepted by 0005) have no canonical form: they are not merged.
          '{"patient_id": "   ", "visits": []}',
          '{"patient_id": " ", "visits": []}',
        ]);
        await load([
          '{"patient_id": "12", "updated_at": "2024-03-01T00:00:00Z", "visits": [{"visit_id": "NEW", "visit_date": "2020-01-01"}]}',
          '{"patient_id": "Jos\u00e9", "updated_at": "2024-04-01T00:00:00Z", "visits": [{"visit_id": "NFC", "visit_date": "2020-01-01"}]}',
          '{"patient_id": "7", "updated_at": "2024-02-01T00:00:00Z", "visits": []}',
          // Dated far ahead (accepted by 0005): it froze the patient against every real update.
          '{"patient_id": "99", "updated_at": "2099-01-01T00:00:00Z", "visits": []}',
        ]);
      } finally {
        await p.end();
      }
      await client.connect();
      expect((await client.query(`SELECT count(*)::int AS n FROM clinical.patients`)).rows[0].n).toBe(9);

      await migrate(url, 'up');
      const patients = (
        await client.query(`SELECT p.source_patient_id AS id, array_agg(v.source_visit_id) AS visits
                                            FROM clinical.patients p LEFT JOIN clinical.visits v USING (patient_key)
                                            GROUP BY 1 ORDER BY 1`)
      ).rows;
      expect(patients).toEqual([
        { id: ' ', visits: [null] },
        { id: '   ', visits: [null] },
        { id: '12', visits: ['NEW'] },
        { id: '7', visits: [null] },
        { id: '99', visits: [null] },
        { id: 'Jos\u00e9', visits: ['NFD'] },
      ]);
      expect((await client.query(`SELECT source_patient_id AS id FROM etl.patient_keys ORDER BY 1`)).rows.map((r) => r.id)).toEqual([
        ' ',
        '   ',
        '12',
        '7',
        '99',
        'Jos\u00e9',
      ]);
      // The losers' current documents count as superseded now; every batch still balances.
      const statuses = (await client.query(`SELECT payload->>'patient_id' AS id, status FROM landing.raw_documents ORDER BY document_id`))
        .rows;
      expect(statuses.map((s) => s.status)).toEqual([
        'superseded',
        'loaded',
        'superseded',
        'loaded',
        'loaded',
        'loaded',
        'superseded',
        'loaded',
        'loaded',
      ]);
      expect((await client.query(`SELECT bool_and(balanced) AS ok FROM etl.batch_summary`)).rows[0].ok).toBe(true);
      // The far-future snapshot no longer blocks: a real update dated in the past now wins.
      expect((await client.query(`SELECT source_updated_at FROM clinical.patients WHERE source_patient_id = '99'`)).rows).toEqual([
        { source_updated_at: null },
      ]);
      const p2 = await createDbPool(url);
      try {
        await stage(url, [
          '{"patient_id": "99", "updated_at": "2025-01-01T00:00:00Z", "visits": [{"visit_id": "LATER", "visit_date": "2024-12-01"}]}',
        ]);
        await transformPending(p2);
      } finally {
        await p2.end();
      }
      const later = await client.query(`SELECT v.source_visit_id FROM clinical.visits v JOIN clinical.patients p USING (patient_key)
                                        WHERE p.source_patient_id = '99'`);
      expect(later.rows).toEqual([{ source_visit_id: 'LATER' }]);
    } finally {
      await client.end().catch(() => undefined);
      await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await admin.end();
    }
  });
});

describe('the last line of defence: a document the server refuses is rejected with its SQLSTATE, the others load', () => {
  // Server errors the rules cannot foresee, planted the way a DBA might: a CHECK constraint
  // (23514), an index on a column the contract does not limit (54000), a cast in a CHECK (22P02).
  const plants = [
    {
      sqlstate: '23514',
      plant: `ALTER TABLE clinical.patients ADD CONSTRAINT test_plant CHECK (family_name IS DISTINCT FROM 'Poison') NOT VALID`,
      drop: `ALTER TABLE clinical.patients DROP CONSTRAINT test_plant`,
      bad: { name: { family: 'Poison' } },
    },
    {
      sqlstate: '54000',
      plant: `CREATE INDEX test_plant ON clinical.patients (given_name)`,
      drop: `DROP INDEX clinical.test_plant`,
      bad: { name: { given: Array.from({ length: 4000 }, (_, i) => String.fromCharCode(0x4e00 + ((i * 7919) % 20000))).join('') } },
    },
    {
      sqlstate: '22P02',
      plant: `ALTER TABLE clinical.patients ADD CONSTRAINT test_plant CHECK (mrn IS NULL OR mrn::int > 0) NOT VALID`,
      drop: `ALTER TABLE clinical.patients DROP CONSTRAINT test_plant`,
      bad: { mrn: 'CANARY-MRN-731' },
    },
  ];
  for (const p of plants) {
    for (const shards of [{ shards: 1 }, { shards: 3, shardMinDocuments: 1 }]) {
      test(`SQLSTATE ${p.sqlstate}, ${shards.shards === 1 ? 'one transaction' : '3 shards'}`, async () => {
        await reset();
        await db.query(p.plant);
        try {
          const docs = Array.from({ length: 30 }, (_, i) => ({
            patient_id: `P-${i}`,
            mrn: String(i + 1),
            visits: [visit('V1', '2021-03-04')],
            ...(i === 6 || i === 22 ? p.bad : {}),
          }));
          const r = await run(docs, shards);
          const rows = await outcomes(r.batchId);
          const reason = `$: PostgreSQL refused the document while transforming it (SQLSTATE ${p.sqlstate})`;
          expect(rows.filter((x) => x.status === 'rejected')).toEqual([
            { line: 7, status: 'rejected', reason },
            { line: 23, status: 'rejected', reason },
          ]);
          expect(rows.filter((x) => x.status === 'loaded')).toHaveLength(28);
          const [batch] = await db.query(`SELECT status, balanced, error FROM etl.batch_summary WHERE batch_id = $1`, [r.batchId]);
          expect(batch).toEqual({ status: 'transformed', balanced: true, error: null });
          expect((await db.query(`SELECT count(*)::int AS n FROM clinical.visits`))[0].n).toBe(28);
          // The reason never carries the server's message, which quotes the value.
          const [leak] = await db.query(
            `SELECT count(*)::int AS n FROM etl.rejected_documents WHERE reason LIKE '%CANARY%' OR array_to_string(all_reasons, ' ') LIKE '%CANARY%'`,
          );
          expect(leak.n).toBe(0);
        } finally {
          await db.query(p.drop);
        }
      });
    }
  }
});

describe('landing keeps one payload per content', () => {
  test('re-sending a file with a reject in it stores no second payload, and the counts stay whole', async () => {
    await reset();
    const docs = [...Array.from({ length: 5 }, (_, i) => ({ patient_id: `D-${i}`, visits: [] })), { visits: [] }];
    const a = await run(docs);
    const b = await run(docs);
    expect((await outcomes(a.batchId)).map((x) => x.status)).toEqual(['loaded', 'loaded', 'loaded', 'loaded', 'loaded', 'rejected']);
    expect((await outcomes(b.batchId)).map((x) => x.status)).toEqual([
      'duplicate',
      'duplicate',
      'duplicate',
      'duplicate',
      'duplicate',
      'rejected',
    ]);
    const rows = await db.query(`SELECT batch_id::int AS batch, count(*)::int AS rows, count(payload)::int AS payloads
                                 FROM landing.raw_documents GROUP BY 1 ORDER BY 1`);
    expect(rows).toEqual([
      { batch: a.batchId, rows: 6, payloads: 6 },
      { batch: b.batchId, rows: 6, payloads: 0 },
    ]);
  });
});

describe('functions cannot be hijacked through public', () => {
  test('overloads planted in public never run during a load and transform', async () => {
    await reset();
    await db.query(`CREATE TABLE public.canary (what text)`);
    // Better matches than pg_catalog's variadic format/concat_ws for the calls the transform makes.
    const overloads = [
      ['format', 'text, integer'],
      ['format', 'text, text'],
      ['format', 'text, bigint'],
      ['format', 'text, integer, text, bigint'],
      ['format', 'text, integer, text, bigint, text'],
      ['format', 'text, text, integer'],
      ['concat_ws', 'text, text, bigint, bigint, bigint, text'],
    ];
    try {
      for (const [fn, args] of overloads) {
        await db.query(`CREATE FUNCTION public.${fn}(${args}) RETURNS text LANGUAGE plpgsql AS $$
          BEGIN INSERT INTO public.canary VALUES ('${fn}(${args})'); RETURN 'hijacked'; END $$`);
      }
      // The plant is live: an unqualified call from a session with public on its path runs it.
      await db.query(`SELECT format('%s', 1)`);
      expect(await db.query(`SELECT what FROM public.canary`)).toEqual([{ what: 'format(text, integer)' }]);
      await db.query(`TRUNCATE public.canary`);

      const r = await run(
        [
          {
            patient_id: 'H-1',
            visits: [visit('V1', '2022-01-01', { diagnoses: [{ code: 'E11.9' }], treatments: [{ name: 'x', type: 'bogus' }] })],
          },
          { patient_id: 'H-2', visits: [visit('V1', '2022-01-01'), visit('V1', '2022-01-02')] },
          { patient_id: 'H-3', visits: [visit('V1', '2022-01-01', { diagnoses: [{}] })] },
          '{"patient_id": "H-4", "visits": [',
        ],
        { shards: 2, shardMinDocuments: 1 },
      );
      expect((await outcomes(r.batchId)).map((x) => x.status)).toEqual(['loaded', 'rejected', 'rejected', 'rejected']);
      expect((await outcomes(r.batchId))[1].reason).toBe('visits[1].visit_id: "V1" is a duplicate of visits[0].visit_id');
      expect(await db.query(`SELECT what FROM public.canary`)).toEqual([]);
    } finally {
      for (const [fn, args] of overloads) await db.query(`DROP FUNCTION IF EXISTS public.${fn}(${args})`);
      await db.query(`DROP TABLE public.canary`);
    }
  });
});

describe('only ASCII digits are digits, also on a database with an ICU locale', () => {
  test('dates written with other digits are problems or rejects, never a failed batch', async (ctx) => {
    const name = `healthetl_t_${inject('templateDb').split('_')[2]}_${process.pid}_icu_${Math.random().toString(36).slice(2, 8)}`;
    const admin = new pg.Client({ connectionString: inject('adminUrl') });
    await admin.connect();
    try {
      try {
        await admin.query(
          `CREATE DATABASE ${name} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'`,
        );
      } catch (err) {
        // A server built without ICU cannot have such a database; say so rather than pass.
        expect(String((err as Error).message)).toMatch(/ICU is not supported|locale/i);
        ctx.skip();
      }
      const url = urlFor(name);
      await migrate(url, 'up');
      const c = new pg.Client({ connectionString: url });
      await c.connect();
      try {
        // The premise: on this database \d matches Arabic-Indic digits, [0-9] does not.
        const [premise] = (await c.query(`SELECT '١٩٨٠' ~ '^\\d{4}$' AS d, '١٩٨٠' ~ '^[0-9]{4}$' AS ascii`)).rows;
        expect(premise).toEqual({ d: true, ascii: false });
        const p = await createDbPool(url);
        try {
          const r = await stage(url, [
            { patient_id: 'I-1', birth_date: '١٩٨٠-01-01', visits: [visit('V1', '2020-01-01', { discharge_date: '٢٠٢٠-01-02' })] },
            { patient_id: 'I-2', visits: [visit('V1', '٢٠٢٠-01-01')] },
            { patient_id: 'I-3', updated_at: '٢٠٢٤-01-01T00:00:00Z', visits: [] },
            { patient_id: 'I-4', visits: [visit('V1', '2020-01-01')] },
          ]);
          await transformPending(p);
          const rows = (
            await c.query(
              `SELECT d.line::int AS line, d.status, r.reason FROM landing.raw_documents d
                                       LEFT JOIN etl.batch_rejects r USING (document_id) WHERE d.batch_id = $1 ORDER BY 1`,
              [r.batchId],
            )
          ).rows;
          expect(rows).toEqual([
            { line: 1, status: 'loaded', reason: null },
            { line: 2, status: 'rejected', reason: 'visits[0].visit_date: "٢٠٢٠-01-01" is not a valid date' },
            { line: 3, status: 'rejected', reason: 'updated_at: "٢٠٢٤-01-01T00:00:00Z" is not an RFC 3339 timestamp with an offset' },
            { line: 4, status: 'loaded', reason: null },
          ]);
          expect((await c.query(`SELECT field, problem FROM etl.document_problems ORDER BY field`)).rows).toEqual([
            { field: 'birth_date', problem: 'not a valid date (YYYY-MM-DD)' },
            { field: 'visits[0].discharge_date', problem: 'not a valid date' },
          ]);
        } finally {
          await p.end();
        }
      } finally {
        await c.end();
      }
    } finally {
      await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await admin.end();
    }
  });
});

describe('what a snapshot deletes is counted', () => {
  test("a newer snapshot without visits deletes the patient's visits and children; the batch says how many", async () => {
    await reset();
    await run([
      {
        patient_id: 'DEL-1',
        updated_at: '2024-01-01T00:00:00Z',
        visits: [
          visit('V1', '2021-01-01', { diagnoses: [{ code: 'E11.9' }, { code: 'I10' }], treatments: [{ name: 'metformin' }] }),
          visit('V2', '2021-02-01', { provider_notes: [{ text: 'Seen.' }] }),
          visit('V3', '2021-03-01'),
        ],
      },
      { patient_id: 'DEL-2', visits: [visit('V1', '2021-01-01')] },
    ]);
    const r = await stage(db.url(), [{ patient_id: 'DEL-1', updated_at: '2024-02-01T00:00:00Z' }]);
    const [counts] = await db.query(`SELECT * FROM etl.transform_batch($1)`, [r.batchId]);
    // 3 visits; 2 diagnoses + 1 treatment + 1 note; DEL-2 is untouched.
    expect(counts).toMatchObject({ loaded: '1', deleted_visits: '3', deleted_children: '4' });
    const [summary] = await db.query(`SELECT deleted_visits::int, deleted_children::int FROM etl.batch_summary WHERE batch_id = $1`, [
      r.batchId,
    ]);
    expect(summary).toEqual({ deleted_visits: 3, deleted_children: 4 });
    expect((await db.query(`SELECT count(*)::int AS n FROM clinical.visits`))[0].n).toBe(1);
  });
});

describe('review findings', () => {
  test('a document with thousands of reasons is one reject with the first 100, quickly; three bad documents among thousands are all found', async () => {
    await reset();
    const many = {
      patient_id: 'MANY',
      visits: [visit('V1', '2020-01-01', { diagnoses: Array.from({ length: 5000 }, () => 1).map(() => ({})) })],
    };
    const r = await run([many, { patient_id: 'FINE', visits: [] }]);
    const rows = await outcomes(r.batchId);
    expect(rows.map((x) => x.status)).toEqual(['rejected', 'loaded']);
    const [rej] = await db.query(`SELECT cardinality(all_reasons) AS n, reason FROM etl.rejected_documents`);
    expect(rej).toEqual({ n: 100, reason: 'visits[0].diagnoses[0].code: is required' });

    await reset();
    await db.query(`ALTER TABLE clinical.patients ADD CONSTRAINT test_plant CHECK (length(mrn) < 20) NOT VALID`);
    try {
      const docs = Array.from({ length: 3000 }, (_, i) => ({
        patient_id: `T-${i}`,
        mrn: [17, 1500, 2999].includes(i) ? 'M'.repeat(25) : `M-${i}`,
        visits: [],
      }));
      const b = await run(docs, { shards: 1 });
      const out = await outcomes(b.batchId);
      expect(out.filter((x) => x.status === 'rejected').map((x) => x.line)).toEqual([18, 1501, 3000]);
      expect(out.filter((x) => x.status === 'loaded')).toHaveLength(2997);
    } finally {
      await db.query(`ALTER TABLE clinical.patients DROP CONSTRAINT test_plant`);
    }
  });
});
