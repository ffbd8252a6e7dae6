// Replay and retention in the database (migration 0007): etl.replay_patients re-derives clinical
// rows from the current snapshots under today's rules; etl.purge drops what nothing needs.
import path from 'node:path';
import { beforeAll, describe, expect, test } from 'vitest';
import { expandInputs } from '../scripts/inputs.ts';
import { replay as replayAll } from '../scripts/maintenance.ts';
import { loadBatch } from '../scripts/stage.ts';
import { transformPending } from '../scripts/transform.ts';
import { usePool, useTestDatabase } from './db.ts';

const db = useTestDatabase();
const pool = usePool(db);

const FIX = path.resolve('fixtures');

async function run(...files: string[]): Promise<number> {
  const r = await loadBatch(db.url(), expandInputs(files.map((f) => path.join(FIX, f))));
  await transformPending(pool());
  return r.batchId;
}

/** Every clinical row by its natural keys, without surrogate keys or load times: what a fresh load gives. */
async function clinicalRows(): Promise<Record<string, unknown[]>> {
  const q = (sql: string) => db.query(sql);
  return {
    patients: await q(`SELECT source_system, source_patient_id, mrn, ssn, name_prefix, given_name, family_name, name_suffix,
                              birth_date::text, sex, phone, email, address_lines, city, state, postal_code, country,
                              source_updated_at::text, document_id::int, batch_id::int
                       FROM clinical.patients ORDER BY 1, 2`),
    visits: await q(`SELECT p.source_system, p.source_patient_id, v.source_visit_id, v.visit_date::text, v.visit_start::text,
                            v.discharge_date::text, v.visit_type, v.facility_id, v.facility_name, v.provider_npi, v.provider_name, v.position
                     FROM clinical.visits v JOIN clinical.patients p USING (patient_key) ORDER BY 1, 2, 3`),
    diagnoses: await q(`SELECT p.source_system, p.source_patient_id, v.source_visit_id, d.position, d.visit_date::text, d.code,
                               d.code_system, d.description, d.is_primary
                        FROM clinical.diagnoses d JOIN clinical.patients p USING (patient_key)
                        JOIN clinical.visits v ON v.patient_key = d.patient_key AND v.visit_key = d.visit_key ORDER BY 1, 2, 3, 4`),
    treatments:
      await q(`SELECT p.source_system, p.source_patient_id, v.source_visit_id, t.position, t.source_treatment_id, t.treatment_type,
                                t.code, t.code_system, t.name, t.dose, t.route, t.frequency, t.start_date::text, t.end_date::text
                         FROM clinical.treatments t JOIN clinical.patients p USING (patient_key)
                         JOIN clinical.visits v ON v.patient_key = t.patient_key AND v.visit_key = t.visit_key ORDER BY 1, 2, 3, 4`),
    notes: await q(`SELECT p.source_system, p.source_patient_id, v.source_visit_id, n.position, n.source_note_id, n.author,
                           n.written_at::text, n.note_text
                    FROM clinical.provider_notes n JOIN clinical.patients p USING (patient_key)
                    JOIN clinical.visits v ON v.patient_key = n.patient_key AND v.visit_key = n.visit_key ORDER BY 1, 2, 3, 4`),
    problems: await q(`SELECT document_id::int, batch_id::int, field, problem FROM etl.document_problems ORDER BY 1, 3`),
  };
}

async function replay(keysSql: string): Promise<{ patient_key: number; outcome: string; field: string | null }[]> {
  return db.query(`SELECT patient_key::int, outcome, field FROM etl.replay_patients(ARRAY(${keysSql}))`);
}

describe('replay', () => {
  let loaded: Record<string, unknown[]>;
  beforeAll(async () => {
    await run('valid');
    await run('warnings');
    await run('snapshots/v1.ndjson');
    await run('snapshots/v2.ndjson');
    loaded = await clinicalRows();
    expect(loaded.visits.length).toBeGreaterThan(10);
    expect(loaded.problems.length).toBe(12);
  });

  test('after rows are deleted by hand, re-sending changes nothing; replay restores exactly what the load gave', async () => {
    await db.query(
      `DELETE FROM clinical.diagnoses WHERE patient_key = (SELECT patient_key FROM clinical.patients WHERE source_patient_id = 'P-1007')`,
    );
    await db.query(
      `DELETE FROM clinical.visits WHERE patient_key = (SELECT patient_key FROM clinical.patients WHERE source_patient_id = 'W-3')`,
    );
    await db.query(`DELETE FROM etl.document_problems WHERE field = 'sex'`);
    await run('valid');
    expect(await clinicalRows()).not.toEqual(loaded);

    const out = await replay(`SELECT patient_key FROM clinical.patients`);
    expect(out.length).toBe(loaded.patients.length);
    expect(out.filter((o) => o.outcome !== 'replayed')).toEqual([]);
    expect(await clinicalRows()).toEqual(loaded);
    // A replay is no batch's: nothing of the batches' books changed.
    expect((await db.query(`SELECT count(*)::int AS n FROM etl.batch_deletes`))[0].n).toBe(1); // v2 replacing v1, at load
    expect((await db.query(`SELECT bool_and(balanced) AS ok FROM etl.batch_summary`))[0].ok).toBe(true);
  });

  test("a patient whose current snapshot today's rules reject keeps its rows and is reported with the field", async () => {
    // As if the rules had changed since the load: the current snapshot now breaks one.
    await db.query(`UPDATE landing.raw_documents d SET payload = jsonb_set(d.payload, '{visits,0,visit_date}', '"2024-02-30"')
                    FROM clinical.patients p WHERE p.document_id = d.document_id AND p.source_patient_id = 'P-1005'`);
    const [{ key }] = await db.query(`SELECT patient_key::int AS key FROM clinical.patients WHERE source_patient_id = 'P-1005'`);
    const before = await clinicalRows();
    expect(await replay(`SELECT patient_key FROM clinical.patients WHERE source_patient_id IN ('P-1005', 'P-1004')`)).toEqual(
      expect.arrayContaining([
        { patient_key: key, outcome: 'kept', field: 'visits[0].visit_date' },
        expect.objectContaining({ outcome: 'replayed' }),
      ]),
    );
    expect(await clinicalRows()).toEqual(before);
    // Nothing was recorded as a reject: the document was accepted when it arrived.
    expect((await db.query(`SELECT count(*)::int AS n FROM etl.rejected_documents`))[0].n).toBe(0);
  });
});

describe('purge', () => {
  test("drops every payload but the current snapshots', old rejects and old problems; replay still works after it", async () => {
    await db.query(`TRUNCATE clinical.patients, clinical.visits, clinical.diagnoses, clinical.treatments, clinical.provider_notes,
      etl.document_problems, etl.rejected_documents, landing.raw_documents, etl.batch_files, etl.batches, etl.patient_keys, etl.batch_deletes`);
    await run('snapshots/v1.ndjson');
    await run('snapshots/v2.ndjson');
    await run('snapshots/v0-late.ndjson');
    await run('invalid/rejects.ndjson');
    await run('warnings');
    const landed = (await db.query(`SELECT count(*)::int AS n FROM landing.raw_documents`))[0].n;
    const problems = (await db.query(`SELECT count(*)::int AS n FROM etl.document_problems`))[0].n;
    expect(problems).toBe(12);

    // Nothing is old enough yet.
    expect(await db.query(`SELECT payloads::int, rejects::int, problems::int FROM etl.purge(interval '90 days')`)).toEqual([
      { payloads: 0, rejects: 0, problems: 0 },
    ]);
    const loaded = await clinicalRows();

    const [purged] = await db.query(`SELECT payloads::int, rejects::int, problems::int FROM etl.purge(interval '0')`);
    expect(purged.rejects).toBe(29); // every reject of rejects.ndjson (30 rejected documents, the malformed file not loaded here)
    expect(purged.problems).toBe(0); // the problems are all of current snapshots
    expect(purged.payloads).toBeGreaterThan(0);
    // Every document is still accounted for; only the current snapshots keep a payload.
    expect((await db.query(`SELECT count(*)::int AS n FROM landing.raw_documents`))[0].n).toBe(landed);
    const [kept] = await db.query(`SELECT (SELECT count(*)::int FROM landing.raw_documents WHERE payload IS NOT NULL) AS payloads,
                                          (SELECT count(*)::int FROM clinical.patients) AS patients,
                                          (SELECT count(*)::int FROM clinical.patients p JOIN landing.raw_documents d
                                             ON d.document_id = p.document_id WHERE d.payload IS NOT NULL) AS current_with_payload`);
    expect(kept.payloads).toBe(kept.patients);
    expect(kept.current_with_payload).toBe(kept.patients);
    expect((await db.query(`SELECT bool_and(balanced) AS ok FROM etl.batch_summary`))[0].ok).toBe(true);

    const out = await replay(`SELECT patient_key FROM clinical.patients`);
    expect(out.filter((o) => o.outcome !== 'replayed')).toEqual([]);
    expect(await clinicalRows()).toEqual(loaded);
  });

  test('a negative age is refused with a hint', async () => {
    await expect(db.query(`SELECT * FROM etl.purge(interval '-1 day')`)).rejects.toMatchObject({ code: 'HE006' });
  });
});

describe('replay, as a reviewer tried it', () => {
  test('a changed identity rule never moves a patient: the patient is kept and reported', async () => {
    await run('valid/one-patient.json');
    const [{ key }] = await db.query(`SELECT patient_key::int AS key FROM clinical.patients ORDER BY patient_key DESC LIMIT 1`);
    const keys = (await db.query(`SELECT count(*)::int AS n FROM etl.patient_keys`))[0].n;
    await db.query('BEGIN');
    try {
      // As if a later migration had changed the identity rule: ids lower-cased.
      await db.query(`CREATE OR REPLACE FUNCTION etl.patient_id_of(j jsonb) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
                      RETURN lower(CASE jsonb_typeof(j) WHEN 'string' THEN btrim(normalize(j #>> '{}', NFC), E' \\t\\r\\n') END)`);
      const out = await db.query(`SELECT patient_key::int, outcome, field FROM etl.replay_patients(ARRAY[${key}]::bigint[])`);
      expect(out).toEqual([{ patient_key: key, outcome: 'kept', field: '$identity' }]);
      expect((await db.query(`SELECT count(*)::int AS n FROM etl.patient_keys`))[0].n).toBe(keys);
    } finally {
      await db.query('ROLLBACK');
    }
  });

  test('patients from more than 50 batches are refused with a hint (each batch is a pass whose locks last to the commit)', async () => {
    for (let i = 0; i < 51; i++) {
      const r = await loadBatch(db.url(), [{ kind: 'stdin', path: '-', format: 'ndjson', gzip: false }], {
        stdin: (await import('node:stream')).Readable.from([JSON.stringify({ patient_id: `MANY-B-${i}`, visits: [] }) + '\n']),
      });
      expect(r.documents).toBe(1);
    }
    await transformPending(pool());
    await expect(
      db.query(
        `SELECT * FROM etl.replay_patients(ARRAY(SELECT patient_key FROM clinical.patients WHERE source_patient_id LIKE 'MANY-B-%'))`,
      ),
    ).rejects.toMatchObject({ code: 'HE007' });
    // healthetl replay groups its chunks by batch, so the same patients replay in two transactions.
    const chunks: number[] = [];
    const r = await replayAll(pool(), { all: true }, (done) => chunks.push(done));
    expect(r.kept).toEqual([]);
    expect(r.replayed).toBe(r.selected);
    expect(chunks.length).toBeGreaterThanOrEqual(2);
  });
});
