// The pipeline end to end, in process: load (COPY into landing) then the in-database transform,
// on the handwritten fixtures whose outcomes fixtures/EXPECTED.md states by hand.
import { readFileSync } from 'node:fs';
import { mkdtemp, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { gzipSync } from 'node:zlib';
import { beforeAll, describe, expect, test } from 'vitest';
import { expandInputs } from '../scripts/inputs.ts';
import { loadBatch, type LoadResult } from '../scripts/stage.ts';
import { transformPending } from '../scripts/transform.ts';
import { useLogin, usePool, useTestDatabase } from './db.ts';

const db = useTestDatabase();
// The loader runs as a login of healthetl_loader, not a superuser: a missing grant fails here.
const loader = useLogin(db, 'healthetl_loader');
const pool = usePool({ url: loader });

const FIX = path.resolve('fixtures');

async function run(paths: string[], stdin?: Readable, stdinFormat: 'ndjson' | 'json' = 'ndjson'): Promise<LoadResult> {
  const r = await loadBatch(loader(), expandInputs(paths, stdinFormat), { stdin, stdinFormat });
  await transformPending(pool());
  return r;
}

async function counts(): Promise<Record<string, number>> {
  const [r] = await db.query(`SELECT
    (SELECT count(*) FROM clinical.patients)::int AS patients,
    (SELECT count(*) FROM clinical.visits)::int AS visits,
    (SELECT count(*) FROM clinical.diagnoses)::int AS diagnoses,
    (SELECT count(*) FROM clinical.treatments)::int AS treatments,
    (SELECT count(*) FROM clinical.provider_notes)::int AS provider_notes`);
  return r;
}

async function outcomes(batchId: number): Promise<Record<string, number>> {
  const rows = await db.query(`SELECT status, count(*)::int AS n FROM landing.raw_documents WHERE batch_id = $1 GROUP BY status`, [
    batchId,
  ]);
  return Object.fromEntries(rows.map((r) => [r.status, r.n]));
}

async function reset(): Promise<void> {
  await db.query(`TRUNCATE clinical.patients, clinical.visits, clinical.diagnoses, clinical.treatments, clinical.provider_notes,
    etl.document_problems, etl.rejected_documents, landing.raw_documents, etl.batch_files, etl.batches, etl.patient_keys`);
}

describe('fixtures/valid (every file form in one directory load)', () => {
  let first: LoadResult;
  beforeAll(async () => {
    await reset();
    first = await run([path.join(FIX, 'valid')]);
  });

  test('16 documents from 6 files, all loaded, with the row counts of EXPECTED.md', async () => {
    expect(first.documents).toBe(16);
    expect(first.files.map((f) => [path.relative(FIX, f.path), f.status, f.documents])).toEqual([
      ['valid/array.json', 'staged', 3],
      ['valid/gzipped.ndjson.gz', 'staged', 2],
      ['valid/nested/dir/deep.jsonl', 'staged', 1],
      ['valid/one-patient.json', 'staged', 1],
      ['valid/patients.ndjson', 'staged', 8],
      ['valid/with-bom.json', 'staged', 1],
    ]);
    expect(await outcomes(first.batchId)).toEqual({ loaded: 16 });
    expect(await counts()).toEqual({ patients: 16, visits: 15, diagnoses: 13, treatments: 9, provider_notes: 8 });
    expect(await db.query(`SELECT count(*)::int AS n FROM etl.document_problems`)).toEqual([{ n: 0 }]);
  });

  test('positions: NDJSON lines, array items, the BOM file at byte 3', async () => {
    const rows = await db.query(
      `SELECT source_file, line, item, byte_offset FROM landing.raw_documents WHERE batch_id = $1 ORDER BY document_id`,
      [first.batchId],
    );
    const rel = rows.map((r) => [
      path.relative(FIX, r.source_file),
      r.line === null ? null : Number(r.line),
      r.item === null ? null : Number(r.item),
    ]);
    expect(rel.filter((r) => r[0] === 'valid/array.json')).toEqual([
      ['valid/array.json', null, 0],
      ['valid/array.json', null, 1],
      ['valid/array.json', null, 2],
    ]);
    expect(rel.filter((r) => r[0] === 'valid/patients.ndjson').map((r) => r[1])).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    const bom = rows.find((r) => r.source_file.endsWith('with-bom.json'));
    expect(Number(bom.byte_offset)).toBe(3);
  });

  test('values: numbers as text, given names joined, case folding of sex, non-ASCII names', async () => {
    const p = await db.query(`SELECT source_system, source_patient_id, given_name, family_name, sex, address_lines
                              FROM clinical.patients ORDER BY source_system, source_patient_id`);
    const by = (ss: string, id: string) => p.find((r) => r.source_system === ss && r.source_patient_id === id);
    expect(by('default', '1003')).toBeDefined();
    expect(by('default', 'P-1001')).toMatchObject({ given_name: 'Ada Quinn', address_lines: ['1 Example Street', 'Apt 2'] });
    expect(by('clinic-b', 'P-1001')).toMatchObject({ sex: 'male' });
    expect(by('default', 'P-1005')).toMatchObject({ sex: 'unknown', family_name: '李', given_name: '小龍' });
    expect(by('default', 'P-1004')).toMatchObject({ given_name: 'José', family_name: 'Müller' });
    expect(p.filter((r) => r.source_system === 'default')).toHaveLength(15);
    const years = await db.query(
      `SELECT extract(year FROM visit_date)::int AS y, count(*)::int AS n FROM clinical.visits GROUP BY 1 ORDER BY 1`,
    );
    expect(years).toEqual([
      { y: 2019, n: 1 },
      { y: 2020, n: 2 },
      { y: 2021, n: 3 },
      { y: 2022, n: 3 },
      { y: 2023, n: 3 },
      { y: 2024, n: 3 },
    ]);
    const started = await db.query(`SELECT v.visit_date::text AS d FROM clinical.visits v JOIN clinical.patients p USING (patient_key)
                                    WHERE p.source_patient_id = 'P-1005' AND v.source_visit_id = 'V-88'`);
    expect(started).toEqual([{ d: '2024-03-10' }]);
    const dx = await db.query(`SELECT code_system, count(*)::int AS n FROM clinical.diagnoses GROUP BY 1 ORDER BY 1`);
    expect(dx).toEqual([
      { code_system: 'ICD-10-CM', n: 12 },
      { code_system: 'SNOMED-CT', n: 1 },
    ]);
    const tx = await db.query(`SELECT treatment_type, count(*)::int AS n FROM clinical.treatments GROUP BY 1 ORDER BY 1`);
    expect(tx).toEqual([
      { treatment_type: 'medication', n: 5 },
      { treatment_type: 'procedure', n: 4 },
    ]);
  });

  test('unknown fields stay in the landing payload only', async () => {
    const [r] = await db.query(`SELECT count(*)::int AS n FROM landing.raw_documents WHERE payload::text LIKE '%favorite_color%'`);
    expect(r.n).toBeGreaterThan(0);
  });

  test('re-loading the same files changes nothing and counts every document as a duplicate', async () => {
    const before = await counts();
    const [keysBefore] = await db.query(`SELECT max(visit_key) AS m FROM clinical.visits`);
    const again = await run([path.join(FIX, 'valid')]);
    expect(again.documents).toBe(16);
    expect(again.files.every((f) => f.status === 'duplicate_file')).toBe(true);
    expect(await outcomes(again.batchId)).toEqual({ duplicate: 16 });
    expect(await counts()).toEqual(before);
    const [keysAfter] = await db.query(`SELECT max(visit_key) AS m FROM clinical.visits`);
    expect(keysAfter.m).toBe(keysBefore.m); // rows were not rewritten
  });

  test('the same documents under another file name are duplicates document by document', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'healthetl-'));
    // Same documents, different bytes for the file (reordered lines): no file-level match.
    const lines = readFileSync(path.join(FIX, 'valid/patients.ndjson'), 'utf8').trim().split('\n').reverse();
    await writeFile(path.join(dir, 'copy.ndjson'), lines.join('\n') + '\n');
    const r = await run([dir]);
    expect(r.files[0].status).toBe('staged');
    expect(await outcomes(r.batchId)).toEqual({ duplicate: 8 });
    expect(await counts()).toEqual({ patients: 16, visits: 15, diagnoses: 13, treatments: 9, provider_notes: 8 });
  });
});

describe('rejects: exact reasons, the rest of the batch loads', () => {
  let r: LoadResult;
  beforeAll(async () => {
    await reset();
    r = await run([path.join(FIX, 'invalid/rejects.ndjson')]);
  });

  test('31 documents: 2 loaded, 29 rejected, row counts of the two good ones', async () => {
    expect(r.documents).toBe(31);
    expect(await outcomes(r.batchId)).toEqual({ loaded: 2, rejected: 29 });
    expect(await counts()).toEqual({ patients: 2, visits: 2, diagnoses: 1, treatments: 0, provider_notes: 1 });
  });

  test('each reject has the reason EXPECTED.md gives for its line', async () => {
    const rows = await db.query(`SELECT line::int AS line, field, reason, all_reasons FROM etl.rejected_documents ORDER BY line`);
    const byLine = new Map(rows.map((x) => [x.line, x]));
    const expected: Record<number, string> = {
      3: '$: document is not a JSON object (found array)',
      4: '$: document is not a JSON object (found string)',
      5: '$: document is not a JSON object (found number)',
      6: '$: document is not a JSON object (found boolean)',
      7: '$: document is not a JSON object (found null)',
      8: 'patient_id: is required',
      9: 'patient_id: is required',
      10: 'patient_id: is required',
      11: 'patient_id: must be a string or a number (found object)',
      12: 'patient_id: must be a string or a number (found array)',
      13: 'patient_id: must be a string or a number (found boolean)',
      14: 'source_system: must be a string (found number)',
      15: 'visits: must be an array (found object)',
      16: 'visits[2]: must be an object (found string)',
      17: 'visits[2].visit_id: is required',
      19: 'visits[2].visit_id: "V1" is a duplicate of visits[0].visit_id',
      20: 'visits[2].visit_date: is required',
      21: 'visits[2].visit_date: "2024-02-30" is not a valid date',
      22: 'visits[0].diagnoses: must be an array (found object)',
      23: 'visits[0].treatments: must be an array (found string)',
      24: 'visits[0].provider_notes: must be an array (found object)',
      25: 'visits[0].diagnoses[0]: must be an object (found string)',
      26: 'visits[0].treatments[1]: must be an object (found number)',
      27: 'visits[0].provider_notes[0]: must be an object (found null)',
      28: 'visits[0].diagnoses[0].code: is required',
      29: 'visits[2].provider_notes[1].text: is required',
      30: 'patient_id: is required',
      31: 'visits[0].visit_date: 20240101 is not a valid date',
    };
    for (const [line, reason] of Object.entries(expected)) {
      expect(byLine.get(Number(line))?.reason, `line ${line}`).toBe(reason);
      expect(byLine.get(Number(line))?.field, `line ${line}`).toBe(reason.slice(0, reason.indexOf(': ')));
    }
    expect(byLine.get(2)?.reason).toMatch(/^\$: not valid JSON: /);
    expect(byLine.has(1) || byLine.has(18)).toBe(false);
    expect(byLine.get(30)?.all_reasons).toEqual([
      'patient_id: is required',
      'source_system: must be a string (found number)',
      'visits[0].visit_date: "2024-13-01" is not a valid date',
      'visits[1].visit_id: "A" is a duplicate of visits[0].visit_id',
      'visits[1].diagnoses[0].code: is required',
    ]);
    for (const [line, x] of byLine) if (line !== 30) expect(x.all_reasons, `line ${line}`).toHaveLength(1);
  });

  test('re-sending a file with rejects reports them again (not as duplicates)', async () => {
    const again = await run([path.join(FIX, 'invalid/rejects.ndjson')]);
    expect(again.files[0].status).toBe('staged');
    expect(await outcomes(again.batchId)).toEqual({ duplicate: 2, rejected: 29 });
  });

  test('a malformed .json file is rejected whole with the byte position', async () => {
    const m = await run([path.join(FIX, 'invalid/malformed.json')]);
    expect(m.files[0]).toMatchObject({ status: 'rejected', documents: 1 });
    const rows = await db.query(
      `SELECT r.field, r.reason, r.byte_offset::int AS byte_offset, d.payload FROM etl.rejected_documents r
       JOIN landing.raw_documents d USING (document_id) WHERE r.batch_id = $1`,
      [m.batchId],
    );
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ field: '$', byte_offset: 0, payload: null });
    expect(rows[0].reason).toMatch(/^\$: not valid JSON: .*at byte 183\)$/);
    const [p] = await db.query(`SELECT count(*)::int AS n FROM clinical.patients WHERE source_patient_id IN ('M-1', 'M-2')`);
    expect(p.n).toBe(0);
  });
});

describe('problems: invalid optional values load as NULL and are recorded', () => {
  beforeAll(async () => {
    await reset();
    await run([path.join(FIX, 'warnings/optional-problems.ndjson')]);
  });

  test('12 problems with the fields and messages of EXPECTED.md', async () => {
    const rows = await db.query(`SELECT p.source_patient_id AS patient, d.field, d.problem
      FROM etl.document_problems d JOIN clinical.patients p USING (document_id) ORDER BY 1, 2`);
    expect(rows).toEqual([
      { patient: 'W-1', field: 'birth_date', problem: 'not a valid date (YYYY-MM-DD)' },
      { patient: 'W-1', field: 'sex', problem: 'not one of female, male, other, unknown' },
      { patient: 'W-2', field: 'name.given', problem: 'not a string or an array of strings' },
      { patient: 'W-3', field: 'visits[0].discharge_date', problem: 'not a valid date' },
      { patient: 'W-3', field: 'visits[0].visit_type', problem: 'not one of outpatient, inpatient, emergency, telehealth, other' },
      { patient: 'W-4', field: 'visits[0].diagnoses[0].primary', problem: 'not a boolean' },
      { patient: 'W-4', field: 'visits[0].provider_notes[0].written_at', problem: 'not a valid RFC 3339 timestamp' },
      { patient: 'W-4', field: 'visits[0].treatments[0].type', problem: 'not one of medication, procedure' },
      { patient: 'W-4', field: 'visits[0].treatments[1].end_date', problem: 'not a valid date' },
      { patient: 'W-4', field: 'visits[0].treatments[1].start_date', problem: 'not a valid date' },
      { patient: 'W-5', field: 'birth_date', problem: 'not a valid date (YYYY-MM-DD)' },
      { patient: 'W-5', field: 'sex', problem: 'not one of female, male, other, unknown' },
    ]);
    expect(await counts()).toEqual({ patients: 5, visits: 2, diagnoses: 1, treatments: 2, provider_notes: 1 });
  });

  test('the affected columns are NULL, defaults apply only to absent values', async () => {
    const [w1] = await db.query(`SELECT birth_date, sex FROM clinical.patients WHERE source_patient_id = 'W-1'`);
    expect(w1).toEqual({ birth_date: null, sex: null });
    const [w3] = await db.query(`SELECT p.sex, v.discharge_date, v.visit_type FROM clinical.patients p
                                 JOIN clinical.visits v USING (patient_key) WHERE p.source_patient_id = 'W-3'`);
    expect(w3).toEqual({ sex: 'female', discharge_date: null, visit_type: null });
    const t = await db.query(`SELECT t.position, t.treatment_type, t.start_date, t.end_date FROM clinical.treatments t
                              JOIN clinical.patients p USING (patient_key) WHERE p.source_patient_id = 'W-4' ORDER BY t.position`);
    expect(t).toEqual([
      { position: 0, treatment_type: null, start_date: null, end_date: null },
      { position: 1, treatment_type: 'medication', start_date: null, end_date: null },
    ]);
  });
});

describe('snapshots: newer replaces, a late older one changes nothing', () => {
  const patient = async () =>
    (
      await db.query(`SELECT p.patient_key, p.city, p.given_name, p.family_name, p.source_updated_at,
        (SELECT array_agg(source_visit_id ORDER BY source_visit_id) FROM clinical.visits v WHERE v.patient_key = p.patient_key) AS visits
        FROM clinical.patients p WHERE source_patient_id = 'S-1'`)
    )[0];

  test('v1, then v2 replaces visits and children, then v0 arriving late is superseded', async () => {
    await reset();
    await run([path.join(FIX, 'snapshots/v1.ndjson')]);
    const p1 = await patient();
    expect(p1.visits).toEqual(['S1-V1', 'S1-V2']);
    expect(await counts()).toEqual({ patients: 1, visits: 2, diagnoses: 1, treatments: 1, provider_notes: 1 });

    const b2 = await run([path.join(FIX, 'snapshots/v2.ndjson')]);
    expect(await outcomes(b2.batchId)).toEqual({ loaded: 1 });
    const p2 = await patient();
    expect(p2).toMatchObject({
      patient_key: p1.patient_key,
      city: 'Secondville',
      given_name: 'Sam',
      family_name: 'Snapshot',
      visits: ['S1-V3'],
    });
    expect(await counts()).toEqual({ patients: 1, visits: 1, diagnoses: 2, treatments: 0, provider_notes: 0 });

    const b3 = await run([path.join(FIX, 'snapshots/v0-late.ndjson')]);
    expect(await outcomes(b3.batchId)).toEqual({ superseded: 1 });
    expect(await patient()).toEqual(p2);
    expect(await counts()).toEqual({ patients: 1, visits: 1, diagnoses: 2, treatments: 0, provider_notes: 0 });
    expect(await db.query(`SELECT count(*)::int AS n FROM etl.patient_keys`)).toEqual([{ n: 1 }]);

    // v2's exact bytes again, on standard input: a duplicate, nothing changes.
    const b4 = await run(['-'], Readable.from([readFileSync(path.join(FIX, 'snapshots/v2.ndjson'))]));
    expect(await outcomes(b4.batchId)).toEqual({ duplicate: 1 });
    expect(await patient()).toEqual(p2);
  });

  test('all three in one batch, in any order: v2 wins, the other two are superseded', async () => {
    for (const order of [
      ['v0-late', 'v1', 'v2'],
      ['v2', 'v0-late', 'v1'],
    ]) {
      await reset();
      const r = await run(order.map((n) => path.join(FIX, `snapshots/${n}.ndjson`)));
      expect(await outcomes(r.batchId), order.join(', ')).toEqual({ loaded: 1, superseded: 2 });
      expect(await patient()).toMatchObject({ city: 'Secondville', visits: ['S1-V3'] });
    }
  });

  test('equal updated_at: the later arrival wins', async () => {
    await reset();
    const doc = (city: string) => JSON.stringify({ patient_id: 'S-1', updated_at: '2024-01-01T00:00:00Z', address: { city }, visits: [] });
    await run(['-'], Readable.from([Buffer.from(doc('First') + '\n')]));
    await run(['-'], Readable.from([Buffer.from(doc('Second') + '\n')]));
    expect(await patient()).toMatchObject({ city: 'Second' });
  });
});

describe('input forms and edge cases', () => {
  let dir: string;
  beforeAll(async () => {
    await reset();
    dir = await mkdtemp(path.join(os.tmpdir(), 'healthetl-forms-'));
  });
  const doc = (id: string, extra: object = {}) =>
    JSON.stringify({ patient_id: id, visits: [{ visit_id: 'V1', visit_date: '2022-02-02' }], ...extra });

  test('stdin: NDJSON, a JSON array, and gzip sniffed by its magic bytes', async () => {
    const a = await run(['-'], Readable.from([Buffer.from(`${doc('IN-1')}\n${doc('IN-2')}\n`)]));
    expect(await outcomes(a.batchId)).toEqual({ loaded: 2 });
    const b = await run(['-'], Readable.from([Buffer.from(`[${doc('IN-3')},${doc('IN-4')}]`)]), 'json');
    expect(await outcomes(b.batchId)).toEqual({ loaded: 2 });
    const c = await run(['-'], Readable.from([gzipSync(Buffer.from(`${doc('IN-5')}\n`))]));
    expect(await outcomes(c.batchId)).toEqual({ loaded: 1 });
  });

  test('an empty file and a whitespace-only file stage no documents and are not errors', async () => {
    await writeFile(path.join(dir, 'empty.ndjson'), '');
    await writeFile(path.join(dir, 'blank.json'), '  \n\n');
    const r = await run([path.join(dir, 'empty.ndjson'), path.join(dir, 'blank.json')]);
    expect(r.files.map((f) => [f.status, f.documents])).toEqual([
      ['staged', 0],
      ['staged', 0],
    ]);
    expect(await outcomes(r.batchId)).toEqual({});
  });

  test('a BOM, CRLF line ends, blank lines and non-ASCII names', async () => {
    const text = `\ufeff${doc('BOM-1', { name: { given: 'Zoë', family: 'Ødegård-Ñúñez' } })}\r\n\r\n${doc('BOM-2', { name: { family: '山田' } })}\r\n`;
    await writeFile(path.join(dir, 'bom.ndjson'), text);
    const r = await run([path.join(dir, 'bom.ndjson')]);
    expect(await outcomes(r.batchId)).toEqual({ loaded: 2 });
    const rows = await db.query(
      `SELECT source_patient_id, given_name, family_name FROM clinical.patients WHERE source_patient_id LIKE 'BOM-%' ORDER BY 1`,
    );
    expect(rows).toEqual([
      { source_patient_id: 'BOM-1', given_name: 'Zoë', family_name: 'Ødegård-Ñúñez' },
      { source_patient_id: 'BOM-2', given_name: null, family_name: '山田' },
    ]);
    const lines = await db.query(`SELECT line::int AS line FROM landing.raw_documents WHERE batch_id = $1 ORDER BY line`, [r.batchId]);
    expect(lines.map((l) => l.line)).toEqual([1, 3]);
  });

  test('a malformed NDJSON line rejects that line only; an unreadable file is reported, the others load', async () => {
    await mkdir(path.join(dir, 'mixed'));
    await writeFile(path.join(dir, 'mixed/a.ndjson'), `${doc('MX-1')}\n{"patient_id": "MX-2", "visits": [\n${doc('MX-3')}\n`);
    await writeFile(path.join(dir, 'mixed/notes.txt'), 'not data');
    const r = await run([path.join(dir, 'mixed'), path.join(dir, 'does-not-exist.ndjson')]);
    expect(r.files.map((f) => [path.basename(f.path), f.status])).toEqual([
      ['a.ndjson', 'staged'],
      ['notes.txt', 'skipped'],
      ['does-not-exist.ndjson', 'unreadable'],
    ]);
    expect(await outcomes(r.batchId)).toEqual({ loaded: 2, rejected: 1 });
    const [rej] = await db.query(`SELECT line::int AS line, reason FROM etl.rejected_documents WHERE batch_id = $1`, [r.batchId]);
    expect(rej.line).toBe(2);
    expect(rej.reason).toMatch(/^\$: not valid JSON: .*\(at byte \d+\)$/);
    const [f] = await db.query(`SELECT status, error FROM etl.batch_files WHERE batch_id = $1 AND source_file LIKE '%does-not-exist%'`, [
      r.batchId,
    ]);
    expect(f.status).toBe('unreadable');
    expect(f.error).toMatch(/ENOENT/);
  });

  test('a corrupt .gz file is unreadable and nothing from it is kept', async () => {
    const gz = gzipSync(Buffer.from(Array.from({ length: 200 }, (_, i) => doc(`GZ-${i}`)).join('\n')));
    await writeFile(
      path.join(dir, 'corrupt.ndjson.gz'),
      Buffer.concat([gz.subarray(0, gz.length - 40), Buffer.from('garbage-garbage-garbage-garbage-garbage!')]),
    );
    const r = await run([path.join(dir, 'corrupt.ndjson.gz')]);
    expect(r.files[0].status).toBe('unreadable');
    expect(await outcomes(r.batchId)).toEqual({});
    const [p] = await db.query(`SELECT count(*)::int AS n FROM clinical.patients WHERE source_patient_id LIKE 'GZ-%'`);
    expect(p.n).toBe(0);
  });

  test('\\u0000 in a string is rejected by the loader, the neighbours load', async () => {
    await writeFile(path.join(dir, 'nul.ndjson'), `${doc('NUL-1')}\n{"patient_id":"NUL-2","note":"a\\u0000b"}\n${doc('NUL-3')}\n`);
    const r = await run([path.join(dir, 'nul.ndjson')]);
    expect(await outcomes(r.batchId)).toEqual({ loaded: 2, rejected: 1 });
    const [rej] = await db.query(`SELECT line::int AS line, reason FROM etl.rejected_documents WHERE batch_id = $1`, [r.batchId]);
    expect(rej).toMatchObject({ line: 2 });
    expect(rej.reason).toMatch(/\\u0000/);
  });
});

describe('partitions', () => {
  test('the transform creates yearly visit partitions as needed', async () => {
    await reset();
    const docs = ['1999-07-01', '2026-01-01T08:00:00Z'].map((d, i) =>
      JSON.stringify({ patient_id: `PART-${i}`, visits: [{ visit_id: 'V', visit_date: d }] }),
    );
    await run(['-'], Readable.from([Buffer.from(docs.join('\n'))]));
    const parts = await db.query(`SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                                  WHERE i.inhparent = 'clinical.visits'::regclass ORDER BY 1`);
    expect(parts.map((p) => p.relname)).toEqual(expect.arrayContaining(['visits_y1999', 'visits_y2026']));
  });

  test('a date-range query on clinical.visits scans only the matching partitions (EXPLAIN)', async () => {
    await run([path.join(FIX, 'valid')]);
    const plan = await db.query(`EXPLAIN (FORMAT JSON) SELECT count(*) FROM clinical.visits
                                 WHERE visit_date >= '2021-01-01' AND visit_date < '2022-01-01'`);
    const text = JSON.stringify(plan[0]['QUERY PLAN']);
    expect(text).toContain('visits_y2021');
    for (const other of ['visits_y2019', 'visits_y2020', 'visits_y2022', 'visits_y2023', 'visits_y2024', 'visits_y1999']) {
      expect(text).not.toContain(other);
    }
  });
});

describe('copies of a bad document', () => {
  test('two copies in one batch are both rejected, and a later re-send is rejected again (not a duplicate)', async () => {
    await reset();
    const bad = Buffer.from('{"patient_id":null,"visits":[]}\n');
    const a = await run(['-'], Readable.from([Buffer.concat([bad, bad])]));
    expect(await outcomes(a.batchId)).toEqual({ rejected: 2 });
    const b = await run(['-'], Readable.from([bad]));
    expect(await outcomes(b.batchId)).toEqual({ rejected: 1 });
    // The reject is stored once, with its three deliveries: the first one's position, the last batch.
    const rejects = await db.query(`SELECT batch_id::int AS first_batch, line::int AS line, last_batch_id::int AS last_batch,
                                           deliveries::int AS deliveries, reason FROM etl.rejected_documents`);
    expect(rejects).toEqual([{ first_batch: a.batchId, line: 1, last_batch: b.batchId, deliveries: 3, reason: 'patient_id: is required' }]);
    // Every delivery is listed by batch, at its own position, with the reason.
    const deliveries = await db.query(
      `SELECT batch_id::int AS batch, line::int AS line, reason FROM etl.batch_rejects ORDER BY document_id`,
    );
    expect(deliveries).toEqual([
      { batch: a.batchId, line: 1, reason: 'patient_id: is required' },
      { batch: a.batchId, line: 2, reason: 'patient_id: is required' },
      { batch: b.batchId, line: 1, reason: 'patient_id: is required' },
    ]);
  });

  test('two copies of a good document in one batch: one loaded, one duplicate', async () => {
    await reset();
    const good = Buffer.from('{"patient_id":"COPY-1","visits":[{"visit_id":"V","visit_date":"2020-01-01"}]}\n');
    const a = await run(['-'], Readable.from([Buffer.concat([good, good])]));
    expect(await outcomes(a.batchId)).toEqual({ loaded: 1, duplicate: 1 });
    expect(await counts()).toEqual({ patients: 1, visits: 1, diagnoses: 0, treatments: 0, provider_notes: 0 });
  });
});
