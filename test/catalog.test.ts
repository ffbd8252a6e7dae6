// Schema rules checked on the catalog of a migrated database.
import { expect, test } from 'vitest';
import { useTestDatabase } from './db.ts';

const db = useTestDatabase();

test('every clinical table carries patient_key, and every primary and unique key includes it (Citus co-location)', async () => {
  const tables = await db.query(`
    SELECT c.relname,
           EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'patient_key' AND NOT a.attisdropped) AS has_key
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'clinical' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
    ORDER BY 1`);
  expect(tables.map((t) => t.relname)).toEqual(['diagnoses', 'patients', 'provider_notes', 'treatments', 'visits']);
  expect(tables.filter((t) => !t.has_key)).toEqual([]);

  const keys = await db.query(`
    SELECT c.relname, con.conname, con.contype,
           EXISTS (SELECT 1 FROM unnest(con.conkey) k JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k
                   WHERE a.attname = 'patient_key') AS includes_key
    FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'clinical' AND con.contype IN ('p', 'u') AND NOT c.relispartition`);
  expect(keys.length).toBeGreaterThanOrEqual(5); // one primary key per table at least
  expect(keys.filter((k) => !k.includes_key)).toEqual([]);

  // Unique indexes made without a constraint count too.
  const idx = await db.query(`
    SELECT i.indexrelid::regclass::text AS name,
           EXISTS (SELECT 1 FROM unnest(i.indkey) k JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k
                   WHERE a.attname = 'patient_key') AS includes_key
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'clinical' AND i.indisunique AND NOT c.relispartition`);
  expect(idx.filter((i) => !i.includes_key)).toEqual([]);
});

test('no row-level foreign keys into the partitioned visits table (integrity is kept by the transform)', async () => {
  const fks = await db.query(`SELECT conname FROM pg_constraint WHERE contype = 'f' AND confrelid = 'clinical.visits'::regclass`);
  expect(fks).toEqual([]);
});

test('the indexes analysts filter by exist: diagnosis code, treatment name, visit date and type', async () => {
  const defs = (await db.query(`SELECT indexdef FROM pg_indexes WHERE schemaname = 'clinical'`)).map((r) => r.indexdef as string);
  expect(defs.some((d) => /ON clinical\.diagnoses USING btree \(code\)/.test(d))).toBe(true);
  expect(defs.some((d) => /ON clinical\.treatments USING btree \(name\)/.test(d))).toBe(true);
  expect(defs.some((d) => /ON ONLY clinical\.visits USING btree \(visit_date, visit_type\)/.test(d))).toBe(true);
});

test('no function in our schemas has a body over 150 lines: the next rule is a new step, not a longer one', async () => {
  const bodies = await db.query(`
    SELECT n.nspname || '.' || p.proname AS name,
           coalesce(array_length(regexp_split_to_array(coalesce(nullif(p.prosrc, ''), pg_get_function_sqlbody(p.oid)), E'\\n'), 1), 0) AS lines
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname IN ('landing', 'etl', 'clinical', 'analytics', 'dq', 'deid')
    ORDER BY lines DESC`);
  // The count is real: the transform's steps are there and the longest of them has a body of some length.
  expect(bodies.map((b) => b.name)).toEqual(expect.arrayContaining(['etl.transform_batch', 'etl.step_visits', 'etl.step_patients']));
  expect(bodies[0].lines).toBeGreaterThan(20);
  expect(bodies.filter((b) => b.lines > 150)).toEqual([]);
});

test('the transform is a driver of steps: etl.transform_batch and etl.transform_documents call each etl.step_* function, and fit on a screen', async () => {
  const drivers = await db.query(`SELECT p.prosrc FROM pg_proc p
                                  WHERE p.oid IN ('etl.transform_batch(bigint, int, int, int)'::regprocedure,
                                                  'etl.transform_documents(bigint, int, int, bigint[])'::regprocedure)`);
  expect(drivers).toHaveLength(2);
  const steps = (
    await db.query(`SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                                 WHERE n.nspname = 'etl' AND p.proname LIKE 'step\\_%' ORDER BY 1`)
  ).map((r) => r.proname as string);
  expect(steps.length).toBeGreaterThan(10);
  for (const s of steps) expect(drivers.map((d) => d.prosrc).join('\n'), s).toContain(`etl.${s}(`);
  for (const d of drivers) expect(d.prosrc.split('\n').length).toBeLessThanOrEqual(60);
});

test('no function in our schemas can be hijacked: each pins search_path or has a SQL-standard body', async () => {
  const fns = await db.query(`
    SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS name,
           l.lanname, p.prosqlbody IS NOT NULL AS standard_body,
           coalesce(p.proconfig, '{}') @> ARRAY['search_path=pg_catalog, pg_temp'] AS pinned
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
    WHERE n.nspname IN ('landing', 'etl', 'clinical', 'analytics', 'dq', 'deid')
      -- pgcrypto's functions (in crypto since 0008) are C, and no one but the owner may use their schema
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')`);
  expect(fns.length).toBeGreaterThan(40);
  expect(fns.filter((f) => !f.standard_body && !f.pinned).map((f) => f.name)).toEqual([]);
  // The per-value helpers stay inlinable: SQL-standard bodies, no SET clause.
  const helpers = [
    'etl.jtext(j jsonb)',
    'etl.is_ymd(t text)',
    'etl.to_visit_date(t text)',
    'etl.patient_id_of(j jsonb)',
    'etl.sex_of(j jsonb)',
  ];
  for (const h of helpers)
    expect(
      fns.find((f) => f.name === h),
      h,
    ).toMatchObject({ lanname: 'sql', standard_body: true, pinned: false });
});
