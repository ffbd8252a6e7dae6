// Deterministic generator of fake patient documents (patient document v1) for the benchmark.
// Every value is synthetic: SSNs start with 9 (never issued as SSNs), phones are 555-01xx,
// e-mails are @example.org, NPIs start with 9 (real NPIs start with 1 or 2), postal codes 00xxx.
// Besides NDJSON and a JSON array, it writes the same rows already flattened into the clinical
// tables of migrations/0002 as CSV, for a COPY lower bound.
import { createHash } from 'node:crypto';
import { createWriteStream, realpathSync, type WriteStream } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { once } from 'node:events';
import { finished } from 'node:stream/promises';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

export type Sex = 'female' | 'male' | 'other' | 'unknown';
export type VisitType = 'outpatient' | 'inpatient' | 'emergency' | 'telehealth' | 'other';
export interface Diagnosis {
  code: string;
  system: 'ICD-10-CM';
  description: string;
  primary: boolean;
}
export interface Treatment {
  treatment_id: string;
  type: 'medication' | 'procedure';
  code: string;
  system: string;
  name: string;
  dose: string;
  route: string;
  frequency: string;
  start_date: string;
  end_date: string;
}
export interface ProviderNote {
  note_id: string;
  author: string;
  written_at: string;
  text: string;
}
export interface Visit {
  visit_id: string;
  visit_date: string;
  discharge_date?: string;
  visit_type: VisitType;
  facility: { id: string; name: string };
  provider: { npi: string; name: string };
  diagnoses: Diagnosis[];
  treatments: Treatment[];
  provider_notes: ProviderNote[];
}
export interface PatientDocument {
  patient_id: string;
  source_system?: string;
  updated_at?: string;
  mrn: string;
  ssn: string;
  name: { given: string | string[]; family: string; prefix?: string; suffix?: string };
  birth_date: string;
  sex: Sex;
  contact: { phone: string; email: string };
  address: { line: string[]; city: string; state: string; postal_code: string; country: string };
  visits: Visit[];
}

export type Form = 'ndjson' | 'json' | 'csv';
export const TABLES = ['patients', 'visits', 'diagnoses', 'treatments', 'provider_notes'] as const;
export type Table = (typeof TABLES)[number];
export interface DatasetInfo {
  patients: number;
  rows: Record<Table, number>;
  bytes: { ndjson: number; json: number }; // sizes of the two document forms (also when not written)
  files: { ndjson?: string; json?: string; csv?: Record<Table, string> };
}

// CSV header of each clinical table: the columns of migrations/0002 without identity columns
// (diagnosis_key, treatment_key, note_key) and without patients.loaded_at (it has a default).
export const CSV_COLUMNS: Record<Table, readonly string[]> = {
  patients: [
    'patient_key',
    'source_system',
    'source_patient_id',
    'mrn',
    'ssn',
    'name_prefix',
    'given_name',
    'family_name',
    'name_suffix',
    'birth_date',
    'sex',
    'phone',
    'email',
    'address_lines',
    'city',
    'state',
    'postal_code',
    'country',
    'source_updated_at',
    'document_id',
    'content_sha256',
    'batch_id',
  ],
  visits: [
    'patient_key',
    'visit_key',
    'visit_date',
    'source_visit_id',
    'visit_start',
    'discharge_date',
    'visit_type',
    'facility_id',
    'facility_name',
    'provider_npi',
    'provider_name',
    'position',
  ],
  diagnoses: ['patient_key', 'visit_key', 'visit_date', 'position', 'code', 'code_system', 'description', 'is_primary'],
  treatments: [
    'patient_key',
    'visit_key',
    'visit_date',
    'position',
    'source_treatment_id',
    'treatment_type',
    'code',
    'code_system',
    'name',
    'dose',
    'route',
    'frequency',
    'start_date',
    'end_date',
  ],
  provider_notes: ['patient_key', 'visit_key', 'visit_date', 'position', 'source_note_id', 'author', 'written_at', 'note_text'],
};

// ---------------------------------------------------------------------------------------------
// Random numbers: mulberry32, seeded per patient from (seed, index) so patients are independent.

type Rng = () => number; // uniform in [0, 1)

function mulberry32(a: number): Rng {
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function mix32(h: number): number {
  // murmur3 finalizer
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

const patientRng = (index: number, seed: number): Rng => mulberry32(mix32(mix32(seed >>> 0) ^ Math.imul(index + 1, 0x9e3779b1)));

const int = (r: Rng, n: number): number => Math.floor(r() * n); // 0 .. n-1
const pick = <T>(r: Rng, list: readonly T[]): T => list[int(r, list.length)]!;
const digits = (r: Rng, n: number): string => String(int(r, 10 ** n)).padStart(n, '0');
function weighted(r: Rng, weights: readonly number[]): number {
  // index chosen with the given weights
  let x = r() * weights.reduce((a, b) => a + b, 0);
  for (let i = 0; i < weights.length; i++) if ((x -= weights[i]!) < 0) return i;
  return weights.length - 1;
}

// ---------------------------------------------------------------------------------------------
// Small built-in lists (codes are real public code sets; every person, place and number is made up).

const GIVEN_F = ['Ava', 'Maria', 'Olivia', 'Grace', 'Nora', 'Lena', 'Ruth', 'Chloe', 'Iris', 'Mei', 'Amara', 'Sofia', 'Hana', 'Elena'];
const GIVEN_M = ['Liam', 'Noah', 'Omar', 'Ethan', 'Lucas', 'Mateo', 'Ravi', 'Jonas', 'Theo', 'Kenji', 'Felix', 'Adam', 'Samuel', 'Diego'];
const FAMILY = [
  'Quillfeather',
  'Marrowby',
  'Testwood',
  'Fakenham',
  "O'Sampleton",
  'Nullberg',
  'Placeholder',
  'Dummont',
  'Mockridge',
  'Synthwell',
  'Examplar',
  'Fixtureson',
  'Stubbins',
  'Van Dataveld',
  'Lorem-Ipsum',
  'Benchley',
];
const PREFIXES = ['Mr.', 'Ms.', 'Mrs.', 'Mx.', 'Dr.'];
const SUFFIXES = ['Jr.', 'Sr.', 'II', 'III'];
const STREETS = ['Synthetic', 'Sample', 'Mockingbird', 'Placeholder', 'Fixture', 'Test', 'Example', 'Elm', 'Maple', 'Birch'];
const STREET_KINDS = ['St', 'Ave', 'Rd', 'Ln', 'Blvd', 'Ct'];
// [city, state, area code]: fictional towns; 555-01xx numbers are reserved for fiction in every area code.
const CITIES: ReadonlyArray<readonly [string, string, string]> = [
  ['Fakeville', 'OH', '614'],
  ['Mockton', 'TX', '512'],
  ['Sampleburg', 'PA', '412'],
  ['Testford', 'CA', '916'],
  ['Lake Placeholder', 'MN', '612'],
  ['Port Fixture', 'WA', '206'],
  ['Dummy Springs', 'CO', '303'],
  ['New Synthetica', 'NY', '518'],
  ['Benchmark Falls', 'OR', '503'],
  ['Examplar City', 'GA', '404'],
  ['Nullport', 'MA', '617'],
  ['Stubfield', 'IL', '217'],
];
const FACILITIES: ReadonlyArray<readonly [string, string]> = [
  ['F01', 'Fakeville General'],
  ['F02', 'Mockton Clinic'],
  ['F03', 'Sampleburg Medical'],
  ['F04', 'Testford Family Care'],
  ['F05', 'Placeholder Urgent Care'],
  ['F06', 'Port Fixture Hospital'],
  ['F07', 'Dummy Springs, North'],
  ['F08', 'Synthetica Telehealth'],
  ['F09', 'Benchmark Cardiology'],
  ['F10', "Examplar Children's"],
  ['F11', 'Nullport Primary Care'],
  ['F12', 'Stubfield Ortho & Sports'],
];
const ICD10: ReadonlyArray<readonly [string, string]> = [
  ['I10', 'Essential (primary) hypertension'],
  ['E11.9', 'Type 2 diabetes mellitus without complications'],
  ['E78.5', 'Hyperlipidemia, unspecified'],
  ['J06.9', 'Acute upper respiratory infection, unspecified'],
  ['M54.50', 'Low back pain, unspecified'],
  ['F41.1', 'Generalized anxiety disorder'],
  ['F32.A', 'Depression, unspecified'],
  ['J45.909', 'Unspecified asthma, uncomplicated'],
  ['K21.9', 'Gastro-esophageal reflux disease without esophagitis'],
  ['E66.9', 'Obesity, unspecified'],
  ['N39.0', 'Urinary tract infection, site not specified'],
  ['R51.9', 'Headache, unspecified'],
  ['Z00.00', 'General adult exam without abnormal findings'],
  ['J02.9', 'Acute pharyngitis, unspecified'],
  ['R05.9', 'Cough, unspecified'],
  ['E03.9', 'Hypothyroidism, unspecified'],
  ['I25.10', 'Atherosclerotic heart disease without angina'],
  ['M17.11', 'Unilateral primary osteoarthritis, right knee'],
  ['R10.9', 'Unspecified abdominal pain'],
  ['J18.9', 'Pneumonia, unspecified organism'],
  ['I48.91', 'Unspecified atrial fibrillation'],
  ['Z23', 'Encounter for immunization'],
];
// [RxNorm code, name, dose, route, frequency]; codes are illustrative.
const MEDICATIONS: ReadonlyArray<readonly [string, string, string, string, string]> = [
  ['860975', 'Metformin 500 mg tab', '500 mg', 'oral', 'BID'],
  ['314076', 'Lisinopril 10 mg tab', '10 mg', 'oral', 'daily'],
  ['617310', 'Atorvastatin 20 mg tab', '20 mg', 'oral', 'nightly'],
  ['197361', 'Amlodipine 5 mg tab', '5 mg', 'oral', 'daily'],
  ['308191', 'Amoxicillin 500 mg cap', '500 mg', 'oral', 'TID'],
  ['745679', 'Albuterol inhaler', '2 puffs', 'inhaled', 'q4h PRN'],
  ['312940', 'Sertraline 50 mg tab', '50 mg', 'oral', 'daily'],
  ['966222', 'Levothyroxine 50 mcg tab', '50 mcg', 'oral', 'daily'],
];
const PROCEDURES: ReadonlyArray<readonly [string, string]> = [
  ['93000', 'ECG, 12 leads'],
  ['36415', 'Venipuncture'],
  ['71046', 'Chest X-ray, 2 views'],
  ['81002', 'Urinalysis'],
  ['90471', 'Immunization admin'],
  ['20610', 'Arthrocentesis, major joint'],
];
const COMPLAINTS = ['Follow-up', 'Cough, mild fever', 'Back pain', 'Routine check', 'Headache', 'Dyspnea on exertion'];
const PLANS = ['continue meds', 'labs, recheck 2 wk', 'return if worse', 'new Rx, recheck 1 mo', 'refer'];

// ---------------------------------------------------------------------------------------------
// Documents

const DAY = 86_400_000;
const FIRST_VISIT = Date.UTC(2015, 0, 1);
const VISIT_SPAN_DAYS = Math.round((Date.UTC(2025, 5, 30) - FIRST_VISIT) / DAY); // through 2025-06-30
const isoDate = (ms: number): string => new Date(ms).toISOString().slice(0, 10);
const isoTime = (ms: number): string => new Date(ms).toISOString().replace('.000Z', 'Z');
const VISIT_COUNT_WEIGHTS = [8, 12, 15, 16, 15, 12, 9, 8, 5]; // 1..9 visits, mean 4.60
const VISIT_TYPES: readonly VisitType[] = ['outpatient', 'inpatient', 'emergency', 'telehealth', 'other'];
const VISIT_TYPE_WEIGHTS = [60, 8, 12, 17, 3];

function provider(k: number): { npi: string; name: string } {
  // a fixed pool of 97 providers
  return {
    npi: `9${String(10_000_000 + k * 7919).padStart(9, '0')}`,
    name: `${(k % 2 ? GIVEN_F : GIVEN_M)[k % 14]} ${FAMILY[(k * 5) % FAMILY.length]}, ${k % 3 ? 'MD' : 'DO'}`,
  };
}

export function generatePatient(index: number, seed: number): PatientDocument {
  const r = patientRng(index, seed);
  const pid = `P${String(index + 1).padStart(7, '0')}`;
  const sex = (['female', 'male', 'other', 'unknown'] as const)[weighted(r, [49, 49, 1, 1])]!;
  const givenList = sex === 'female' ? GIVEN_F : sex === 'male' ? GIVEN_M : r() < 0.5 ? GIVEN_F : GIVEN_M;
  const given = r() < 0.3 ? [pick(r, givenList), pick(r, givenList)] : pick(r, givenList);
  const family = pick(r, FAMILY);
  const [city, state, area] = pick(r, CITIES);
  const name: PatientDocument['name'] = { given, family };
  if (r() < 0.1) name.prefix = pick(r, PREFIXES);
  if (r() < 0.05) name.suffix = pick(r, SUFFIXES);
  const line = [`${1 + int(r, 9899)} ${pick(r, STREETS)} ${pick(r, STREET_KINDS)}`];
  if (r() < 0.2) line.push(r() < 0.25 ? `Bldg "C", Unit ${1 + int(r, 40)}` : `Apt ${1 + int(r, 30)}${pick(r, ['A', 'B', 'C'])}`);
  const first = typeof given === 'string' ? given : given[0]!;
  const homeFacility = pick(r, FACILITIES);
  const homeProvider = int(r, 97);

  const visitCount = 1 + weighted(r, VISIT_COUNT_WEIGHTS);
  const days = Array.from({ length: visitCount }, () => int(r, VISIT_SPAN_DAYS + 1)).sort((a, b) => a - b);
  let last = 0;
  const visits = days.map((d, v): Visit => {
    const start = FIRST_VISIT + d * DAY;
    const visitDate = isoDate(start);
    const visitType = VISIT_TYPES[weighted(r, VISIT_TYPE_WEIGHTS)]!;
    const [facilityId, facilityName] = r() < 0.7 ? homeFacility : pick(r, FACILITIES);
    const prov = provider(r() < 0.6 ? homeProvider : int(r, 97));
    const end = visitType === 'inpatient' ? start + (1 + int(r, 7)) * DAY : visitType === 'emergency' && r() < 0.2 ? start + DAY : start;
    const dx0 = int(r, ICD10.length); // distinct codes within a visit: steps of 7 through the 22 codes
    const diagnoses = Array.from({ length: 1 + weighted(r, [1, 2, 1]) }, (_, i): Diagnosis => {
      const [code, description] = ICD10[(dx0 + 7 * i) % ICD10.length]!;
      return { code, system: 'ICD-10-CM', description, primary: i === 0 };
    });
    const treatments = Array.from({ length: weighted(r, [1, 2, 1]) }, (_, i): Treatment => {
      const treatment_id = `V${v + 1}T${i + 1}`;
      if (r() < 0.75) {
        const [code, tname, dose, route, frequency] = pick(r, MEDICATIONS);
        return {
          treatment_id,
          type: 'medication',
          code,
          system: 'RxNorm',
          name: tname,
          dose,
          route,
          frequency,
          start_date: visitDate,
          end_date: isoDate(start + (7 + int(r, 174)) * DAY),
        };
      }
      const [code, tname] = pick(r, PROCEDURES);
      return {
        treatment_id,
        type: 'procedure',
        code,
        system: 'CPT',
        name: tname,
        dose: '1 procedure',
        route: 'n/a',
        frequency: 'once',
        start_date: visitDate,
        end_date: visitDate,
      };
    });
    const provider_notes: ProviderNote[] = [];
    if (r() < 0.5) {
      const written = end + (8 * 60 + int(r, 10 * 60)) * 60_000;
      const quote = r() < 0.1 ? ` Says "better".` : '';
      const sep = r() < 0.1 ? '\n' : ' ';
      provider_notes.push({
        note_id: `V${v + 1}N1`,
        author: prov.name,
        written_at: isoTime(written),
        text: `${pick(r, COMPLAINTS)}.${quote}${sep}Plan: ${pick(r, PLANS)}.`,
      });
      last = Math.max(last, written);
    }
    last = Math.max(last, end);
    return {
      visit_id: `V${v + 1}`,
      visit_date: visitDate,
      ...(end !== start && { discharge_date: isoDate(end) }),
      visit_type: visitType,
      facility: { id: facilityId, name: facilityName },
      provider: prov,
      diagnoses,
      treatments,
      provider_notes,
    };
  });

  return {
    patient_id: pid,
    source_system: 'bench',
    updated_at: isoTime(last + DAY + int(r, 30 * 24 * 60) * 60_000),
    mrn: `MRN-${String(index + 1).padStart(8, '0')}`,
    ssn: `9${digits(r, 2)}-${digits(r, 2)}-${digits(r, 4)}`,
    name,
    birth_date: isoDate(Date.UTC(1935, 0, 1) + int(r, 80 * 365) * DAY),
    sex,
    contact: {
      phone: `+1-${area}-555-01${digits(r, 2)}`,
      email: `${first}.${family}${index + 1}@example.org`.toLowerCase().replace(/[^a-z0-9.@-]/g, ''),
    },
    address: { line, city, state, postal_code: `00${100 + int(r, 400)}`, country: 'US' },
    visits,
  };
}

// ---------------------------------------------------------------------------------------------
// CSV (RFC 4180, as read by COPY ... (FORMAT csv)): null is an empty unquoted field, so an empty
// string is written quoted.

type Cell = string | number | boolean | null | undefined;
export function csvField(v: Cell): string {
  if (v === null || v === undefined) return '';
  const s = String(v);
  return s === '' || /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}
const csvRow = (cells: Cell[]): string => cells.map(csvField).join(',') + '\n';

// A PostgreSQL text[] literal: every element double-quoted, with " and \ backslash-escaped.
export const pgTextArray = (items: readonly string[]): string => `{${items.map((s) => `"${s.replace(/[\\"]/g, '\\$&')}"`).join(',')}}`;

// The flattened rows of one document, exactly as the transform writes them into clinical.*.
export function flatten(
  doc: PatientDocument,
  patientKey: number,
  firstVisitKey: number,
  sha256Hex: string,
  batchId = 1,
): Record<Table, Cell[][]> {
  const n = doc.name;
  const rows: Record<Table, Cell[][]> = {
    patients: [
      [
        patientKey,
        doc.source_system,
        doc.patient_id,
        doc.mrn,
        doc.ssn,
        n.prefix,
        Array.isArray(n.given) ? n.given.join(' ') : n.given,
        n.family,
        n.suffix,
        doc.birth_date,
        doc.sex,
        doc.contact.phone,
        doc.contact.email,
        pgTextArray(doc.address.line),
        doc.address.city,
        doc.address.state,
        doc.address.postal_code,
        doc.address.country,
        doc.updated_at,
        patientKey,
        `\\x${sha256Hex}`,
        batchId,
      ],
    ],
    visits: [],
    diagnoses: [],
    treatments: [],
    provider_notes: [],
  };
  doc.visits.forEach((v, position) => {
    const vk = firstVisitKey + position;
    const d = v.visit_date;
    rows.visits.push([
      patientKey,
      vk,
      d,
      v.visit_id,
      null,
      v.discharge_date,
      v.visit_type,
      v.facility.id,
      v.facility.name,
      v.provider.npi,
      v.provider.name,
      position,
    ]);
    v.diagnoses.forEach((x, i) => rows.diagnoses.push([patientKey, vk, d, i, x.code, x.system, x.description, x.primary]));
    v.treatments.forEach((t, i) =>
      rows.treatments.push([
        patientKey,
        vk,
        d,
        i,
        t.treatment_id,
        t.type,
        t.code,
        t.system,
        t.name,
        t.dose,
        t.route,
        t.frequency,
        t.start_date,
        t.end_date,
      ]),
    );
    v.provider_notes.forEach((x, i) => rows.provider_notes.push([patientKey, vk, d, i, x.note_id, x.author, x.written_at, x.text]));
  });
  return rows;
}

// ---------------------------------------------------------------------------------------------
// Streaming writer: one chunk per patient and stream, awaiting 'drain' whenever a buffer is full.

class Out {
  error: Error | undefined;
  constructor(
    readonly path: string,
    readonly stream: WriteStream = createWriteStream(path),
  ) {
    stream.on('error', (e) => {
      this.error ??= e;
    });
  }
  async put(chunk: string): Promise<void> {
    if (this.error) throw this.error;
    if (!this.stream.write(chunk)) await once(this.stream, 'drain');
  }
  async close(): Promise<void> {
    this.stream.end();
    await finished(this.stream);
  }
}

export async function writeDataset(dir: string, opts: { patients: number; seed?: number; forms?: Form[] }): Promise<DatasetInfo> {
  const { patients, seed = 42, forms = ['ndjson', 'json', 'csv'] } = opts;
  if (!Number.isSafeInteger(patients) || patients < 0) throw new Error(`patients must be a whole number >= 0, got ${patients}`);
  await mkdir(dir, { recursive: true });
  if (forms.includes('csv')) await mkdir(join(dir, 'csv'), { recursive: true });
  const info: DatasetInfo = {
    patients,
    rows: { patients: 0, visits: 0, diagnoses: 0, treatments: 0, provider_notes: 0 },
    bytes: { ndjson: 0, json: 0 },
    files: {},
  };
  const nd = forms.includes('ndjson') ? new Out(join(dir, 'patients.ndjson')) : undefined;
  const js = forms.includes('json') ? new Out(join(dir, 'patients.json')) : undefined;
  const csv = forms.includes('csv')
    ? (Object.fromEntries(TABLES.map((t) => [t, new Out(join(dir, 'csv', `${t}.csv`))])) as Record<Table, Out>)
    : undefined;
  const all = [nd, js, ...(csv ? Object.values(csv) : [])].filter((o): o is Out => o !== undefined);
  if (nd) info.files.ndjson = nd.path;
  if (js) info.files.json = js.path;
  if (csv) info.files.csv = Object.fromEntries(TABLES.map((t) => [t, csv[t].path])) as Record<Table, string>;
  try {
    if (csv) for (const t of TABLES) await csv[t].put(CSV_COLUMNS[t].join(',') + '\n');
    await js?.put('[');
    let visitKey = 1;
    for (let i = 0; i < patients; i++) {
      const doc = generatePatient(i, seed);
      const text = JSON.stringify(doc);
      const size = Buffer.byteLength(text);
      info.bytes.ndjson += size + 1;
      info.bytes.json += size + (i === 0 ? 1 : 2);
      await nd?.put(text + '\n');
      await js?.put((i === 0 ? '\n' : ',\n') + text);
      const rows = flatten(doc, i + 1, visitKey, csv ? createHash('sha256').update(text).digest('hex') : '');
      visitKey += doc.visits.length;
      for (const t of TABLES) {
        info.rows[t] += rows[t].length;
        if (csv) await csv[t].put(rows[t].map(csvRow).join(''));
      }
    }
    info.bytes.json += 4; // "[" ... "\n]\n"
    await js?.put('\n]\n');
    await Promise.all(all.map((o) => o.close()));
  } catch (e) {
    for (const o of all) o.stream.destroy();
    throw e;
  }
  return info;
}

// ---------------------------------------------------------------------------------------------
// CLI: generate.ts --patients N --out DIR [--seed S] [--forms ndjson,json,csv]

const USAGE = 'usage: generate.ts --patients N --out DIR [--seed 42] [--forms ndjson,json,csv]';

async function main(argv: string[]): Promise<void> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        patients: { type: 'string' },
        out: { type: 'string' },
        seed: { type: 'string', default: '42' },
        forms: { type: 'string', default: 'ndjson,json,csv' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (err) {
    throw new Error(`${(err as Error).message}\n${USAGE}`, { cause: err });
  }
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const patients = Number(values.patients);
  const seed = Number(values.seed);
  const out = values.out;
  const forms = values.forms
    .split(',')
    .map((f) => f.trim())
    .filter(Boolean);
  const bad = forms.find((f) => !['ndjson', 'json', 'csv'].includes(f));
  if (!out || !Number.isSafeInteger(patients) || patients < 0 || !Number.isSafeInteger(seed) || bad !== undefined) {
    throw new Error(`${bad !== undefined ? `unknown form ${JSON.stringify(bad)}\n` : ''}${USAGE}`);
  }
  const started = performance.now();
  const info = await writeDataset(resolve(out), { patients, seed, forms: forms as Form[] });
  console.log(JSON.stringify({ ...info, seconds: +((performance.now() - started) / 1000).toFixed(2) }, null, 2));
}

function isMain(): boolean {
  try {
    return !!process.argv[1] && import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href;
  } catch {
    return false;
  }
}
if (isMain()) {
  main(process.argv.slice(2)).catch((e: unknown) => {
    console.error(e instanceof Error ? e.message : e);
    process.exitCode = 1;
  });
}
