// What `healthetl demo` shows after loading fixtures/: table counts, the batch's books, a few rows.
import { z } from 'zod';
import { createDbPool, describeTarget, sql } from './db.ts';
import { EXIT, UserError } from './errors.ts';
import { visible } from './log.ts';
import { batchSummaries } from './status.ts';

/** How etl.batches.loader marks the demo's batches (stage.ts: `healthetl demo on <host> (pid N)`). */
const DEMO_LOADER = 'healthetl demo on %';

/**
 * Where the demo writes: only a database named with its own --database-url; otherwise (undefined)
 * its own embedded server, whatever DATABASE_URL and the PG* variables say.
 */
export function demoTarget(databaseUrlOption: string | undefined): string | undefined {
  return databaseUrlOption || undefined;
}

/**
 * Refuses (exit 2) a database that holds anything but the demo's own data: the demo writes only
 * into one without healthetl's schema yet, or one whose every batch is a demo batch.
 */
export async function checkDemoTarget(url: string): Promise<void> {
  const pool = await createDbPool(url, 1);
  try {
    const state = await pool.one(sql.type(z.object({ schemas: z.coerce.number(), batches: z.boolean() }))`
      SELECT (SELECT count(*) FROM pg_namespace WHERE nspname IN ('landing', 'etl', 'clinical', 'analytics', 'dq')) AS schemas,
             to_regclass('etl.batches') IS NOT NULL AS batches`);
    if (state.schemas === 0) return;
    const others = state.batches
      ? await pool.oneFirst(sql.type(z.object({ n: z.coerce.number() }))`
          SELECT count(*) AS n FROM etl.batches WHERE loader IS NULL OR loader NOT LIKE ${DEMO_LOADER}`)
      : 1;
    if (others > 0) {
      throw new UserError(
        `the demo writes only into a database without healthetl's schema or with demo data only, and ${describeTarget(url)} holds ${state.batches ? `${others} batch(es) the demo did not load` : "part of healthetl's schema"}: run "healthetl demo" without --database-url (it starts its own server) or name an empty database`,
        EXIT.USAGE,
      );
    }
  } finally {
    await pool.end();
  }
}

const Count = z.object({ table_name: z.string(), row_count: z.coerce.number() });
const AnalystVisit = z.object({
  patient_pseudonym: z.string().nullable(),
  visit_date: z.string(),
  visit_type: z.string().nullable(),
  age_at_visit: z.coerce.number().nullable(),
});
const AnalystNote = z.object({ patient_pseudonym: z.string().nullable(), visit_date: z.string(), note_text: z.string() });

/** The role whose view the demo ends with (migrations/0009: it reads the analytics views only). */
const ANALYST = 'healthetl_analyst';

/** What etl.redact_note puts in place of an identifier. */
const REDACTION_MARKER = String.raw`\[(NAME|MRN|DOB|SSN|PHONE|EMAIL)\]`;

/** A pseudonym is a uuid (128 bits of a keyed hash): its first 12 characters are enough to tell the demo's patients apart. */
const shortPseudonym = (p: string | null) => (p ? `${p.slice(0, 12)}…` : '-');

/** A note for one line of the summary: control characters visible, at most 160 characters. */
const oneNoteLine = (t: string) => {
  const v = visible(t);
  return v.length > 160 ? `${v.slice(0, 159)}…` : v;
};

export async function showDemo(url: string, batchId: number, print: (text: string) => void): Promise<void> {
  const pool = await createDbPool(url, 1);
  try {
    // Only what the demo loaded: patients whose current document came in a demo batch.
    const demoBatches = sql.fragment`SELECT b.batch_id FROM etl.batches b WHERE b.loader LIKE ${DEMO_LOADER}`;
    const demoPatients = sql.fragment`
      SELECT p.patient_key FROM clinical.patients p JOIN landing.raw_documents d ON d.document_id = p.document_id
      WHERE d.batch_id IN (${demoBatches})`;
    const counts = await pool.any(sql.type(Count)`
      SELECT t.table_name, t.row_count FROM (VALUES
        ('clinical.patients', (SELECT count(*) FROM (${demoPatients}) x)),
        ('clinical.visits', (SELECT count(*) FROM clinical.visits WHERE patient_key IN (${demoPatients}))),
        ('clinical.diagnoses', (SELECT count(*) FROM clinical.diagnoses WHERE patient_key IN (${demoPatients}))),
        ('clinical.treatments', (SELECT count(*) FROM clinical.treatments WHERE patient_key IN (${demoPatients}))),
        ('clinical.provider_notes', (SELECT count(*) FROM clinical.provider_notes WHERE patient_key IN (${demoPatients}))),
        ('etl.rejected_documents', (SELECT count(*) FROM etl.rejected_documents WHERE batch_id IN (${demoBatches}))),
        ('etl.document_problems', (SELECT count(*) FROM etl.document_problems WHERE batch_id IN (${demoBatches})))
      ) AS t(table_name, row_count)`);
    print('\nTable counts');
    for (const c of counts) print(`  ${c.table_name.padEnd(26)} ${String(c.row_count).padStart(6)}`);

    const [b] = await batchSummaries(pool, { batchId });
    if (b) {
      print(
        `\nThis run (batch ${b.batch_id}): received ${b.received} = loaded ${b.loaded} + rejected ${b.rejected} + duplicate ${b.duplicate} + superseded ${b.superseded} + erased ${b.erased}${b.staged ? ` + staged ${b.staged}` : ''}`,
      );
      if (b.duplicate === b.received) print('  (everything was loaded by an earlier demo run: re-delivered documents change nothing)');
    }

    // What an analyst gets: the masked analytics views, read under the analyst's role, never the
    // clinical tables (which hold names and ids). Which patients are the demo's is known only from
    // the tables the analyst may not read, so their pseudonyms are looked up first, as the demo's
    // own login, and passed in.
    const pseudonyms = await pool.anyFirst(sql.type(z.object({ pseudonym: z.string() }))`
      SELECT p.pseudonym FROM clinical.patients p WHERE p.patient_key IN (${demoPatients})`);
    print(`\nAs an analyst sees them (analytics views, role ${ANALYST})`);
    const mayAct = await pool.oneFirst(sql.type(z.object({ ok: z.boolean() }))`SELECT pg_has_role(${ANALYST}, 'MEMBER') AS ok`);
    if (!mayAct) {
      print(`  (not shown: this login is not a member of ${ANALYST}, so it may not SET ROLE to it)`);
    } else {
      const { visits, note } = await pool.transaction(async (tx) => {
        await tx.query(sql.unsafe`SET LOCAL ROLE ${sql.identifier([ANALYST])}`);
        const among = sql.fragment`patient_pseudonym = ANY (${sql.array([...pseudonyms], 'uuid')})`;
        return {
          visits: await tx.any(sql.type(AnalystVisit)`
            SELECT patient_pseudonym, visit_date::text AS visit_date, visit_type, age_at_visit
            FROM analytics.visits WHERE ${among}
            ORDER BY visit_date DESC, visit_key DESC LIMIT 5`),
          // One whose redaction shows, if any: a marker in place of a name, an MRN, a date of birth...
          note: await tx.maybeOne(sql.type(AnalystNote)`
            SELECT patient_pseudonym, visit_date::text AS visit_date, note_text
            FROM analytics.provider_notes WHERE ${among} AND note_text IS NOT NULL
            ORDER BY note_text ~ ${REDACTION_MARKER} DESC, visit_date DESC, visit_key, position LIMIT 1`),
        };
      });
      print('Latest visits (synthetic fixtures)');
      print(`  ${'visit date'.padEnd(11)} ${'patient (pseudonym)'.padEnd(20)} ${'type'.padEnd(11)} age`);
      for (const v of visits) {
        print(
          `  ${v.visit_date.padEnd(11)} ${shortPseudonym(v.patient_pseudonym).padEnd(20)} ${(v.visit_type ?? '-').padEnd(11)} ${v.age_at_visit ?? '-'}`,
        );
      }
      if (note) {
        print('A provider note, redacted when it was loaded');
        print(`  ${note.visit_date.padEnd(11)} ${shortPseudonym(note.patient_pseudonym).padEnd(20)} ${oneNoteLine(note.note_text)}`);
      }
    }
    print('\nReasons for rejects: SELECT field, reason FROM etl.rejected_documents ORDER BY document_id;');
  } finally {
    await pool.end();
  }
}
