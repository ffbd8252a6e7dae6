// FHIR R4 input (issue 12) end to end against a real PostgreSQL: the shared Synthea data of
// ../shared/data/fhir (a Bulk Data export of 13 patients and 6 transaction Bundles) staged as a
// healthetl_loader login, checked as the owner, read through the masked views as an analyst and a
// researcher. Expected numbers are docs/fhir-r4-mapping.md section 6; each is also counted here
// from the files themselves, so a wrong number in the docs fails as loudly as a wrong transform.
// Failure messages name source ids, codes and hashes only, never a name or a note's text.
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { LoadResult } from '../scripts/stage.ts';
import { queryAs, useLogin } from './db.ts';
import {
  BULK_DIR,
  BUNDLE_DIR,
  bulkFiles,
  bulkOf,
  bundles,
  clinicalCounts,
  encounterOf,
  fingerprint,
  fingerprintDiff,
  healthetl,
  missingData,
  ndjsonLines,
  orphans,
  outcomes,
  refId,
  unbalanced,
  useFhirDatabase,
  type Fingerprint,
  type Resource,
} from './fhir-helpers.ts';

const MISSING = missingData();
if (MISSING) console.warn(`[fhir.test] FHIR tests skipped: ${MISSING} (../shared/data/README.md says what belongs there)`);
const SKIPPED = MISSING ? ` [skipped: ${MISSING}]` : '';

const LOAD_TIMEOUT = 600_000;
const CHILD_TYPES = ['Condition', 'MedicationRequest', 'Procedure', 'DocumentReference'];

/** Encounter.class (v3-ActEncounterCode) -> visit_type, docs/fhir-r4-mapping.md section 4. */
const VISIT_TYPE: Record<string, string> = {
  AMB: 'outpatient',
  IMP: 'inpatient',
  ACUTE: 'inpatient',
  NONAC: 'inpatient',
  EMER: 'emergency',
  VR: 'telehealth',
  HH: 'other',
  FLD: 'other',
  OBSENC: 'other',
  PRENC: 'other',
  SS: 'other',
};

function tally(values: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const v of [...values].sort()) out[v] = (out[v] ?? 0) + 1;
  return out;
}

/** The resourceType a bulk file holds, from its name (Condition.000.ndjson). */
const typeOfFile = (file: string) => path.basename(file).split('.')[0];

/** Epoch milliseconds of a timestamp (a Date from pg, or FHIR text), to compare instants whatever their offset. */
const ms = (t: Date | string | null | undefined) => (t === null || t === undefined ? null : new Date(t).getTime());

/** Ids whose value in `actual` differs from `expected` (at most 5), and how many differ. */
function mismatches<T>(expected: Map<string, T>, actual: Map<string, T>): { n: number; ids: string[] } {
  const ids = [...new Set([...expected.keys(), ...actual.keys()])].filter(
    (id) => JSON.stringify(expected.get(id)) !== JSON.stringify(actual.get(id)),
  );
  return { n: ids.length, ids: ids.slice(0, 5) };
}
const NONE = { n: 0, ids: [] };

/**
 * Waiting rows after each file of `order`, by the rules of the design (section 5): an Encounter
 * waits for its Patient, a child (Condition, MedicationRequest, Procedure, DocumentReference) for its
 * Encounter (which needs its Patient); other types never wait. Counted from the files.
 */
function expectedWaiting(order: string[]): number[] {
  const present = new Set<string>();
  const n = (t: string) => bulkOf(t).length;
  return order.map((file) => {
    present.add(typeOfFile(file));
    const patients = present.has('Patient');
    const encounters = present.has('Encounter');
    let w = encounters && !patients ? n('Encounter') : 0;
    for (const t of CHILD_TYPES) if (present.has(t) && !(patients && encounters)) w += n(t);
    return w;
  });
}

/** Identifiers of the source patients that no masked view may show: ids, SSNs, names, phones, street lines. */
function directIdentifiers(patients: Resource[]): string[] {
  const out = new Set<string>();
  for (const p of patients) {
    out.add(p.id);
    for (const i of p.identifier ?? []) if (i.type?.coding?.some((c: any) => ['SS', 'MR'].includes(c.code))) out.add(i.value);
    for (const n of p.name ?? []) for (const w of [...(n.given ?? []), n.family]) if (typeof w === 'string' && w.length >= 3) out.add(w);
    for (const t of p.telecom ?? []) out.add(t.value);
    for (const a of p.address ?? []) for (const l of a.line ?? []) out.add(l);
  }
  return [...out];
}

/** Every row of every relation the login may SELECT from, as JSON text, by relation. */
async function everythingAs(url: string): Promise<Map<string, string[]>> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    const rels = await c.query(`SELECT n.nspname || '.' || c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        AND n.nspname NOT LIKE 'pg_toast%' AND has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT') ORDER BY 1`);
    const out = new Map<string, string[]>();
    for (const { name } of rels.rows)
      out.set(
        name,
        (await c.query(`SELECT row_to_json(t)::text AS j FROM ${name} t`)).rows.map((r) => r.j),
      );
    return out;
  } finally {
    await c.end();
  }
}

/** Which of `planted` occur (case-insensitive) in which relation: `relation: #index` (the index into planted, not the value). */
function leaks(data: Map<string, string[]>, planted: string[]): string[] {
  const found: string[] = [];
  for (const [rel, rows] of data) {
    const text = rows.join('\n').toLowerCase();
    planted.forEach((p, i) => {
      if (text.includes(p.toLowerCase())) found.push(`${rel}: #${i}`);
    });
  }
  return found;
}

describe.skipIf(Boolean(MISSING))(`FHIR bulk export (13 patients, 7,160 resources) in one batch${SKIPPED}`, () => {
  const f = useFhirDatabase();
  const analyst = useLogin(f.db, 'healthetl_analyst');
  const researcher = useLogin(f.db, 'healthetl_researcher');
  let r: LoadResult;
  beforeAll(async () => {
    r = await f.load([BULK_DIR]);
  }, LOAD_TIMEOUT);

  test('the files hold what section 1 says: 13 files, 7,160 lines (one resource each), one type per file', () => {
    const lines = Object.fromEntries(bulkFiles().map((file) => [path.basename(file), ndjsonLines(file).length]));
    expect(lines).toEqual({
      'AllergyIntolerance.000.ndjson': 11,
      'Condition.000.ndjson': 555,
      'Device.000.ndjson': 16,
      'DocumentReference.000.ndjson': 1215,
      'Encounter.000.ndjson': 1215,
      'Immunization.000.ndjson': 161,
      'Location.000.ndjson': 44,
      'MedicationRequest.000.ndjson': 1745,
      'Organization.000.ndjson': 43,
      'Patient.000.ndjson': 13,
      'Practitioner.000.ndjson': 43,
      'PractitionerRole.000.ndjson': 43,
      'Procedure.000.ndjson': 2056,
    });
    for (const file of bulkFiles()) expect(bulkOf(typeOfFile(file)).length, file).toBe(lines[path.basename(file)]);
  });

  test('landing: one row per resource (7,160), all loaded, format fhir-r4, typed, source system fhir; the batch balances with nothing waiting', async () => {
    expect(r.documents).toBe(7160);
    expect(r.files.map((x) => [path.basename(x.path), x.status])).toEqual(bulkFiles().map((x) => [path.basename(x), 'staged']));
    expect(await outcomes(f.db.query, r.batchId)).toEqual({ loaded: 7160 });
    const byType = await f.db.query(`SELECT format, source_system, resource_type, count(*)::int AS n, count(line)::int AS with_line
      FROM landing.raw_documents GROUP BY 1, 2, 3 ORDER BY 3`);
    expect(byType).toEqual(
      bulkFiles().map((file) => {
        const n = ndjsonLines(file).length;
        return { format: 'fhir-r4', source_system: 'fhir', resource_type: typeOfFile(file), n, with_line: n };
      }),
    );
    const [s] = await f.db.query(
      `SELECT status, received::int, staged::int, loaded::int, rejected::int, duplicate::int, superseded::int,
      waiting::int, balanced FROM etl.batch_summary WHERE batch_id = $1`,
      [r.batchId],
    );
    expect(s).toEqual({
      status: 'transformed',
      received: 7160,
      staged: 0,
      loaded: 7160,
      rejected: 0,
      duplicate: 0,
      superseded: 0,
      waiting: 0,
      balanced: true,
    });
    expect(await f.db.query(`SELECT count(*)::int AS n FROM etl.rejected_documents`)).toEqual([{ n: 0 }]);
  });

  test('row counts per clinical table: 13 / 1,215 / 555 / 3,801 / 1,215, as counted from the files', async () => {
    const expected = {
      patients: bulkOf('Patient').length,
      visits: bulkOf('Encounter').length,
      diagnoses: bulkOf('Condition').length,
      treatments: bulkOf('MedicationRequest').length + bulkOf('Procedure').length,
      provider_notes: bulkOf('DocumentReference').length,
    };
    expect(expected).toEqual({ patients: 13, visits: 1215, diagnoses: 555, treatments: 3801, provider_notes: 1215 });
    expect(await clinicalCounts(f.db.query)).toEqual(expected);
  });

  test('patients: source system fhir, Patient.id, 3 deceased with their date, MRN and SSN by identifier type, sex', async () => {
    const src = bulkOf('Patient');
    const rows = await f.db
      .query(`SELECT source_system, source_patient_id, mrn, ssn, sex, birth_date::text AS birth_date, deceased, deceased_at
      FROM clinical.patients`);
    expect(rows.every((p) => p.source_system === 'fhir')).toBe(true);
    const ident = (p: Resource, code: string) => p.identifier.find((i: any) => i.type?.coding?.some((c: any) => c.code === code))?.value;
    const want = new Map(
      src.map((p) => [
        p.id,
        [ident(p, 'MR'), ident(p, 'SS'), p.gender, p.birthDate, Boolean(p.deceasedDateTime), ms(p.deceasedDateTime)] as unknown[],
      ]),
    );
    const got = new Map(
      rows.map((p) => [p.source_patient_id, [p.mrn, p.ssn, p.sex, p.birth_date, p.deceased === true, ms(p.deceased_at)]]),
    );
    expect(mismatches(want, got)).toEqual(NONE);
    expect(src.filter((p) => p.deceasedDateTime).length).toBe(3);
    expect(rows.filter((p) => p.deceased === true).length).toBe(3);
    expect(tally(rows.map((p) => p.sex))).toEqual({ female: 9, male: 4 });
  });

  test('visits: Encounter.id, its patient, start/end instants, calendar date as written, class -> visit_type (1133/49/23/1/9), provider NPI and facility', async () => {
    const src = bulkOf('Encounter');
    const types = tally(src.map((e) => VISIT_TYPE[e.class.code] ?? 'unmapped'));
    expect(types).toEqual({ emergency: 23, inpatient: 49, other: 9, outpatient: 1133, telehealth: 1 });
    const rows = await f.db
      .query(`SELECT p.source_patient_id, v.source_visit_id, v.visit_date::text AS visit_date, v.visit_start, v.visit_end,
      v.discharge_date::text AS discharge_date, v.visit_type, v.provider_npi, v.facility_name
      FROM clinical.visits v JOIN clinical.patients p USING (patient_key)`);
    expect(tally(rows.map((v) => v.visit_type))).toEqual(types);
    const npiOf = (e: Resource) => e.participant[0].individual.reference.split('|')[1];
    const want = new Map(
      src.map((e) => [
        e.id,
        [refId(e.subject.reference), e.period.start.slice(0, 10), ms(e.period.start), ms(e.period.end), e.period.end.slice(0, 10)],
      ]),
    );
    const got = new Map(
      rows.map((v) => [v.source_visit_id, [v.source_patient_id, v.visit_date, ms(v.visit_start), ms(v.visit_end), v.discharge_date]]),
    );
    expect(mismatches(want, got)).toEqual(NONE);
    const later = src.filter((e) => e.period.end.slice(0, 10) > e.period.start.slice(0, 10)).length;
    expect(later).toBe(332);
    expect(rows.filter((v) => v.discharge_date > v.visit_date).length).toBe(later);
    const who = mismatches(
      new Map(src.map((e) => [e.id, [npiOf(e), e.serviceProvider.display]])),
      new Map(rows.map((v) => [v.source_visit_id, [v.provider_npi, v.facility_name]])),
    );
    expect(who).toEqual(NONE);
  });

  test('diagnoses: Condition.id, SNOMED-CT code, clinical status (107 active / 448 resolved), onset', async () => {
    const src = bulkOf('Condition');
    expect(tally(src.map((c) => c.clinicalStatus.coding[0].code))).toEqual({ active: 107, resolved: 448 });
    const rows = await f.db.query(`SELECT source_diagnosis_id, code, code_system, clinical_status, onset_at FROM clinical.diagnoses`);
    expect(tally(rows.map((d) => `${d.code_system} ${d.clinical_status}`))).toEqual({ 'SNOMED-CT active': 107, 'SNOMED-CT resolved': 448 });
    const want = new Map(src.map((c) => [c.id, [c.code.coding[0].code, c.clinicalStatus.coding[0].code, ms(c.onsetDateTime)]]));
    const got = new Map(rows.map((d) => [d.source_diagnosis_id, [d.code, d.clinical_status, ms(d.onset_at)]]));
    expect(mismatches(want, got)).toEqual(NONE);
  });

  test('treatments: 1,745 RxNorm medications + 2,056 SNOMED-CT procedures by source id, with their start dates; 332 doses', async () => {
    const meds = bulkOf('MedicationRequest');
    const procs = bulkOf('Procedure');
    const rows = await f.db.query(`SELECT source_treatment_id, treatment_type, code, code_system, dose, start_date::text AS start_date
      FROM clinical.treatments`);
    expect(tally(rows.map((t) => `${t.treatment_type} ${t.code_system}`))).toEqual({
      'medication RxNorm': 1745,
      'procedure SNOMED-CT': 2056,
    });
    const want = new Map<string, unknown[]>([
      ...meds.map((m): [string, unknown[]] => [
        m.id,
        ['medication', m.medicationCodeableConcept.coding[0].code, m.authoredOn.slice(0, 10)],
      ]),
      ...procs.map((p): [string, unknown[]] => [p.id, ['procedure', p.code.coding[0].code, p.performedPeriod.start.slice(0, 10)]]),
    ]);
    const got = new Map(rows.map((t) => [t.source_treatment_id, [t.treatment_type, t.code, t.start_date]]));
    expect(mismatches(want, got)).toEqual(NONE);
    const withDose = meds.filter((m) => m.dosageInstruction?.[0]?.doseAndRate?.[0]?.doseQuantity?.value !== undefined).length;
    expect(withDose).toBe(332);
    expect(rows.filter((t) => t.dose !== null).length).toBe(withDose);
  });

  test('every diagnosis, treatment and note has its visit (same patient, visit key and date), the one its resource references', async () => {
    expect(await orphans(f.db.query)).toEqual({ diagnoses: 0, treatments: 0, provider_notes: 0 });
    const linked = async (table: string, idCol: string) =>
      new Map(
        (
          await f.db.query(`SELECT c.${idCol} AS id, v.source_visit_id AS visit, p.source_patient_id AS patient FROM clinical.${table} c
            JOIN clinical.visits v ON v.patient_key = c.patient_key AND v.visit_key = c.visit_key AND v.visit_date = c.visit_date
            JOIN clinical.patients p ON p.patient_key = c.patient_key`)
        ).map((x) => [x.id as string, [x.visit, x.patient]]),
      );
    const want = (types: string[]) =>
      new Map(types.flatMap((t) => bulkOf(t)).map((x): [string, unknown[]] => [x.id, [encounterOf(x), refId(x.subject.reference)]]));
    expect(mismatches(want(['Condition']), await linked('diagnoses', 'source_diagnosis_id'))).toEqual(NONE);
    expect(mismatches(want(['MedicationRequest', 'Procedure']), await linked('treatments', 'source_treatment_id'))).toEqual(NONE);
    expect(mismatches(want(['DocumentReference']), await linked('provider_notes', 'source_note_id'))).toEqual(NONE);
  });

  test("a note's text is its DocumentReference's base64 attachment decoded, exactly; author and date", async () => {
    const src = bulkOf('DocumentReference');
    const decoded = new Map(src.map((d) => [d.id, Buffer.from(d.content[0].attachment.data, 'base64').toString('utf8')]));
    const rows = await f.db.query(`SELECT source_note_id, note_text, author, written_at FROM clinical.provider_notes`);
    const differ = rows.filter((n) => decoded.get(n.source_note_id) !== n.note_text).map((n) => n.source_note_id);
    expect(rows.length).toBe(src.length);
    expect({ n: differ.length, ids: differ.slice(0, 5) }).toEqual(NONE);
    // Section 6's aggregate figures, recomputed from the files and in SQL
    const texts = [...decoded.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, t]) => t);
    const octets = texts.reduce((s, t) => s + Buffer.byteLength(t, 'utf8'), 0);
    const sha = createHash('sha256').update(texts.join(''), 'utf8').digest('hex');
    expect([octets, sha]).toEqual([1617409, '5a1c8c695eac1f3aa36c5c90bc19b5fb418d2a423f48032921f8ede82611d297']);
    const [agg] = await f.db.query(`SELECT sum(octet_length(note_text))::int AS octets,
      encode(sha256(convert_to(string_agg(note_text, '' ORDER BY source_note_id COLLATE "C"), 'UTF8')), 'hex') AS sha FROM clinical.provider_notes`);
    expect(agg).toEqual({ octets, sha });
    const meta = mismatches(
      new Map(src.map((d) => [d.id, [d.author[0].display, ms(d.date)]])),
      new Map(rows.map((n) => [n.source_note_id, [n.author, ms(n.written_at)]])),
    );
    expect(meta).toEqual(NONE);
  });

  test('analyst: analytics.patients shows the 13 FHIR patients without names, SSN, MRN or source ids; no identifier of theirs in any analytics view', async () => {
    const fields = await (async () => {
      const c = new pg.Client({ connectionString: analyst() });
      await c.connect();
      try {
        return (await c.query('SELECT * FROM analytics.patients LIMIT 0')).fields.map((x) => x.name);
      } finally {
        await c.end();
      }
    })();
    expect(fields).toContain('patient_pseudonym');
    expect(fields.filter((c) => /name|ssn|mrn|phone|email|address|source_patient_id/.test(c))).toEqual([]);
    expect(await queryAs(analyst(), `SELECT source_system, count(*)::int AS n FROM analytics.patients GROUP BY 1`)).toEqual([
      { source_system: 'fhir', n: 13 },
    ]);
    const all = await everythingAs(analyst());
    expect([...all.keys()].filter((rel) => !rel.startsWith('analytics.'))).toEqual([]);
    // Synthea draws clinicians' names from the patients' pool: Dr. Jasper743 Champlin946 shares a patient's family
    // name. Provider names are shown in the limited data set (visits.provider_name, notes' author), so those words are not planted.
    const clinicians = new Set(bulkOf('Practitioner').flatMap((p) => p.name.flatMap((n: any) => [...(n.given ?? []), n.family])));
    const planted = directIdentifiers(bulkOf('Patient')).filter((w) => !clinicians.has(w));
    expect(planted.length).toBeGreaterThan(13 * 4);
    expect(leaks(all, planted)).toEqual([]);
  });

  test("analyst: every note shows [NAME] where the source has the patient's given name (e.g. Denis399), and no given name", async () => {
    const notes = await queryAs(analyst(), `SELECT note_text FROM analytics.provider_notes`);
    expect(notes.length).toBe(1215);
    // in the source: every note names its patient by the first given name
    const given = new Map(bulkOf('Patient').map((p) => [p.id, p.name.find((n: any) => n.use === 'official').given[0] as string]));
    const withName = bulkOf('DocumentReference').filter((d) =>
      Buffer.from(d.content[0].attachment.data, 'base64')
        .toString('utf8')
        .includes(given.get(refId(d.subject.reference)!)!),
    ).length;
    expect(withName).toBe(1215);
    expect(notes.filter((n) => n.note_text.includes('[NAME]')).length).toBe(withName);
    const names = [...new Set(given.values())];
    expect(notes.filter((n) => names.some((g) => n.note_text.toLowerCase().includes(g.toLowerCase()))).length).toBe(0);
  });

  test('researcher: deid shows the 13 patients with years only: no full date and no date-typed column anywhere in deid', async () => {
    expect(await queryAs(researcher(), `SELECT count(*)::int AS n FROM deid.patients`)).toEqual([{ n: 13 }]);
    const all = await everythingAs(researcher());
    expect([...all.keys()].filter((rel) => !rel.startsWith('deid.'))).toEqual([]);
    const dated = [...all].filter(([, rows]) => rows.some((j) => /\d{4}-\d{2}-\d{2}/.test(j))).map(([rel]) => rel);
    expect(dated).toEqual([]);
    const dateColumns = await queryAs(
      researcher(),
      `SELECT table_name || '.' || column_name AS c FROM information_schema.columns
       WHERE table_schema = 'deid' AND data_type IN ('date', 'timestamp with time zone', 'timestamp without time zone') ORDER BY 1`,
    );
    expect(dateColumns).toEqual([]);
    expect(leaks(all, directIdentifiers(bulkOf('Patient')))).toEqual([]);
  });

  describe('order independence: one file per batch, in file-name order (the CLI) and in reverse (the loader API)', () => {
    const fwd = useFhirDatabase();
    const rev = useFhirDatabase();
    type Step = { file: string; code?: number | null; waiting: number; batchStatus: string; unbalanced: number[]; output?: string };
    const forward: Step[] = [];
    const reverse: Step[] = [];
    /** `healthetl status` exit codes: while resources wait (after the Condition file), and at the end. */
    const statusCodes: { waiting: number | null; end: number | null } = { waiting: null, end: null };

    async function after(db: typeof fwd, file: string, code?: number | null): Promise<Step> {
      const [w] = await db.db.query(`SELECT count(*)::int AS n FROM landing.raw_documents WHERE status = 'waiting'`);
      const [b] = await db.db.query(`SELECT status FROM etl.batches ORDER BY batch_id DESC LIMIT 1`);
      return { file: path.basename(file), code, waiting: w.n, batchStatus: b.status, unbalanced: await unbalanced(db.db.query) };
    }

    beforeAll(async () => {
      for (const file of bulkFiles()) {
        // the CLI's own default source system (fhir), as a scheduler runs it
        const res = await healthetl(['run', file, '--database-url', fwd.loader()]);
        const step = await after(fwd, file, res.code);
        // what a failed run said (its log lines carry no document content): shown only when the exit code is wrong
        if (res.code !== 0) step.output = (res.stdout + res.stderr).trim().split('\n').slice(-3).join(' | ').slice(0, 600);
        forward.push(step);
        if (typeOfFile(file) === 'Condition') statusCodes.waiting = (await healthetl(['status', '--database-url', fwd.loader()])).code;
      }
      statusCodes.end = (await healthetl(['status', '--database-url', fwd.loader()])).code;
      for (const file of [...bulkFiles()].reverse()) {
        await rev.load([file]);
        reverse.push(await after(rev, file));
      }
    }, LOAD_TIMEOUT);

    test('the waiting model gives section 6 table: file-name order waits until Patient, reverse until Encounter', () => {
      expect(expectedWaiting(bulkFiles())).toEqual([0, 555, 555, 1770, 2985, 2985, 2985, 4730, 4730, 0, 0, 0, 0]);
      expect(expectedWaiting([...bulkFiles()].reverse())).toEqual([2056, 2056, 2056, 2056, 2056, 3801, 3801, 3801, 0, 0, 0, 0, 0]);
    });

    test('file-name order: each run exits 0 and its batch is transformed and balanced; waiting as the model says, 0 from Patient on', () => {
      expect(forward.map((s) => s.file)).toEqual(bulkFiles().map((x) => path.basename(x)));
      const want = expectedWaiting(bulkFiles());
      expect(forward.map((s) => [s.file, s.code, s.batchStatus, s.waiting, s.unbalanced, s.output])).toEqual(
        bulkFiles().map((x, i) => [path.basename(x), 0, 'transformed', want[i], [], undefined]),
      );
      // waiting is not a failure: `status` balances (exit 0, not 6) while 555 Conditions wait, and at the end
      expect(statusCodes).toEqual({ waiting: 0, end: 0 });
    });

    test('reverse order: each batch transformed and balanced; waiting as the model says, 0 from Encounter on', () => {
      const order = [...bulkFiles()].reverse();
      const want = expectedWaiting(order);
      expect(reverse.map((s) => [s.file, s.batchStatus, s.waiting, s.unbalanced])).toEqual(
        order.map((x, i) => [path.basename(x), 'transformed', want[i], []]),
      );
    });

    test('both end with every resource loaded, nothing waiting, and exactly the rows of the one-batch load', async () => {
      const one = await fingerprint(f.db.query);
      expect(one.patients.length).toBe(13);
      for (const d of [fwd, rev]) {
        expect(await outcomes(d.db.query)).toEqual({ loaded: 7160 });
        const [s] = await d.db.query(`SELECT sum(waiting)::int AS waiting, sum(loaded)::int AS loaded, bool_and(balanced) AS balanced
          FROM etl.batch_summary`);
        expect(s).toEqual({ waiting: 0, loaded: 7160, balanced: true });
        expect(await orphans(d.db.query)).toEqual({ diagnoses: 0, treatments: 0, provider_notes: 0 });
        expect(fingerprintDiff(one, await fingerprint(d.db.query))).toEqual({});
      }
    });
  });
});

describe.skipIf(Boolean(MISSING))(`FHIR transaction bundles (6 patients, 485 entries)${SKIPPED}`, () => {
  const f = useFhirDatabase();
  let r: LoadResult;
  const src = () => bundles();
  const all = (type: string) => src().flatMap((b) => b.resources.filter((x) => x.resourceType === type));
  beforeAll(async () => {
    r = await f.load([BUNDLE_DIR]);
  }, LOAD_TIMEOUT);

  test('one landing row per entry (485), item = entry index, typed, all loaded, balanced', async () => {
    expect(src().map((b) => b.resources.length)).toEqual([83, 66, 104, 93, 78, 61]);
    expect(r.documents).toBe(485);
    expect(r.files.map((x) => x.status)).toEqual(Array(6).fill('staged'));
    expect(await outcomes(f.db.query, r.batchId)).toEqual({ loaded: 485 });
    const rows = await f.db.query(
      `SELECT source_file, item::int AS item, resource_type, format FROM landing.raw_documents ORDER BY source_file COLLATE "C", item`,
    );
    const want = src().flatMap((b) =>
      b.resources.map((x, i) => ({ source_file: b.file, item: i, resource_type: x.resourceType, format: 'fhir-r4' })),
    );
    expect(rows.length).toBe(want.length);
    expect(rows.filter((x, i) => JSON.stringify(x) !== JSON.stringify(want[i])).length).toBe(0);
    const [s] = await f.db.query(`SELECT received::int, loaded::int, waiting::int, balanced FROM etl.batch_summary WHERE batch_id = $1`, [
      r.batchId,
    ]);
    expect(s).toEqual({ received: 485, loaded: 485, waiting: 0, balanced: true });
  });

  test('patients 6 (none deceased), visits 38 (36 outpatient, 2 emergency), diagnoses 15 (5 active / 10 resolved), treatments 5 + 10, notes 0', async () => {
    const expected = {
      patients: all('Patient').length,
      visits: all('Encounter').length,
      diagnoses: all('Condition').length,
      treatments: all('MedicationRequest').length + all('Procedure').length,
      provider_notes: all('DocumentReference').length,
    };
    expect(expected).toEqual({ patients: 6, visits: 38, diagnoses: 15, treatments: 15, provider_notes: 0 });
    expect(await clinicalCounts(f.db.query)).toEqual(expected);
    expect(
      await f.db
        .query(`SELECT count(*) FILTER (WHERE deceased)::int AS deceased, count(*) FILTER (WHERE source_system = 'fhir')::int AS fhir
      FROM clinical.patients`),
    ).toEqual([{ deceased: 0, fhir: 6 }]);
    const types = await f.db.query(`SELECT visit_type, count(*)::int AS n FROM clinical.visits GROUP BY 1 ORDER BY 1`);
    expect(Object.fromEntries(types.map((x) => [x.visit_type, x.n]))).toEqual(tally(all('Encounter').map((e) => VISIT_TYPE[e.class.code])));
    expect(tally(all('Encounter').map((e) => VISIT_TYPE[e.class.code]))).toEqual({ emergency: 2, outpatient: 36 });
    const dx = await f.db.query(
      `SELECT code_system || ' ' || clinical_status AS k, count(*)::int AS n FROM clinical.diagnoses GROUP BY 1 ORDER BY 1`,
    );
    expect(dx).toEqual([
      { k: 'SNOMED-CT active', n: 5 },
      { k: 'SNOMED-CT resolved', n: 10 },
    ]);
    const tx = await f.db.query(
      `SELECT treatment_type || ' ' || code_system AS k, count(*)::int AS n FROM clinical.treatments GROUP BY 1 ORDER BY 1`,
    );
    expect(tx).toEqual([
      { k: 'medication RxNorm', n: 5 },
      { k: 'procedure SNOMED-CT', n: 10 },
    ]);
  });

  test('urn:uuid references resolve inside the bundle: children to their visit, visits to the Organization and Practitioner entries', async () => {
    expect(await orphans(f.db.query)).toEqual({ diagnoses: 0, treatments: 0, provider_notes: 0 });
    const rows = await f.db.query(`SELECT c.id, v.source_visit_id AS visit FROM (
        SELECT patient_key, visit_key, visit_date, source_diagnosis_id AS id FROM clinical.diagnoses
        UNION ALL SELECT patient_key, visit_key, visit_date, source_treatment_id FROM clinical.treatments) c
      JOIN clinical.visits v USING (patient_key, visit_key, visit_date)`);
    const want = new Map(['Condition', 'MedicationRequest', 'Procedure'].flatMap(all).map((x) => [x.id, encounterOf(x)]));
    expect(mismatches(want, new Map(rows.map((x) => [x.id, x.visit])))).toEqual(NONE);
    const byId = new Map(src().flatMap((b) => b.resources.map((x) => [x.id, x])));
    const npi = (p: Resource) => p.identifier.find((i: any) => i.system === 'http://hl7.org/fhir/sid/us-npi')?.value;
    const wantVisits = new Map(
      all('Encounter').map((e) => [
        e.id,
        [byId.get(refId(e.serviceProvider.reference)!)!.name, npi(byId.get(refId(e.participant[0].individual.reference)!)!)],
      ]),
    );
    const visits = await f.db.query(`SELECT source_visit_id, facility_name, provider_npi FROM clinical.visits`);
    expect(mismatches(wantVisits, new Map(visits.map((v) => [v.source_visit_id, [v.facility_name, v.provider_npi]])))).toEqual(NONE);
  });
});

describe.skipIf(Boolean(MISSING))(
  `FHIR re-deliveries: the same files twice, the same resources renamed, a changed resource${SKIPPED}`,
  () => {
    const f = useFhirDatabase();
    let tmp: string;
    let bulk1: LoadResult;
    let bundles1: LoadResult;
    let before: Fingerprint;
    beforeAll(async () => {
      tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-fhir-'));
      bulk1 = await f.load([BULK_DIR]);
      bundles1 = await f.load([BUNDLE_DIR]);
      before = await fingerprint(f.db.query);
    }, LOAD_TIMEOUT);
    afterAll(() => {
      if (tmp) rmSync(tmp, { recursive: true, force: true });
    });

    const typesOf = (batchId: number) =>
      f.db.query(`SELECT resource_type, count(*)::int AS n FROM landing.raw_documents WHERE batch_id = $1 GROUP BY 1 ORDER BY 1`, [
        batchId,
      ]);

    test('both sets: 7,645 resources loaded, 19 patients, 1,253 visits, 570 diagnoses, 3,816 treatments, 1,215 notes', async () => {
      expect(await outcomes(f.db.query)).toEqual({ loaded: 7645 });
      expect(await clinicalCounts(f.db.query)).toEqual({
        patients: 19,
        visits: 1253,
        diagnoses: 570,
        treatments: 3816,
        provider_notes: 1215,
      });
    });

    test('the same files again: every resource a duplicate (typed like the first), no clinical row changes', async () => {
      const [keys] = await f.db.query(
        `SELECT (SELECT max(visit_key) FROM clinical.visits)::text AS v, (SELECT max(diagnosis_key) FROM clinical.diagnoses)::text AS d`,
      );
      const bulk2 = await f.load([BULK_DIR]);
      expect(bulk2.files.map((x) => x.status)).toEqual(Array(13).fill('duplicate_file'));
      expect(await outcomes(f.db.query, bulk2.batchId)).toEqual({ duplicate: 7160 });
      expect(await typesOf(bulk2.batchId)).toEqual(await typesOf(bulk1.batchId));
      const bundles2 = await f.load([BUNDLE_DIR]);
      expect(await outcomes(f.db.query, bundles2.batchId)).toEqual({ duplicate: 485 });
      expect(await typesOf(bundles2.batchId)).toEqual(await typesOf(bundles1.batchId));
      expect(fingerprintDiff(before, await fingerprint(f.db.query))).toEqual({});
      expect(
        await f.db.query(
          `SELECT (SELECT max(visit_key) FROM clinical.visits)::text AS v, (SELECT max(diagnosis_key) FROM clinical.diagnoses)::text AS d`,
        ),
      ).toEqual([keys]);
      expect(await unbalanced(f.db.query)).toEqual([]);
    });

    test('the same resources in a new file (lines reversed) are duplicates resource by resource', async () => {
      const file = path.join(tmp, 'Condition.reordered.ndjson');
      writeFileSync(file, ndjsonLines(path.join(BULK_DIR, 'Condition.000.ndjson')).reverse().join('\n') + '\n');
      const again = await f.load([file]);
      expect(again.files[0].status).toBe('staged');
      expect(await outcomes(f.db.query, again.batchId)).toEqual({ duplicate: 555 });
      expect(fingerprintDiff(before, await fingerprint(f.db.query))).toEqual({});
      expect(await unbalanced(f.db.query)).toEqual([]);
    });

    test('a Condition delivered again with another clinicalStatus replaces its row: one row, the new value, nothing else changes', async () => {
      const line = ndjsonLines(path.join(BULK_DIR, 'Condition.000.ndjson')).find(
        (l) => JSON.parse(l).clinicalStatus.coding[0].code === 'active',
      )!;
      const changed = JSON.parse(line);
      changed.clinicalStatus.coding[0].code = 'resolved';
      changed.abatementDateTime = changed.onsetDateTime;
      const file = path.join(tmp, 'Condition.001.ndjson');
      writeFileSync(file, JSON.stringify(changed) + '\n');
      const q = `SELECT clinical_status, code, visit_date::text AS visit_date FROM clinical.diagnoses WHERE source_diagnosis_id = $1`;
      const [old] = await f.db.query(q, [changed.id]);
      expect(old.clinical_status).toBe('active');

      const r = await f.load([file]);
      expect(await outcomes(f.db.query, r.batchId)).toEqual({ loaded: 1 });
      expect(await f.db.query(q, [changed.id])).toEqual([{ ...old, clinical_status: 'resolved' }]);
      expect(await clinicalCounts(f.db.query)).toEqual({
        patients: 19,
        visits: 1253,
        diagnoses: 570,
        treatments: 3816,
        provider_notes: 1215,
      });
      const status = await f.db.query(`SELECT clinical_status, count(*)::int AS n FROM clinical.diagnoses GROUP BY 1 ORDER BY 1`);
      expect(status).toEqual([
        { clinical_status: 'active', n: 107 + 5 - 1 },
        { clinical_status: 'resolved', n: 448 + 10 + 1 },
      ]);
      // every other row as it was; the diagnosis row of that Condition only changed
      const diff = fingerprintDiff(before, await fingerprint(f.db.query));
      expect(Object.keys(diff)).toEqual(['diagnoses']);
      expect([...diff.diagnoses.onlyA, ...diff.diagnoses.onlyB].map((x) => x.split(' ')[0].split('/').at(-1))).toEqual([
        changed.id,
        changed.id,
      ]);
      expect(await orphans(f.db.query)).toEqual({ diagnoses: 0, treatments: 0, provider_notes: 0 });
      expect(await unbalanced(f.db.query)).toEqual([]);
    });
  },
);

describe.skipIf(Boolean(MISSING))(`FHIR rejects: a bad resource is rejected alone, named by its FHIRPath-like field${SKIPPED}`, () => {
  const f = useFhirDatabase();
  let tmp: string;
  const id = (n: number) => `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`;
  const patient = {
    resourceType: 'Patient',
    id: id(1),
    gender: 'female',
    birthDate: '1980-01-01',
    name: [{ use: 'official', family: 'Testfam', given: ['Testgiven'] }],
  };
  const cls = { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB' };
  const encounter = {
    resourceType: 'Encounter',
    id: id(2),
    status: 'finished',
    class: cls,
    subject: { reference: `Patient/${id(1)}` },
    period: { start: '2020-01-02T10:00:00-05:00', end: '2020-01-02T10:30:00-05:00' },
  };
  const noStart = { ...encounter, id: id(3), period: { end: '2020-01-03T10:30:00-05:00' } };
  const condition = {
    resourceType: 'Condition',
    id: id(4),
    clinicalStatus: { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/condition-clinical', code: 'active' }] },
    code: { coding: [{ system: 'http://snomed.info/sct', code: '44054006', display: 'Diabetes' }], text: 'Diabetes' },
    subject: { reference: `Patient/${id(1)}` },
    encounter: { reference: `Encounter/${id(2)}` },
    onsetDateTime: '2020-01-02T10:00:00-05:00',
  };
  const { code: _code, ...noCode } = { ...condition, id: id(5) };
  const procedure = {
    resourceType: 'Procedure',
    id: id(6),
    status: 'completed',
    code: { coding: [{ system: 'http://snomed.info/sct', code: '430193006', display: 'Medication reconciliation' }] },
    subject: { reference: `Patient/${id(1)}` },
    encounter: { reference: `Encounter/${id(2)}` },
    performedPeriod: { start: '2020-01-02T10:05:00-05:00', end: '2020-01-02T10:20:00-05:00' },
  };
  let cli: { code: number | null; stdout: string; stderr: string };
  beforeAll(async () => {
    tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-fhir-'));
    const file = path.join(tmp, 'mixed.ndjson');
    writeFileSync(file, [patient, encounter, noStart, noCode, condition, procedure].map((x) => JSON.stringify(x)).join('\n') + '\n');
    cli = await healthetl(['run', file, '--source-system', 'test-fhir', '--database-url', f.loader()]);
  }, LOAD_TIMEOUT);
  afterAll(() => {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  test('the run exits 4 (rejects); the 4 good resources load under --source-system, the 2 bad ones are rejected', async () => {
    expect(cli.code, (cli.stdout + cli.stderr).trim().split('\n').slice(-3).join(' | ').slice(0, 600)).toBe(4);
    expect(await outcomes(f.db.query)).toEqual({ loaded: 4, rejected: 2 });
    expect(await f.db.query(`SELECT DISTINCT source_system FROM landing.raw_documents`)).toEqual([{ source_system: 'test-fhir' }]);
    expect(await clinicalCounts(f.db.query)).toEqual({ patients: 1, visits: 1, diagnoses: 1, treatments: 1, provider_notes: 0 });
    expect(await f.db.query(`SELECT source_system, source_patient_id FROM clinical.patients`)).toEqual([
      { source_system: 'test-fhir', source_patient_id: id(1) },
    ]);
    expect(await f.db.query(`SELECT source_visit_id FROM clinical.visits`)).toEqual([{ source_visit_id: id(2) }]);
    expect(await f.db.query(`SELECT source_diagnosis_id FROM clinical.diagnoses`)).toEqual([{ source_diagnosis_id: id(4) }]);
    expect(await unbalanced(f.db.query)).toEqual([]);
  });

  test('each reject names its field as a FHIRPath-like path, and its reason starts with that field', async () => {
    const rows = await f.db.query(`SELECT line::int AS line, field, reason FROM etl.rejected_documents ORDER BY line`);
    expect(rows.map((x) => x.line)).toEqual([3, 4]);
    expect(rows[0]).toEqual({ line: 3, field: 'Encounter.period.start', reason: 'Encounter.period.start: is required' });
    expect(rows[1].field).toMatch(/^Condition\.code(\.coding(\.code)?)?$/);
    expect(rows[1].reason).toBe(`${rows[1].field}: is required`);
  });

  test('inside a bundle, a Condition without a code rejects that entry only (item = its entry index)', async () => {
    const file = bundles()[0].file;
    const b = JSON.parse(readFileSync(file, 'utf8'));
    const index = b.entry.findIndex((e: any) => e.resource.resourceType === 'Condition');
    const patientId = b.entry[0].resource.id;
    delete b.entry[index].resource.code;
    const bad = path.join(tmp, 'bundle-with-a-bad-condition.json');
    writeFileSync(bad, JSON.stringify(b));
    const r = await f.load([bad], { format: 'fhir-r4' });
    expect(await outcomes(f.db.query, r.batchId)).toEqual({ loaded: b.entry.length - 1, rejected: 1 });
    const [rej] = await f.db.query(`SELECT item::int AS item, field, reason FROM etl.rejected_documents WHERE batch_id = $1`, [r.batchId]);
    expect(rej.item).toBe(index);
    expect(rej.field).toMatch(/^Condition\.code(\.coding(\.code)?)?$/);
    expect(rej.reason).toBe(`${rej.field}: is required`);
    const n = (t: string) => b.entry.filter((e: any) => e.resource.resourceType === t).length;
    const [c] = await f.db.query(
      `SELECT (SELECT count(*) FROM clinical.visits v WHERE v.patient_key = p.patient_key)::int AS visits,
              (SELECT count(*) FROM clinical.diagnoses d WHERE d.patient_key = p.patient_key)::int AS diagnoses
       FROM clinical.patients p WHERE p.source_system = 'fhir' AND p.source_patient_id = $1`,
      [patientId],
    );
    expect(c).toEqual({ visits: n('Encounter'), diagnoses: n('Condition') - 1 });
    expect(await unbalanced(f.db.query)).toEqual([]);
  });
});
