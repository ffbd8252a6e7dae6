// `healthetl replay` and `healthetl purge`: the operator's side of etl.replay_patients and
// etl.purge (migration 0007). Which patients, in chunks, one transaction each; the counts back.
import { z } from 'zod';
import type { DatabasePool } from 'slonik';
import { sql } from './db.ts';

/** Which patients to replay: every one, those whose current document came in a batch, or by id. */
export type ReplaySelector = { all: true } | { batch: number } | { patientIds: string[]; sourceSystem: string };

export type ReplayResult = { selected: number; replayed: number; kept: { patient_key: number; field: string | null }[] };

/** Patient keys per transaction: each chunk holds the transform lock only that long. */
export const REPLAY_CHUNK = 5_000;

const Key = z.object({ patient_key: z.coerce.number() });
const Replayed = z.object({ patient_key: z.coerce.number(), outcome: z.enum(['replayed', 'kept']), field: z.string().nullable() });

async function patientKeys(pool: DatabasePool, which: ReplaySelector): Promise<number[]> {
  const where =
    'all' in which
      ? sql.fragment`TRUE`
      : 'batch' in which
        ? sql.fragment`p.document_id IN (SELECT d.document_id FROM landing.raw_documents d WHERE d.batch_id = ${which.batch})`
        : sql.fragment`p.source_system = ${which.sourceSystem}
            AND p.source_patient_id IN (SELECT etl.patient_id_of(to_jsonb(i)) FROM unnest(${sql.array(which.patientIds, 'text')}) AS i)`;
  const keys = await pool.anyFirst(sql.type(Key)`SELECT p.patient_key FROM clinical.patients p WHERE ${where} ORDER BY p.patient_key`);
  return [...keys];
}

/**
 * Re-derives the selected patients' clinical rows from their current snapshots under today's
 * rules (etl.replay_patients), REPLAY_CHUNK patients per transaction. A patient whose snapshot
 * today's rules reject (or whose payload is gone) keeps its rows and is returned with the field.
 */
export async function replay(
  pool: DatabasePool,
  which: ReplaySelector,
  onChunk?: (done: number, of: number) => void,
): Promise<ReplayResult> {
  const keys = await patientKeys(pool, which);
  const result: ReplayResult = { selected: keys.length, replayed: 0, kept: [] };
  for (let i = 0; i < keys.length; i += REPLAY_CHUNK) {
    const chunk = keys.slice(i, i + REPLAY_CHUNK);
    const rows = await pool.transaction((tx) => tx.any(sql.type(Replayed)`SELECT * FROM etl.replay_patients(${sql.array(chunk, 'int8')})`));
    for (const r of rows) {
      if (r.outcome === 'replayed') result.replayed++;
      else result.kept.push({ patient_key: r.patient_key, field: r.field });
    }
    onChunk?.(i + chunk.length, keys.length);
  }
  return result;
}

const Purged = z.object({ payloads: z.coerce.number(), rejects: z.coerce.number(), problems: z.coerce.number() });
export type PurgeResult = z.infer<typeof Purged>;

/** What only history needs, of documents received more than `days` days ago (etl.purge): never a current snapshot. */
export async function purge(pool: DatabasePool, days: number): Promise<PurgeResult> {
  return pool.transaction((tx) => tx.one(sql.type(Purged)`SELECT * FROM etl.purge(make_interval(days => ${days}))`));
}
