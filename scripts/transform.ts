// Calls the in-database transform, one transaction per batch, oldest batch first.
import { z } from 'zod';
import type { DatabasePool } from 'slonik';
import { DEFAULT_TIMEOUTS, sql } from './db.ts';

const TransformCounts = z.object({
  documents: z.coerce.number(),
  loaded: z.coerce.number(),
  rejected: z.coerce.number(),
  duplicate: z.coerce.number(),
  superseded: z.coerce.number(),
  problems: z.coerce.number(),
});
export type TransformCounts = z.infer<typeof TransformCounts>;
export type BatchTransform = TransformCounts & { batchId: number };

/**
 * Batches with staged documents whose loader has finished or is gone (a batch still held by
 * a live loader is left for later).
 */
export async function pendingBatches(pool: DatabasePool): Promise<number[]> {
  const ids = await pool.anyFirst(sql.type(z.object({ batch_id: z.coerce.number() }))`
    SELECT b.batch_id FROM etl.batches b
    WHERE b.status IN ('loading', 'staged')
      AND EXISTS (SELECT 1 FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'staged')
    ORDER BY b.batch_id`);
  return [...ids];
}

/** Transforms one batch atomically; says so when it has to wait for another transform. */
export async function transformBatch(pool: DatabasePool, batchId: number, onWait?: (m: string) => void): Promise<BatchTransform> {
  return pool.transaction(async (tx) => {
    const free = await tx.oneFirst(sql.type(z.object({ ok: z.boolean() }))`
      SELECT pg_try_advisory_xact_lock(etl.transform_lock_key()) AS ok`);
    if (!free) {
      onWait?.(`waiting for another run to finish transforming (batch ${batchId} is next)`);
      await tx.query(sql.unsafe`SET LOCAL lock_timeout = 0`);
      await tx.query(sql.unsafe`SELECT pg_advisory_xact_lock(etl.transform_lock_key())`);
    }
    const state = await tx.maybeOne(sql.type(z.object({ status: z.string(), busy: z.boolean(), staged: z.boolean() }))`
      SELECT b.status,
             CASE WHEN b.status = 'loading' THEN NOT pg_try_advisory_xact_lock(etl.loader_lock_key(b.batch_id)) ELSE false END AS busy,
             EXISTS (SELECT 1 FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'staged') AS staged
      FROM etl.batches b WHERE b.batch_id = ${batchId}`);
    // A batch whose loader is alive is left alone before etl.transform_batch locks its row: that
    // row lock waits for the loader's open file transaction (its landing rows' foreign keys hold a
    // share lock on the row), which stalled every transform, holding the transform lock, for as
    // long as the other loader took to stage its current file.
    if (state?.busy) throw new BatchStillLoading(batchId);
    // Transformed by another run while this one waited: nothing to do. Calling the transform again
    // would only move the batch's transformed_at to now, losing when its documents were loaded.
    if (state?.status === 'transformed' && !state.staged) {
      return { batchId, documents: 0, loaded: 0, rejected: 0, duplicate: 0, superseded: 0, problems: 0 };
    }
    // Past the waits that are meant to be long, a stuck lock (a table locked by another session)
    // is a clear error after HEALTHETL_LOCK_TIMEOUT_MS, as in the loader, not a hang.
    await tx.query(sql.unsafe`SELECT set_config('lock_timeout', ${String(DEFAULT_TIMEOUTS.lockTimeoutMs)}, true)`);
    const counts = await tx.one(sql.type(TransformCounts)`SELECT * FROM etl.transform_batch(${batchId})`);
    return { batchId, ...counts };
  });
}

/** The same condition (and SQLSTATE) etl.transform_batch raises for a batch whose loader is alive. */
class BatchStillLoading extends Error {
  readonly code = 'HE002';
  readonly hint = 'Wait for its loader to finish, then run "healthetl transform".';
  constructor(batchId: number) {
    super(`batch ${batchId} is still being loaded`);
  }
}

/** Transforms the given batches, or every pending one; batches of live loaders are skipped. */
export async function transformPending(
  pool: DatabasePool,
  opts: { batchIds?: number[]; onWait?: (m: string) => void; onBatch?: (r: BatchTransform) => void } = {},
): Promise<BatchTransform[]> {
  const ids = opts.batchIds ?? (await pendingBatches(pool));
  const out: BatchTransform[] = [];
  for (const id of ids) {
    try {
      const r = await transformBatch(pool, id, opts.onWait);
      // A batch another run finished while this one waited for the lock has nothing left.
      if (r.documents === 0) continue;
      out.push(r);
      opts.onBatch?.(r);
    } catch (err) {
      // Another loader is still staging that batch: not an error for a scheduler, it will come back.
      if ((err as { code?: string }).code === 'HE002' || innerCode(err) === 'HE002') {
        if (opts.batchIds) throw err;
        opts.onWait?.(`batch ${id} is still being loaded by another process; left for a later run`);
        continue;
      }
      throw err;
    }
  }
  return out;
}

function innerCode(err: unknown): string | undefined {
  let e = err as { code?: string; cause?: unknown } | undefined;
  for (let i = 0; i < 5 && e; i++) {
    if (e.code) return e.code;
    e = e.cause as typeof e;
  }
  return undefined;
}
