import { createHash } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CSV_COLUMNS,
  TABLES,
  csvField,
  generatePatient,
  pgTextArray,
  writeDataset,
  type DatasetInfo,
  type PatientDocument,
  type Table,
} from '../scripts/generate.ts';

const N = 2000;
const SEED = 42;

// RFC 4180 parser: returns rows of fields; an unquoted empty field is null (as COPY reads it).
function parseCsv(text: string): Array<Array<string | null>> {
  const rows: Array<Array<string | null>> = [];
  let row: Array<string | null> = [];
  let i = 0;
  while (i < text.length) {
    let field: string | null;
    if (text[i] === '"') {
      field = '';
      i++;
      for (;;) {
        const q = text.indexOf('"', i);
        if (q < 0) throw new Error('unterminated quote');
        field += text.slice(i, q);
        i = q + 1;
        if (text[i] === '"') {
          field += '"';
          i++;
        } else break;
      }
    } else {
      let j = i;
      while (j < text.length && text[j] !== ',' && text[j] !== '\n' && text[j] !== '\r') j++;
      field = j === i ? null : text.slice(i, j);
      i = j;
    }
    row.push(field);
    if (text[i] === ',') {
      i++;
      continue;
    }
    if (text[i] === '\r') i++;
    if (text[i] === '\n' || i >= text.length) {
      rows.push(row);
      row = [];
      i++;
      continue;
    }
    throw new Error(`unexpected ${JSON.stringify(text[i])} at ${i}`);
  }
  return rows;
}

// PostgreSQL array literal of quoted elements, e.g. {"a","b \"c\""} -> ['a', 'b "c"'].
function parsePgTextArray(s: string): string[] {
  expect(s.startsWith('{') && s.endsWith('}')).toBe(true);
  return [...s.slice(1, -1).matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]!.replace(/\\(.)/g, '$1'));
}

// Column names of each clinical table, read from the migration itself.
async function migrationColumns(): Promise<Record<string, string[]>> {
  const sql = await readFile(new URL('../migrations/0002_clinical-tables.sql', import.meta.url), 'utf8');
  const out: Record<string, string[]> = {};
  for (const m of sql.matchAll(/CREATE TABLE clinical\.(\w+) \(([\s\S]*?)\n\)/g)) {
    out[m[1]!] = m[2]!
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => /^[a-z_][a-z0-9_]*\s+(bigint|text|date|int|boolean|timestamptz|bytea|text\[\])\b/.test(l))
      .filter((l) => !/GENERATED ALWAYS/.test(l) && !/DEFAULT/.test(l)) // identity keys and loaded_at
      .map((l) => l.split(/\s+/)[0]!);
  }
  return out;
}

const isDate = (s: unknown): boolean =>
  typeof s === 'string' && /^\d{4}-\d{2}-\d{2}$/.test(s) && new Date(`${s}T00:00:00Z`).toISOString().startsWith(s);
const isTimestamp = (s: unknown): boolean =>
  typeof s === 'string' && /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/.test(s) && !Number.isNaN(Date.parse(s));

// The contract's required fields and enumerations; returns the problems found.
function problems(d: PatientDocument): string[] {
  const p: string[] = [];
  const check = (ok: boolean, what: string) => {
    if (!ok) p.push(what);
  };
  check(/^P\d{7}$/.test(d.patient_id), 'patient_id');
  check(d.source_system === 'bench', 'source_system');
  check(isTimestamp(d.updated_at), 'updated_at');
  check(/^9\d{2}-\d{2}-\d{4}$/.test(d.ssn), 'ssn');
  check(typeof d.mrn === 'string' && d.mrn.length > 0, 'mrn');
  const given = Array.isArray(d.name.given) ? d.name.given : [d.name.given];
  check(given.length > 0 && given.every((g) => typeof g === 'string' && g.length > 0) && d.name.family.length > 0, 'name');
  check(isDate(d.birth_date), 'birth_date');
  check(['female', 'male', 'other', 'unknown'].includes(d.sex), 'sex');
  check(/^\+1-\d{3}-555-01\d{2}$/.test(d.contact.phone) && d.contact.email.endsWith('@example.org'), 'contact');
  const a = d.address;
  check(a.line.length > 0 && [a.city, a.state, a.postal_code, a.country].every((x) => x.length > 0), 'address');
  check(d.visits.length > 0 && new Set(d.visits.map((v) => v.visit_id)).size === d.visits.length, 'visit ids');
  for (const v of d.visits) {
    check(
      isDate(v.visit_date) && v.visit_date >= '2015-01-01' && v.visit_date <= '2025-12-31' && v.visit_date > d.birth_date,
      'visit_date',
    );
    check(v.discharge_date === undefined || (isDate(v.discharge_date) && v.discharge_date >= v.visit_date), 'discharge_date');
    check(['outpatient', 'inpatient', 'emergency', 'telehealth', 'other'].includes(v.visit_type), 'visit_type');
    check(!!v.facility.id && !!v.facility.name && /^9\d{9}$/.test(v.provider.npi) && !!v.provider.name, 'facility/provider');
    check(
      v.diagnoses.every((x) => x.system === 'ICD-10-CM' && /^[A-Z]\d{2}(\.[0-9A-Z]{1,4})?$/.test(x.code) && !!x.description),
      'diagnoses',
    );
    check(v.diagnoses.filter((x) => x.primary).length === 1, 'one primary diagnosis');
    check(new Set(v.diagnoses.map((x) => x.code)).size === v.diagnoses.length, 'distinct diagnosis codes');
    check(
      v.treatments.every(
        (t) =>
          ['medication', 'procedure'].includes(t.type) &&
          isDate(t.start_date) &&
          isDate(t.end_date) &&
          t.end_date >= t.start_date &&
          [t.treatment_id, t.code, t.system, t.name, t.dose, t.route, t.frequency].every(Boolean),
      ),
      'treatments',
    );
    check(
      v.provider_notes.every((n) => !!n.note_id && !!n.author && isTimestamp(n.written_at) && n.text.length > 0),
      'notes',
    );
  }
  return p;
}

describe('generatePatient', () => {
  it('is a pure function of (index, seed)', () => {
    const first = generatePatient(7, SEED);
    for (let i = 0; i < 20; i++) generatePatient(i, SEED); // generating others changes nothing
    generatePatient(7, 1);
    expect(generatePatient(7, SEED)).toEqual(first);
    expect(first.patient_id).toBe('P0000008');
    expect(generatePatient(7, SEED + 1)).not.toEqual(first);
    expect(generatePatient(8, SEED)).not.toEqual(first);
  });

  it('different seeds give different datasets, not shifted copies', () => {
    const a = JSON.stringify(Array.from({ length: 50 }, (_, i) => generatePatient(i, 1)).map((d) => d.visits));
    const b = JSON.stringify(Array.from({ length: 50 }, (_, i) => generatePatient(i, 2)).map((d) => d.visits));
    expect(a).not.toEqual(b);
    const ssns = new Set(Array.from({ length: 50 }, (_, i) => generatePatient(i, 1).ssn));
    expect(ssns.size).toBeGreaterThan(45); // patients are not all alike
  });
});

describe('writeDataset', () => {
  let dir: string;
  let info: DatasetInfo;
  let docs: PatientDocument[];
  let lines: string[];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'healthetl-generate-'));
    info = await writeDataset(dir, { patients: N, seed: SEED });
    const text = await readFile(join(dir, 'patients.ndjson'), 'utf8');
    expect(text.endsWith('\n')).toBe(true);
    lines = text.slice(0, -1).split('\n');
    docs = lines.map((l) => JSON.parse(l) as PatientDocument);
  }, 60_000);

  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('writes one valid document per NDJSON line, the same as generatePatient', () => {
    expect(lines.length).toBe(N);
    expect(info.patients).toBe(N);
    expect(docs[0]).toEqual(generatePatient(0, SEED));
    expect(docs[N - 1]).toEqual(generatePatient(N - 1, SEED));
    const bad = docs.flatMap((d) => problems(d).map((p) => `${d.patient_id}: ${p}`));
    expect(bad).toEqual([]);
    const years = new Set(docs.flatMap((d) => d.visits.map((v) => v.visit_date.slice(0, 4))));
    expect([...years].sort()).toEqual(['2015', '2016', '2017', '2018', '2019', '2020', '2021', '2022', '2023', '2024', '2025']);
  });

  it('hits the target averages', () => {
    const visits = docs.flatMap((d) => d.visits);
    const sum = (f: (v: PatientDocument['visits'][number]) => number) => visits.reduce((a, v) => a + f(v), 0);
    expect(visits.length / N).toBeGreaterThan(4.6 - 0.3);
    expect(visits.length / N).toBeLessThan(4.6 + 0.3);
    expect(Math.abs(sum((v) => v.diagnoses.length) / visits.length - 2)).toBeLessThan(0.2);
    expect(Math.abs(sum((v) => v.treatments.length) / visits.length - 1)).toBeLessThan(0.15);
    expect(Math.abs(sum((v) => v.provider_notes.length) / visits.length - 0.5)).toBeLessThan(0.07);
    // ~22 clinical rows per patient: 1 + 4.6 + 9.2 + 4.6 + 2.3.
    const rows = TABLES.reduce((a, t) => a + info.rows[t], 0) / N;
    expect(Math.abs(rows - 21.7)).toBeLessThan(1.5);
  });

  it('has a document size close to what the v1 shape allows', () => {
    // Keys and punctuation alone (every string value emptied) at the target counts are about
    // 0.2 KB per patient + 4.6 visits x (0.15 KB visit + 2 x 0.05 KB diagnosis + 0.13 KB treatment
    // + 0.5 x 0.06 KB note) = about 2.2 KB, so the brief's 2.8 KB leaves no room for realistic
    // values. Dates, enumerations and code systems add about 0.35 KB, names, codes, descriptions,
    // contact and address about 1.1 KB: about 3.7 KB per patient in all.
    const skeleton = docs.reduce((a, d) => a + JSON.stringify(d, (_k, v: unknown) => (typeof v === 'string' ? '' : v)).length, 0);
    expect(Math.abs(skeleton / N / 2200 - 1)).toBeLessThan(0.1);
    expect(Math.abs(info.bytes.ndjson / N / 3700 - 1)).toBeLessThan(0.2);
  });

  it('writes the JSON array form with the same documents', async () => {
    const text = await readFile(join(dir, 'patients.json'), 'utf8');
    const arr = JSON.parse(text) as PatientDocument[];
    expect(arr.length).toBe(N);
    expect(arr).toEqual(docs);
    expect(Buffer.byteLength(text)).toBe(info.bytes.json);
    expect((await stat(join(dir, 'patients.ndjson'))).size).toBe(info.bytes.ndjson);
  });

  it("writes CSV files with the migration's columns and the flattened row counts", async () => {
    const columns = await migrationColumns();
    expect(Object.keys(columns).sort()).toEqual([...TABLES].sort());
    expect((await readdir(join(dir, 'csv'))).sort()).toEqual(TABLES.map((t) => `${t}.csv`).sort());
    const expected: Record<Table, number> = {
      patients: N,
      visits: docs.reduce((a, d) => a + d.visits.length, 0),
      diagnoses: docs.reduce((a, d) => a + d.visits.reduce((b, v) => b + v.diagnoses.length, 0), 0),
      treatments: docs.reduce((a, d) => a + d.visits.reduce((b, v) => b + v.treatments.length, 0), 0),
      provider_notes: docs.reduce((a, d) => a + d.visits.reduce((b, v) => b + v.provider_notes.length, 0), 0),
    };
    expect(info.rows).toEqual(expected);
    for (const t of TABLES) {
      const [header, ...rows] = parseCsv(await readFile(join(dir, 'csv', `${t}.csv`), 'utf8'));
      expect(header).toEqual(columns[t]);
      expect(header).toEqual(CSV_COLUMNS[t]);
      expect(rows.length).toBe(info.rows[t]);
      expect(rows.every((r) => r.length === header!.length)).toBe(true);
    }
  });

  it('flattens values the way the transform does', async () => {
    const read = async (t: Table) => {
      const [header, ...rows] = parseCsv(await readFile(join(dir, 'csv', `${t}.csv`), 'utf8'));
      return rows.map((r) => Object.fromEntries(header!.map((h, i) => [h as string, r[i]])));
    };
    const patients = await read('patients');
    patients.forEach((p, i) => {
      const d = docs[i]!;
      expect(p.patient_key).toBe(String(i + 1));
      expect(p.document_id).toBe(String(i + 1));
      expect(p.batch_id).toBe('1');
      expect(p.source_patient_id).toBe(d.patient_id);
      expect(p.source_updated_at).toBe(d.updated_at);
      expect(p.given_name).toBe(Array.isArray(d.name.given) ? d.name.given.join(' ') : d.name.given);
      expect(p.name_prefix).toBe(d.name.prefix ?? null);
      expect(parsePgTextArray(p.address_lines!)).toEqual(d.address.line);
      expect(p.content_sha256).toBe(`\\x${createHash('sha256').update(lines[i]!).digest('hex')}`);
    });
    // Commas and quotes inside array elements survive both quotings (array literal, then CSV).
    expect(docs.some((d) => d.address.line.some((l) => l.includes('"') && l.includes(',')))).toBe(true);

    const visits = await read('visits');
    expect(visits.map((v) => Number(v.visit_key))).toEqual(visits.map((_, i) => i + 1));
    const flatVisits = docs.flatMap((d, i) => d.visits.map((v, position) => ({ i, v, position })));
    visits.forEach((row, k) => {
      const { i, v, position } = flatVisits[k]!;
      expect([row.patient_key, row.source_visit_id, row.visit_date, row.position, row.visit_start, row.discharge_date]).toEqual([
        String(i + 1),
        v.visit_id,
        v.visit_date,
        String(position),
        null,
        v.discharge_date ?? null,
      ]);
      expect(row.provider_name).toBe(v.provider.name);
    });

    const notes = await read('provider_notes');
    const flatNotes = flatVisits.flatMap(({ i, v }, k) =>
      v.provider_notes.map((n, position) => ({
        patient_key: String(i + 1),
        visit_key: String(k + 1),
        visit_date: v.visit_date,
        position: String(position),
        source_note_id: n.note_id,
        author: n.author,
        written_at: n.written_at,
        note_text: n.text,
      })),
    );
    expect(notes).toEqual(flatNotes);
    // The data exercises CSV quoting: commas, doubled quotes and line breaks inside fields.
    expect(notes.some((n) => n.note_text!.includes('"') && n.note_text!.includes(','))).toBe(true);
    expect(notes.some((n) => n.note_text!.includes('\n'))).toBe(true);

    const diagnoses = await read('diagnoses');
    const flatDx = flatVisits.flatMap(({ v }) => v.diagnoses);
    expect(diagnoses.map((x) => [x.code, x.code_system, x.description, x.is_primary])).toEqual(
      flatDx.map((x) => [x.code, x.system, x.description, String(x.primary)]),
    );
    const treatments = await read('treatments');
    const flatTx = flatVisits.flatMap(({ v }) => v.treatments);
    expect(treatments.map((x) => [x.source_treatment_id, x.treatment_type, x.code_system, x.name, x.frequency, x.end_date])).toEqual(
      flatTx.map((x) => [x.treatment_id, x.type, x.system, x.name, x.frequency, x.end_date]),
    );
  });

  it('writes only the forms asked for', async () => {
    const sub = join(dir, 'only-ndjson');
    const small = await writeDataset(sub, { patients: 3, seed: SEED, forms: ['ndjson'] });
    expect(await readdir(sub)).toEqual(['patients.ndjson']);
    expect(small.files).toEqual({ ndjson: join(sub, 'patients.ndjson') });
    expect(small.rows.patients).toBe(3);
  });
});

describe('CSV and array quoting', () => {
  it('quotes per RFC 4180 and keeps null apart from the empty string', () => {
    const values = ['plain', 'a,b', 'say "hi"', 'two\nlines', 'cr\r\nlf', '', null, 'x""y', ' spaced '];
    const line = values.map((v) => csvField(v)).join(',') + '\n';
    expect(line.startsWith('plain,"a,b","say ""hi""","two\nlines"')).toBe(true);
    expect(parseCsv(line)).toEqual([values]);
  });

  it('writes text[] literals that survive the CSV quoting', () => {
    const items = ['12 Elm St', 'Bldg "C", Unit 4', 'back\\slash', '{braces}', ''];
    const literal = pgTextArray(items);
    expect(literal).toBe('{"12 Elm St","Bldg \\"C\\", Unit 4","back\\\\slash","{braces}",""}');
    const [[field]] = parseCsv(csvField(literal) + '\n') as [[string]];
    expect(parsePgTextArray(field)).toEqual(items);
  });
});
