// Binary COPY of documents into landing.raw_documents. Binary COPY needs no escaping of the JSON
// text: each field is a length and raw bytes (jsonb's binary form is a version byte, 1, followed
// by the JSON text).
import type pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';

const COPY_SIGNATURE = Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1');
const COPY_HEADER = Buffer.concat([COPY_SIGNATURE, Buffer.alloc(8)]);
const COPY_TRAILER = Buffer.from([0xff, 0xff]);
const NULL_FIELD = Buffer.from([0xff, 0xff, 0xff, 0xff]);
const JSONB_VERSION = Buffer.from([1]);
const COPY_COLUMNS = 'batch_id, source_file, line, item, byte_offset, content_sha256, format, payload';
const COPY_SQL = `COPY landing.raw_documents (${COPY_COLUMNS}) FROM STDIN (FORMAT binary)`;
// Chunks with FHIR resources only: patient documents load as before (and into a schema before 0012).
const COPY_FHIR_SQL = `COPY landing.raw_documents (${COPY_COLUMNS}, resource_type, source_system) FROM STDIN (FORMAT binary)`;
const FHIR_FORMAT = Buffer.from('fhir-r4', 'utf8');

function int8Field(n: number | null): Buffer {
  if (n === null) return NULL_FIELD;
  const b = Buffer.allocUnsafe(12);
  b.writeInt32BE(8, 0);
  b.writeBigInt64BE(BigInt(n), 4);
  return b;
}
function lengthOf(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeInt32BE(n, 0);
  return b;
}
function bytesField(b: Buffer): Buffer[] {
  return [lengthOf(b.length), b];
}

/** A FHIR resource's landing columns: its resourceType and the source system it is loaded under. */
export type FhirColumns = { resourceType: Buffer; sourceSystem: Buffer };

export type StagedDoc = {
  line: number | null;
  item: number | null;
  byteOffset: number;
  bytes: Buffer;
  sha256: Buffer;
  /** Set for a FHIR resource (format fhir-r4); a patient document has none. */
  fhir?: FhirColumns;
};

/** One row; `withFhir`: the two FHIR columns too (NULL for a patient document), for COPY_FHIR_SQL. */
export function encodeRow(batchId: number, file: Buffer, format: Buffer, d: StagedDoc, withFhir: boolean): Buffer[] {
  const count = Buffer.from([0, withFhir ? 10 : 8]);
  return [
    count,
    int8Field(batchId),
    ...bytesField(file),
    int8Field(d.line),
    int8Field(d.item),
    int8Field(d.byteOffset),
    ...bytesField(d.sha256),
    ...bytesField(d.fhir ? FHIR_FORMAT : format),
    lengthOf(d.bytes.length + 1),
    JSONB_VERSION,
    d.bytes,
    ...(!withFhir ? [] : d.fhir ? [...bytesField(d.fhir.resourceType), ...bytesField(d.fhir.sourceSystem)] : [NULL_FIELD, NULL_FIELD]),
  ];
}

/** One COPY statement of rows encoded by encodeRow (with the FHIR columns when `withFhir`). */
export async function copyRows(client: pg.Client, parts: Buffer[], withFhir: boolean): Promise<void> {
  const stream = client.query(copyFrom(withFhir ? COPY_FHIR_SQL : COPY_SQL));
  await new Promise<void>((resolve, reject) => {
    stream.on('error', reject);
    stream.on('finish', resolve);
    stream.end(Buffer.concat([COPY_HEADER, ...parts, COPY_TRAILER]));
  });
}
