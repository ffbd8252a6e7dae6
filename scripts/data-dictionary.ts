// `npm run data-dictionary [-- --check]`: docs/data-dictionary.md, generated from the catalog of a
// migrated database: every view of the analyst-facing schemas (analytics, deid) with its COMMENT,
// and each column's name, type and COMMENT. DATABASE_URL (or --database-url) names the database;
// it is only read. --check writes nothing and exits 1 when the file differs from what the catalog
// gives. test/data-dictionary.test.ts holds the committed file to the migrations (CI runs it on
// PostgreSQL 15 and 18, so the text is the same on both: types by format_type, order by a JS
// comparator, never the database collation).
import { realpathSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import pg from 'pg';

export const DICTIONARY_PATH = fileURLToPath(new URL('../docs/data-dictionary.md', import.meta.url));

/** The analyst-facing schemas, in the order the dictionary shows them, with who reads each. */
export const TIERS = [
  { schema: 'analytics', login: 'bi_reader', role: 'healthetl_analyst', tier: 'HIPAA limited data set' },
  { schema: 'deid', login: 'research_reader', role: 'healthetl_researcher', tier: 'HIPAA Safe Harbor' },
] as const;

export type DictionaryColumn = { name: string; type: string; comment: string | null };
export type DictionaryView = { schema: string; name: string; comment: string | null; columns: DictionaryColumn[] };

const VIEWS = `
  SELECT n.nspname AS schema, c.relname AS name, obj_description(c.oid, 'pg_class') AS comment,
         coalesce((SELECT json_agg(json_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
                                                     'comment', col_description(c.oid, a.attnum)) ORDER BY a.attnum)
                   FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]') AS columns
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = ANY($1) AND c.relkind = 'v'`;

/** Code-unit order: the same on every server and locale (ORDER BY follows the database collation). */
const byText = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

/** Every view in analytics and deid, by schema (as in TIERS) then name, its columns in column order. */
export async function readDictionary(url: string): Promise<DictionaryView[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const schemas: string[] = TIERS.map((t) => t.schema);
    const { rows } = await client.query<DictionaryView>(VIEWS, [schemas]);
    return rows.sort((a, b) => schemas.indexOf(a.schema) - schemas.indexOf(b.schema) || byText(a.name, b.name));
  } finally {
    await client.end();
  }
}

/** The views and columns whose COMMENT is missing or blank, as `schema.view` or `schema.view.column`. */
export function missingComments(views: DictionaryView[]): string[] {
  const blank = (s: string | null) => s === null || s.trim() === '';
  return views.flatMap((v) => [
    ...(blank(v.comment) ? [`${v.schema}.${v.name}`] : []),
    ...v.columns.filter((c) => blank(c.comment)).map((c) => `${v.schema}.${v.name}.${c.name}`),
  ]);
}

/** One line of a Markdown table cell: `|` escaped, line breaks and runs of blanks made one space. */
const cell = (s: string | null) => (s ?? '').replace(/\s+/g, ' ').trim().replaceAll('|', '\\|');

export function renderViews(views: DictionaryView[]): string {
  const out: string[] = [
    '# Data dictionary',
    '',
    'Generated from the catalog of a migrated database by `npm run data-dictionary`: do not edit by hand. ' +
      TIERS.map((t) => `\`${t.schema}\` is read by \`${t.login}\` (role \`${t.role}\`, ${t.tier})`).join('; ') +
      '.',
  ];
  for (const t of TIERS) {
    out.push('', `## ${t.schema}`, '', `${t.tier}; read by \`${t.login}\` (role \`${t.role}\`).`);
    for (const v of views.filter((v) => v.schema === t.schema)) {
      out.push('', `### ${v.schema}.${v.name}`, '');
      out.push(v.comment?.trim() ? v.comment.trim() : '*(no comment)*', '');
      out.push('| column | type | meaning |', '| --- | --- | --- |');
      for (const c of v.columns) out.push(`| ${cell(c.name)} | ${cell(c.type)} | ${cell(c.comment)} |`);
    }
  }
  return `${out.map((l) => l.replace(/\s+$/, '')).join('\n')}\n`;
}

/** docs/data-dictionary.md as the migrated database at url gives it. */
export async function renderDataDictionary(url: string): Promise<string> {
  return renderViews(await readDictionary(url));
}

// ---------------------------------------------------------------------------------------------
// CLI: data-dictionary.ts [--database-url URL] [--check]

const USAGE = 'usage: data-dictionary.ts [--database-url URL] [--check]   (or DATABASE_URL of a migrated database)';

async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      'database-url': { type: 'string' },
      check: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const url = values['database-url'] ?? process.env.DATABASE_URL;
  if (!url) {
    console.error(`no database: set DATABASE_URL or pass --database-url\n${USAGE}`);
    return 2;
  }
  const text = await renderDataDictionary(url);
  const current = await readFile(DICTIONARY_PATH, 'utf8').catch(() => null);
  if (values.check) {
    if (current === text) {
      console.log(`${DICTIONARY_PATH} is up to date`);
      return 0;
    }
    console.error(
      `${DICTIONARY_PATH} is ${current === null ? 'missing' : 'stale'}: it differs from the catalog; ` +
        'regenerate it with `DATABASE_URL=<a migrated database> npm run data-dictionary` and commit it',
    );
    return 1;
  }
  if (current === text) console.log(`${DICTIONARY_PATH} is up to date`);
  else {
    await writeFile(DICTIONARY_PATH, text);
    console.log(`wrote ${DICTIONARY_PATH}`);
  }
  return 0;
}

function isMain(): boolean {
  try {
    return !!process.argv[1] && import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href;
  } catch {
    return false;
  }
}
if (isMain()) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (e: unknown) => {
      console.error(e instanceof Error ? e.message : e);
      process.exitCode = 1;
    },
  );
}
