// The loader's part of FHIR R4 (scripts/fhir-split.ts): which documents are FHIR, and a Bundle as
// one piece per entry. Pure functions: no database.
import { describe, expect, test } from 'vitest';
import { fhirPieces } from '../scripts/fhir-split.ts';

const b = (v: unknown) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v), 'utf8');
const types = (p: ReturnType<typeof fhirPieces>) => p?.map((x) => (x.kind === 'resource' ? x.resourceType : `reject: ${x.reason}`));

describe('which documents are FHIR', () => {
  test('a patient document is not (null), with or without the word resourceType in a value', () => {
    expect(fhirPieces(b({ patient_id: '1', visits: [] }), 'auto', null)).toBeNull();
    expect(fhirPieces(b({ patient_id: '1', note: 'has a "resourceType" in it' }), 'auto', null)).toBeNull();
    // A nested resourceType does not make the document FHIR.
    expect(fhirPieces(b({ patient_id: '1', x: { resourceType: 'Patient' } }), 'auto', null)).toBeNull();
  });

  test('resourceType first (read without parsing) or anywhere at the top level (parsed): the same piece, bytes as given', () => {
    const first = b('  {\n "resourceType" : "Condition", "id": "c1"}');
    expect(fhirPieces(first, 'auto', 3)).toEqual([{ kind: 'resource', bytes: first, resourceType: 'Condition', item: 3 }]);
    const later = b({ id: 'c1', resourceType: 'Condition' });
    expect(fhirPieces(later, 'auto', null)).toEqual([{ kind: 'resource', bytes: later, resourceType: 'Condition', item: null }]);
  });

  test('--format fhir-r4: a document without a resourceType is rejected, naming the field', () => {
    expect(types(fhirPieces(b({ patient_id: '1' }), 'fhir-r4', null))).toEqual([
      'reject: resourceType: is required (the input was named FHIR R4 by --format fhir-r4)',
    ]);
    expect(types(fhirPieces(b([1, 2]), 'fhir-r4', null))).toEqual([
      'reject: resourceType: is required (the input was named FHIR R4 by --format fhir-r4)',
    ]);
  });
});

describe('a Bundle', () => {
  const patient = { resourceType: 'Patient', id: 'a1' };
  const encounter = { resourceType: 'Encounter', id: 'e1', subject: { reference: 'urn:uuid:a1' } };

  test('is one piece per entry, item = the entry index, each the compact JSON of its resource', () => {
    const bundle = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        { fullUrl: 'urn:uuid:a1', resource: patient, request: { method: 'POST', url: 'Patient' } },
        { fullUrl: 'urn:uuid:e1', resource: encounter },
      ],
    };
    // Pretty-printed with the type first: a Bundle is always parsed.
    const pieces = fhirPieces(b(JSON.stringify(bundle, null, 4)), 'auto', null)!;
    expect(pieces.map((p) => [p.kind, p.item, p.kind === 'resource' ? p.bytes.toString('utf8') : null])).toEqual([
      ['resource', 0, JSON.stringify(patient)],
      ['resource', 1, JSON.stringify(encounter)],
    ]);
  });

  test('an entry without an id takes its urn:uuid fullUrl; one whose fullUrl names another id is rejected alone', () => {
    const pieces = fhirPieces(
      b({
        resourceType: 'Bundle',
        entry: [
          { fullUrl: 'urn:uuid:n1', resource: { resourceType: 'Condition', code: { text: 'x' } } },
          { fullUrl: 'urn:uuid:zz', resource: patient },
          { resource: { id: 'no-type' } },
          { fullUrl: 'http://example.org/fhir/Patient/a1', resource: patient },
        ],
      }),
      'auto',
      null,
    )!;
    expect(pieces[0]).toMatchObject({ kind: 'resource', item: 0, resourceType: 'Condition' });
    expect(JSON.parse(pieces[0].bytes!.toString('utf8'))).toEqual({ resourceType: 'Condition', id: 'n1', code: { text: 'x' } });
    expect(pieces[1]).toEqual({
      kind: 'reject',
      bytes: null,
      item: 1,
      reason: "Bundle.entry[1].fullUrl: does not match Bundle.entry[1].resource.id (the bundle's references to it could not be resolved)",
    });
    expect(pieces[2]).toEqual({ kind: 'reject', bytes: null, item: 2, reason: 'Bundle.entry[2].resource.resourceType: is required' });
    // Not a urn:uuid: kept as it is (its references are Patient/a1).
    expect(pieces[3]).toMatchObject({ kind: 'resource', item: 3, resourceType: 'Patient' });
  });

  test('without entries it is rejected whole: nothing in it could be accounted for', () => {
    expect(types(fhirPieces(b({ resourceType: 'Bundle', type: 'collection' }), 'auto', 7))).toEqual([
      'reject: Bundle.entry: is required (a Bundle without entries has nothing to load)',
    ]);
  });
});
