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
/** Source batches per transaction: etl.replay_patients runs the steps once per batch (HE007 above 50). */
export const REPLAY_BATCHES = 50;

const Key = z.object({ patient_key: z.coerce.number(), batch_id: z.coerce.number() });
const Replayed = z.object({ patient_key: z.coerce.number(), outcome: z.enum(['replayed', 'kept']), field: z.string().nullable() });

async function patientKeys(pool: DatabasePool, which: ReplaySelector): Promise<{ patient_key: number; batch_id: number }[]> {
  const where =
    'all' in which
      ? sql.fragment`TRUE`
      : 'batch' in which
        ? sql.fragment`p.document_id IN (SELECT d.document_id FROM landing.raw_documents d WHERE d.batch_id = ${which.batch})`
        : sql.fragment`p.source_system = ${which.sourceSystem}
            AND p.source_patient_id IN (SELECT etl.patient_id_of(to_jsonb(i)) FROM unnest(${sql.array(which.patientIds, 'text')}) AS i)`;
  return [
    ...(await pool.any(sql.type(Key)`
      SELECT p.patient_key, d.batch_id FROM clinical.patients p JOIN landing.raw_documents d ON d.document_id = p.document_id
      WHERE ${where} ORDER BY d.batch_id, p.patient_key`)),
  ];
}

/** Chunks of at most REPLAY_CHUNK patients whose current documents come from at most REPLAY_BATCHES batches. */
function chunks(keys: { patient_key: number; batch_id: number }[]): number[][] {
  const out: number[][] = [];
  let chunk: number[] = [];
  let batches = new Set<number>();
  for (const k of keys) {
    if (chunk.length >= REPLAY_CHUNK || (!batches.has(k.batch_id) && batches.size >= REPLAY_BATCHES)) {
      out.push(chunk);
      chunk = [];
      batches = new Set();
    }
    chunk.push(k.patient_key);
    batches.add(k.batch_id);
  }
  if (chunk.length > 0) out.push(chunk);
  return out;
}

/**
 * Re-derives the selected patients' clinical rows from their current snapshots under today's
 * rules (etl.replay_patients), in chunks (see chunks) of one transaction each. A patient whose snapshot
 * today's rules reject (or whose payload is gone) keeps its rows and is returned with the field.
 */
export async function replay(
  pool: DatabasePool,
  which: ReplaySelector,
  onChunk?: (done: number, of: number) => void,
): Promise<ReplayResult> {
  const keys = await patientKeys(pool, which);
  const result: ReplayResult = { selected: keys.length, replayed: 0, kept: [] };
  let done = 0;
  for (const chunk of chunks(keys)) {
    const rows = await pool.transaction((tx) => tx.any(sql.type(Replayed)`SELECT * FROM etl.replay_patients(${sql.array(chunk, 'int8')})`));
    for (const r of rows) {
      if (r.outcome === 'replayed') result.replayed++;
      else result.kept.push({ patient_key: r.patient_key, field: r.field });
    }
    done += chunk.length;
    onChunk?.(done, keys.length);
  }
  return result;
}

const Purged = z.object({ payloads: z.coerce.number(), rejects: z.coerce.number(), problems: z.coerce.number() });
export type PurgeResult = z.infer<typeof Purged>;

/** What only history needs, of documents received more than `days` days ago (etl.purge): never a current snapshot. */
export async function purge(pool: DatabasePool, days: number): Promise<PurgeResult> {
  return pool.transaction((tx) => tx.one(sql.type(Purged)`SELECT * FROM etl.purge(make_interval(days => ${days}))`));
}
