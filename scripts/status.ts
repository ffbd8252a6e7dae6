// Batch bookkeeping for `healthetl status`: what each batch received and what became of it.
import { z } from 'zod';
import type { DatabasePool } from 'slonik';
import { sql } from './db.ts';

const BatchSummary = z.object({
  batch_id: z.coerce.number(),
  status: z.string(),
  started_at: z.coerce.number().transform((ms) => new Date(ms).toISOString()),
  received: z.coerce.number(),
  landed: z.coerce.number(),
  staged: z.coerce.number(),
  loaded: z.coerce.number(),
  rejected: z.coerce.number(),
  duplicate: z.coerce.number(),
  superseded: z.coerce.number(),
  // Documents of a patient erased before or since (etl.erase_patient, migrations/0010): not loaded, no payload kept.
  erased: z.coerce.number(),
  files: z.coerce.number(),
  failed_files: z.coerce.number(),
  balanced: z.boolean(),
  // Why the last attempt to transform the batch failed (etl.record_batch_failure); null once transformed.
  error: z.string().nullable(),
  deleted_visits: z.coerce.number(),
  deleted_children: z.coerce.number(),
  // The database login that started the batch (session_user; migrations/0010).
  db_user: z.string().nullable(),
  // FHIR resources whose Patient or Encounter has not arrived yet, and since when (migrations/0012):
  // not a failure; every later transform looks at them again.
  waiting: z.coerce.number(),
  waiting_since: z.coerce
    .number()
    .nullable()
    .transform((ms) => (ms === null ? null : new Date(ms).toISOString())),
});
export type BatchSummary = z.infer<typeof BatchSummary>;

/**
 * Per batch: `received` is what the loader counted while reading the batch's files, `landed` the
 * batch's rows in landing.raw_documents, each with one outcome (staged, loaded, rejected, duplicate,
 * superseded, erased); `balanced` (etl.batch_summary, migrations/0004 and 0010) says received =
 * landed = the sum of the outcomes (FHIR resources also waiting, migrations/0012).
 */
export async function batchSummaries(pool: DatabasePool, opts: { batchId?: number; limit?: number } = {}): Promise<BatchSummary[]> {
  const where = opts.batchId === undefined ? sql.fragment`TRUE` : sql.fragment`batch_id = ${opts.batchId}`;
  return [
    ...(await pool.any(sql.type(BatchSummary)`
      SELECT s.batch_id, s.status, s.started_at, s.loader_count AS received, s.received AS landed,
             s.staged, s.loaded, s.rejected, s.duplicate, s.superseded, s.erased, s.files, s.failed_files, s.balanced,
             s.error, s.deleted_visits, s.deleted_children, s.db_user, s.waiting, s.waiting_since
      FROM etl.batch_summary s WHERE ${where}
      ORDER BY batch_id DESC LIMIT ${opts.limit ?? 20}`)),
  ];
}

/** A batch whose last transform failed and that is not transformed yet: `status` exits 7 for it. */
export function failedToTransform(b: BatchSummary): boolean {
  return b.error !== null && b.status !== 'transformed';
}

export type BatchOutcome = BatchSummary & { problems: number };

/** A batch's outcome as recorded, with the count of its documents' problems (invalid optional values). */
export async function batchOutcomeOf(pool: DatabasePool, batchId: number): Promise<BatchOutcome> {
  const [summary] = await batchSummaries(pool, { batchId });
  const problems = await pool.oneFirst(sql.type(z.object({ n: z.coerce.number() }))`
    SELECT count(*) AS n FROM etl.document_problems WHERE batch_id = ${batchId}`);
  return { ...summary, problems };
}

const Rejected = z.object({
  source_file: z.string(),
  line: z.coerce.number().nullable(),
  item: z.coerce.number().nullable(),
  byte_offset: z.coerce.number(),
  field: z.string(),
});
export type RejectedRow = z.infer<typeof Rejected>;

/** Where the rejects of a batch are and which field each names (not the reason: it may quote a value). */
export async function rejectedDocuments(pool: DatabasePool, batchId: number, limit = 20): Promise<RejectedRow[]> {
  return [
    ...(await pool.any(sql.type(Rejected)`
      SELECT source_file, line, item, byte_offset, field FROM etl.batch_rejects
      WHERE batch_id = ${batchId} ORDER BY document_id LIMIT ${limit}`)),
  ];
}

const FhirCount = z.object({
  resource_type: z.string().nullable(),
  status: z.string(),
  resources: z.coerce.number(),
  oldest_received_at: z.coerce.number().transform((ms) => new Date(ms).toISOString()),
});
export type FhirCount = z.infer<typeof FhirCount>;

/** FHIR resources in landing by resourceType and status (etl.fhir_summary; no payload is read). */
export async function fhirCounts(pool: DatabasePool): Promise<FhirCount[]> {
  return [
    ...(await pool.any(sql.type(FhirCount)`
      SELECT resource_type, status, resources, oldest_received_at FROM etl.fhir_summary
      ORDER BY resource_type COLLATE "C", status`)),
  ];
}
