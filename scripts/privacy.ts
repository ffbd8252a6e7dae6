// The operator's side of the PHI functions: `healthetl erase` (etl.erase_patient, etl.lift_erasure:
// migrations/0010), `healthetl rotate-pseudonym-key` (etl.rotate_pseudonym_key) and `healthetl
// privacy-report` (etl.privacy_report: 0009). Each is one transaction; what comes back is counts and
// a receipt number, never an identity: the patient id goes to the server as a parameter and nowhere else.
import { z } from 'zod';
import type { DatabasePool } from 'slonik';
import { DEFAULT_TIMEOUTS, localLockTimeout, sql, type Timeouts } from './db.ts';

/** A patient as their documents name them: the source system (default `default`) and the patient id (PHI). */
export type PatientIdentity = { sourceSystem: string; patientId: string };

/** What the refusal of `rotate-pseudonym-key` without --yes says. */
export const ROTATE_WARNING =
  'rotate-pseudonym-key gives every patient a new pseudonym in the analytics views: saved reports, extracts and joins keyed by the old pseudonyms stop matching, and the old key is gone (it cannot be undone); run it again with --yes to do it';

// erase_patient and rotate_pseudonym_key first wait for running transforms (etl.lock_out_transforms):
// as the loader's sessions do, they set lock_timeout (db.ts localLockTimeout) so a stuck lock is an error.

const Receipt = z.object({
  erasure_id: z.coerce.number(),
  documents: z.coerce.number(), // landing rows scrubbed (payload, fingerprint; every copy of the same bytes)
  clinical_rows: z.coerce.number(), // rows deleted from the clinical tables
  files: z.coerce.number(), // files whose stored names were replaced
});
export type ErasureReceipt = z.infer<typeof Receipt>;

/** Erases a patient everywhere and blocks their later documents (etl.erase_patient), in one transaction; the receipt. */
export async function erasePatient(
  pool: DatabasePool,
  who: PatientIdentity,
  timeouts: Timeouts = DEFAULT_TIMEOUTS,
): Promise<ErasureReceipt> {
  return pool.transaction(async (tx) => {
    await tx.query(localLockTimeout(timeouts));
    return tx.one(sql.type(Receipt)`
      SELECT erasure_id, documents, clinical_rows, files FROM etl.erase_patient(${who.sourceSystem}, ${who.patientId})`);
  });
}

/** Lifts the block of a patient's erasure (etl.lift_erasure): how many receipts were lifted, 0 when the patient was not erased. */
export async function liftErasure(pool: DatabasePool, who: PatientIdentity): Promise<number> {
  return pool.transaction((tx) =>
    tx.oneFirst(
      sql.type(z.object({ lifted: z.coerce.number() }))`SELECT etl.lift_erasure(${who.sourceSystem}, ${who.patientId}) AS lifted`,
    ),
  );
}

/** A new pseudonym key and every patient's pseudonym under it (etl.rotate_pseudonym_key), in one transaction: how many patients. */
export async function rotatePseudonymKey(pool: DatabasePool, timeouts: Timeouts = DEFAULT_TIMEOUTS): Promise<number> {
  return pool.transaction(async (tx) => {
    await tx.query(localLockTimeout(timeouts));
    return tx.oneFirst(sql.type(z.object({ patients: z.coerce.number() }))`SELECT etl.rotate_pseudonym_key() AS patients`);
  });
}

const Report = z.object({
  k: z.coerce.number(),
  patients: z.coerce.number(),
  groups: z.coerce.number(),
  smallest_group: z.coerce.number().nullable(), // null: no patients
  groups_below_k: z.coerce.number(),
  patients_below_k: z.coerce.number(),
});
export type PrivacyReport = z.infer<typeof Report>;

/** The k-anonymity of the deid tier (etl.privacy_report): counts only. */
export async function privacyReport(pool: DatabasePool, k: number): Promise<PrivacyReport> {
  return pool.one(
    sql.type(Report)`SELECT k, patients, groups, smallest_group, groups_below_k, patients_below_k FROM etl.privacy_report(${k})`,
  );
}

/** The report as a few lines for a person. */
export function formatPrivacyReport(r: PrivacyReport): string {
  const share = r.patients > 0 ? ` (${((100 * r.patients_below_k) / r.patients).toFixed(1)}% of them)` : '';
  return [
    `Privacy report of the deid views (k = ${r.k})`,
    `  patients:                 ${r.patients}`,
    `  groups:                   ${r.groups} (patients alike in birth year or 90+, sex and 3-digit ZIP)`,
    `  smallest group:           ${r.smallest_group ?? '-'}${r.smallest_group === null ? '' : ` patient${r.smallest_group === 1 ? '' : 's'}`}`,
    `  in groups smaller than k: ${r.patients_below_k} patient${r.patients_below_k === 1 ? '' : 's'} in ${r.groups_below_k} group${r.groups_below_k === 1 ? '' : 's'}${share}`,
    r.patients_below_k === 0
      ? `Every patient shares these quasi-identifiers with at least ${r.k - 1} others.`
      : `Those patients share these quasi-identifiers with fewer than ${r.k - 1} others: a research extract may need coarser values or suppression.`,
  ].join('\n');
}
