// What `healthetl demo` shows after loading fixtures/: table counts, the batch's books, a few rows.
import { z } from 'zod';
import { createDbPool, sql } from './db.ts';
import { batchSummaries } from './status.ts';

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
    const counts = await pool.any(sql.type(Count)`
      SELECT t.table_name, t.row_count FROM (VALUES
        ('clinical.patients', (SELECT count(*) FROM clinical.patients)),
        ('clinical.visits', (SELECT count(*) FROM clinical.visits)),
        ('clinical.diagnoses', (SELECT count(*) FROM clinical.diagnoses)),
        ('clinical.treatments', (SELECT count(*) FROM clinical.treatments)),
        ('clinical.provider_notes', (SELECT count(*) FROM clinical.provider_notes)),
        ('etl.rejected_documents', (SELECT count(*) FROM etl.rejected_documents)),
        ('etl.document_problems', (SELECT count(*) FROM etl.document_problems))
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
