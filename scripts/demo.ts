// What `healthetl demo` shows after loading fixtures/: table counts, the batch's books, a few rows.
import { z } from 'zod';
import { createDbPool, describeTarget, sql } from './db.ts';
import { EXIT, UserError } from './errors.ts';
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
const VisitRow = z.object({
  source_patient_id: z.string(),
  visit_date: z.string(),
  visit_type: z.string().nullable(),
  diagnoses: z.string().nullable(),
  treatments: z.string().nullable(),
});

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
        `\nThis run (batch ${b.batch_id}): received ${b.received} = loaded ${b.loaded} + rejected ${b.rejected} + duplicate ${b.duplicate} + superseded ${b.superseded}${b.staged ? ` + staged ${b.staged}` : ''}`,
      );
      if (b.duplicate === b.received) print('  (everything was loaded by an earlier demo run: re-delivered documents change nothing)');
    }

    // Only synthetic fixtures are shown here; analysts get masked views, never these tables.
    const visits = await pool.any(sql.type(VisitRow)`
      SELECT p.source_patient_id, v.visit_date::text AS visit_date, v.visit_type,
             (SELECT string_agg(d.code, ', ' ORDER BY d.position) FROM clinical.diagnoses d
               WHERE d.patient_key = v.patient_key AND d.visit_key = v.visit_key) AS diagnoses,
             (SELECT string_agg(t.name, ', ' ORDER BY t.position) FROM clinical.treatments t
               WHERE t.patient_key = v.patient_key AND t.visit_key = v.visit_key) AS treatments
      FROM clinical.visits v JOIN clinical.patients p USING (patient_key)
      WHERE v.patient_key IN (${demoPatients})
      ORDER BY v.visit_date DESC LIMIT 5`);
    print('\nLatest visits (synthetic fixtures)');
    for (const v of visits) {
      print(
        `  ${v.visit_date}  ${v.source_patient_id.padEnd(8)} ${(v.visit_type ?? '-').padEnd(11)} dx: ${v.diagnoses ?? '-'}  rx: ${v.treatments ?? '-'}`,
      );
    }
    print('\nReasons for rejects: SELECT field, reason FROM etl.rejected_documents ORDER BY document_id;');
  } finally {
    await pool.end();
  }
}
