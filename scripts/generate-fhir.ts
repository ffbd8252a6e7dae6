// Deterministic generator of a fake FHIR R4 Bulk Data export, shaped like Synthea's (issue 12):
// one NDJSON file per resource type (`Patient.000.ndjson`, ...), compact JSON, one resource per
// line; references `Patient/<id>` and `Encounter/<id>`, conditional references to Practitioner
// (by NPI), Organization and Location (by Synthea identifier) with a display, as in
// ../shared/data/fhir/bulk-10-patients. Per patient about 90 encounters, each with a note, 0-2
// conditions (5 % ICD-10-CM coded, else SNOMED CT), 0-4 medication requests, 0-4 procedures and
// some immunizations and observations: ~530 resources and ~1,460 bytes per resource, like the real
// set. Every value is synthetic: SSNs 999-dd-dddd, phones 555-01xx, NPIs 9999xxxxxx, ZIPs 00xxx.
import { createWriteStream, realpathSync, type WriteStream } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { once } from 'node:events';
import { finished } from 'node:stream/promises';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

export const FHIR_TYPES = [
  'Patient',
  'Encounter',
  'Condition',
  'MedicationRequest',
  'Procedure',
  'DocumentReference',
  'Immunization',
  'Observation',
  'Practitioner',
  'Organization',
  'Location',
] as const;
export type FhirType = (typeof FHIR_TYPES)[number];
/** The clinical table each mapped resource type becomes a row of (issue 12); other types stay in landing. */
export const CLINICAL_TABLE_OF: Partial<Record<FhirType, string>> = {
  Patient: 'patients',
  Encounter: 'visits',
  Condition: 'diagnoses',
  MedicationRequest: 'treatments',
  Procedure: 'treatments',
  DocumentReference: 'provider_notes',
};
export interface FhirBulkInfo {
  patients: number;
  seed: number;
  resources: Record<FhirType, number>;
  bytes: Record<FhirType, number>; // NDJSON bytes, newline included
  total: { resources: number; bytes: number };
  files: Record<FhirType, string>;
}

// ---------------------------------------------------------------------------------------------
// Random numbers (mulberry32 per patient, as in generate.ts) and ids.

type Rng = () => number;
function mulberry32(a: number): Rng {
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
function mix32(h: number): number {
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}
const int = (r: Rng, n: number): number => Math.floor(r() * n);
const pick = <T>(r: Rng, list: readonly T[]): T => list[int(r, list.length)]!;
const digits = (r: Rng, n: number): string => String(int(r, 10 ** n)).padStart(n, '0');
function weighted(r: Rng, weights: readonly number[]): number {
  let x = r() * weights.reduce((a, b) => a + b, 0);
  for (let i = 0; i < weights.length; i++) if ((x -= weights[i]!) < 0) return i;
  return weights.length - 1;
}
const hex = (n: number, w: number): string => n.toString(16).padStart(w, '0');

/**
 * A uuid-shaped id, unique per (owner, k) for one seed: its first two words (a ^ f(b), b) are a
 * bijection of them (mix32 is one on 32 bits), the rest only looks random.
 */
export function fhirId(seed: number, owner: number, k: number): string {
  const a = mix32(owner ^ mix32(seed));
  const b = mix32(k ^ mix32(seed ^ 0x5bd1e995));
  const c = mix32(a ^ Math.imul(b, 0x27d4eb2d));
  const d = mix32(c ^ b ^ 0x165667b1);
  return `${hex((a ^ mix32(b)) >>> 0, 8)}-${hex(b >>> 16, 4)}-${hex(b & 0xffff, 4)}-${hex(c >>> 16, 4)}-${hex(c & 0xffff, 4)}${hex(d, 8)}`;
}

// ---------------------------------------------------------------------------------------------
// Code lists (public code systems; every person, place and number is made up).

const SCT = 'http://snomed.info/sct';
const ICD10CM = 'http://hl7.org/fhir/sid/icd-10-cm';
const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';
const LOINC = 'http://loinc.org';
const NPI_SYSTEM = 'http://hl7.org/fhir/sid/us-npi';
const SYNTHEA = 'https://github.com/synthetichealth/synthea';
const V2_0203 = 'http://terminology.hl7.org/CodeSystem/v2-0203';
const US_CORE = 'http://hl7.org/fhir/us/core/StructureDefinition/';
const profile = (p: string) => ({ profile: [US_CORE + p] });

// [class, weight, [SNOMED code, display]...]
const CLASSES: ReadonlyArray<readonly [string, number, ReadonlyArray<readonly [string, string]>]> = [
  [
    'AMB',
    920,
    [
      ['185347001', 'Encounter for problem (procedure)'],
      ['162673000', 'General examination of patient (procedure)'],
      ['185349003', 'Encounter for check up (procedure)'],
      ['702927004', 'Urgent care clinic (environment)'],
      ['390906007', 'Follow-up encounter (procedure)'],
      ['185345009', 'Encounter for symptom (procedure)'],
      ['698314001', 'Consultation for treatment (procedure)'],
    ],
  ],
  ['IMP', 40, [['32485007', 'Hospital admission (procedure)']]],
  ['EMER', 20, [['50849002', 'Emergency room admission (procedure)']]],
  ['HH', 10, [['439708006', 'Home visit (procedure)']]],
  ['VR', 10, [['390906007', 'Follow-up encounter (procedure)']]],
];
const CONDITIONS: ReadonlyArray<readonly [string, string]> = [
  ['160903007', 'Full-time employment (finding)'],
  ['73595000', 'Stress (finding)'],
  ['195662009', 'Acute viral pharyngitis (disorder)'],
  ['444814009', 'Viral sinusitis (disorder)'],
  ['10509002', 'Acute bronchitis (disorder)'],
  ['15777000', 'Prediabetes'],
  ['271737000', 'Anemia (disorder)'],
  ['59621000', 'Essential hypertension (disorder)'],
  ['44054006', 'Diabetes mellitus type 2 (disorder)'],
  ['162864005', 'Body mass index 30+ - obesity (finding)'],
  ['57676002', 'Joint pain (finding)'],
  ['301011002', 'Escherichia coli urinary tract infection'],
];
const ICD10: ReadonlyArray<readonly [string, string]> = [
  ['E11.9', 'Type 2 diabetes mellitus without complications'],
  ['I10', 'Essential (primary) hypertension'],
  ['J06.9', 'Acute upper respiratory infection, unspecified'],
  ['M54.50', 'Low back pain, unspecified'],
  ['E78.5', 'Hyperlipidemia, unspecified'],
];
const MEDICATIONS: ReadonlyArray<readonly [string, string]> = [
  ['314076', 'lisinopril 10 MG Oral Tablet'],
  ['860975', '24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet'],
  ['205923', '1 ML Epoetin Alfa 4000 UNT/ML Injection [Epogen]'],
  ['314231', 'Simvastatin 10 MG Oral Tablet'],
  ['310798', 'Hydrochlorothiazide 25 MG Oral Tablet'],
  ['351137', 'albuterol 0.21 MG/ML Inhalation Solution'],
  ['313782', 'Acetaminophen 325 MG Oral Tablet'],
  ['206905', 'Ibuprofen 400 MG Oral Tablet [Ibu]'],
];
const PROCEDURES: ReadonlyArray<readonly [string, string]> = [
  ['430193006', 'Medication Reconciliation (procedure)'],
  ['710824005', 'Assessment of health and social care needs (procedure)'],
  ['171207006', 'Depression screening (procedure)'],
  ['428211000124100', 'Assessment of substance use (procedure)'],
  ['710841007', 'Assessment of anxiety (procedure)'],
  ['398171003', 'Hearing examination (procedure)'],
  ['265764009', 'Renal dialysis (procedure)'],
  ['866148006', 'Screening for domestic abuse (procedure)'],
];
const VACCINES: ReadonlyArray<readonly [string, string]> = [
  ['140', 'Influenza, seasonal, injectable, preservative free'],
  ['113', 'Td (adult), 5 Lf tetanus toxoid, preservative free, adsorbed'],
  ['52', 'Hep A, adult'],
];
// [LOINC, display, unit, low, high]
const VITALS: ReadonlyArray<readonly [string, string, string, number, number]> = [
  ['29463-7', 'Body weight', 'kg', 45, 120],
  ['8302-2', 'Body height', 'cm', 150, 195],
  ['8867-4', 'Heart rate', '/min', 55, 100],
  ['8480-6', 'Systolic blood pressure', 'mm[Hg]', 100, 160],
];
const DOSAGES = [
  [
    {
      sequence: 1,
      timing: { repeat: { frequency: 1, period: 1.0, periodUnit: 'd' } },
      asNeededBoolean: false,
      doseAndRate: [
        {
          type: { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/dose-rate-type', code: 'ordered', display: 'Ordered' }] },
          doseQuantity: { value: 1.0 },
        },
      ],
    },
  ],
  [{ sequence: 1, text: 'Take as needed.', asNeededBoolean: true }],
];
const GIVEN_F = ['Ava', 'Maria', 'Olivia', 'Grace', 'Nora', 'Lena', 'Ruth', 'Chloe', 'Iris', 'Mei', 'Amara', 'Sofia'];
const GIVEN_M = ['Liam', 'Noah', 'Omar', 'Ethan', 'Lucas', 'Mateo', 'Ravi', 'Jonas', 'Theo', 'Kenji', 'Felix', 'Diego'];
const FAMILY = ['Quillfeather', 'Marrowby', 'Testwood', 'Fakenham', "O'Sampleton", 'Nullberg', 'Dummont', 'Mockridge', 'Synthwell'];
const CITIES: ReadonlyArray<readonly [string, string]> = [
  ['Fakeville', 'OH'],
  ['Mockton', 'TX'],
  ['Sampleburg', 'PA'],
  ['Testford', 'CA'],
  ['Nullport', 'MA'],
  ['Stubfield', 'IL'],
];
const STREETS = ['Synthetic', 'Sample', 'Mockingbird', 'Placeholder', 'Fixture', 'Example'];
const COMPLAINTS = ['Cough', 'Fatigue', 'Headache', 'Back pain', 'Sore throat', 'Dizziness', 'Routine follow-up'];
const HISTORY = [
  'stress (finding)',
  'part-time employment (finding)',
  'limited social contact (finding)',
  'not in labor force (finding)',
  'received higher education (finding)',
  'medication review due (situation)',
];
const SOCIAL = [
  'Patient is married. Patient has never smoked.\n Patient identifies as heterosexual.',
  'Patient is single. Patient quit smoking at age 30.\n Patient identifies as heterosexual.',
  'Patient is divorced. Patient is a former smoker.\n Patient identifies as homosexual.',
];
const BACKGROUND = [
  'Patient comes from a middle socioeconomic background.\n Patient has completed some college courses.\nPatient currently has NO INSURANCE.',
  'Patient comes from a high socioeconomic background.\n Patient has a high school education.\nThe primary insurance is Medicaid.',
  'Patient comes from a low socioeconomic background.\n Patient has a graduate degree.\nThe primary insurance is Medicare.',
];

// ---------------------------------------------------------------------------------------------
// Time: local wall time with a US Eastern-like offset (-04:00 April-October, else -05:00), as Synthea writes it.

const MIN = 60_000;
const HOUR = 60 * MIN;
const DAY = 24 * HOUR;
const LAST_DAY = Date.UTC(2025, 5, 30);
function fhirTime(ms: number, millis = false): string {
  const month = new Date(ms).getUTCMonth();
  const off = month >= 3 && month <= 9 ? 4 : 5;
  const local = new Date(ms - off * HOUR).toISOString();
  return `${millis ? local.slice(0, 23) : local.slice(0, 19)}-0${off}:00`;
}

// ---------------------------------------------------------------------------------------------
// Shared pools: practitioners (valid NPI check digits), organizations, one location each.

const ORGS = 20;
const PRACTITIONERS = 60;
const POOL = 0x80000000; // owner numbers of pool resources, above every patient index

/** NPI with its Luhn check digit (prefix 80840, as dq.npi_ok checks); 9999 starts no real NPI. */
export function npiOf(k: number): string {
  const base = `9999${String(10000 + k).padStart(5, '0')}`;
  let sum = 24;
  for (let i = 0; i < 9; i++) {
    const d = Number(base[i]);
    sum += i % 2 === 0 ? (d * 2 > 9 ? d * 2 - 9 : d * 2) : d;
  }
  return base + String((10 - (sum % 10)) % 10);
}
const orgId = (seed: number, o: number) => fhirId(seed, POOL + o, 1);
const orgName = (o: number) =>
  `${CITIES[o % CITIES.length]![0].toUpperCase()} ${['GENERAL', 'FAMILY CLINIC', 'MEDICAL CENTER'][o % 3]} ${o + 1}`;
const pracName = (p: number) => `Dr. ${(p % 2 ? GIVEN_F : GIVEN_M)[p % 12]}${100 + p} ${FAMILY[p % FAMILY.length]}${200 + p}`;
const npiRef = (p: number) => ({ reference: `Practitioner?identifier=${NPI_SYSTEM}|${npiOf(p)}`, display: pracName(p) });
const orgRef = (seed: number, o: number) => ({ reference: `Organization?identifier=${SYNTHEA}|${orgId(seed, o)}`, display: orgName(o) });
const locRef = (seed: number, o: number) => ({
  reference: `Location?identifier=${SYNTHEA}|${fhirId(seed, POOL + o, 2)}`,
  display: orgName(o),
});
const address = (r: Rng, cityIndex: number) => {
  const [city, state] = CITIES[cityIndex % CITIES.length]!;
  return { line: [`${1 + int(r, 9899)} ${pick(r, STREETS)} St`], city, state, postalCode: `00${100 + int(r, 400)}`, country: 'US' };
};

function poolResources(seed: number): Partial<Record<FhirType, object[]>> {
  const r = mulberry32(mix32(seed ^ 0x0f0f0f0f));
  const orgs: object[] = [];
  const locations: object[] = [];
  for (let o = 0; o < ORGS; o++) {
    const id = orgId(seed, o);
    const addr = address(r, o);
    orgs.push({
      resourceType: 'Organization',
      id,
      meta: profile('us-core-organization'),
      identifier: [{ system: SYNTHEA, value: id }],
      active: true,
      type: [
        { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/organization-type', code: 'prov', display: 'Healthcare Provider' }] },
      ],
      name: orgName(o),
      telecom: [{ system: 'phone', value: `555-01${digits(r, 2)}` }],
      address: [addr],
    });
    const lid = fhirId(seed, POOL + o, 2);
    locations.push({
      resourceType: 'Location',
      id: lid,
      meta: profile('us-core-location'),
      identifier: [{ system: SYNTHEA, value: lid }],
      status: 'active',
      name: orgName(o),
      address: addr,
      managingOrganization: orgRef(seed, o),
    });
  }
  const practitioners = Array.from({ length: PRACTITIONERS }, (_, p) => ({
    resourceType: 'Practitioner',
    id: fhirId(seed, POOL + ORGS + p, 1),
    meta: profile('us-core-practitioner'),
    identifier: [{ system: NPI_SYSTEM, value: npiOf(p) }],
    active: true,
    name: [
      { family: `${FAMILY[p % FAMILY.length]}${200 + p}`, given: [`${(p % 2 ? GIVEN_F : GIVEN_M)[p % 12]}${100 + p}`], prefix: ['Dr.'] },
    ],
    gender: p % 2 ? 'female' : 'male',
    address: [address(r, p % ORGS)],
  }));
  return { Organization: orgs, Location: locations, Practitioner: practitioners };
}

// ---------------------------------------------------------------------------------------------
// One patient's resources, by type.

export function generateFhirPatient(index: number, seed: number): Partial<Record<FhirType, object[]>> {
  const r = mulberry32(mix32(mix32(seed >>> 0) ^ Math.imul(index + 1, 0x9e3779b1)));
  let k = 0;
  const newId = () => fhirId(seed, index, k++);
  const pid = newId();
  const subject = { reference: `Patient/${pid}` };
  const out: Record<string, object[]> = {};
  const add = (type: FhirType, res: object) => (out[type] ??= []).push(res);

  const female = r() < 0.5;
  const given = [`${pick(r, female ? GIVEN_F : GIVEN_M)}${int(r, 999)}`];
  if (r() < 0.4) given.push(`${pick(r, female ? GIVEN_F : GIVEN_M)}${int(r, 999)}`);
  const family = `${pick(r, FAMILY)}${int(r, 999)}`;
  const birth = Date.UTC(1935, 0, 1) + int(r, 85 * 365) * DAY;
  const cityIndex = int(r, CITIES.length);
  const org = int(r, ORGS);
  const home = int(r, PRACTITIONERS);
  const first = Math.max(birth + 30 * DAY, Date.UTC(1970, 0, 1));
  const count = Math.min(700, 15 + Math.floor(-75 * Math.log(1 - r()))); // mean ~90
  const days = Array.from({ length: count }, () => int(r, Math.floor((LAST_DAY - first) / DAY) + 1)).sort((a, b) => a - b);
  const conditions: Array<{ ref: string; display: string }> = [];
  const history = new Set([pick(r, HISTORY), pick(r, HISTORY), pick(r, HISTORY)]);
  const medHistory = new Set<string>();
  const social = `${pick(r, SOCIAL)}\n\n${pick(r, BACKGROUND)}`;
  let last = first;

  for (const day of days) {
    const eid = newId();
    const encounter = { reference: `Encounter/${eid}` };
    const [cls, , types] =
      CLASSES[
        weighted(
          r,
          CLASSES.map((c) => c[1]),
        )
      ]!;
    const [typeCode, typeDisplay] = pick(r, types);
    const [reasonCode, reasonDisplay] = pick(r, CONDITIONS);
    const start = first + day * DAY + int(r, 24 * 60) * MIN;
    const end = start + (cls === 'IMP' ? (1 + int(r, 6)) * DAY : cls === 'EMER' ? (1 + int(r, 5)) * HOUR : (15 + int(r, 45)) * MIN);
    last = Math.max(last, end);
    const o = r() < 0.8 ? org : int(r, ORGS);
    const prac = r() < 0.6 ? home : int(r, PRACTITIONERS);
    const period = { start: fhirTime(start), end: fhirTime(end) };
    const at = (offset: number) => fhirTime(Math.min(end, start + offset * MIN));
    add('Encounter', {
      resourceType: 'Encounter',
      id: eid,
      meta: profile('us-core-encounter'),
      identifier: [{ use: 'official', system: SYNTHEA, value: eid }],
      status: 'finished',
      class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: cls },
      type: [{ coding: [{ system: SCT, code: typeCode, display: typeDisplay }], text: typeDisplay }],
      subject: { ...subject, display: `${given.join(' ')} ${family}` },
      participant: [
        {
          type: [
            {
              coding: [
                { system: 'http://terminology.hl7.org/CodeSystem/v3-ParticipationType', code: 'PPRF', display: 'primary performer' },
              ],
              text: 'primary performer',
            },
          ],
          period,
          individual: npiRef(prac),
        },
      ],
      period,
      ...(r() < 0.55 && { reasonCode: [{ coding: [{ system: SCT, code: reasonCode, display: reasonDisplay }] }] }),
      location: [{ location: locRef(seed, o) }],
      serviceProvider: orgRef(seed, o),
    });

    for (let i = weighted(r, [60, 35, 5]); i > 0; i--) {
      const id = newId();
      const icd = r() < 0.05;
      const [code, display] = icd ? pick(r, ICD10) : pick(r, CONDITIONS);
      const resolved = r() < 0.8;
      conditions.push({ ref: `Condition/${id}`, display });
      history.add(display.toLowerCase());
      add('Condition', {
        resourceType: 'Condition',
        id,
        meta: profile('us-core-condition-encounter-diagnosis'),
        clinicalStatus: {
          coding: [{ system: 'http://terminology.hl7.org/CodeSystem/condition-clinical', code: resolved ? 'resolved' : 'active' }],
        },
        verificationStatus: { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/condition-ver-status', code: 'confirmed' }] },
        category: [
          {
            coding: [
              {
                system: 'http://terminology.hl7.org/CodeSystem/condition-category',
                code: 'encounter-diagnosis',
                display: 'Encounter Diagnosis',
              },
            ],
          },
        ],
        code: { coding: [{ system: icd ? ICD10CM : SCT, code, display }], text: display },
        subject,
        encounter,
        onsetDateTime: period.start,
        ...(resolved && { abatementDateTime: fhirTime(start + (7 + int(r, 60)) * DAY) }),
        recordedDate: period.start,
      });
    }
    const meds: string[] = [];
    for (let i = weighted(r, [25, 30, 25, 15, 5]); i > 0; i--) {
      const [code, display] = pick(r, MEDICATIONS);
      meds.push(display.toLowerCase());
      medHistory.add(display.toLowerCase());
      const reason =
        conditions.length > 0 && r() < 0.5 ? conditions[conditions.length - 1 - int(r, Math.min(3, conditions.length))] : undefined;
      add('MedicationRequest', {
        resourceType: 'MedicationRequest',
        id: newId(),
        meta: profile('us-core-medicationrequest'),
        status: r() < 0.95 ? 'stopped' : 'active',
        intent: 'order',
        category: [
          {
            coding: [
              { system: 'http://terminology.hl7.org/CodeSystem/medicationrequest-category', code: 'community', display: 'Community' },
            ],
            text: 'Community',
          },
        ],
        medicationCodeableConcept: { coding: [{ system: RXNORM, code, display }], text: display },
        subject,
        encounter,
        authoredOn: at(5),
        requester: npiRef(prac),
        ...(reason && { reasonReference: [{ reference: reason.ref, display: reason.display }] }),
        ...(r() < 0.25 && { dosageInstruction: DOSAGES[weighted(r, [4, 1])] }),
      });
    }
    const procs: string[] = [];
    for (let i = weighted(r, [20, 25, 25, 20, 10]); i > 0; i--) {
      const [code, display] = pick(r, PROCEDURES);
      procs.push(display.toLowerCase());
      const reason = conditions.length > 0 && r() < 0.4 ? conditions[conditions.length - 1] : undefined;
      const ps = start + int(r, 20) * MIN;
      add('Procedure', {
        resourceType: 'Procedure',
        id: newId(),
        meta: profile('us-core-procedure'),
        status: 'completed',
        code: { coding: [{ system: SCT, code, display }], text: display },
        subject,
        encounter,
        performedPeriod: { start: fhirTime(Math.min(ps, end)), end: fhirTime(Math.min(ps + 15 * MIN, end)) },
        location: locRef(seed, o),
        ...(reason && { reasonReference: [{ reference: reason.ref, display: reason.display }] }),
      });
    }
    if (r() < 0.13) {
      const [code, display] = pick(r, VACCINES);
      add('Immunization', {
        resourceType: 'Immunization',
        id: newId(),
        meta: profile('us-core-immunization'),
        status: 'completed',
        vaccineCode: { coding: [{ system: 'http://hl7.org/fhir/sid/cvx', code, display }], text: display },
        patient: subject,
        encounter,
        occurrenceDateTime: period.start,
        primarySource: true,
        location: locRef(seed, o),
      });
    }
    if (r() < 0.1) {
      const [code, display, unit, lo, hi] = pick(r, VITALS);
      add('Observation', {
        resourceType: 'Observation',
        id: newId(),
        meta: profile('us-core-vital-signs'),
        status: 'final',
        category: [
          {
            coding: [{ system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'vital-signs', display: 'Vital signs' }],
          },
        ],
        code: { coding: [{ system: LOINC, code, display }], text: display },
        subject,
        encounter,
        effectiveDateTime: period.start,
        issued: fhirTime(start, true),
        valueQuantity: { value: Math.round((lo + r() * (hi - lo)) * 10) / 10, unit, system: 'http://unitsofmeasure.org', code: unit },
      });
    }

    // The note: Synthea's layout, naming the patient by given name (as the real notes do).
    const age = Math.floor((start - birth) / (365.25 * DAY));
    const note = [
      '',
      fhirTime(start).slice(0, 10),
      '',
      '# Chief Complaint',
      `- ${pick(r, COMPLAINTS)}`,
      '',
      '# History of Present Illness',
      `${given.join(' ')}`,
      ` is a ${age} year-old ${female ? 'female' : 'male'}. Patient has a history of ${[...history].join(', ')}.`,
      '',
      '# Social History',
      social,
      '',
      '# Allergies',
      'No Known Allergies.',
      '',
      '# Medications',
      medHistory.size ? [...medHistory].join('; ') : 'None.',
      '',
      '# Assessment and Plan',
      '',
      '## Plan',
      ...(procs.length ? ['The following procedures were conducted:', ...procs.map((p) => `- ${p}`)] : []),
      ...(meds.length ? ['The patient was prescribed the following medications:', ...meds.map((m) => `- ${m}`)] : []),
      '',
    ].join('\n');
    add('DocumentReference', {
      resourceType: 'DocumentReference',
      id: newId(),
      meta: profile('us-core-documentreference'),
      identifier: [{ system: 'urn:ietf:rfc:3986', value: `urn:uuid:${newId()}` }],
      status: 'superseded',
      type: {
        coding: [
          { system: LOINC, code: '34117-2', display: 'History and physical note' },
          { system: LOINC, code: '51847-2', display: 'Evaluation + Plan note' },
        ],
      },
      category: [
        {
          coding: [
            {
              system: 'http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category',
              code: 'clinical-note',
              display: 'Clinical Note',
            },
          ],
        },
      ],
      subject,
      date: fhirTime(start, true),
      author: [npiRef(prac)],
      custodian: orgRef(seed, o),
      content: [
        {
          attachment: { contentType: 'text/plain; charset=utf-8', data: Buffer.from(note, 'utf8').toString('base64') },
          format: {
            system: 'http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode',
            code: 'urn:ihe:iti:xds:2017:mimeTypeSufficient',
            display: 'mimeType Sufficient',
          },
        },
      ],
      context: { encounter: [encounter], period },
    });
  }

  const deceased = index % 25 === 3 ? fhirTime(last + (1 + int(r, 30)) * DAY) : undefined; // 4 %, after the last encounter
  const ident = (code: string, display: string, system: string, value: string) => ({
    type: { coding: [{ system: V2_0203, code, display }], text: display },
    system,
    value,
  });
  add('Patient', {
    resourceType: 'Patient',
    id: pid,
    meta: profile('us-core-patient'),
    text: {
      status: 'generated',
      div: '<div xmlns="http://www.w3.org/1999/xhtml">Generated by healthetl scripts/generate-fhir.ts (synthetic data).</div>',
    },
    extension: [
      {
        url: US_CORE + 'us-core-race',
        extension: [
          { url: 'ombCategory', valueCoding: { system: 'urn:oid:2.16.840.1.113883.6.238', code: '2106-3', display: 'White' } },
          { url: 'text', valueString: 'White' },
        ],
      },
      {
        url: US_CORE + 'us-core-ethnicity',
        extension: [
          {
            url: 'ombCategory',
            valueCoding: { system: 'urn:oid:2.16.840.1.113883.6.238', code: '2186-5', display: 'Not Hispanic or Latino' },
          },
          { url: 'text', valueString: 'Not Hispanic or Latino' },
        ],
      },
      {
        url: 'http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName',
        valueString: `${pick(r, GIVEN_F)}${int(r, 999)} ${family}`,
      },
      { url: US_CORE + 'us-core-birthsex', valueCode: female ? 'F' : 'M' },
      {
        url: 'http://hl7.org/fhir/StructureDefinition/patient-birthPlace',
        valueAddress: {
          city: CITIES[(cityIndex + 1) % CITIES.length]![0],
          state: CITIES[(cityIndex + 1) % CITIES.length]![1],
          country: 'US',
        },
      },
      { url: 'http://synthetichealth.github.io/synthea/disability-adjusted-life-years', valueDecimal: r() * 10 },
      { url: 'http://synthetichealth.github.io/synthea/quality-adjusted-life-years', valueDecimal: r() * 80 },
    ],
    identifier: [
      { system: SYNTHEA, value: pid },
      ident('MR', 'Medical Record Number', 'http://hospital.smarthealthit.org', pid),
      ident('SS', 'Social Security Number', 'http://hl7.org/fhir/sid/us-ssn', `999-${digits(r, 2)}-${digits(r, 4)}`),
      ident('DL', "Driver's license number", 'urn:oid:2.16.840.1.113883.4.3.25', `S999${digits(r, 5)}`),
    ],
    name: [{ use: 'official', family, given, prefix: [female ? 'Ms.' : 'Mr.'] }],
    telecom: [{ system: 'phone', value: `555-01${digits(r, 2)}`, use: 'home' }],
    gender: female ? 'female' : 'male',
    birthDate: new Date(birth).toISOString().slice(0, 10),
    ...(deceased && { deceasedDateTime: deceased }),
    address: [
      {
        extension: [
          {
            url: 'http://hl7.org/fhir/StructureDefinition/geolocation',
            extension: [
              { url: 'latitude', valueDecimal: 30 + r() * 15 },
              { url: 'longitude', valueDecimal: -120 + r() * 45 },
            ],
          },
        ],
        ...address(r, cityIndex),
      },
    ],
    maritalStatus: {
      coding: [{ system: 'http://terminology.hl7.org/CodeSystem/v3-MaritalStatus', code: 'M', display: 'Married' }],
      text: 'Married',
    },
    multipleBirthBoolean: false,
    communication: [
      {
        language: {
          coding: [{ system: 'urn:ietf:bcp:47', code: 'en-US', display: 'English (United States)' }],
          text: 'English (United States)',
        },
      },
    ],
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing: one stream per type, one write per patient and type, awaiting 'drain' when full.

async function put(stream: WriteStream, chunk: string): Promise<void> {
  if (!stream.write(chunk)) await once(stream, 'drain');
}

export async function generateFhirBulk(dir: string, opts: { patients: number; seed?: number }): Promise<FhirBulkInfo> {
  const { patients, seed = 42 } = opts;
  if (!Number.isSafeInteger(patients) || patients < 0 || patients >= POOL)
    throw new Error(`patients must be a whole number >= 0, got ${patients}`);
  await mkdir(dir, { recursive: true });
  const zero = () => Object.fromEntries(FHIR_TYPES.map((t) => [t, 0])) as Record<FhirType, number>;
  const info: FhirBulkInfo = {
    patients,
    seed,
    resources: zero(),
    bytes: zero(),
    total: { resources: 0, bytes: 0 },
    files: Object.fromEntries(FHIR_TYPES.map((t) => [t, join(dir, `${t}.000.ndjson`)])) as Record<FhirType, string>,
  };
  const streams = Object.fromEntries(FHIR_TYPES.map((t) => [t, createWriteStream(info.files[t])])) as Record<FhirType, WriteStream>;
  let failed: Error | undefined;
  for (const s of Object.values(streams)) s.on('error', (e) => (failed ??= e));
  const write = async (byType: Partial<Record<FhirType, object[]>>) => {
    for (const t of FHIR_TYPES) {
      const list = byType[t];
      if (!list?.length) continue;
      const text = list.map((x) => JSON.stringify(x) + '\n').join('');
      const bytes = Buffer.byteLength(text);
      info.resources[t] += list.length;
      info.bytes[t] += bytes;
      info.total.resources += list.length;
      info.total.bytes += bytes;
      if (failed) throw failed;
      await put(streams[t], text);
    }
  };
  try {
    await write(poolResources(seed));
    for (let i = 0; i < patients; i++) await write(generateFhirPatient(i, seed));
    for (const s of Object.values(streams)) s.end();
    await Promise.all(Object.values(streams).map((s) => finished(s)));
  } catch (e) {
    for (const s of Object.values(streams)) s.destroy();
    throw e;
  }
  return info;
}

// ---------------------------------------------------------------------------------------------
// CLI: generate-fhir.ts --patients N --out DIR [--seed S]

const USAGE = 'usage: generate-fhir.ts --patients N --out DIR [--seed 42]';

async function main(argv: string[]): Promise<void> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        patients: { type: 'string' },
        out: { type: 'string' },
        seed: { type: 'string', default: '42' },
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
  if (!values.out || !Number.isSafeInteger(patients) || patients < 0 || !Number.isSafeInteger(seed)) throw new Error(USAGE);
  const started = performance.now();
  const info = await generateFhirBulk(resolve(values.out), { patients, seed });
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
