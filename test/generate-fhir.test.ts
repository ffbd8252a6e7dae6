// The FHIR bulk generator (scripts/generate-fhir.ts): files only, no database.
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FHIR_TYPES, generateFhirBulk, npiOf, type FhirBulkInfo, type FhirType } from '../scripts/generate-fhir.ts';

const N = 20;
const SEED = 7;
type Res = Record<string, any>;

let dir: string;
let info: FhirBulkInfo;
const byType = {} as Record<FhirType, Res[]>;
const lines = {} as Record<FhirType, string[]>;

async function digest(d: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const f of (await readdir(d)).sort())
    out[f] = createHash('sha256')
      .update(await readFile(join(d, f)))
      .digest('hex');
  return out;
}

/** Every `reference` string in a resource, wherever it is nested. */
function references(x: unknown, out: string[] = []): string[] {
  if (Array.isArray(x)) for (const v of x) references(v, out);
  else if (x && typeof x === 'object')
    for (const [k, v] of Object.entries(x)) {
      if (k === 'reference' && typeof v === 'string') out.push(v);
      else references(v, out);
    }
  return out;
}

const patientOf = (r: Res): string | null =>
  r.resourceType === 'Patient' ? r.id : ((r.subject ?? r.patient)?.reference?.replace(/^Patient\//, '') ?? null);

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'healthetl-fhir-gen-'));
  info = await generateFhirBulk(join(dir, 'a'), { patients: N, seed: SEED });
  for (const t of FHIR_TYPES) {
    const text = await readFile(info.files[t], 'utf8');
    lines[t] = text.split('\n');
    expect(lines[t].pop()).toBe(''); // ends with a newline
    byType[t] = lines[t].map((l) => JSON.parse(l));
  }
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('generateFhirBulk', () => {
  it('writes one file per type, named as a bulk export, with the counts and bytes it returns', async () => {
    expect((await readdir(join(dir, 'a'))).sort()).toEqual(FHIR_TYPES.map((t) => `${t}.000.ndjson`).sort());
    let resources = 0;
    let bytes = 0;
    for (const t of FHIR_TYPES) {
      expect(lines[t].length, t).toBe(info.resources[t]);
      expect((await stat(info.files[t])).size, t).toBe(info.bytes[t]);
      resources += info.resources[t];
      bytes += info.bytes[t];
    }
    expect(info.total).toEqual({ resources, bytes });
    expect(info.resources.Patient).toBe(N);
    expect(info.resources.DocumentReference).toBe(info.resources.Encounter); // a note per encounter
  });

  it('writes compact JSON, one resource of the file type per line, with unique uuid-shaped ids', () => {
    const ids = new Set<string>();
    for (const t of FHIR_TYPES) {
      byType[t].forEach((r, i) => {
        expect(JSON.stringify(r)).toBe(lines[t][i]);
        expect(r.resourceType).toBe(t);
        expect(r.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
        expect(ids.has(r.id), r.id).toBe(false);
        ids.add(r.id);
      });
    }
  });

  it('is deterministic: the same seed gives the same bytes, another seed other bytes', async () => {
    const again = await generateFhirBulk(join(dir, 'b'), { patients: N, seed: SEED });
    expect(again).toEqual({ ...info, files: again.files });
    expect(await digest(join(dir, 'b'))).toEqual(await digest(join(dir, 'a')));
    await generateFhirBulk(join(dir, 'c'), { patients: N, seed: SEED + 1 });
    const [a, c] = [await digest(join(dir, 'a')), await digest(join(dir, 'c'))];
    expect(a['Patient.000.ndjson']).not.toBe(c['Patient.000.ndjson']);
    expect(a['Encounter.000.ndjson']).not.toBe(c['Encounter.000.ndjson']);
  });

  it('resolves every reference to a generated resource of the right type and the same patient', () => {
    const index = new Map<string, Res>(); // `Type/id`
    const identifiers = new Set<string>(); // `Type|system|value`
    for (const t of FHIR_TYPES)
      for (const r of byType[t]) {
        index.set(`${t}/${r.id}`, r);
        for (const i of r.identifier ?? []) identifiers.add(`${t}|${i.system}|${i.value}`);
      }
    let literal = 0;
    let conditional = 0;
    for (const t of FHIR_TYPES)
      for (const r of byType[t])
        for (const ref of references(r)) {
          const cond = /^(\w+)\?identifier=(.+)\|([^|]+)$/.exec(ref);
          if (cond) {
            expect(identifiers.has(`${cond[1]}|${cond[2]}|${cond[3]}`), `${t}/${r.id} -> ${ref}`).toBe(true);
            conditional++;
            continue;
          }
          const m = /^(Patient|Encounter|Condition)\/([0-9a-f-]{36})$/.exec(ref);
          expect(m, `${t}/${r.id} -> ${ref}`).not.toBeNull();
          const target = index.get(ref);
          expect(target, `${t}/${r.id} -> ${ref}`).toBeDefined();
          expect(patientOf(target!), `${t}/${r.id} -> ${ref}`).toBe(patientOf(r));
          literal++;
        }
    expect(literal).toBeGreaterThan(info.total.resources);
    expect(conditional).toBeGreaterThan(info.resources.Encounter * 2);
    // every clinical resource names its patient and (except Patient) its encounter
    for (const t of ['Encounter', 'Condition', 'MedicationRequest', 'Procedure', 'DocumentReference', 'Immunization'] as const)
      for (const r of byType[t]) expect(patientOf(r), `${t}/${r.id}`).toMatch(/^[0-9a-f-]{36}$/);
    for (const t of ['Condition', 'MedicationRequest', 'Procedure'] as const)
      for (const r of byType[t]) expect(r.encounter.reference).toMatch(/^Encounter\//);
    for (const r of byType.DocumentReference) expect(r.context.encounter[0].reference).toMatch(/^Encounter\//);
  });

  it('has the shapes the FHIR mapping reads', () => {
    for (const p of byType.Patient) {
      const mr = p.identifier.filter((i: Res) => i.type?.coding?.[0]?.code === 'MR');
      const ss = p.identifier.filter((i: Res) => i.type?.coding?.[0]?.code === 'SS');
      expect(mr).toHaveLength(1);
      expect(mr[0].value).toBe(p.id);
      expect(mr[0].type.coding[0].system).toBe('http://terminology.hl7.org/CodeSystem/v2-0203');
      expect(ss).toHaveLength(1);
      expect(ss[0].system).toBe('http://hl7.org/fhir/sid/us-ssn');
      expect(p.name[0]).toMatchObject({ use: 'official', family: expect.any(String), given: expect.any(Array), prefix: expect.any(Array) });
      expect(['female', 'male']).toContain(p.gender);
      expect(p.birthDate).toMatch(/^\d{4}-\d{2}-\d{2}$/);
      expect(p.address[0]).toMatchObject({ line: expect.any(Array), city: expect.any(String), state: expect.any(String), country: 'US' });
    }
    const dead = byType.Patient.filter((p) => p.deceasedDateTime);
    expect(dead.length).toBeGreaterThan(0);
    for (const p of dead) {
      const ends = byType.Encounter.filter((e) => e.subject.reference === `Patient/${p.id}`).map((e) => Date.parse(e.period.end));
      expect(Date.parse(p.deceasedDateTime)).toBeGreaterThan(Math.max(...ends));
    }
    const byId = new Map(byType.Encounter.map((e) => [e.id, e]));
    for (const e of byType.Encounter) {
      expect(e.class.system).toBe('http://terminology.hl7.org/CodeSystem/v3-ActCode');
      expect(['AMB', 'IMP', 'EMER', 'HH', 'VR']).toContain(e.class.code);
      expect(e.type[0].coding[0].system).toBe('http://snomed.info/sct');
      expect(e.period.start).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d-0[45]:00$/);
      expect(Date.parse(e.period.end)).toBeGreaterThanOrEqual(Date.parse(e.period.start));
      expect(e.participant[0].individual.display).toMatch(/^Dr\. /);
      expect(e.serviceProvider.reference).toMatch(/^Organization\?identifier=https:\/\/github\.com\/synthetichealth\/synthea\|/);
    }
    // children are never dated before their encounter starts
    const start = (ref: string) => Date.parse(byId.get(ref.replace('Encounter/', ''))!.period.start);
    for (const c of byType.Condition) expect(Date.parse(c.onsetDateTime)).toBeGreaterThanOrEqual(start(c.encounter.reference));
    for (const m of byType.MedicationRequest) expect(Date.parse(m.authoredOn)).toBeGreaterThanOrEqual(start(m.encounter.reference));
    for (const p of byType.Procedure) expect(Date.parse(p.performedPeriod.start)).toBeGreaterThanOrEqual(start(p.encounter.reference));
    for (const d of byType.DocumentReference) expect(Date.parse(d.date)).toBeGreaterThanOrEqual(start(d.context.encounter[0].reference));

    const systems = byType.Condition.map((c) => c.code.coding[0].system);
    const icd = byType.Condition.filter((c) => c.code.coding[0].system === 'http://hl7.org/fhir/sid/icd-10-cm');
    expect(new Set(systems)).toEqual(new Set(['http://snomed.info/sct', 'http://hl7.org/fhir/sid/icd-10-cm']));
    expect(icd.length / systems.length).toBeGreaterThan(0.02);
    expect(icd.length / systems.length).toBeLessThan(0.09);
    for (const c of icd) expect(c.code.coding[0].code).toMatch(/^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$/); // dq.check_icd10cm_shape
    for (const c of byType.Condition) expect(['active', 'resolved']).toContain(c.clinicalStatus.coding[0].code);
    for (const m of byType.MedicationRequest)
      expect(m.medicationCodeableConcept.coding[0].system).toBe('http://www.nlm.nih.gov/research/umls/rxnorm');
    expect(byType.MedicationRequest.some((m) => m.dosageInstruction?.[0]?.doseAndRate)).toBe(true);
    expect(byType.MedicationRequest.some((m) => m.dosageInstruction?.[0]?.text)).toBe(true);
    for (const p of byType.Procedure) expect(p.code.coding[0].system).toBe('http://snomed.info/sct');
  });

  it('encodes each note as base64 UTF-8 text naming the patient by given name', () => {
    const given = new Map(byType.Patient.map((p) => [`Patient/${p.id}`, p.name[0].given[0]]));
    for (const d of byType.DocumentReference) {
      const a = d.content[0].attachment;
      expect(a.contentType).toBe('text/plain; charset=utf-8');
      const text = Buffer.from(a.data, 'base64').toString('utf8');
      expect(Buffer.from(text, 'utf8').toString('base64')).toBe(a.data);
      expect(text).toContain(given.get(d.subject.reference));
      expect(d.author[0].reference).toMatch(/^Practitioner\?identifier=http:\/\/hl7\.org\/fhir\/sid\/us-npi\|\d{10}$/);
    }
  });

  it('holds no real-looking identifiers', () => {
    for (const p of byType.Patient) {
      const ss = p.identifier.find((i: Res) => i.system === 'http://hl7.org/fhir/sid/us-ssn');
      expect(ss.value).toMatch(/^999-\d\d-\d{4}$/);
      expect(p.telecom[0].value).toMatch(/^555-01\d\d$/);
      expect(p.address[0].postalCode).toMatch(/^00\d{3}$/);
    }
    for (const p of byType.Practitioner) expect(p.identifier[0].value).toMatch(/^9999\d{6}$/);
    // NPIs carry a valid check digit, as dq.npi_ok computes it (Luhn over 80840 and the first 9 digits)
    for (let k = 0; k < 60; k++) {
      const digits = `80840${npiOf(k)}`.split('').map(Number).reverse();
      const sum = digits.reduce((s, d, i) => s + (i % 2 ? (d * 2 > 9 ? d * 2 - 9 : d * 2) : d), 0);
      expect(sum % 10, npiOf(k)).toBe(0);
    }
  });

  it('is sized like the real bulk set: 500+ resources per patient, about 1,460 bytes each', () => {
    expect(info.total.resources / N).toBeGreaterThan(500);
    const mean = info.total.bytes / info.total.resources;
    expect(mean).toBeGreaterThan(1300);
    expect(mean).toBeLessThan(1650);
  });
});
