// PHI protection, tried as the roles themselves over real connections: what each analyst role can
// see (and cannot), that none of the identifiers planted in fixtures/phi reaches a tier that must
// remove it, note redaction, erasure and pseudonym rotation. The right answers are worked out by
// hand from fixtures/phi (three patients; see the values planted there).
import { execFileSync, spawnSync } from 'node:child_process';
import path from 'node:path';
import pg from 'pg';
import { beforeAll, describe, expect, test } from 'vitest';
import { expandInputs } from '../scripts/inputs.ts';
import { loadBatch } from '../scripts/stage.ts';
import { transformPending } from '../scripts/transform.ts';
import { failureAs, queryAs, useLogin, usePool, useTestDatabase } from './db.ts';

const db = useTestDatabase();
const loader = useLogin(db, 'healthetl_loader');
const analyst = useLogin(db, 'healthetl_analyst');
const researcher = useLogin(db, 'healthetl_researcher');
const migrator = useLogin(db, 'healthetl_owner');
const loaderPool = usePool({ url: loader });

const PHI = path.resolve('fixtures/phi');

/** Identifiers planted in fixtures/phi that neither tier may show (case-insensitive). */
const DIRECT = [
  'Zebulon',
  'Quixote',
  'Marchbanks',
  'Henrietta',
  'Vandersloot',
  'Ottoline',
  'Brackenridge',
  '123-45-6789',
  '123 45 6789',
  '987-65-4321',
  '987654321',
  'MRN-77123',
  'H-5555',
  'C-3333',
  '123-4567',
  '123.4567',
  '987-6543',
  '987 6543',
  'Example.org',
  'hvs@example.com',
  'Evergreen',
  'Main Street',
  'Rue de Rivoli',
  'Apt 9',
  'PHI-A-01',
  'PHI-B-02',
  'PHI-C-03',
  'ENC-ZQM-1',
  'N-ZQM-1',
  'T-ZQM-1',
  'Zebulon_Marchbanks',
  '03601-1234',
];
/** Also gone from deid: full dates, the 95-year-old's birth year, city, 5-digit ZIPs, free text. */
const DEID_ONLY = [
  '1931',
  '02/17',
  'Springfield',
  'New York',
  'Paris',
  '03601',
  '10001',
  '75001',
  'Fictional General',
  'Dr. Placeholder',
  'lisinopril',
  'hypertension',
  'stable',
];

async function connect(url: string): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  return c;
}

/** Every relation (outside pg_catalog and information_schema) the role may SELECT from, by name. */
async function readable(url: string): Promise<string[]> {
  const rows = await queryAs<{ name: string }>(
    url,
    `SELECT n.nspname || '.' || c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
       AND n.nspname NOT LIKE 'pg_toast%' AND has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT')
     ORDER BY 1`,
  );
  return rows.map((r) => r.name);
}

/** Every row of every relation the role can read, as JSON text, read as that role. */
async function everything(url: string): Promise<Map<string, string[]>> {
  const out = new Map<string, string[]>();
  const c = await connect(url);
  try {
    for (const rel of await readable(url)) {
      const rows = (await c.query(`SELECT row_to_json(t)::text AS j FROM ${rel} t`)).rows.map((r) => r.j as string);
      out.set(rel, rows);
    }
  } finally {
    await c.end();
  }
  return out;
}

/** Random ids and pseudonyms are hex: a planted number could turn up inside one by chance. */
function withoutIds(row: string): string {
  return row.replace(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g, '').replace(/[0-9a-f]{64}/g, '');
}

function leaks(data: Map<string, string[]>, planted: string[]): string[] {
  const found: string[] = [];
  for (const [rel, rows] of data)
    for (const p of planted) if (rows.some((r) => withoutIds(r).toLowerCase().includes(p.toLowerCase()))) found.push(`${rel}: ${p}`);
  return found;
}

beforeAll(async () => {
  await loadBatch(loader(), expandInputs([PHI], 'ndjson'), {});
  await transformPending(loaderPool());
});

describe('who can read what', () => {
  test('the loader loaded all three patients as a non-superuser login', async () => {
    const [r] = await db.query(`SELECT rolsuper FROM pg_roles WHERE rolname = $1`, [new URL(loader()).username]);
    expect(r.rolsuper).toBe(false);
    expect(await db.query(`SELECT source_patient_id FROM clinical.patients ORDER BY 1`)).toEqual([
      { source_patient_id: 'PHI-A-01' },
      { source_patient_id: 'PHI-B-02' },
      { source_patient_id: 'PHI-C-03' },
    ]);
  });

  test('an analyst can read exactly the analytics views; a researcher exactly the deid views', async () => {
    expect(await readable(analyst())).toEqual([
      'analytics.data_freshness',
      'analytics.data_quality',
      'analytics.diagnoses',
      'analytics.patients',
      'analytics.provider_notes',
      'analytics.treatments',
      'analytics.visits',
    ]);
    expect(await readable(researcher())).toEqual(['deid.diagnoses', 'deid.patients', 'deid.treatments', 'deid.visits']);
  });

  test.each([
    ['clinical.patients', 'permission denied for schema clinical'],
    ['landing.raw_documents', 'permission denied for schema landing'],
    ['etl.secret_keys', 'permission denied for schema etl'],
    ['etl.rejected_documents', 'permission denied for schema etl'],
    ['etl.batches', 'permission denied for schema etl'],
  ])('analyst and researcher: SELECT from %s is refused', async (rel, message) => {
    for (const url of [analyst(), researcher()]) expect(await failureAs(url, `SELECT * FROM ${rel} LIMIT 1`)).toContain(message);
  });

  test("each analyst role is refused the other tier's views", async () => {
    expect(await failureAs(analyst(), 'SELECT * FROM deid.patients')).toContain('permission denied for schema deid');
    expect(await failureAs(researcher(), 'SELECT * FROM analytics.patients')).toContain('permission denied for schema analytics');
  });

  test("search_path tricks do not help: an unqualified name finds nothing the role can't read", async () => {
    const c = await connect(analyst());
    try {
      await c.query('SET search_path = clinical, etl, landing, analytics');
      // patients resolves to analytics.patients (the only schema the analyst may use), not clinical's
      const cols = (await c.query('SELECT * FROM patients LIMIT 0')).fields.map((f) => f.name);
      expect(cols).toContain('patient_pseudonym');
      expect(cols).not.toContain('family_name');
      await expect(c.query('SELECT * FROM secret_keys')).rejects.toThrow(/does not exist|permission denied/);
    } finally {
      await c.end();
    }
  });

  test("analysts cannot execute the owner's functions, nor create anything anywhere (no TEMP either)", async () => {
    for (const url of [analyst(), researcher()]) {
      expect(await failureAs(url, `SELECT etl.keyed_hash('\\x00'::bytea, 'a', 'b')`)).toContain('permission denied for schema etl');
      expect(await failureAs(url, `SELECT * FROM etl.privacy_report()`)).toContain('permission denied for schema etl');
      expect(await failureAs(url, `SELECT etl.erase_patient('phi-test', 'PHI-A-01')`)).toContain('permission denied for schema etl');
      expect(await failureAs(url, 'CREATE TEMP TABLE watch (x text)')).toContain('permission denied to create temporary tables');
      expect(await failureAs(url, 'CREATE TABLE public.watch (x text)')).toContain('permission denied for schema public');
      expect(await failureAs(url, 'CREATE VIEW analytics.watch AS SELECT 1 AS x')).toContain('permission denied for schema analytics');
      expect(await failureAs(url, 'CREATE FUNCTION public.watch(text) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$')).toContain(
        'permission denied for schema public',
      );
    }
    expect(await failureAs(researcher(), 'CREATE VIEW deid.watch AS SELECT 1 AS x')).toContain('permission denied for schema deid');
  });

  test('the loader reads no clinical or landing data, and cannot call the owner-only functions', async () => {
    expect(await failureAs(loader(), 'SELECT * FROM clinical.patients LIMIT 1')).toContain('permission denied for schema clinical');
    expect(await failureAs(loader(), 'SELECT payload FROM landing.raw_documents LIMIT 1')).toContain(
      'permission denied for table raw_documents',
    );
    expect(await failureAs(loader(), 'SELECT * FROM etl.secret_keys')).toContain('permission denied for table secret_keys');
    expect(await failureAs(loader(), `SELECT * FROM etl.erase_patient('phi-test', 'PHI-A-01')`)).toContain(
      'permission denied for function',
    );
    expect(await failureAs(loader(), 'SELECT etl.rotate_pseudonym_key()')).toContain('permission denied for function');
    expect(await failureAs(loader(), `SELECT crypto.digest('x', 'sha256')`)).toContain('permission denied for schema crypto');
    expect(await failureAs(loader(), 'SELECT * FROM etl.replay_patients(ARRAY[1]::bigint[])')).toContain('permission denied for function');
    expect(await failureAs(loader(), 'SELECT * FROM analytics.patients')).toContain('permission denied for schema analytics');
    // What it does need: the bookkeeping.
    expect(await queryAs(loader(), 'SELECT count(*)::int AS n FROM etl.batch_summary')).toEqual([{ n: 1 }]);
  });

  test('the catalog: healthetl_owner owns every object; PUBLIC may execute no function and use no schema of ours', async () => {
    const notOwned = await db.query(`
      SELECT c.oid::regclass::text AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname IN ('landing', 'etl', 'clinical', 'analytics', 'dq', 'deid') AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
        AND c.relowner <> 'healthetl_owner'::regrole
      UNION ALL
      SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE n.nspname IN ('landing', 'etl', 'clinical', 'analytics', 'dq', 'deid') AND p.proowner <> 'healthetl_owner'::regrole
        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')`);
    expect(notOwned).toEqual([]);
    const publicRights = await db.query(`
      SELECT p.oid::regprocedure::text AS name FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE n.nspname IN ('landing', 'etl', 'clinical', 'analytics', 'dq', 'deid') AND has_function_privilege('public', p.oid, 'EXECUTE')
      UNION ALL
      SELECT nspname FROM pg_namespace WHERE nspname IN ('landing', 'etl', 'clinical', 'analytics', 'dq', 'deid', 'crypto')
        AND has_schema_privilege('public', oid, 'USAGE')`);
    expect(publicRights).toEqual([]);
    // A function added later by the owner is not callable by PUBLIC either (default privileges).
    const c = await connect(migrator());
    try {
      await c.query('BEGIN');
      await c.query('SET LOCAL ROLE healthetl_owner');
      await c.query(`CREATE FUNCTION analytics.later() RETURNS int LANGUAGE sql RETURN 1`);
      const [r] = (await c.query(`SELECT has_function_privilege('public', 'analytics.later()', 'EXECUTE') AS x`)).rows;
      expect(r.x).toBe(false);
      await c.query(`CREATE VIEW analytics.later_view AS SELECT 1 AS x`);
      const [v] = (await c.query(`SELECT has_table_privilege('healthetl_analyst', 'analytics.later_view', 'SELECT') AS x`)).rows;
      expect(v.x).toBe(false);
    } finally {
      await c.query('ROLLBACK');
      await c.end();
    }
  });

  test('every analyst-facing view and column has a comment', async () => {
    const missing = await db.query(`
      SELECT n.nspname || '.' || c.relname || coalesce('.' || a.attname, '') AS name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      WHERE n.nspname IN ('analytics', 'deid') AND c.relkind = 'v'
        AND (obj_description(c.oid, 'pg_class') IS NULL OR (a.attname IS NOT NULL AND col_description(c.oid, a.attnum) IS NULL))`);
    expect(missing).toEqual([]);
    const [n] = await db.query(`SELECT count(*)::int AS n FROM pg_views WHERE schemaname IN ('analytics', 'deid')`);
    expect(n.n).toBe(11);
  });

  test('a view that filters rows is a security barrier, and only those (none filters today)', async () => {
    const views = await db.query(`
      SELECT n.nspname || '.' || c.relname AS name, pg_get_viewdef(c.oid) AS def,
             coalesce(c.reloptions, '{}') @> ARRAY['security_barrier=true'] AS barrier
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname IN ('analytics', 'deid') AND c.relkind = 'v' ORDER BY 1`);
    expect(views).toHaveLength(11);
    // A WHERE of the view itself, not of a subquery in a column: parenthesised parts are cut out first.
    const topLevel = (def: string) => {
      let s = def;
      while (/\([^()]*\)/.test(s)) s = s.replace(/\([^()]*\)/g, '');
      return s;
    };
    expect(views.filter((v) => /\bWHERE\b/i.test(topLevel(v.def)) !== v.barrier).map((v) => v.name)).toEqual([]);
  });

  test('a date filter on analytics.visits still prunes partitions (the views are not security barriers)', async () => {
    // Partitions for 2023 and 2024 exist (fixtures/phi).
    const plan = (await queryAs(analyst(), `EXPLAIN SELECT count(*) FROM analytics.visits WHERE visit_date >= '2024-01-01'`))
      .map((r) => r['QUERY PLAN'])
      .join('\n');
    expect(plan).toMatch(/visits_y2024/);
    expect(plan).not.toMatch(/visits_y2023/);
  });
});

describe('nothing planted leaks into the tiers', () => {
  test('analytics (limited data set): no names, SSN, MRN, phone, email, street lines, source ids, full ZIP+4 or file names', async () => {
    const data = await everything(analyst());
    expect(data.get('analytics.patients')).toHaveLength(3);
    expect(leaks(data, DIRECT)).toEqual([]);
    // What the limited data set keeps: dates of service and birth, city, state, 5-digit ZIP.
    const [a] = await queryAs(
      analyst(),
      `SELECT p.birth_date::text, p.city, p.state, p.zip5, p.age_years FROM analytics.patients p
                                     JOIN analytics.visits v USING (patient_pseudonym) WHERE v.visit_date = '2024-05-06'`,
    );
    expect(a).toEqual({ birth_date: '1931-02-17', city: 'Springfield', state: 'NH', zip5: '03601', age_years: 95 });
    const paris = await queryAs(analyst(), `SELECT zip5 FROM analytics.patients WHERE city = 'Paris'`);
    expect(paris).toEqual([{ zip5: null }]);
  });

  test('deid (Safe Harbor): none of that, no full date, no 90+ birth year, restricted ZIP as 000, no free text', async () => {
    const data = await everything(researcher());
    expect(leaks(data, [...DIRECT, ...DEID_ONLY])).toEqual([]);
    const fullDates = [...data].flatMap(([rel, rows]) =>
      rows
        .map(withoutIds)
        .filter((r) => /\d{4}-\d{2}-\d{2}|\d{1,2}\/\d{1,2}\/\d{2,4}/.test(r))
        .map(() => rel),
    );
    expect(fullDates).toEqual([]);
    const dateColumns = await db.query(`
      SELECT table_schema || '.' || table_name || '.' || column_name AS col FROM information_schema.columns
      WHERE table_schema = 'deid' AND (data_type LIKE 'date%' OR data_type LIKE 'time%')`);
    expect(dateColumns).toEqual([]);
    expect(await queryAs(researcher(), `SELECT birth_year, age, sex, state, zip3 FROM deid.patients ORDER BY sex, age`)).toEqual([
      { birth_year: 1990, age: '36', sex: 'female', state: null, zip3: null }, // Paris: non-US, dropped
      { birth_year: 1980, age: '46', sex: 'female', state: 'NY', zip3: '100' },
      { birth_year: null, age: '90+', sex: 'male', state: 'NH', zip3: '000' }, // 95, restricted 036
    ]);
    // 92 at a visit in 2024 and 95 today: 90+, never an exact age that gives the birth year away.
    expect(
      await queryAs(researcher(), `SELECT visit_year, age_at_visit, length_of_stay_days FROM deid.visits WHERE visit_type = 'inpatient'`),
    ).toEqual([{ visit_year: 2024, age_at_visit: '90+', length_of_stay_days: 3 }]);
  });

  test('the tiers cannot be linked: research ids are not the pseudonyms, research visit ids not the visit keys', async () => {
    const pseud = (await queryAs(analyst(), 'SELECT patient_pseudonym AS id FROM analytics.patients')).map((r) => r.id);
    const research = (await queryAs(researcher(), 'SELECT research_id::text AS id FROM deid.patients')).map((r) => r.id);
    expect(pseud.filter((p) => research.includes(p))).toEqual([]);
    // Nor through the visits: deid has its own random visit ids, and no column the other tier has but the codes.
    const cols = async (schema: string) =>
      (await db.query(`SELECT DISTINCT column_name AS c FROM information_schema.columns WHERE table_schema = $1`, [schema])).map(
        (r) => r.c,
      );
    expect((await cols('deid')).filter((c) => /key|pseudonym|_id$/.test(c)).sort()).toEqual(['research_id', 'research_visit_id']);
    const visitKeys = (await queryAs(analyst(), 'SELECT visit_key::text AS k FROM analytics.visits')).map((r) => r.k);
    const researchVisits = (await queryAs(researcher(), 'SELECT research_visit_id::text AS k FROM deid.visits')).map((r) => r.k);
    expect(researchVisits).toHaveLength(visitKeys.length);
    expect(researchVisits.filter((k) => visitKeys.includes(k))).toEqual([]);
    // A researcher's visits still join their diagnoses: I10 of PHI-A-01 and E11.9 of PHI-B-02.
    expect(
      await queryAs(
        researcher(),
        `SELECT count(*)::int AS n FROM deid.diagnoses d JOIN deid.visits v USING (research_id, research_visit_id)`,
      ),
    ).toEqual([{ n: 2 }]);
    expect(pseud.every((p) => /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(p))).toBe(true);
  });
});

describe('note redaction', () => {
  test('identifiers in note text, in their usual spellings, are replaced by markers; dates of service stay', async () => {
    const notes = (await queryAs(analyst(), `SELECT note_text FROM analytics.provider_notes ORDER BY visit_date DESC`)).map(
      (r) => r.note_text,
    );
    expect(notes).toEqual([
      '[NAME] [NAME] ([MRN], DOB [DOB], born [DOB], [DOB]) seen 2024-05-06. Phone [PHONE] or [PHONE]. SSN [SSN], also [SSN]. Email [EMAIL]. mr. [NAME] is stable.',
      '[NAME] called from [PHONE] on 2024-02-01; dob [DOB], [DOB], [DOB]. Reach her at [EMAIL]. SSN [SSN]. Ms. [NAME] agrees.',
    ]);
  });

  test('etl.redact_note: one spelling each, and what it must leave alone', async () => {
    const cases: [string, string][] = [
      ['ssn 123-45-6789.', 'ssn [SSN].'],
      ['ssn 123 45 6789', 'ssn [SSN]'],
      ['call (555) 123-4567 now', 'call [PHONE] now'],
      ['call +1 555.123.4567', 'call [PHONE]'],
      ['call 1-555-123-4567', 'call [PHONE]'],
      ['mail Jane.Doe+x@Mail.Example.CO.uk today', 'mail [EMAIL] today'],
      [
        'BP 120/80, seen 2024-03-15, dose 5 mg, code E11.9, NPI 1234567893',
        'BP 120/80, seen 2024-03-15, dose 5 mg, code E11.9, NPI 1234567893',
      ],
      ['born Mar. 5th, 1980 and 5 March 1980, 03/05/1980, 1980-03-05, 19800305', 'born [DOB] and [DOB], [DOB], [DOB], [DOB]'],
      ['patient jane DOE-SMITH, not janet', 'patient [NAME] [NAME], not janet'],
      ['mrn x.1+2', 'mrn [MRN]'],
    ];
    for (const [input, want] of cases) {
      const [r] = await db.query(`SELECT etl.redact_note($1, 'x.1+2', '1980-03-05', 'Jane DOE-SMITH') AS t`, [input]);
      expect(r.t, input).toBe(want);
    }
  });
});

const hasPsql = spawnSync('psql', ['--version']).status === 0;

describe.skipIf(!hasPsql)('subject access (sql/subject_access.sql, run with psql as the migrator)', () => {
  test("one patient's rows and documents, as JSON, and nobody else's", async () => {
    const out = execFileSync(
      'psql',
      [migrator(), '-X', '-v', 'source_system=phi-test', '-v', 'patient_id=PHI-B-02', '-f', 'sql/subject_access.sql'],
      {
        encoding: 'utf8',
      },
    );
    const doc = JSON.parse(out);
    expect(doc.found).toBe(true);
    expect(doc.patient).toMatchObject({ family_name: 'Vandersloot', mrn: 'H-5555', ssn: '987-65-4321' });
    expect(doc.visits.map((v: any) => v.source_visit_id)).toEqual(['ENC-HV-1']);
    expect(doc.diagnoses.map((d: any) => d.code)).toEqual(['E11.9']);
    expect(doc.provider_notes).toHaveLength(1);
    expect(doc.documents_received.map((d: any) => d.document.patient_id)).toEqual(['PHI-B-02']);
    expect(out).not.toContain('Marchbanks');
    const none = JSON.parse(
      execFileSync('psql', [migrator(), '-X', '-v', 'source_system=phi-test', '-v', 'patient_id=nobody', '-f', 'sql/subject_access.sql'], {
        encoding: 'utf8',
      }),
    );
    expect(none).toMatchObject({ found: false, patient: null, visits: [], documents_received: [] });
  });
});

describe('pseudonyms, rotation and erasure', () => {
  let before: string[];
  beforeAll(async () => {
    before = (await db.query(`SELECT pseudonym FROM clinical.patients ORDER BY patient_key`)).map((r) => r.pseudonym);
  });

  test('the pseudonym is the keyed HMAC stored at load: the same on a replay, not any plain hash of the id', async () => {
    const [r] =
      await db.query(`SELECT count(*) FILTER (WHERE p.pseudonym = etl.keyed_uuid(k.key, p.source_system, p.source_patient_id))::int AS keyed,
                                       count(*) FILTER (WHERE p.pseudonym::text IN (left(encode(sha256(convert_to(p.source_patient_id, 'UTF8')), 'hex'), 32), md5(p.source_patient_id))
                                                  OR replace(p.pseudonym::text, '-', '') IN (left(encode(sha256(convert_to(p.source_patient_id, 'UTF8')), 'hex'), 32), md5(p.source_patient_id)))::int AS plain
                                FROM clinical.patients p CROSS JOIN etl.secret_keys k WHERE k.purpose = 'pseudonym'`);
    expect(r).toEqual({ keyed: 3, plain: 0 });
  });

  test('rotating the key changes every pseudonym at once and keeps them distinct', async () => {
    const [r] = await queryAs(migrator(), 'SELECT etl.rotate_pseudonym_key() AS n');
    expect(Number(r.n)).toBe(3);
    const after = (await db.query(`SELECT pseudonym FROM clinical.patients ORDER BY patient_key`)).map((x) => x.pseudonym);
    expect(after.filter((p, i) => p === before[i])).toEqual([]);
    expect(new Set(after).size).toBe(3);
    // Every row of every patient carries the new one (the child views read it from there).
    const stale = await db.query(`
      SELECT t.rel, bool_and(t.pseudonym = p.pseudonym) AS same FROM (
        SELECT 'visits' AS rel, c.patient_key, c.pseudonym FROM clinical.visits c
        UNION ALL SELECT 'diagnoses', c.patient_key, c.pseudonym FROM clinical.diagnoses c
        UNION ALL SELECT 'treatments', c.patient_key, c.pseudonym FROM clinical.treatments c
        UNION ALL SELECT 'provider_notes', c.patient_key, c.pseudonym FROM clinical.provider_notes c) t
      JOIN clinical.patients p ON p.patient_key = t.patient_key
      GROUP BY t.rel ORDER BY 1`);
    expect(stale).toEqual(['diagnoses', 'provider_notes', 'treatments', 'visits'].map((rel) => ({ rel, same: true })));
  });

  test('erasure leaves no trace of the patient in any table, keeps a receipt without PHI, and blocks a re-delivery', async () => {
    const [receipt] = await queryAs(migrator(), `SELECT * FROM etl.erase_patient('phi-test', 'PHI-A-01')`);
    expect({ ...receipt, erasure_id: undefined }).toEqual({ erasure_id: undefined, documents: '1', clinical_rows: '5', files: '1' });
    // Every table of every schema of ours, read whole as the superuser.
    const tables = await db.query(`SELECT c.oid::regclass::text AS rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                   WHERE n.nspname IN ('landing', 'etl', 'clinical', 'dq') AND c.relkind = 'r'`);
    const planted = ['Zebulon', 'Marchbanks', 'PHI-A-01', 'MRN-77123', '123-45-6789', '1931-02-17', 'Evergreen', 'ZQM'];
    const found: string[] = [];
    for (const { rel } of tables) {
      if (rel === 'etl.secret_keys') continue;
      const rows = await db.query(`SELECT t::text AS j FROM ${rel} t`);
      for (const p of planted) if (rows.some((x) => x.j.toLowerCase().includes(p.toLowerCase()))) found.push(`${rel}: ${p}`);
    }
    expect(found).toEqual([]);
    const [e] = await db.query(`SELECT erased_by, documents::int, lifted_at FROM etl.erasures`);
    expect(e).toEqual({ erased_by: new URL(migrator()).username, documents: 1, lifted_at: null });
    expect(await queryAs(analyst(), `SELECT count(*)::int AS n FROM analytics.patients`)).toEqual([{ n: 2 }]);
    // A rotation of the pseudonym key does not lift it (the erasure key is another, never rotated).
    expect(await queryAs(migrator(), 'SELECT etl.rotate_pseudonym_key()::int AS n')).toEqual([{ n: 2 }]);

    // A later, newer document of the same patient (other bytes, another file) is counted erased.
    const { mkdtemp, writeFile } = await import('node:fs/promises');
    const os = await import('node:os');
    const dir = await mkdtemp(path.join(os.tmpdir(), 'healthetl-phi-'));
    const doc = JSON.parse((await import('node:fs')).readFileSync(path.join(PHI, 'Zebulon_Marchbanks.json'), 'utf8'));
    doc.updated_at = '2025-01-01T00:00:00Z';
    await writeFile(path.join(dir, 'again.json'), JSON.stringify(doc));
    const r = await loadBatch(loader(), expandInputs([dir], 'ndjson'), {});
    await transformPending(loaderPool());
    const [s] = await db.query(`SELECT received::int, loaded::int, erased::int, balanced FROM etl.batch_summary WHERE batch_id = $1`, [
      r.batchId,
    ]);
    expect(s).toEqual({ received: 1, loaded: 0, erased: 1, balanced: true });
    expect(await db.query(`SELECT count(*)::int AS n FROM clinical.patients WHERE source_patient_id = 'PHI-A-01'`)).toEqual([{ n: 0 }]);
    expect(await db.query(`SELECT payload IS NULL AS gone FROM landing.raw_documents WHERE batch_id = $1`, [r.batchId])).toEqual([
      { gone: true },
    ]);

    // Lifted on purpose, the next delivery loads.
    expect(await queryAs(migrator(), `SELECT etl.lift_erasure('phi-test', 'PHI-A-01') AS n`)).toEqual([{ n: '1' }]);
    doc.updated_at = '2025-02-01T00:00:00Z';
    await writeFile(path.join(dir, 'again.json'), JSON.stringify(doc));
    await loadBatch(loader(), expandInputs([dir], 'ndjson'), {});
    await transformPending(loaderPool());
    expect(await db.query(`SELECT count(*)::int AS n FROM clinical.patients WHERE source_patient_id = 'PHI-A-01'`)).toEqual([{ n: 1 }]);
  });
});
