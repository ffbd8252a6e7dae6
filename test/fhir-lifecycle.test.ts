// FHIR resources after their first load (migration 0012), on small hand-made resources whose
// right answers are worked out in the comments: versions by meta.lastUpdated, an Encounter whose
// date moves (its visit_key stays, its children follow), erasure of a FHIR patient (waiting
// resources too), and the same load transformed in shards.
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, test } from 'vitest';
import { expandInputs } from '../scripts/inputs.ts';
import { erasePatient } from '../scripts/privacy.ts';
import { loadBatch } from '../scripts/stage.ts';
import { transformPending } from '../scripts/transform.ts';
import { usePool } from './db.ts';
import { useFhirDatabase } from './fhir-helpers.ts';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-fhir-life-'));
let fileNo = 0;

/** One NDJSON file of these resources (a new name each time: a file is one delivery). */
function file(...resources: object[]): string {
  const p = path.join(tmp, `delivery-${++fileNo}.ndjson`);
  writeFileSync(p, resources.map((r) => JSON.stringify(r)).join('\n') + '\n');
  return p;
}

const patient = (id: string, family: string, extra: object = {}) => ({
  resourceType: 'Patient',
  id,
  name: [{ use: 'official', given: ['Fictional'], family }],
  gender: 'female',
  birthDate: '1970-01-01',
  ...extra,
});
const encounter = (id: string, pid: string, start: string, extra: object = {}) => ({
  resourceType: 'Encounter',
  id,
  subject: { reference: `Patient/${pid}` },
  class: { code: 'AMB' },
  period: { start, end: start },
  ...extra,
});
const condition = (id: string, pid: string, eid: string, status: string, extra: object = {}) => ({
  resourceType: 'Condition',
  id,
  subject: { reference: `Patient/${pid}` },
  encounter: { reference: `Encounter/${eid}` },
  code: { coding: [{ system: 'http://snomed.info/sct', code: '44054006', display: 'Diabetes' }] },
  clinicalStatus: { coding: [{ code: status }] },
  ...extra,
});

describe('versions of a resource', () => {
  const f = useFhirDatabase();

  test('meta.lastUpdated orders versions: an older one arriving later is superseded, a newer one replaces', async () => {
    await f.load([file(patient('p1', 'One'), encounter('e1', 'p1', '2024-01-10T09:00:00Z'))]);
    const at = (t: string, status: string) => condition('c1', 'p1', 'e1', status, { meta: { lastUpdated: t } });
    await f.load([file(at('2024-02-01T00:00:00Z', 'active'))]);
    // Arrives later but was written earlier: superseded, the row keeps 'active'.
    const older = await f.load([file(at('2024-01-15T00:00:00Z', 'resolved'))]);
    expect(await f.db.query(`SELECT status FROM landing.raw_documents WHERE batch_id = $1`, [older.batchId])).toEqual([
      { status: 'superseded' },
    ]);
    expect(await f.db.query(`SELECT clinical_status FROM clinical.diagnoses`)).toEqual([{ clinical_status: 'active' }]);
    // Newer: replaces the one row.
    await f.load([file(at('2024-03-01T00:00:00Z', 'resolved'))]);
    expect(await f.db.query(`SELECT clinical_status, source_diagnosis_id FROM clinical.diagnoses`)).toEqual([
      { clinical_status: 'resolved', source_diagnosis_id: 'c1' },
    ]);
    expect(await f.db.query(`SELECT bool_and(balanced) AS ok FROM etl.batch_summary`)).toEqual([{ ok: true }]);
  });

  test('an Encounter whose date moves to another year keeps its visit_key, and its diagnosis follows it', async () => {
    const [before] = await f.db.query(`SELECT visit_key, visit_date::text AS d FROM clinical.visits WHERE source_visit_id = 'e1'`);
    expect(before.d).toBe('2024-01-10');
    await f.load([file(encounter('e1', 'p1', '2023-12-31T23:00:00Z', { class: { code: 'EMER' } }))]);
    const visits = await f.db.query(`SELECT visit_key, visit_date::text AS d, visit_type FROM clinical.visits`);
    expect(visits).toEqual([{ visit_key: before.visit_key, d: '2023-12-31', visit_type: 'emergency' }]);
    // The child carries the visit's date (for partition pruning): it moved with it.
    expect(await f.db.query(`SELECT visit_key, visit_date::text AS d FROM clinical.diagnoses`)).toEqual([
      { visit_key: before.visit_key, d: '2023-12-31' },
    ]);
  });
});

describe('erasure of a FHIR patient', () => {
  const f = useFhirDatabase();
  const owner = usePool(f.db);

  test('clinical rows, version index, payloads (waiting ones too) go; the other patient stays; a later delivery is erased', async () => {
    // p2: a patient, a visit, a diagnosis, and a diagnosis waiting for an Encounter that never came.
    // p3: another patient with one visit.
    const first = await f.load([
      file(
        patient('p2', 'Two'),
        encounter('e2', 'p2', '2024-02-02T10:00:00Z'),
        condition('c2', 'p2', 'e2', 'active'),
        condition('c2w', 'p2', 'e2-never', 'active'),
        patient('p3', 'Three'),
        encounter('e3', 'p3', '2024-03-03T10:00:00Z'),
      ),
    ]);
    expect(await f.db.query(`SELECT status, count(*)::int AS n FROM landing.raw_documents GROUP BY 1 ORDER BY 1`)).toEqual([
      { status: 'loaded', n: 5 },
      { status: 'waiting', n: 1 },
    ]);

    const r = await erasePatient(owner(), { sourceSystem: 'fhir', patientId: 'p2' });
    // 4 resources name p2 (the Patient, its Encounter, both Conditions); 3 clinical rows (patient, visit, diagnosis).
    expect(r).toMatchObject({ documents: 4, clinical_rows: 3 });

    expect(await f.db.query(`SELECT source_patient_id FROM clinical.patients`)).toEqual([{ source_patient_id: 'p3' }]);
    expect(await f.db.query(`SELECT source_visit_id FROM clinical.visits`)).toEqual([{ source_visit_id: 'e3' }]);
    expect(await f.db.query(`SELECT count(*)::int AS n FROM clinical.diagnoses`)).toEqual([{ n: 0 }]);
    expect(await f.db.query(`SELECT resource_id FROM etl.fhir_resources WHERE patient_key IS NOT NULL ORDER BY 1`)).toEqual([
      { resource_id: 'e3' },
      { resource_id: 'p3' },
    ]);
    // Every landing row is still accounted for; none holds p2 any more.
    expect(
      await f.db.query(
        `SELECT status, count(*)::int AS n, count(payload)::int AS with_payload FROM landing.raw_documents GROUP BY 1 ORDER BY 1`,
      ),
    ).toEqual([
      { status: 'erased', n: 4, with_payload: 0 },
      { status: 'loaded', n: 2, with_payload: 2 },
    ]);
    expect(await f.db.query(`SELECT count(*)::int AS n FROM landing.raw_documents WHERE payload::text LIKE '%p2%'`)).toEqual([{ n: 0 }]);
    expect(await f.db.query(`SELECT balanced FROM etl.batch_summary WHERE batch_id = $1`, [first.batchId])).toEqual([{ balanced: true }]);

    // The source sends p2's Encounter again: counted erased, nothing loads.
    const again = await f.load([file(encounter('e2', 'p2', '2024-02-02T10:00:00Z', { status: 'finished' }))]);
    expect(await f.db.query(`SELECT status FROM landing.raw_documents WHERE batch_id = $1`, [again.batchId])).toEqual([
      { status: 'erased' },
    ]);
    expect(await f.db.query(`SELECT count(*)::int AS n FROM clinical.visits`)).toEqual([{ n: 1 }]);
  });
});

describe('a FHIR batch transformed in shards by patient', () => {
  const f = useFhirDatabase();

  test('two shards give the rows one transaction gives; a child and its Encounter meet in one shard', async () => {
    // 20 patients, each with a visit in a different year (20 partitions, made before the shards
    // by etl.ensure_batch_partitions) and a diagnosis that comes before its Encounter in the file.
    const resources = (x: string) =>
      Array.from({ length: 20 }, (_, i) => [
        condition(`${x}c${i}`, `${x}p${i}`, `${x}e${i}`, 'active'),
        encounter(`${x}e${i}`, `${x}p${i}`, `${2000 + i}-06-01T12:00:00Z`),
        patient(`${x}p${i}`, `Shard${i}`),
      ]).flat();
    // One transaction (60 resources are under --shard-min-documents) ...
    await f.load([file(...resources('a'))]);
    // ... and the same shape with other ids, as 2 shards.
    const second = await loadBatch(f.loader(), expandInputs([file(...resources('b'))]), {});
    const done = await transformPending(f.pool(), { batchIds: [second.batchId], shards: 2, shardMinDocuments: 1 });
    expect(done).toMatchObject([{ batchId: second.batchId, shards: 2, loaded: 60 }]);
    const byLoad = await f.db.query(
      `SELECT left(p.source_patient_id, 1) AS load, count(DISTINCT p.patient_key)::int AS patients,
              count(DISTINCT v.visit_key)::int AS visits, count(d.*)::int AS diagnoses,
              count(d.*) FILTER (WHERE d.visit_date = v.visit_date AND d.source_diagnosis_id = replace(v.source_visit_id, 'e', 'c'))::int AS linked
       FROM clinical.patients p JOIN clinical.visits v USING (patient_key)
       LEFT JOIN clinical.diagnoses d ON d.patient_key = v.patient_key AND d.visit_key = v.visit_key
       GROUP BY 1 ORDER BY 1`,
    );
    expect(byLoad).toEqual([
      { load: 'a', patients: 20, visits: 20, diagnoses: 20, linked: 20 },
      { load: 'b', patients: 20, visits: 20, diagnoses: 20, linked: 20 },
    ]);
    expect(await f.db.query(`SELECT count(*)::int AS n FROM landing.raw_documents WHERE status <> 'loaded'`)).toEqual([{ n: 0 }]);
  });
});

describe('a patient comes from patient documents or from FHIR resources, never both', () => {
  const f = useFhirDatabase();

  test('a patient document for a FHIR patient is rejected, and a FHIR Patient for a documents patient; replay leaves FHIR patients be', async () => {
    await f.load([file(patient('k1', 'Kind'), encounter('ke1', 'k1', '2024-05-05T10:00:00Z'))]);
    const doc = path.join(tmp, `doc-${++fileNo}.ndjson`);
    writeFileSync(
      doc,
      [
        { patient_id: 'k1', source_system: 'fhir', visits: [] }, // would delete k1's FHIR visit
        { patient_id: 'd1', source_system: 'fhir', visits: [{ visit_id: 'dv1', visit_date: '2024-01-01' }] },
      ]
        .map((d) => JSON.stringify(d))
        .join('\n') + '\n',
    );
    const docs = await f.load([doc]);
    const fhirForDoc = await f.load([file(patient('d1', 'Doc'))]);
    const rejects = await f.db.query(
      `SELECT batch_id::int AS batch, field, reason FROM etl.rejected_documents WHERE batch_id IN ($1, $2) ORDER BY batch_id`,
      [docs.batchId, fhirForDoc.batchId],
    );
    expect(rejects).toEqual([
      {
        batch: docs.batchId,
        field: 'source_system',
        reason:
          'source_system: patient "k1" of "fhir" is loaded from FHIR resources; a patient document may not replace it (send it under another source_system)',
      },
      {
        batch: fhirForDoc.batchId,
        field: 'Patient.id',
        reason: 'Patient.id: patient "d1" of "fhir" is loaded from patient documents; load FHIR resources under another --source-system',
      },
    ]);
    // k1 keeps its FHIR visit; d1 keeps its document's visit.
    expect(await f.db.query(`SELECT source_visit_id FROM clinical.visits ORDER BY 1`)).toEqual([
      { source_visit_id: 'dv1' },
      { source_visit_id: 'ke1' },
    ]);
    // Replay re-derives the documents patient and leaves the FHIR one as it is.
    const replayed = await f.db.query(
      `SELECT p.source_patient_id AS id, r.outcome, r.field FROM etl.replay_patients(ARRAY(SELECT patient_key FROM clinical.patients)) r
       JOIN clinical.patients p USING (patient_key) ORDER BY 1`,
    );
    expect(replayed).toEqual([
      { id: 'd1', outcome: 'replayed', field: null },
      { id: 'k1', outcome: 'kept', field: '$fhir' },
    ]);
    expect(await f.db.query(`SELECT source_visit_id FROM clinical.visits ORDER BY 1`)).toEqual([
      { source_visit_id: 'dv1' },
      { source_visit_id: 'ke1' },
    ]);
  });
});
