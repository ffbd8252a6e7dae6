// FHIR R4 at load time: a document is a FHIR resource when it is a JSON object with a string
// `resourceType` (or when the input is named FHIR with --format fhir-r4). A Bundle is split into its
// entries here, so that the unit staged, transformed and accounted for is the resource: a bad
// Condition in a bundle rejects that Condition only. Everything else about FHIR (references,
// versions, the mapping) is the transform's, in the database.

/** 'auto': FHIR where a document says so by its resourceType; 'fhir-r4': every document must be FHIR. */
export type FhirMode = 'auto' | 'fhir-r4';

export type FhirPiece =
  | { kind: 'resource'; bytes: Buffer; resourceType: string; item: number | null }
  | { kind: 'reject'; bytes: Buffer | null; item: number | null; reason: string };

const RESOURCE_TYPE = Buffer.from('"resourceType"', 'utf8');
// Bulk exports (and most writers) put resourceType first: then the type is read without parsing
// the document (which the loader has already checked is well-formed JSON).
const LEADING_TYPE = /^[ \t\r\n]*\{[ \t\r\n]*"resourceType"[ \t\r\n]*:[ \t\r\n]*"([A-Za-z]{1,64})"/;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * The FHIR resources in one document (already checked to be well-formed JSON), or null when it is
 * not FHIR (a patient document). A Bundle gives one piece per entry, `item` its 0-based index in
 * `Bundle.entry`; an entry's resource is staged re-serialised (compact JSON) and, when it has no
 * id, takes the uuid of its `urn:uuid:` fullUrl (what its bundle's references point at).
 */
export function fhirPieces(bytes: Buffer, mode: FhirMode, item: number | null): FhirPiece[] | null {
  // Cheap test first: most patient documents never mention the key, and are not parsed here.
  if (mode === 'auto' && bytes.indexOf(RESOURCE_TYPE) === -1) return null;
  const leading = LEADING_TYPE.exec(bytes.toString('latin1', 0, Math.min(bytes.length, 128)));
  if (leading && leading[1] !== 'Bundle') return [{ kind: 'resource', bytes, resourceType: leading[1], item }];
  let doc: unknown;
  try {
    doc = JSON.parse(bytes.toString('utf8'));
  } catch {
    return mode === 'auto' ? null : [{ kind: 'reject', bytes, item, reason: '$: is not valid JSON' }];
  }
  if (!isObject(doc) || typeof doc.resourceType !== 'string' || doc.resourceType === '') {
    if (mode === 'auto') return null;
    return [{ kind: 'reject', bytes, item, reason: 'resourceType: is required (the input was named FHIR R4 by --format fhir-r4)' }];
  }
  if (doc.resourceType !== 'Bundle') return [{ kind: 'resource', bytes, resourceType: doc.resourceType, item }];
  return bundleEntries(doc, bytes, item);
}

function bundleEntries(bundle: Record<string, unknown>, bytes: Buffer, item: number | null): FhirPiece[] {
  const entries = bundle.entry;
  if (!Array.isArray(entries) || entries.length === 0)
    return [{ kind: 'reject', bytes, item, reason: 'Bundle.entry: is required (a Bundle without entries has nothing to load)' }];
  return entries.map((entry: unknown, i): FhirPiece => {
    const at = `Bundle.entry[${i}]`;
    const resource = isObject(entry) ? entry.resource : undefined;
    if (!isObject(resource) || typeof resource.resourceType !== 'string' || resource.resourceType === '')
      return { kind: 'reject', bytes: null, item: i, reason: `${at}.resource.resourceType: is required` };
    const fullUrl = isObject(entry) && typeof entry.fullUrl === 'string' ? entry.fullUrl : null;
    let staged = resource;
    if (fullUrl?.startsWith('urn:uuid:')) {
      const uuid = fullUrl.slice('urn:uuid:'.length);
      if (resource.id === undefined) staged = { resourceType: resource.resourceType, id: uuid, ...resource };
      else if (resource.id !== uuid)
        return {
          kind: 'reject',
          bytes: null,
          item: i,
          reason: `${at}.fullUrl: does not match ${at}.resource.id (the bundle's references to it could not be resolved)`,
        };
    }
    return { kind: 'resource', bytes: Buffer.from(JSON.stringify(staged), 'utf8'), resourceType: resource.resourceType, item: i };
  });
}
