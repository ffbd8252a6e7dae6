// The catalog of the healthetl schemas, read without OIDs (catalogSnapshot), and rendered as one
// stable, reviewable text (renderSchema) for test/__snapshots__/schema.sql. Used by
// test/migrations.test.ts (up/down/up gives the same catalog) and test/schema-snapshot.test.ts.
import pg from 'pg';

export const SCHEMAS = ['landing', 'etl', 'clinical', 'analytics', 'dq', 'deid', 'crypto'];

export type Catalog = Record<string, any[]>;

/**
 * The privileges in effect (the ACL, or the default one when it is NULL), without the owner's own
 * entries or the grantor (both are role names of the environment); '' when only the owner has any.
 * An explicit ACL equal to the default reads the same as NULL: they mean the same.
 */
function grants(acl: string, owner: string, kind: string): string {
  return `coalesce((
            SELECT string_agg(g, ', ' ORDER BY g) FROM (
              SELECT CASE e.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(e.grantee) END || ' ' || e.privilege_type
                     || CASE WHEN e.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END AS g
              FROM aclexplode(coalesce(${acl}, acldefault(${kind}, ${owner}))) e WHERE e.grantee <> ${owner}) x), '')`;
}

const QUERIES: Record<string, string> = {
  schemas: `
    SELECT n.nspname, obj_description(n.oid, 'pg_namespace') AS comment, ${grants('n.nspacl', 'n.nspowner', `'n'`)} AS grants
    FROM pg_namespace n WHERE n.nspname = ANY($1) ORDER BY 1`,
  relations: `
    SELECT n.nspname, c.relname, c.relkind, c.relpersistence, c.relispartition,
           pg_get_partkeydef(c.oid) AS partition_key, pg_get_expr(c.relpartbound, c.oid) AS partition_bound,
           c.reloptions, ${grants('c.relacl', 'c.relowner', `CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char"`)} AS grants, obj_description(c.oid, 'pg_class') AS comment
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = ANY($1) ORDER BY 1, 2`,
  columns: `
    SELECT n.nspname, c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type,
           a.attnotnull, pg_get_expr(d.adbin, d.adrelid) AS default_expr, a.attidentity, a.attgenerated,
           a.attcompression, col_description(c.oid, a.attnum) AS comment
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE n.nspname = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY 1, 2, 3`,
  indexes: `
    SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes
    WHERE schemaname = ANY($1) ORDER BY 1, 2, 3`,
  // A domain's constraints are named by the domain (relname is the table's or the domain's name).
  constraints: `
    SELECT n.nspname, coalesce(c.relname, t.typname, '-') AS relname, co.conname, co.contype,
           pg_get_constraintdef(co.oid) AS definition, co.condeferrable, co.condeferred
    FROM pg_constraint co
    JOIN pg_namespace n ON n.oid = co.connamespace
    LEFT JOIN pg_class c ON c.oid = co.conrelid
    LEFT JOIN pg_type t ON t.oid = co.contypid
    WHERE n.nspname = ANY($1) ORDER BY 1, 2, 3`,
  functions: `
    SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid) AS args, p.prokind,
           pg_get_functiondef(p.oid) AS definition, obj_description(p.oid, 'pg_proc') AS comment,
           ${grants('p.proacl', 'p.proowner', `'f'`)} AS grants
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = ANY($1) AND p.prokind <> 'a'
      -- an extension's functions (pgcrypto's, in crypto) are its own; its presence is in pg_extension
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
    ORDER BY 1, 2, 3`,
  views: `
    SELECT schemaname, viewname, definition FROM pg_views
    WHERE schemaname = ANY($1) ORDER BY 1, 2`,
  sequences: `
    SELECT schemaname, sequencename, data_type::text, start_value, min_value, max_value, increment_by, cycle, cache_size
    FROM pg_sequences WHERE schemaname = ANY($1) ORDER BY 1, 2`,
  triggers: `
    SELECT n.nspname, c.relname, t.tgname, pg_get_triggerdef(t.oid) AS definition
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = ANY($1) AND NOT t.tgisinternal ORDER BY 1, 2, 3`,
  types: `
    SELECT n.nspname, t.typname, t.typtype, format_type(t.oid, NULL) AS formatted,
           format_type(t.typbasetype, t.typtypmod) AS base_type, t.typnotnull, t.typdefault,
           pg_catalog.array_to_string(ARRAY(SELECT e.enumlabel FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder), ',') AS labels,
           obj_description(t.oid, 'pg_type') AS comment
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = ANY($1) AND t.typtype IN ('e', 'd', 'r', 'm') ORDER BY 1, 2`,
};

/** Everything the migrations define in the five schemas, without OIDs. */
export async function catalogSnapshot(url: string): Promise<Catalog> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    const out: Catalog = {};
    for (const [k, q] of Object.entries(QUERIES)) out[k] = (await c.query(q, [SCHEMAS])).rows;
    out.views = out.views.map((v) => ({ ...v, definition: unqualifySingleRelation(v.definition) }));
    return out;
  } finally {
    await c.end();
  }
}

/**
 * A view over one relation is printed with its columns qualified by the alias on PostgreSQL 15
 * (`SELECT d.code ... FROM clinical.diagnoses d`) and without on 16 and later (`SELECT code ...`):
 * the same view either way, so the alias is taken off. Views with more than one relation (a JOIN,
 * a comma, a subquery) are left as they are.
 */
export function unqualifySingleRelation(def: string): string {
  const from = [...def.matchAll(/\b(?:FROM|JOIN)\s+([\w.]+)\s+(\w+)/g)];
  if (from.length !== 1 || /\bJOIN\b|\(\s*SELECT\b/i.test(def) || /FROM\s+[\w.]+\s+\w+\s*,/.test(def)) return def;
  const alias = from[0][2];
  return def.replace(new RegExp(`\\b${alias}\\.`, 'g'), '');
}

// ---- rendering ------------------------------------------------------------------------------

/** Code-unit order: the same on every server and locale (ORDER BY follows the database collation). */
const byText = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
const literal = (s: string) => `'${s.replaceAll("'", "''")}'`;
const trimEnd = (s: string) => s.replace(/\s+$/, '');

function groupBy(rows: any[], key: (r: any) => string): Map<string, any[]> {
  const m = new Map<string, any[]>();
  for (const r of rows) m.set(key(r), [...(m.get(key(r)) ?? []), r]);
  return m;
}

function columnLine(col: any): string {
  const parts = [col.attname, col.type];
  if (col.attgenerated === 's') parts.push(`GENERATED ALWAYS AS (${col.default_expr}) STORED`);
  else if (col.default_expr !== null) parts.push(`DEFAULT ${col.default_expr}`);
  if (col.attidentity) parts.push(`GENERATED ${col.attidentity === 'a' ? 'ALWAYS' : 'BY DEFAULT'} AS IDENTITY`);
  if (col.attnotnull) parts.push('NOT NULL');
  return parts.join(' ');
}

function grantLines(kind: string, name: string, grants: string | null): string[] {
  if (grants === null) return [];
  return [`-- grants on ${kind} ${name} (besides its owner): ${grants || 'none'}`];
}

const RELKIND: Record<string, string> = {
  r: 'TABLE',
  p: 'TABLE',
  f: 'FOREIGN TABLE',
  v: 'VIEW',
  m: 'MATERIALIZED VIEW',
  S: 'SEQUENCE',
  c: 'TYPE',
  i: 'INDEX',
  I: 'INDEX',
};

/**
 * The catalog as one text, schema by schema, each object by name: schemas, types, tables with
 * their columns, constraints, indexes, triggers and comments, sequences, views and functions.
 * Left out: partitions (relispartition: the yearly visits partitions are made at run time) and
 * everything on them; NOT NULL constraints as catalog rows (PostgreSQL 18 keeps them in
 * pg_constraint, 15 does not; the column lines say NOT NULL on both); column compression (lz4
 * is set only where the server is built with it: test/schema-snapshot.test.ts asserts it apart);
 * owners and grantors. So the text is the same on PostgreSQL 15 and 18.
 */
export function renderSchema(cat: Catalog): string {
  const q = (schema: string, name: string) => `${schema}.${name}`;
  const partitions = new Set(cat.relations.filter((r) => r.relispartition).map((r) => q(r.nspname, r.relname)));
  const keep = (schema: string, rel: string) => !partitions.has(q(schema, rel));
  const columns = groupBy(
    cat.columns.filter((c) => keep(c.nspname, c.relname)),
    (c) => q(c.nspname, c.relname),
  );
  const constraints = groupBy(
    cat.constraints.filter((c) => c.contype !== 'n' && keep(c.nspname, c.relname)),
    (c) => q(c.nspname, c.relname),
  );
  const indexes = groupBy(
    cat.indexes.filter((i) => keep(i.schemaname, i.tablename)),
    (i) => q(i.schemaname, i.tablename),
  );
  const triggers = groupBy(
    cat.triggers.filter((t) => keep(t.nspname, t.relname)),
    (t) => q(t.nspname, t.relname),
  );
  const views = new Map(cat.views.map((v) => [q(v.schemaname, v.viewname), v]));
  const sequences = new Map(cat.sequences.map((s) => [q(s.schemaname, s.sequencename), s]));
  const relComments = new Map(
    cat.relations.filter((r) => r.comment !== null && keep(r.nspname, r.relname)).map((r) => [q(r.nspname, r.relname), r]),
  );
  const sorted = <T>(rows: T[], key: (r: T) => string) => [...rows].sort((a, b) => byText(key(a), key(b)));

  const out: string[] = [
    '-- The catalog of the healthetl schemas after all migrations, rendered by test/schema-snapshot.test.ts.',
    '-- Generated: do not edit. A migration that changes the schema regenerates it (README, "Tests").',
    '-- The same on PostgreSQL 15 and 18. For review, not for running: partitions, owners, OIDs and',
    '-- column compression are left out; index lines include those behind primary and unique keys.',
  ];
  const section = (title: string) => out.push('', `-- ==== ${title} ${'='.repeat(Math.max(4, 90 - title.length))}`);
  const block = (...lines: string[]) => out.push('', ...lines);

  const constraintLine = (c: any) =>
    `CONSTRAINT ${c.conname} ${c.definition}${c.condeferrable ? ` DEFERRABLE INITIALLY ${c.condeferred ? 'DEFERRED' : 'IMMEDIATE'}` : ''}`;
  const relationTail = (name: string, kind: string) => {
    const lines: string[] = [];
    for (const i of sorted(indexes.get(name) ?? [], (i) => i.indexname)) {
      lines.push(`${i.indexdef};`);
      const ic = relComments.get(q(i.schemaname, i.indexname));
      if (ic) lines.push(`COMMENT ON INDEX ${q(i.schemaname, i.indexname)} IS ${literal(ic.comment)};`);
    }
    for (const t of sorted(triggers.get(name) ?? [], (t) => t.tgname)) lines.push(`${t.definition};`);
    const rc = relComments.get(name);
    if (rc) lines.push(`COMMENT ON ${kind} ${name} IS ${literal(rc.comment)};`);
    for (const c of columns.get(name) ?? []) {
      if (c.comment !== null) lines.push(`COMMENT ON COLUMN ${name}.${c.attname} IS ${literal(c.comment)};`);
    }
    return lines;
  };

  for (const s of sorted(cat.schemas, (s) => s.nspname)) {
    const schema = s.nspname;
    section(`schema ${schema}`);
    block(`CREATE SCHEMA ${schema};`);
    if (s.comment !== null) out.push(`COMMENT ON SCHEMA ${schema} IS ${literal(s.comment)};`);
    out.push(...grantLines('schema', schema, s.grants));

    for (const t of sorted(
      cat.types.filter((t) => t.nspname === schema),
      (t) => t.typname,
    )) {
      const name = q(schema, t.typname);
      if (t.typtype === 'e') {
        block(`CREATE TYPE ${name} AS ENUM (${t.labels.split(',').map(literal).join(', ')});`);
      } else if (t.typtype === 'd') {
        const parts = [`CREATE DOMAIN ${name} AS ${t.base_type}`];
        if (t.typdefault !== null) parts.push(`DEFAULT ${t.typdefault}`);
        if (t.typnotnull) parts.push('NOT NULL');
        for (const c of sorted(constraints.get(name) ?? [], (c) => c.conname)) parts.push(constraintLine(c));
        block(`${parts.join('\n  ')};`);
      } else {
        block(`-- type ${name} (${t.typtype === 'r' ? 'range' : 'multirange'}): ${t.formatted}`);
      }
      if (t.comment !== null) out.push(`COMMENT ON TYPE ${name} IS ${literal(t.comment)};`);
    }

    const rels = sorted(
      cat.relations.filter((r) => r.nspname === schema && !r.relispartition && !['i', 'I'].includes(r.relkind)),
      (r) => r.relname,
    );
    // Composite types, then tables, sequences, views; by name within each (the sort is stable).
    const rank: Record<string, number> = { c: 0, r: 1, p: 1, f: 1, S: 2, v: 3, m: 3 };
    for (const r of [...rels].sort((a, b) => (rank[a.relkind] ?? 4) - (rank[b.relkind] ?? 4))) {
      const name = q(schema, r.relname);
      const kind = RELKIND[r.relkind] ?? `relkind ${r.relkind}`;
      if (r.relkind === 'S') {
        const sq = sequences.get(name);
        block(
          sq
            ? `CREATE SEQUENCE ${name} AS ${sq.data_type} START ${sq.start_value} INCREMENT ${sq.increment_by} ` +
                `MINVALUE ${sq.min_value} MAXVALUE ${sq.max_value} CACHE ${sq.cache_size}${sq.cycle ? ' CYCLE' : ''};`
            : `CREATE SEQUENCE ${name};`,
        );
      } else if (r.relkind === 'v' || r.relkind === 'm') {
        const v = views.get(name);
        const cols = (columns.get(name) ?? []).map((c) => `--   ${c.attname} ${c.type}`);
        block(`-- ${kind.toLowerCase()} ${name} columns:`, ...cols);
        out.push(`CREATE ${kind} ${name} AS`, trimEnd(v ? v.definition : '-- (definition not in pg_views)'));
      } else {
        const body = [
          ...(columns.get(name) ?? []).map(columnLine),
          ...sorted(constraints.get(name) ?? [], (c) => c.conname).map(constraintLine),
        ];
        const unlogged = r.relpersistence === 'u' ? 'UNLOGGED ' : '';
        const tail = [
          r.partition_key ? ` PARTITION BY ${r.partition_key}` : '',
          r.reloptions ? ` WITH (${r.reloptions.join(', ')})` : '',
        ].join('');
        block(
          `CREATE ${unlogged}${r.relkind === 'c' ? 'TYPE' : kind} ${name}${r.relkind === 'c' ? ' AS' : ''} (`,
          ...body.map((l, i) => `  ${l}${i < body.length - 1 ? ',' : ''}`),
          `)${tail};`,
        );
      }
      out.push(...relationTail(name, kind), ...grantLines(kind.toLowerCase(), name, r.grants));
    }

    for (const f of sorted(
      cat.functions.filter((f) => f.nspname === schema),
      (f) => `${f.proname}(${f.args})`,
    )) {
      const name = `${q(schema, f.proname)}(${f.args})`;
      const kind = f.prokind === 'p' ? 'PROCEDURE' : 'FUNCTION';
      block(`${trimEnd(f.definition)};`);
      if (f.comment !== null) out.push(`COMMENT ON ${kind} ${name} IS ${literal(f.comment)};`);
      out.push(...grantLines(kind.toLowerCase(), name, f.grants));
    }
  }
  return `${out.map(trimEnd).join('\n')}\n`;
}
