// Calls the in-database transform, oldest batch first: a batch in one transaction, or a large
// batch as N shards by patient, each one transaction, run side by side on N connections under
// one coordinator transaction that holds the transform lock (migrations/0004).
import { z } from 'zod';
import type { DatabasePool } from 'slonik';
import { localLockTimeout, NoResult, sql } from './db.ts';
import { batchFailure, failsOnlyTheBatch, isBatchStillLoading, isTooManyConnections } from './errors.ts';

const TransformCounts = z.object({
  documents: z.coerce.number(),
  loaded: z.coerce.number(),
  rejected: z.coerce.number(),
  duplicate: z.coerce.number(),
  superseded: z.coerce.number(),
  problems: z.coerce.number(),
  // Rows the batch's snapshots deleted from replaced patients: a snapshot without visits deletes them all.
  deleted_visits: z.coerce.number(),
  deleted_children: z.coerce.number(),
});
export type TransformCounts = z.infer<typeof TransformCounts>;
export type BatchTransform = TransformCounts & { batchId: number; shards: number };

export type ShardOptions = {
  /** How many sessions transform a large batch at once (1: the whole batch in one transaction). */
  shards?: number;
  /** A batch with fewer staged documents than this is one transaction whatever `shards` says. */
  shardMinDocuments?: number;
};
/** Two shards use both cores of a small server; more pay off only where the server has them. */
export const DEFAULT_SHARDS = 2;
/** Below this a batch transforms in well under a second: keep it one transaction. */
export const DEFAULT_SHARD_MIN_DOCUMENTS = 10_000;

/**
 * Batches with staged documents, oldest first (etl.pending_batches); one whose loader is still
 * alive is left for later when its turn comes (HE002).
 */
export async function pendingBatches(pool: DatabasePool): Promise<number[]> {
  const ids = await pool.anyFirst(sql.type(z.object({ batch_id: z.coerce.number() }))`
    SELECT batch_id FROM etl.pending_batches() AS batch_id`);
  return [...ids];
}

/**
 * Transforms one batch: atomically, or (large batches, shards > 1) as shards each atomic by
 * patient. Says so when it has to wait for another transform. Shards are capped at the pool's
 * size - 1 (one connection is the coordinator's).
 */
export async function transformBatch(
  pool: DatabasePool,
  batchId: number,
  onWait?: (m: string) => void,
  opts: ShardOptions = {},
): Promise<BatchTransform> {
  // Shards still running when the coordinator's transaction fails (its connection lost) are
  // waited for before this returns: the next batch must not start beside them.
  let shardsRunning: Promise<unknown> | undefined;
  try {
    return await coordinate(pool, batchId, onWait, opts, (p) => (shardsRunning = p));
  } finally {
    await shardsRunning;
  }
}

async function coordinate(
  pool: DatabasePool,
  batchId: number,
  onWait: ((m: string) => void) | undefined,
  opts: ShardOptions,
  started: (shards: Promise<unknown>) => void,
): Promise<BatchTransform> {
  return pool.transaction(async (tx) => {
    // The transform lock, then no shards of a lost coordinator still running; raises HE001 (no such
    // batch) and HE002 (its loader is alive). Tried first, so that a wait is said before it starts.
    let state = await tx.one(sql.type(BeginTransform)`SELECT * FROM etl.begin_transform(${batchId}, false)`);
    if (state.waiting) {
      onWait?.(
        state.waiting === 'transform'
          ? `waiting for another run to finish transforming (batch ${batchId} is next)`
          : `waiting for the shards of an earlier transform to finish (batch ${batchId} is next)`,
      );
      // These waits are meant to be long; the lock timeout is set again below.
      await tx.query(sql.unsafe`SET LOCAL lock_timeout = 0`);
      // The comment says in pg_stat_activity which lock this session waits for.
      state = await tx.one(
        state.waiting === 'transform'
          ? sql.type(BeginTransform)`SELECT * FROM etl.begin_transform(${batchId}, true) /* waits for etl.transform_lock_key() */`
          : sql.type(BeginTransform)`SELECT * FROM etl.begin_transform(${batchId}, true) /* waits for etl.shard_lock_key() */`,
      );
    }
    // Transformed by another run while this one waited: nothing to do. Calling the transform again
    // would only move the batch's transformed_at to now, losing when its documents were loaded.
    if (state.status === 'transformed' && !state.staged) return { batchId, shards: 0, ...NO_DOCUMENTS };
    // Past the waits that are meant to be long, a stuck lock (a table locked by another session)
    // is a clear error after HEALTHETL_LOCK_TIMEOUT_MS, as in the loader, not a hang.
    await tx.query(lockTimeout);
    // One pool connection is this transaction's: shards beyond the rest would wait for one forever.
    const room = Math.max(1, (pool.configuration.maximumPoolSize ?? 10) - 1);
    const wanted = (state.staged ?? 0) >= (opts.shardMinDocuments ?? DEFAULT_SHARD_MIN_DOCUMENTS) ? (opts.shards ?? DEFAULT_SHARDS) : 1;
    const shards = Math.min(wanted, room);
    if (shards <= 1) {
      const counts = await tx.one(sql.type(TransformCounts)`SELECT * FROM etl.transform_batch(${batchId})`);
      return { batchId, shards: 1, ...counts };
    }
    const coordinator = await tx.oneFirst(sql.type(z.object({ pid: z.number() }))`SELECT pg_backend_pid() AS pid`);
    const sum = { batchId, shards, ...NO_DOCUMENTS };
    const add = (c: TransformCounts) => {
      for (const k of Object.keys(c) as (keyof TransformCounts)[]) sum[k] += c[k];
    };
    // A server (or a role's connection limit) that refuses some shards' connections (53300): the
    // shards that connected did their part; the rest of the batch goes on with fewer shards, and
    // with none left, in this transaction. Patients stay whole: a shard is all or nothing.
    for (let n = shards; ;) {
      const running = Promise.allSettled(Array.from({ length: n }, (_, shard) => transformShard(pool, batchId, shard, n, coordinator)));
      started(running);
      const results = await running;
      for (const r of results) if (r.status === 'fulfilled') add(r.value);
      // A shard that failed rolled back alone: its documents stay staged, the batch stays
      // unfinished, and the next run transforms what is left. (The last shard to commit marked
      // the batch transformed: etl.finish_batch, in etl.transform_batch.)
      const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
      const other = failed.find((r) => !isTooManyConnections(r.reason));
      if (other) throw other.reason;
      if (failed.length === 0) return sum;
      const left = n - failed.length;
      onWait?.(
        left > 1
          ? `the server refused ${failed.length} of ${n} shard connections (SQLSTATE 53300: connection limit); going on with ${left} shards`
          : `the server refused ${failed.length} of ${n} shard connections (SQLSTATE 53300: connection limit); transforming the rest of batch ${batchId} in one transaction`,
      );
      if (left <= 1) {
        add(await tx.one(sql.type(TransformCounts)`SELECT * FROM etl.transform_batch(${batchId})`));
        return sum;
      }
      n = left;
    }
  });
}

/** One shard on its own connection: its partitions in a short transaction, then its transform in another. */
function transformShard(pool: DatabasePool, batchId: number, shard: number, shards: number, coordinator: number): Promise<TransformCounts> {
  return pool.connect(async (c) => {
    // Partitions first, committed on their own: tables are never created inside the shards'
    // concurrent transactions.
    await c.transaction(async (t) => {
      await t.query(lockTimeout);
      await t.query(
        sql.type(z.object({ created: z.number() }))`SELECT etl.ensure_batch_partitions(${batchId}, ${shard}, ${shards}) AS created`,
      );
    });
    return c.transaction(async (t) => {
      await t.query(lockTimeout);
      return t.one(sql.type(TransformCounts)`SELECT * FROM etl.transform_batch(${batchId}, ${shard}, ${shards}, ${coordinator})`);
    });
  });
}

const NO_DOCUMENTS: TransformCounts = {
  documents: 0,
  loaded: 0,
  rejected: 0,
  duplicate: 0,
  superseded: 0,
  problems: 0,
  deleted_visits: 0,
  deleted_children: 0,
};

const lockTimeout = localLockTimeout();

const BeginTransform = z.object({
  waiting: z.enum(['transform', 'shards']).nullable(),
  status: z.string().nullable(),
  staged: z.coerce.number().nullable(),
});

/**
 * Transforms the given batches, or every pending one; batches of live loaders are skipped. A
 * batch that fails does not hold back the ones after it (batches are independent: snapshots are
 * ordered by updated_at, not by batch): the others are transformed, then its error is thrown.
 * A lost connection or a server shutting down ends the run at once.
 */
export async function transformPending(
  pool: DatabasePool,
  opts: {
    batchIds?: number[];
    onWait?: (m: string) => void;
    onBatch?: (r: BatchTransform) => void;
    onFailed?: (batchId: number, err: unknown) => void;
  } & ShardOptions = {},
): Promise<BatchTransform[]> {
  const ids = opts.batchIds ?? (await pendingBatches(pool));
  const out: BatchTransform[] = [];
  let failure: { err: unknown } | undefined;
  for (const id of ids) {
    try {
      const r = await transformBatch(pool, id, opts.onWait, opts);
      // A batch another run finished while this one waited for the lock has nothing left.
      if (r.documents === 0) continue;
      out.push(r);
      opts.onBatch?.(r);
    } catch (err) {
      // Another loader is still staging that batch: not an error for a scheduler, it will come back.
      if (isBatchStillLoading(err)) {
        if (opts.batchIds) throw err;
        opts.onWait?.(`batch ${id} is still being loaded by another process; left for a later run`);
        continue;
      }
      if (!failsOnlyTheBatch(err)) throw err;
      await recordFailure(pool, id, err);
      opts.onFailed?.(id, err);
      failure ??= { err };
    }
  }
  if (failure) throw failure.err;
  return out;
}

/**
 * Keeps why a batch failed (etl.record_batch_failure, in its own short transaction), so that
 * `status` never shows it as fine; cleared when a transform finishes the batch. Best effort: if
 * even this fails, the run's own error line and exit code still say the batch failed.
 */
async function recordFailure(pool: DatabasePool, batchId: number, err: unknown): Promise<void> {
  const { sqlstate, message } = batchFailure(err);
  await pool
    .transaction(async (tx) => {
      await tx.query(lockTimeout);
      await tx.query(sql.type(NoResult)`SELECT etl.record_batch_failure(${batchId}, ${sqlstate}, ${message})`);
    })
    .catch(() => undefined);
}
