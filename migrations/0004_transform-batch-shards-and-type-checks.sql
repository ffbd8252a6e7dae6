-- Up Migration
-- transform_batch, restated whole (released migrations are immutable), and sharded transforms:
-- * a diagnosis code or a note text that is not a string or a number (an array, an object, a
--   boolean) is now a reject naming the field; before, it passed validation and then broke the
--   NOT NULL column, failing the whole batch and every later run on it;
-- * a large batch can be transformed as N shards by patient, in N sessions at once (each shard
--   one transaction), which uses the server's cores: the transform was one backend's CPU;
-- * is_rfc3339 no longer accepts a leap second with a fraction, which the cast then refused
--   (the whole batch failed on every run);
-- * no JIT inside the transform (it cost more to compile than it saved).

-- Which of `shards` shards a document belongs to: by its patient (source_system and patient_id as
-- the transform normalises them), so every snapshot of one patient is in the same shard, and so
-- are byte-identical copies. Any document has exactly one shard, valid or not.
CREATE FUNCTION etl.shard_of(source_system jsonb, patient_id jsonb, shards int) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN shards <= 1 THEN 0 ELSE
    ((hashtextextended(coalesce(nullif(etl.jtext(source_system), ''), 'default') || E'\n' || coalesce(etl.jtext(patient_id), ''), 0)
      & 9223372036854775807) % shards)::int END
$$;

-- Held shared by every running shard; a new transform takes it exclusively first, so it waits
-- for the shards of a coordinator that was lost (its connection ended while they ran).
CREATE FUNCTION etl.shard_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 4848000000000000::bigint - 2
$$;

-- Shards of a batch take turns on this at their end, so exactly the last one to commit finds
-- nothing left staged and finishes the batch (even if the coordinator is gone by then).
CREATE FUNCTION etl.batch_finish_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 4848000000000000::bigint - 3
$$;

-- Is the text an RFC 3339 timestamp with a real calendar date and an explicit offset?
-- Restated from 0003: a leap second (:60) with a fraction passed this check and then failed the
-- cast, which failed the whole batch; :60 is accepted only without a fraction (or .000).
CREATE OR REPLACE FUNCTION etl.is_rfc3339(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT t ~ '^\d{4}-\d{2}-\d{2}[Tt ]([01]\d|2[0-3]):[0-5]\d:([0-5]\d(\.\d{1,9})?|60(\.0{1,9})?)([Zz]|[+-](0\d|1[0-5]):[0-5]\d)$'
     AND etl.is_ymd(substr(t, 1, 10))
$$;

-- Does backend p_pid hold the advisory lock p_key exclusively? (How a shard checks its coordinator.)
CREATE FUNCTION etl.holds_advisory_lock(p_pid int, p_key bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.pid = p_pid AND l.granted AND l.mode = 'ExclusiveLock'
      AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((l.classid::bigint << 32) | l.objid::bigint) = p_key)
$$;

-- Create the yearly clinical.visits partitions for the given years that do not exist yet.
-- CREATE TABLE + ATTACH takes only SHARE UPDATE EXCLUSIVE on clinical.visits, so analysts'
-- queries keep running while a new year is added. Sessions that need a new year at once (the
-- shards of a batch) take turns on that lock (it conflicts with itself), and each checks again
-- once it has it: taking a table lock also makes this session see tables committed meanwhile,
-- which waiting on an advisory lock does not (a second CREATE TABLE failed on "already exists").
CREATE OR REPLACE FUNCTION etl.ensure_visit_partitions(years int[]) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
  y int;
  created int := 0;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM unnest(years) u
                 WHERE u IS NOT NULL AND to_regclass(format('clinical.%I', etl.visit_partition_name(u))) IS NULL) THEN
    RETURN 0;
  END IF;
  LOCK TABLE clinical.visits IN SHARE UPDATE EXCLUSIVE MODE;
  FOR y IN SELECT DISTINCT u FROM unnest(years) u WHERE u IS NOT NULL ORDER BY u LOOP
    IF to_regclass(format('clinical.%I', etl.visit_partition_name(y))) IS NULL THEN
      EXECUTE format('CREATE TABLE clinical.%I (LIKE clinical.visits INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                     etl.visit_partition_name(y));
      EXECUTE format('ALTER TABLE clinical.visits ATTACH PARTITION clinical.%I FOR VALUES FROM (%L) TO (%L)',
                     etl.visit_partition_name(y), make_date(y, 1, 1), make_date(y + 1, 1, 1));
      created := created + 1;
    END IF;
  END LOOP;
  RETURN created;
END
$$;

-- Create the visits partitions the staged documents of one shard of a batch need, in the
-- caller's (short) transaction, before the shard's transform. Returns how many it created.
-- strict + silent: a document whose visits are malformed yields no year (it will be rejected).
-- Like the whole-batch transform, it creates only what is needed, with one difference: a document
-- rejected by a visit or child rule (not a document-level one) can still add an empty partition.
-- No JIT, for the reason given in transform_batch.
CREATE FUNCTION etl.ensure_batch_partitions(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1) RETURNS int
LANGUAGE sql SET jit = off AS $$
  SELECT etl.ensure_visit_partitions(ARRAY(
    SELECT DISTINCT extract(year FROM etl.to_visit_date(v.d #>> '{}'))::int
    FROM landing.raw_documents r
    CROSS JOIN LATERAL jsonb_to_record(CASE WHEN jsonb_typeof(r.payload) = 'object' THEN r.payload ELSE '{}'::jsonb END)
      AS x(source_system jsonb, patient_id jsonb, visits jsonb)
    CROSS JOIN LATERAL jsonb_path_query(x.visits, 'strict $[*].visit_date', '{}', true) AS v(d)
    WHERE r.batch_id = p_batch_id AND r.status = 'staged'
      AND etl.shard_of(x.source_system, x.patient_id, p_shards) = p_shard
      -- not for documents the document-level rules reject (a rejected document's years would
      -- only make empty partitions); one rejected by a visit or child rule may still add one
      AND jsonb_typeof(x.patient_id) IN ('string', 'number') AND x.patient_id <> '""'::jsonb
      AND coalesce(jsonb_typeof(x.source_system), 'null') IN ('string', 'null')))
$$;

-- Mark a batch transformed once none of its documents is left staged (after all its shards).
-- Returns whether it did.
CREATE FUNCTION etl.finish_batch(p_batch_id bigint) RETURNS boolean
LANGUAGE sql AS $$
  WITH done AS (
    UPDATE etl.batches b
    SET status = 'transformed', transformed_at = clock_timestamp(), staged_at = coalesce(b.staged_at, clock_timestamp())
    WHERE b.batch_id = p_batch_id AND b.status <> 'transformed'
      AND NOT EXISTS (SELECT 1 FROM landing.raw_documents d WHERE d.batch_id = p_batch_id AND d.status = 'staged')
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM done)
$$;

-- Counts of a batch's documents by outcome, restated from 0003 with two columns added at the
-- end: loader_count, what the loader counted while reading the batch's files (committed with
-- each file), and balanced: loader_count = received (the landing rows) = the sum of their
-- outcomes. The loader's count is the independent side: counting landing rows alone could never
-- disagree with the sum of their own statuses. healthetl status and sql/batch-report.sql read it.
CREATE OR REPLACE VIEW etl.batch_summary AS
SELECT b.batch_id, b.status, b.started_at, b.staged_at, b.transformed_at,
       count(d.document_id)                                AS received,
       count(d.document_id) FILTER (WHERE d.status = 'staged')     AS staged,
       count(d.document_id) FILTER (WHERE d.status = 'loaded')     AS loaded,
       count(d.document_id) FILTER (WHERE d.status = 'rejected')   AS rejected,
       count(d.document_id) FILTER (WHERE d.status = 'duplicate')  AS duplicate,
       count(d.document_id) FILTER (WHERE d.status = 'superseded') AS superseded,
       (SELECT count(*) FROM etl.batch_files f WHERE f.batch_id = b.batch_id) AS files,
       (SELECT count(*) FROM etl.batch_files f WHERE f.batch_id = b.batch_id AND f.status IN ('unreadable', 'rejected')) AS failed_files,
       lf.loader_count,
       lf.loader_count = count(d.document_id)
         AND count(d.document_id) = count(d.document_id) FILTER (WHERE d.status IN ('staged', 'loaded', 'rejected', 'duplicate', 'superseded'))
         AS balanced
FROM etl.batches b
CROSS JOIN LATERAL (SELECT coalesce(sum(f.documents), 0)::bigint AS loader_count FROM etl.batch_files f WHERE f.batch_id = b.batch_id) lf
LEFT JOIN landing.raw_documents d ON d.batch_id = b.batch_id
GROUP BY b.batch_id, lf.loader_count;
COMMENT ON VIEW etl.batch_summary IS 'One row per batch: documents received and what became of them; balanced says whether they add up.';

-- The one-argument transform_batch of 0003 becomes the four-argument one below (called with
-- one argument, it does what it did: the whole batch in one transaction).
DROP FUNCTION etl.transform_batch(bigint);

-- Transform one staged batch (or one shard of it) into the clinical tables, atomically, and
-- return the outcome counts of the documents it took.
-- Shards: with p_shards > 1 the call takes only the documents of shard p_shard (by patient, see
-- etl.shard_of), so shards of one batch can run at once in separate sessions. They are started
-- by a coordinator session that holds the transform lock (p_coordinator is its backend pid);
-- each shard first calls etl.ensure_batch_partitions in its own transaction (tables are not
-- created inside concurrent transactions); the last shard to commit finishes the batch.
-- Performance notes (measured with npm run bench):
-- * each payload is decompressed a few times only: the top-level fields come out of ONE
--   jsonb_to_record call into t_docs, visits out of one jsonb_array_elements pass into t_visits;
--   every later statement reads those small values, never the landing payload again;
-- * checks first compute a cheap boolean per row and build messages only for the rows that fail;
-- * visit keys are taken from the sequence up front, so children never join back to find them.
CREATE FUNCTION etl.transform_batch(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1,
                                    p_coordinator int DEFAULT NULL)
RETURNS TABLE (documents bigint, loaded bigint, rejected bigint, duplicate bigint, superseded bigint, problems bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
  v_status text;
  v_years int[];
BEGIN

  IF p_shards IS NULL OR p_shards < 1 OR p_shard IS NULL OR p_shard < 0 OR p_shard >= p_shards THEN
    RAISE EXCEPTION 'shard % of % does not exist: shards are numbered 0 to shards - 1', p_shard, p_shards
      USING ERRCODE = 'HE003', HINT = 'Call etl.transform_batch(batch_id) to transform the whole batch.';
  END IF;
  IF p_shards = 1 THEN
    PERFORM pg_advisory_xact_lock(etl.transform_lock_key());
    -- Shards of a lost coordinator may still be running: wait for them. Taken and released at
    -- once (a session lock): held to the commit, the next transform could find it still held
    -- for an instant after the transform lock was already free.
    PERFORM pg_advisory_lock(etl.shard_lock_key());
    PERFORM pg_advisory_unlock(etl.shard_lock_key());
    SELECT b.status INTO v_status FROM etl.batches b WHERE b.batch_id = p_batch_id FOR UPDATE;
  ELSE
    -- Transforms of different batches must not interleave (they may share patients); the
    -- coordinator's lock keeps other runs out while its shards run side by side, and the shared
    -- shard lock makes the next coordinator wait for these shards even if this one is lost.
    PERFORM pg_advisory_xact_lock_shared(etl.shard_lock_key());
    IF NOT etl.holds_advisory_lock(p_coordinator, etl.transform_lock_key()) THEN
      RAISE EXCEPTION 'a shard of a batch is transformed only under a coordinator session holding the transform lock (pid % does not hold it)', p_coordinator
        USING ERRCODE = 'HE004',
              HINT = 'Run "healthetl transform" again (its coordinator may have been lost), or call etl.transform_batch(batch_id) for the whole batch.';
    END IF;
    SELECT b.status INTO v_status FROM etl.batches b WHERE b.batch_id = p_batch_id FOR SHARE;
  END IF;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'batch % does not exist', p_batch_id
      USING ERRCODE = 'HE001', HINT = 'Run "healthetl status" to list batches.';
  END IF;
  IF v_status = 'loading' THEN
    -- A loader holds this lock while it stages; if we can take it, the loader is gone and
    -- what it committed (whole files) is complete and can be transformed.
    IF NOT pg_try_advisory_xact_lock(etl.loader_lock_key(p_batch_id))
       AND NOT (p_shards > 1 AND etl.holds_advisory_lock(p_coordinator, etl.loader_lock_key(p_batch_id))) THEN
      RAISE EXCEPTION 'batch % is still being loaded', p_batch_id
        USING ERRCODE = 'HE002', HINT = 'Wait for its loader to finish, then run "healthetl transform".';
    END IF;
  END IF;

  -- Sorts and hashes of a whole batch fit in memory rather than spilling to disk.
  PERFORM set_config('work_mem', '64MB', true);
  -- No JIT: the planner's row estimates for the jsonb set-returning functions (100 rows per call)
  -- make every large statement look expensive enough to compile with optimisation, about 0.3 s
  -- each; measured on 50,000 patients, the transform took 12.5 s without JIT and 13.2 s with it.
  PERFORM set_config('jit', 'off', true);
  -- The batch's temporary tables are scanned several times: keep them in local buffers rather
  -- than re-reading them through the kernel (8MB by default). Settable only before a session's
  -- first temporary table, so later calls in the same session keep the value set here.
  BEGIN
    PERFORM set_config('temp_buffers', '1GB', false);
  EXCEPTION WHEN OTHERS THEN
    NULL;
  END;
  DROP TABLE IF EXISTS pg_temp.t_docs, pg_temp.t_errors, pg_temp.t_visits, pg_temp.t_outcome, pg_temp.t_apply, pg_temp.t_dup;

  -- 1. The batch's staged documents (of this shard): the top-level fields, extracted once.
  CREATE TEMP TABLE t_docs ON COMMIT DROP AS
  SELECT d.document_id, d.content_sha256, d.doc_type, d.visits_type, x.*
  FROM (SELECT r.document_id, r.content_sha256, r.payload, jsonb_typeof(r.payload) AS doc_type,
               jsonb_typeof(r.payload -> 'visits') AS visits_type
        FROM landing.raw_documents r
        WHERE r.batch_id = p_batch_id AND r.status = 'staged'
        OFFSET 0) d
  CROSS JOIN LATERAL jsonb_to_record(CASE WHEN d.doc_type = 'object' THEN d.payload ELSE '{}'::jsonb END)
    AS x(patient_id jsonb, source_system jsonb, updated_at jsonb, mrn jsonb, ssn jsonb, name jsonb,
         birth_date jsonb, sex jsonb, contact jsonb, address jsonb)
  WHERE p_shards = 1 OR etl.shard_of(x.source_system, x.patient_id, p_shards) = p_shard;
  CREATE UNIQUE INDEX ON t_docs (document_id);
  ANALYZE t_docs;

  CREATE TEMP TABLE t_outcome (document_id bigint PRIMARY KEY, status text NOT NULL) ON COMMIT DROP;

  -- 2. Duplicates of earlier batches: the same bytes were accepted before (loaded, superseded,
  --    or a duplicate of accepted bytes). Bytes rejected before are judged again, so a re-sent
  --    bad document shows up as rejected in the new batch too. Copies within this batch are
  --    sorted out after validation (step 7b), so that a copy of a bad document is rejected too.
  INSERT INTO t_outcome
  SELECT d.document_id, 'duplicate'
  FROM t_docs d
  WHERE EXISTS (SELECT 1 FROM landing.raw_documents o
                WHERE o.content_sha256 = d.content_sha256
                  AND o.status IN ('loaded', 'superseded', 'duplicate'));

  -- 3. Document-level rules. sort_key orders the reasons: the first one is reported.
  CREATE TEMP TABLE t_errors (document_id bigint, sort_key int[], field text, reason text) ON COMMIT DROP;
  INSERT INTO t_errors
  SELECT d.document_id, ARRAY[0, c.n], c.field, c.field || ': ' || c.msg
  FROM t_docs d
  CROSS JOIN LATERAL (VALUES
    (1, '$', CASE WHEN d.doc_type <> 'object' THEN format('document is not a JSON object (found %s)', d.doc_type) END),
    (2, 'patient_id', CASE WHEN d.doc_type = 'object' THEN CASE
        WHEN etl.is_blank(d.patient_id) THEN 'is required'
        WHEN jsonb_typeof(d.patient_id) NOT IN ('string', 'number')
          THEN format('must be a string or a number (found %s)', jsonb_typeof(d.patient_id)) END END),
    (3, 'source_system', CASE WHEN d.doc_type = 'object' AND jsonb_typeof(d.source_system) NOT IN ('string', 'null')
        THEN format('must be a string (found %s)', jsonb_typeof(d.source_system)) END),
    (4, 'visits', CASE WHEN d.doc_type = 'object' AND d.visits_type NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', d.visits_type) END)
  ) AS c(n, field, msg)
  WHERE c.msg IS NOT NULL
    AND (d.doc_type <> 'object' OR etl.is_blank(d.patient_id) OR jsonb_typeof(d.patient_id) NOT IN ('string', 'number')
         OR jsonb_typeof(d.source_system) NOT IN ('string', 'null') OR d.visits_type NOT IN ('array', 'null'))
    AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id);

  -- 4. Visits of the documents still in play, keys assigned up front (gaps from rejects are
  --    fine); `bad` marks the few rows that need a closer look.
  CREATE TEMP TABLE t_visits ON COMMIT DROP AS
  SELECT v.*,
         (v.vtype <> 'object' OR etl.is_blank(v.vid_j) OR jsonb_typeof(v.vid_j) NOT IN ('string', 'number')
          OR v.visit_date IS NULL
          OR coalesce(jsonb_typeof(v.v -> 'diagnoses') NOT IN ('array', 'null'), false)
          OR coalesce(jsonb_typeof(v.v -> 'treatments') NOT IN ('array', 'null'), false)
          OR coalesce(jsonb_typeof(v.v -> 'provider_notes') NOT IN ('array', 'null'), false)
          -- children without their required field, or not objects (jsonpath: one C-level pass)
          -- (type() does not unwrap arrays, so an array or object code/text is caught too)
          OR v.v @? '$.diagnoses[*] ? (@.type() != "object" || !exists(@.code) || @.code == ""
                                       || (@.code.type() != "string" && @.code.type() != "number"))'
          OR v.v @? '$.treatments[*] ? (@.type() != "object")'
          OR v.v @? '$.provider_notes[*] ? (@.type() != "object" || !exists(@.text) || @.text == ""
                                            || (@.text.type() != "string" && @.text.type() != "number"))'
         ) AS bad
  FROM (
    SELECT d.document_id,
           (e.ord - 1)::int                   AS position,
           jsonb_typeof(e.v)                  AS vtype,
           e.v -> 'visit_id'                  AS vid_j,
           etl.jtext(e.v -> 'visit_id')       AS vid,
           e.v ->> 'visit_date'               AS vdate_raw,
           etl.to_visit_date(e.v ->> 'visit_date') AS visit_date,
           nextval('clinical.visits_visit_key_seq') AS visit_key,
           e.v ->> 'discharge_date'           AS discharge_raw,
           e.v ->> 'visit_type'               AS type_raw,
           e.v -> 'facility'                  AS facility,
           e.v -> 'provider'                  AS provider,
           e.v
    FROM t_docs d
    JOIN landing.raw_documents r ON r.document_id = d.document_id
    CROSS JOIN LATERAL jsonb_array_elements(etl.jarr(r.payload -> 'visits')) WITH ORDINALITY AS e(v, ord)
    WHERE d.doc_type = 'object' AND d.visits_type = 'array'
      AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id)
  ) v;
  ANALYZE t_visits;

  -- Repeated visit_ids within a document (compared as text).
  CREATE TEMP TABLE t_dup ON COMMIT DROP AS
  SELECT tv.document_id, tv.vid, min(tv.position) AS first_pos
  FROM t_visits tv WHERE tv.vid IS NOT NULL AND tv.vid <> ''
  GROUP BY tv.document_id, tv.vid HAVING count(*) > 1;
  ANALYZE t_dup;  -- usually empty: lets the planner hash it rather than all of t_visits

  -- 5. Visit-level rules, for the flagged rows only.
  INSERT INTO t_errors
  SELECT v.document_id, ARRAY[1, v.position, 0, c.n], c.field, c.field || ': ' || c.msg
  FROM (SELECT tv.*, dp.first_pos
        FROM t_visits tv
        LEFT JOIN t_dup dp ON dp.document_id = tv.document_id AND dp.vid = tv.vid
        WHERE tv.bad OR tv.position > dp.first_pos) v
  CROSS JOIN LATERAL (VALUES
    (1, format('visits[%s]', v.position), CASE WHEN v.vtype <> 'object' THEN format('must be an object (found %s)', v.vtype) END),
    (2, format('visits[%s].visit_id', v.position), CASE WHEN v.vtype = 'object' THEN CASE
        WHEN etl.is_blank(v.vid_j) THEN 'is required'
        WHEN jsonb_typeof(v.vid_j) NOT IN ('string', 'number')
          THEN format('must be a string or a number (found %s)', jsonb_typeof(v.vid_j))
        WHEN v.position > v.first_pos
          THEN format('%s is a duplicate of visits[%s].visit_id', to_json(v.vid), v.first_pos) END END),
    (3, format('visits[%s].visit_date', v.position), CASE WHEN v.vtype = 'object' THEN CASE
        WHEN etl.is_blank(v.v -> 'visit_date') THEN 'is required'
        WHEN v.visit_date IS NULL THEN format('%s is not a valid date', (v.v -> 'visit_date')::text) END END),
    (4, format('visits[%s].diagnoses', v.position), CASE WHEN jsonb_typeof(v.v -> 'diagnoses') NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', jsonb_typeof(v.v -> 'diagnoses')) END),
    (5, format('visits[%s].treatments', v.position), CASE WHEN jsonb_typeof(v.v -> 'treatments') NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', jsonb_typeof(v.v -> 'treatments')) END),
    (6, format('visits[%s].provider_notes', v.position), CASE WHEN jsonb_typeof(v.v -> 'provider_notes') NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', jsonb_typeof(v.v -> 'provider_notes')) END)
  ) AS c(n, field, msg)
  WHERE c.msg IS NOT NULL;

  -- 6. Child-level rules, for the flagged visits only: every element an object; diagnoses need
  --    a code, notes a text, each a string or a number (their columns are NOT NULL text: an
  --    array or object there must be a reject, not a failed batch).
  INSERT INTO t_errors
  SELECT tv.document_id, ARRAY[1, tv.position, k.n, (c.ord - 1)::int],
         CASE WHEN jsonb_typeof(c.e) <> 'object'
              THEN format('visits[%s].%s[%s]', tv.position, k.kind, c.ord - 1)
              ELSE format('visits[%s].%s[%s].%s', tv.position, k.kind, c.ord - 1, k.required) END,
         CASE WHEN jsonb_typeof(c.e) <> 'object'
              THEN format('visits[%s].%s[%s]: must be an object (found %s)', tv.position, k.kind, c.ord - 1, jsonb_typeof(c.e))
              WHEN etl.is_blank(c.e -> k.required)
              THEN format('visits[%s].%s[%s].%s: is required', tv.position, k.kind, c.ord - 1, k.required)
              ELSE format('visits[%s].%s[%s].%s: must be a string or a number (found %s)',
                          tv.position, k.kind, c.ord - 1, k.required, jsonb_typeof(c.e -> k.required)) END
  FROM t_visits tv
  CROSS JOIN LATERAL (VALUES (1, 'diagnoses', 'code'), (2, 'treatments', NULL), (3, 'provider_notes', 'text')) AS k(n, kind, required)
  CROSS JOIN LATERAL jsonb_array_elements(etl.jarr(tv.v -> k.kind)) WITH ORDINALITY AS c(e, ord)
  WHERE tv.bad AND tv.vtype = 'object'
    AND (jsonb_typeof(c.e) <> 'object'
         OR (k.required IS NOT NULL AND (etl.is_blank(c.e -> k.required)
                                         OR jsonb_typeof(c.e -> k.required) NOT IN ('string', 'number'))));

  -- 7. Rejected documents: one row each, the first reason and all of them.
  INSERT INTO etl.rejected_documents (document_id, batch_id, source_file, line, item, byte_offset, field, reason, all_reasons)
  SELECT r.document_id, r.batch_id, r.source_file, r.line, r.item, r.byte_offset,
         e.fields[1], e.reasons[1], e.reasons
  FROM (SELECT document_id, array_agg(field ORDER BY sort_key) AS fields, array_agg(reason ORDER BY sort_key) AS reasons
        FROM t_errors GROUP BY document_id) e
  JOIN landing.raw_documents r ON r.document_id = e.document_id;

  INSERT INTO t_outcome SELECT DISTINCT document_id, 'rejected' FROM t_errors;

  -- 7b. Copies within this batch of a document that passed: the first one counts.
  INSERT INTO t_outcome
  SELECT d.document_id, 'duplicate'
  FROM (SELECT t.document_id, row_number() OVER (PARTITION BY t.content_sha256 ORDER BY t.document_id) AS copy_no
        FROM t_docs t
        WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = t.document_id)) d
  WHERE d.copy_no > 1;

  -- 8. Snapshot resolution. Order of snapshots: updated_at (missing or invalid = oldest), then
  --    arrival (document_id). The newest candidate per patient may replace the current row.
  CREATE TEMP TABLE t_apply ON COMMIT DROP AS
  WITH cand AS (
    SELECT d.document_id, d.content_sha256,
           coalesce(nullif(etl.jtext(d.source_system), ''), 'default') AS source_system,
           etl.jtext(d.patient_id)                     AS source_patient_id,
           etl.to_timestamptz(d.updated_at #>> '{}')   AS updated_at
    FROM t_docs d
    WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id)
  ), ranked AS (
    SELECT c.*, row_number() OVER (PARTITION BY c.source_system, c.source_patient_id
                                   ORDER BY coalesce(c.updated_at, '-infinity') DESC, c.document_id DESC) AS rn
    FROM cand c
  )
  SELECT r.document_id, r.content_sha256, r.source_system, r.source_patient_id, r.updated_at, r.rn,
         k.patient_key,
         (p.patient_key IS NOT NULL) AS replacing,
         (p.patient_key IS NOT NULL AND
          (coalesce(p.source_updated_at, '-infinity'), p.document_id) > (coalesce(r.updated_at, '-infinity'), r.document_id)) AS older_than_current
  FROM ranked r
  LEFT JOIN etl.patient_keys k ON k.source_system = r.source_system AND k.source_patient_id = r.source_patient_id
  LEFT JOIN clinical.patients p ON p.patient_key = k.patient_key;

  INSERT INTO t_outcome SELECT document_id, 'superseded' FROM t_apply WHERE rn > 1 OR older_than_current;
  DELETE FROM t_apply WHERE rn > 1 OR older_than_current;

  -- 9. Keys for new patients, then the replaced patients' old visits and children go.
  INSERT INTO etl.patient_keys (source_system, source_patient_id)
  SELECT a.source_system, a.source_patient_id FROM t_apply a WHERE a.patient_key IS NULL
  ORDER BY a.document_id
  ON CONFLICT DO NOTHING;
  UPDATE t_apply a SET patient_key = k.patient_key
  FROM etl.patient_keys k
  WHERE a.patient_key IS NULL AND k.source_system = a.source_system AND k.source_patient_id = a.source_patient_id;
  CREATE UNIQUE INDEX ON t_apply (document_id);
  ANALYZE t_apply;

  IF EXISTS (SELECT 1 FROM t_apply WHERE replacing) THEN
    DELETE FROM clinical.provider_notes c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.treatments     c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.diagnoses      c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.visits         c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
  END IF;

  -- 10. Patients: insert or replace the row, from the fields extracted in step 1.
  INSERT INTO clinical.patients AS p (
    patient_key, source_system, source_patient_id, mrn, ssn, name_prefix, given_name, family_name, name_suffix,
    birth_date, sex, phone, email, address_lines, city, state, postal_code, country,
    source_updated_at, document_id, content_sha256, batch_id, loaded_at)
  SELECT a.patient_key, a.source_system, a.source_patient_id,
         etl.jtext(d.mrn), etl.jtext(d.ssn),
         etl.jtext(d.name -> 'prefix'),
         CASE jsonb_typeof(d.name -> 'given')
           WHEN 'string' THEN d.name ->> 'given'
           WHEN 'array' THEN (SELECT string_agg(g #>> '{}', ' ' ORDER BY o)
                              FROM jsonb_array_elements(d.name -> 'given') WITH ORDINALITY AS x(g, o)
                              WHERE jsonb_typeof(g) = 'string') END,
         etl.jtext(d.name -> 'family'),
         etl.jtext(d.name -> 'suffix'),
         etl.to_date(d.birth_date #>> '{}'),
         CASE WHEN lower(d.sex #>> '{}') IN ('female', 'male', 'other', 'unknown') THEN lower(d.sex #>> '{}') END,
         etl.jtext(d.contact -> 'phone'), etl.jtext(d.contact -> 'email'),
         CASE jsonb_typeof(d.address -> 'line')
           WHEN 'array' THEN ARRAY(SELECT etl.jtext(l) FROM jsonb_array_elements(d.address -> 'line') AS x(l))
           WHEN 'string' THEN ARRAY[d.address ->> 'line'] END,
         etl.jtext(d.address -> 'city'), etl.jtext(d.address -> 'state'),
         etl.jtext(d.address -> 'postal_code'), etl.jtext(d.address -> 'country'),
         a.updated_at, a.document_id, a.content_sha256, p_batch_id, now()
  FROM t_apply a
  JOIN t_docs d ON d.document_id = a.document_id
  ON CONFLICT (patient_key) DO UPDATE SET
    source_system = excluded.source_system, source_patient_id = excluded.source_patient_id,
    mrn = excluded.mrn, ssn = excluded.ssn, name_prefix = excluded.name_prefix,
    given_name = excluded.given_name, family_name = excluded.family_name, name_suffix = excluded.name_suffix,
    birth_date = excluded.birth_date, sex = excluded.sex, phone = excluded.phone, email = excluded.email,
    address_lines = excluded.address_lines, city = excluded.city, state = excluded.state,
    postal_code = excluded.postal_code, country = excluded.country,
    source_updated_at = excluded.source_updated_at, document_id = excluded.document_id,
    content_sha256 = excluded.content_sha256, batch_id = excluded.batch_id, loaded_at = excluded.loaded_at;

  -- 11. Visits (keys assigned in step 4) into the partitions they need, then the children.
  SELECT array_agg(DISTINCT extract(year FROM tv.visit_date)::int) INTO v_years
  FROM t_visits tv JOIN t_apply a ON a.document_id = tv.document_id;
  IF p_shards = 1 THEN
    PERFORM etl.ensure_visit_partitions(v_years);
  ELSIF EXISTS (SELECT 1 FROM unnest(v_years) y
                WHERE y IS NOT NULL AND to_regclass(format('clinical.%I', etl.visit_partition_name(y))) IS NULL) THEN
    RAISE EXCEPTION 'batch %, shard % of %: a visits partition it needs does not exist', p_batch_id, p_shard, p_shards
      USING ERRCODE = 'HE005',
            HINT = 'Run "healthetl transform" again (it creates them first); from SQL, call etl.ensure_batch_partitions(batch_id, shard, shards) in its own transaction before the shard.';
  END IF;

  INSERT INTO clinical.visits (patient_key, visit_key, visit_date, source_visit_id, visit_start, discharge_date,
                               visit_type, facility_id, facility_name, provider_npi, provider_name, position)
  SELECT a.patient_key, tv.visit_key, tv.visit_date, tv.vid,
         CASE WHEN NOT etl.is_ymd(tv.vdate_raw) THEN etl.to_timestamptz(tv.vdate_raw) END,
         etl.to_visit_date(tv.discharge_raw),
         CASE WHEN tv.type_raw IN ('outpatient', 'inpatient', 'emergency', 'telehealth', 'other') THEN tv.type_raw END,
         etl.jtext(tv.facility -> 'id'), etl.jtext(tv.facility -> 'name'),
         etl.jtext(tv.provider -> 'npi'), etl.jtext(tv.provider -> 'name'),
         tv.position
  FROM t_visits tv
  JOIN t_apply a ON a.document_id = tv.document_id;

  -- Children: each kind expanded once; the same rows feed the insert and the problem check.
  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*
    FROM t_visits tv
    JOIN t_apply a ON a.document_id = tv.document_id
    CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(etl.jarr(tv.v -> 'diagnoses'))
      AS (code jsonb, system jsonb, description jsonb, "primary" jsonb)) WITH ORDINALITY AS x(code, system, description, "primary", ord)
  ), ins AS (
    INSERT INTO clinical.diagnoses (patient_key, visit_key, visit_date, position, code, code_system, description, is_primary)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position,
           etl.jtext(s.code), coalesce(etl.jtext(s.system), 'ICD-10-CM'), etl.jtext(s.description),
           CASE WHEN jsonb_typeof(s."primary") = 'boolean' THEN s."primary"::boolean END
    FROM src s
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].diagnoses[%s].primary', s.vpos, s.position), 'not a boolean'
  FROM src s
  WHERE NOT etl.is_absent(s."primary") AND jsonb_typeof(s."primary") <> 'boolean';

  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*,
           CASE WHEN etl.is_absent(x.type) THEN 'medication'
                WHEN x.type #>> '{}' IN ('medication', 'procedure') THEN x.type #>> '{}' END AS treatment_type,
           etl.to_visit_date(x.start_date #>> '{}') AS start_d,
           etl.to_visit_date(x.end_date #>> '{}') AS end_d
    FROM t_visits tv
    JOIN t_apply a ON a.document_id = tv.document_id
    CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(etl.jarr(tv.v -> 'treatments'))
      AS (treatment_id jsonb, type jsonb, code jsonb, system jsonb, name jsonb, dose jsonb, route jsonb, frequency jsonb,
          start_date jsonb, end_date jsonb))
      WITH ORDINALITY AS x(treatment_id, type, code, system, name, dose, route, frequency, start_date, end_date, ord)
  ), ins AS (
    INSERT INTO clinical.treatments (patient_key, visit_key, visit_date, position, source_treatment_id, treatment_type,
                                     code, code_system, name, dose, route, frequency, start_date, end_date)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position, etl.jtext(s.treatment_id), s.treatment_type,
           etl.jtext(s.code), etl.jtext(s.system), etl.jtext(s.name),
           etl.jtext(s.dose), etl.jtext(s.route), etl.jtext(s.frequency), s.start_d, s.end_d
    FROM src s
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].treatments[%s].%s', s.vpos, s.position, f.field), f.problem
  FROM src s
  CROSS JOIN LATERAL (VALUES
    ('type', CASE WHEN s.treatment_type IS NULL THEN 'not one of medication, procedure' END),
    ('start_date', CASE WHEN s.start_d IS NULL AND NOT etl.is_absent(s.start_date) THEN 'not a valid date' END),
    ('end_date', CASE WHEN s.end_d IS NULL AND NOT etl.is_absent(s.end_date) THEN 'not a valid date' END)
  ) AS f(field, problem)
  WHERE (s.treatment_type IS NULL OR s.start_d IS NULL OR s.end_d IS NULL) AND f.problem IS NOT NULL;

  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*,
           etl.to_timestamptz(x.written_at #>> '{}') AS written_ts
    FROM t_visits tv
    JOIN t_apply a ON a.document_id = tv.document_id
    CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(etl.jarr(tv.v -> 'provider_notes'))
      AS (note_id jsonb, author jsonb, written_at jsonb, text jsonb)) WITH ORDINALITY AS x(note_id, author, written_at, text, ord)
  ), ins AS (
    INSERT INTO clinical.provider_notes (patient_key, visit_key, visit_date, position, source_note_id, author, written_at, note_text)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position,
           etl.jtext(s.note_id), etl.jtext(s.author), s.written_ts, etl.jtext(s.text)
    FROM src s
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].provider_notes[%s].written_at', s.vpos, s.position), 'not a valid RFC 3339 timestamp'
  FROM src s
  WHERE s.written_ts IS NULL AND NOT etl.is_absent(s.written_at);

  -- 12. Problems of the patient and visit levels (invalid optional values; never the value).
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT a.document_id, p_batch_id, c.field, c.problem
  FROM t_apply a
  JOIN t_docs d ON d.document_id = a.document_id
  CROSS JOIN LATERAL (VALUES
    ('birth_date', CASE WHEN NOT etl.is_absent(d.birth_date) AND etl.to_date(d.birth_date #>> '{}') IS NULL
                        THEN 'not a valid date (YYYY-MM-DD)' END),
    ('sex', CASE WHEN NOT etl.is_absent(d.sex) AND lower(d.sex #>> '{}') NOT IN ('female', 'male', 'other', 'unknown')
                 THEN 'not one of female, male, other, unknown' END),
    ('updated_at', CASE WHEN NOT etl.is_absent(d.updated_at) AND a.updated_at IS NULL
                        THEN 'not a valid RFC 3339 timestamp' END),
    ('name.given', CASE WHEN jsonb_typeof(d.name -> 'given') NOT IN ('string', 'array', 'null')
                          OR (jsonb_typeof(d.name -> 'given') = 'array'
                              AND jsonb_path_exists(d.name -> 'given', '$[*] ? (@.type() != "string")'))
                        THEN 'not a string or an array of strings' END)
  ) AS c(field, problem)
  WHERE c.problem IS NOT NULL
  UNION ALL
  SELECT tv.document_id, p_batch_id, format('visits[%s].%s', tv.position, c.field), c.problem
  FROM (SELECT tv0.* FROM t_visits tv0 JOIN t_apply a ON a.document_id = tv0.document_id
        WHERE (tv0.discharge_raw IS NOT NULL AND etl.to_visit_date(tv0.discharge_raw) IS NULL)
           OR tv0.type_raw NOT IN ('outpatient', 'inpatient', 'emergency', 'telehealth', 'other')) tv
  CROSS JOIN LATERAL (VALUES
    ('discharge_date', CASE WHEN tv.discharge_raw IS NOT NULL AND etl.to_visit_date(tv.discharge_raw) IS NULL THEN 'not a valid date' END),
    ('visit_type', CASE WHEN tv.type_raw NOT IN ('outpatient', 'inpatient', 'emergency', 'telehealth', 'other')
                        THEN 'not one of outpatient, inpatient, emergency, telehealth, other' END)
  ) AS c(field, problem)
  WHERE c.problem IS NOT NULL;

  -- 13. Outcomes onto the landing rows, and the batch is done.
  INSERT INTO t_outcome SELECT a.document_id, 'loaded' FROM t_apply a;
  UPDATE landing.raw_documents d SET status = o.status
  FROM t_outcome o WHERE o.document_id = d.document_id;

  -- A whole-batch call finishes the batch. Shards take turns here: each then sees the shards
  -- committed before it, so the last one finds nothing staged and finishes the batch (a failed
  -- shard leaves its documents staged, and the batch unfinished).
  IF p_shards = 1 THEN
    UPDATE etl.batches b
    SET status = 'transformed', transformed_at = clock_timestamp(),
        staged_at = coalesce(b.staged_at, clock_timestamp())
    WHERE b.batch_id = p_batch_id;
  ELSE
    PERFORM pg_advisory_xact_lock(etl.batch_finish_lock_key());
    PERFORM etl.finish_batch(p_batch_id);
  END IF;

  RETURN QUERY
  SELECT count(*),
         count(*) FILTER (WHERE o.status = 'loaded'),
         count(*) FILTER (WHERE o.status = 'rejected'),
         count(*) FILTER (WHERE o.status = 'duplicate'),
         count(*) FILTER (WHERE o.status = 'superseded'),
         (SELECT count(*) FROM etl.document_problems p JOIN t_outcome t ON t.document_id = p.document_id
          WHERE p.batch_id = p_batch_id)
  FROM t_outcome o;
END
$fn$;
COMMENT ON FUNCTION etl.transform_batch(bigint, int, int, int) IS
  'Transform one staged batch (or one shard of it) into the clinical tables in one transaction; returns outcome counts.';


-- Down Migration
DROP FUNCTION etl.transform_batch(bigint, int, int, int);
DROP FUNCTION etl.finish_batch(bigint);
DROP FUNCTION etl.ensure_batch_partitions(bigint, int, int);
DROP FUNCTION etl.holds_advisory_lock(int, bigint);
DROP FUNCTION etl.batch_finish_lock_key();
DROP FUNCTION etl.shard_lock_key();
DROP FUNCTION etl.shard_of(jsonb, jsonb, int);

-- The definitions of 0003, whole.
DROP VIEW etl.batch_summary;
-- Counts of a batch's documents by outcome; received must equal the sum of the outcomes.
CREATE VIEW etl.batch_summary AS
SELECT b.batch_id, b.status, b.started_at, b.staged_at, b.transformed_at,
       count(d.document_id)                                AS received,
       count(d.document_id) FILTER (WHERE d.status = 'staged')     AS staged,
       count(d.document_id) FILTER (WHERE d.status = 'loaded')     AS loaded,
       count(d.document_id) FILTER (WHERE d.status = 'rejected')   AS rejected,
       count(d.document_id) FILTER (WHERE d.status = 'duplicate')  AS duplicate,
       count(d.document_id) FILTER (WHERE d.status = 'superseded') AS superseded,
       (SELECT count(*) FROM etl.batch_files f WHERE f.batch_id = b.batch_id) AS files,
       (SELECT count(*) FROM etl.batch_files f WHERE f.batch_id = b.batch_id AND f.status IN ('unreadable', 'rejected')) AS failed_files
FROM etl.batches b
LEFT JOIN landing.raw_documents d ON d.batch_id = b.batch_id
GROUP BY b.batch_id;
COMMENT ON VIEW etl.batch_summary IS 'One row per batch: documents received and what became of them.';

-- Is the text an RFC 3339 timestamp with a real calendar date and an explicit offset?
CREATE OR REPLACE FUNCTION etl.is_rfc3339(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT t ~ '^\d{4}-\d{2}-\d{2}[Tt ]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{1,9})?([Zz]|[+-](0\d|1[0-5]):[0-5]\d)$'
     AND etl.is_ymd(substr(t, 1, 10))
$$;

-- Create the yearly clinical.visits partitions for the given years that do not exist yet.
-- CREATE TABLE + ATTACH takes only SHARE UPDATE EXCLUSIVE on clinical.visits, so analysts'
-- queries keep running while a new year is added.
CREATE OR REPLACE FUNCTION etl.ensure_visit_partitions(years int[]) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
  y int;
  created int := 0;
BEGIN
  FOR y IN SELECT DISTINCT u FROM unnest(years) u WHERE u IS NOT NULL ORDER BY u LOOP
    IF to_regclass(format('clinical.%I', etl.visit_partition_name(y))) IS NULL THEN
      EXECUTE format('CREATE TABLE clinical.%I (LIKE clinical.visits INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                     etl.visit_partition_name(y));
      EXECUTE format('ALTER TABLE clinical.visits ATTACH PARTITION clinical.%I FOR VALUES FROM (%L) TO (%L)',
                     etl.visit_partition_name(y), make_date(y, 1, 1), make_date(y + 1, 1, 1));
      created := created + 1;
    END IF;
  END LOOP;
  RETURN created;
END
$$;

-- Transform one staged batch into the clinical tables, atomically, and return its outcome counts.
-- Performance notes (measured with npm run bench):
-- * each payload is decompressed a few times only: the top-level fields come out of ONE
--   jsonb_to_record call into t_docs, visits out of one jsonb_array_elements pass into t_visits;
--   every later statement reads those small values, never the landing payload again;
-- * checks first compute a cheap boolean per row and build messages only for the rows that fail;
-- * visit keys are taken from the sequence up front, so children never join back to find them.
CREATE FUNCTION etl.transform_batch(p_batch_id bigint)
RETURNS TABLE (documents bigint, loaded bigint, rejected bigint, duplicate bigint, superseded bigint, problems bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
  v_status text;
  v_years int[];
BEGIN

  PERFORM pg_advisory_xact_lock(etl.transform_lock_key());

  SELECT b.status INTO v_status FROM etl.batches b WHERE b.batch_id = p_batch_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'batch % does not exist', p_batch_id
      USING ERRCODE = 'HE001', HINT = 'Run "healthetl status" to list batches.';
  END IF;
  IF v_status = 'loading' THEN
    -- A loader holds this lock while it stages; if we can take it, the loader is gone and
    -- what it committed (whole files) is complete and can be transformed.
    IF NOT pg_try_advisory_xact_lock(etl.loader_lock_key(p_batch_id)) THEN
      RAISE EXCEPTION 'batch % is still being loaded', p_batch_id
        USING ERRCODE = 'HE002', HINT = 'Wait for its loader to finish, then run "healthetl transform".';
    END IF;
  END IF;

  -- Sorts and hashes of a whole batch fit in memory rather than spilling to disk.
  PERFORM set_config('work_mem', '64MB', true);
  -- The batch's temporary tables are scanned several times: keep them in local buffers rather
  -- than re-reading them through the kernel (8MB by default). Settable only before a session's
  -- first temporary table, so later calls in the same session keep the value set here.
  BEGIN
    PERFORM set_config('temp_buffers', '1GB', false);
  EXCEPTION WHEN OTHERS THEN
    NULL;
  END;
  DROP TABLE IF EXISTS pg_temp.t_docs, pg_temp.t_errors, pg_temp.t_visits, pg_temp.t_outcome, pg_temp.t_apply, pg_temp.t_dup;

  -- 1. The batch's staged documents: the top-level fields, extracted once.
  CREATE TEMP TABLE t_docs ON COMMIT DROP AS
  SELECT d.document_id, d.content_sha256, d.doc_type, d.visits_type, x.*
  FROM (SELECT r.document_id, r.content_sha256, r.payload, jsonb_typeof(r.payload) AS doc_type,
               jsonb_typeof(r.payload -> 'visits') AS visits_type
        FROM landing.raw_documents r
        WHERE r.batch_id = p_batch_id AND r.status = 'staged'
        OFFSET 0) d
  CROSS JOIN LATERAL jsonb_to_record(CASE WHEN d.doc_type = 'object' THEN d.payload ELSE '{}'::jsonb END)
    AS x(patient_id jsonb, source_system jsonb, updated_at jsonb, mrn jsonb, ssn jsonb, name jsonb,
         birth_date jsonb, sex jsonb, contact jsonb, address jsonb);
  CREATE UNIQUE INDEX ON t_docs (document_id);
  ANALYZE t_docs;

  CREATE TEMP TABLE t_outcome (document_id bigint PRIMARY KEY, status text NOT NULL) ON COMMIT DROP;

  -- 2. Duplicates of earlier batches: the same bytes were accepted before (loaded, superseded,
  --    or a duplicate of accepted bytes). Bytes rejected before are judged again, so a re-sent
  --    bad document shows up as rejected in the new batch too. Copies within this batch are
  --    sorted out after validation (step 7b), so that a copy of a bad document is rejected too.
  INSERT INTO t_outcome
  SELECT d.document_id, 'duplicate'
  FROM t_docs d
  WHERE EXISTS (SELECT 1 FROM landing.raw_documents o
                WHERE o.content_sha256 = d.content_sha256
                  AND o.status IN ('loaded', 'superseded', 'duplicate'));

  -- 3. Document-level rules. sort_key orders the reasons: the first one is reported.
  CREATE TEMP TABLE t_errors (document_id bigint, sort_key int[], field text, reason text) ON COMMIT DROP;
  INSERT INTO t_errors
  SELECT d.document_id, ARRAY[0, c.n], c.field, c.field || ': ' || c.msg
  FROM t_docs d
  CROSS JOIN LATERAL (VALUES
    (1, '$', CASE WHEN d.doc_type <> 'object' THEN format('document is not a JSON object (found %s)', d.doc_type) END),
    (2, 'patient_id', CASE WHEN d.doc_type = 'object' THEN CASE
        WHEN etl.is_blank(d.patient_id) THEN 'is required'
        WHEN jsonb_typeof(d.patient_id) NOT IN ('string', 'number')
          THEN format('must be a string or a number (found %s)', jsonb_typeof(d.patient_id)) END END),
    (3, 'source_system', CASE WHEN d.doc_type = 'object' AND jsonb_typeof(d.source_system) NOT IN ('string', 'null')
        THEN format('must be a string (found %s)', jsonb_typeof(d.source_system)) END),
    (4, 'visits', CASE WHEN d.doc_type = 'object' AND d.visits_type NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', d.visits_type) END)
  ) AS c(n, field, msg)
  WHERE c.msg IS NOT NULL
    AND (d.doc_type <> 'object' OR etl.is_blank(d.patient_id) OR jsonb_typeof(d.patient_id) NOT IN ('string', 'number')
         OR jsonb_typeof(d.source_system) NOT IN ('string', 'null') OR d.visits_type NOT IN ('array', 'null'))
    AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id);

  -- 4. Visits of the documents still in play, keys assigned up front (gaps from rejects are
  --    fine); `bad` marks the few rows that need a closer look.
  CREATE TEMP TABLE t_visits ON COMMIT DROP AS
  SELECT v.*,
         (v.vtype <> 'object' OR etl.is_blank(v.vid_j) OR jsonb_typeof(v.vid_j) NOT IN ('string', 'number')
          OR v.visit_date IS NULL
          OR coalesce(jsonb_typeof(v.v -> 'diagnoses') NOT IN ('array', 'null'), false)
          OR coalesce(jsonb_typeof(v.v -> 'treatments') NOT IN ('array', 'null'), false)
          OR coalesce(jsonb_typeof(v.v -> 'provider_notes') NOT IN ('array', 'null'), false)
          -- children without their required field, or not objects (jsonpath: one C-level pass)
          OR v.v @? '$.diagnoses[*] ? (@.type() != "object" || !exists(@.code) || @.code == null || @.code == "")'
          OR v.v @? '$.treatments[*] ? (@.type() != "object")'
          OR v.v @? '$.provider_notes[*] ? (@.type() != "object" || !exists(@.text) || @.text == null || @.text == "")'
         ) AS bad
  FROM (
    SELECT d.document_id,
           (e.ord - 1)::int                   AS position,
           jsonb_typeof(e.v)                  AS vtype,
           e.v -> 'visit_id'                  AS vid_j,
           etl.jtext(e.v -> 'visit_id')       AS vid,
           e.v ->> 'visit_date'               AS vdate_raw,
           etl.to_visit_date(e.v ->> 'visit_date') AS visit_date,
           nextval('clinical.visits_visit_key_seq') AS visit_key,
           e.v ->> 'discharge_date'           AS discharge_raw,
           e.v ->> 'visit_type'               AS type_raw,
           e.v -> 'facility'                  AS facility,
           e.v -> 'provider'                  AS provider,
           e.v
    FROM t_docs d
    JOIN landing.raw_documents r ON r.document_id = d.document_id
    CROSS JOIN LATERAL jsonb_array_elements(etl.jarr(r.payload -> 'visits')) WITH ORDINALITY AS e(v, ord)
    WHERE d.doc_type = 'object' AND d.visits_type = 'array'
      AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id)
  ) v;
  ANALYZE t_visits;

  -- Repeated visit_ids within a document (compared as text).
  CREATE TEMP TABLE t_dup ON COMMIT DROP AS
  SELECT tv.document_id, tv.vid, min(tv.position) AS first_pos
  FROM t_visits tv WHERE tv.vid IS NOT NULL AND tv.vid <> ''
  GROUP BY tv.document_id, tv.vid HAVING count(*) > 1;
  ANALYZE t_dup;  -- usually empty: lets the planner hash it rather than all of t_visits

  -- 5. Visit-level rules, for the flagged rows only.
  INSERT INTO t_errors
  SELECT v.document_id, ARRAY[1, v.position, 0, c.n], c.field, c.field || ': ' || c.msg
  FROM (SELECT tv.*, dp.first_pos
        FROM t_visits tv
        LEFT JOIN t_dup dp ON dp.document_id = tv.document_id AND dp.vid = tv.vid
        WHERE tv.bad OR tv.position > dp.first_pos) v
  CROSS JOIN LATERAL (VALUES
    (1, format('visits[%s]', v.position), CASE WHEN v.vtype <> 'object' THEN format('must be an object (found %s)', v.vtype) END),
    (2, format('visits[%s].visit_id', v.position), CASE WHEN v.vtype = 'object' THEN CASE
        WHEN etl.is_blank(v.vid_j) THEN 'is required'
        WHEN jsonb_typeof(v.vid_j) NOT IN ('string', 'number')
          THEN format('must be a string or a number (found %s)', jsonb_typeof(v.vid_j))
        WHEN v.position > v.first_pos
          THEN format('%s is a duplicate of visits[%s].visit_id', to_json(v.vid), v.first_pos) END END),
    (3, format('visits[%s].visit_date', v.position), CASE WHEN v.vtype = 'object' THEN CASE
        WHEN etl.is_blank(v.v -> 'visit_date') THEN 'is required'
        WHEN v.visit_date IS NULL THEN format('%s is not a valid date', (v.v -> 'visit_date')::text) END END),
    (4, format('visits[%s].diagnoses', v.position), CASE WHEN jsonb_typeof(v.v -> 'diagnoses') NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', jsonb_typeof(v.v -> 'diagnoses')) END),
    (5, format('visits[%s].treatments', v.position), CASE WHEN jsonb_typeof(v.v -> 'treatments') NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', jsonb_typeof(v.v -> 'treatments')) END),
    (6, format('visits[%s].provider_notes', v.position), CASE WHEN jsonb_typeof(v.v -> 'provider_notes') NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', jsonb_typeof(v.v -> 'provider_notes')) END)
  ) AS c(n, field, msg)
  WHERE c.msg IS NOT NULL;

  -- 6. Child-level rules, for the flagged visits only: every element an object; diagnoses need
  --    a code, notes a text.
  INSERT INTO t_errors
  SELECT tv.document_id, ARRAY[1, tv.position, k.n, (c.ord - 1)::int],
         CASE WHEN jsonb_typeof(c.e) <> 'object'
              THEN format('visits[%s].%s[%s]', tv.position, k.kind, c.ord - 1)
              ELSE format('visits[%s].%s[%s].%s', tv.position, k.kind, c.ord - 1, k.required) END,
         CASE WHEN jsonb_typeof(c.e) <> 'object'
              THEN format('visits[%s].%s[%s]: must be an object (found %s)', tv.position, k.kind, c.ord - 1, jsonb_typeof(c.e))
              ELSE format('visits[%s].%s[%s].%s: is required', tv.position, k.kind, c.ord - 1, k.required) END
  FROM t_visits tv
  CROSS JOIN LATERAL (VALUES (1, 'diagnoses', 'code'), (2, 'treatments', NULL), (3, 'provider_notes', 'text')) AS k(n, kind, required)
  CROSS JOIN LATERAL jsonb_array_elements(etl.jarr(tv.v -> k.kind)) WITH ORDINALITY AS c(e, ord)
  WHERE tv.bad AND tv.vtype = 'object'
    AND (jsonb_typeof(c.e) <> 'object' OR (k.required IS NOT NULL AND etl.is_blank(c.e -> k.required)));

  -- 7. Rejected documents: one row each, the first reason and all of them.
  INSERT INTO etl.rejected_documents (document_id, batch_id, source_file, line, item, byte_offset, field, reason, all_reasons)
  SELECT r.document_id, r.batch_id, r.source_file, r.line, r.item, r.byte_offset,
         e.fields[1], e.reasons[1], e.reasons
  FROM (SELECT document_id, array_agg(field ORDER BY sort_key) AS fields, array_agg(reason ORDER BY sort_key) AS reasons
        FROM t_errors GROUP BY document_id) e
  JOIN landing.raw_documents r ON r.document_id = e.document_id;

  INSERT INTO t_outcome SELECT DISTINCT document_id, 'rejected' FROM t_errors;

  -- 7b. Copies within this batch of a document that passed: the first one counts.
  INSERT INTO t_outcome
  SELECT d.document_id, 'duplicate'
  FROM (SELECT t.document_id, row_number() OVER (PARTITION BY t.content_sha256 ORDER BY t.document_id) AS copy_no
        FROM t_docs t
        WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = t.document_id)) d
  WHERE d.copy_no > 1;

  -- 8. Snapshot resolution. Order of snapshots: updated_at (missing or invalid = oldest), then
  --    arrival (document_id). The newest candidate per patient may replace the current row.
  CREATE TEMP TABLE t_apply ON COMMIT DROP AS
  WITH cand AS (
    SELECT d.document_id, d.content_sha256,
           coalesce(nullif(etl.jtext(d.source_system), ''), 'default') AS source_system,
           etl.jtext(d.patient_id)                     AS source_patient_id,
           etl.to_timestamptz(d.updated_at #>> '{}')   AS updated_at
    FROM t_docs d
    WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id)
  ), ranked AS (
    SELECT c.*, row_number() OVER (PARTITION BY c.source_system, c.source_patient_id
                                   ORDER BY coalesce(c.updated_at, '-infinity') DESC, c.document_id DESC) AS rn
    FROM cand c
  )
  SELECT r.document_id, r.content_sha256, r.source_system, r.source_patient_id, r.updated_at, r.rn,
         k.patient_key,
         (p.patient_key IS NOT NULL) AS replacing,
         (p.patient_key IS NOT NULL AND
          (coalesce(p.source_updated_at, '-infinity'), p.document_id) > (coalesce(r.updated_at, '-infinity'), r.document_id)) AS older_than_current
  FROM ranked r
  LEFT JOIN etl.patient_keys k ON k.source_system = r.source_system AND k.source_patient_id = r.source_patient_id
  LEFT JOIN clinical.patients p ON p.patient_key = k.patient_key;

  INSERT INTO t_outcome SELECT document_id, 'superseded' FROM t_apply WHERE rn > 1 OR older_than_current;
  DELETE FROM t_apply WHERE rn > 1 OR older_than_current;

  -- 9. Keys for new patients, then the replaced patients' old visits and children go.
  INSERT INTO etl.patient_keys (source_system, source_patient_id)
  SELECT a.source_system, a.source_patient_id FROM t_apply a WHERE a.patient_key IS NULL
  ORDER BY a.document_id
  ON CONFLICT DO NOTHING;
  UPDATE t_apply a SET patient_key = k.patient_key
  FROM etl.patient_keys k
  WHERE a.patient_key IS NULL AND k.source_system = a.source_system AND k.source_patient_id = a.source_patient_id;
  CREATE UNIQUE INDEX ON t_apply (document_id);
  ANALYZE t_apply;

  IF EXISTS (SELECT 1 FROM t_apply WHERE replacing) THEN
    DELETE FROM clinical.provider_notes c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.treatments     c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.diagnoses      c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.visits         c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
  END IF;

  -- 10. Patients: insert or replace the row, from the fields extracted in step 1.
  INSERT INTO clinical.patients AS p (
    patient_key, source_system, source_patient_id, mrn, ssn, name_prefix, given_name, family_name, name_suffix,
    birth_date, sex, phone, email, address_lines, city, state, postal_code, country,
    source_updated_at, document_id, content_sha256, batch_id, loaded_at)
  SELECT a.patient_key, a.source_system, a.source_patient_id,
         etl.jtext(d.mrn), etl.jtext(d.ssn),
         etl.jtext(d.name -> 'prefix'),
         CASE jsonb_typeof(d.name -> 'given')
           WHEN 'string' THEN d.name ->> 'given'
           WHEN 'array' THEN (SELECT string_agg(g #>> '{}', ' ' ORDER BY o)
                              FROM jsonb_array_elements(d.name -> 'given') WITH ORDINALITY AS x(g, o)
                              WHERE jsonb_typeof(g) = 'string') END,
         etl.jtext(d.name -> 'family'),
         etl.jtext(d.name -> 'suffix'),
         etl.to_date(d.birth_date #>> '{}'),
         CASE WHEN lower(d.sex #>> '{}') IN ('female', 'male', 'other', 'unknown') THEN lower(d.sex #>> '{}') END,
         etl.jtext(d.contact -> 'phone'), etl.jtext(d.contact -> 'email'),
         CASE jsonb_typeof(d.address -> 'line')
           WHEN 'array' THEN ARRAY(SELECT etl.jtext(l) FROM jsonb_array_elements(d.address -> 'line') AS x(l))
           WHEN 'string' THEN ARRAY[d.address ->> 'line'] END,
         etl.jtext(d.address -> 'city'), etl.jtext(d.address -> 'state'),
         etl.jtext(d.address -> 'postal_code'), etl.jtext(d.address -> 'country'),
         a.updated_at, a.document_id, a.content_sha256, p_batch_id, now()
  FROM t_apply a
  JOIN t_docs d ON d.document_id = a.document_id
  ON CONFLICT (patient_key) DO UPDATE SET
    source_system = excluded.source_system, source_patient_id = excluded.source_patient_id,
    mrn = excluded.mrn, ssn = excluded.ssn, name_prefix = excluded.name_prefix,
    given_name = excluded.given_name, family_name = excluded.family_name, name_suffix = excluded.name_suffix,
    birth_date = excluded.birth_date, sex = excluded.sex, phone = excluded.phone, email = excluded.email,
    address_lines = excluded.address_lines, city = excluded.city, state = excluded.state,
    postal_code = excluded.postal_code, country = excluded.country,
    source_updated_at = excluded.source_updated_at, document_id = excluded.document_id,
    content_sha256 = excluded.content_sha256, batch_id = excluded.batch_id, loaded_at = excluded.loaded_at;

  -- 11. Visits (keys assigned in step 4) into the partitions they need, then the children.
  SELECT array_agg(DISTINCT extract(year FROM tv.visit_date)::int) INTO v_years
  FROM t_visits tv JOIN t_apply a ON a.document_id = tv.document_id;
  PERFORM etl.ensure_visit_partitions(v_years);

  INSERT INTO clinical.visits (patient_key, visit_key, visit_date, source_visit_id, visit_start, discharge_date,
                               visit_type, facility_id, facility_name, provider_npi, provider_name, position)
  SELECT a.patient_key, tv.visit_key, tv.visit_date, tv.vid,
         CASE WHEN NOT etl.is_ymd(tv.vdate_raw) THEN etl.to_timestamptz(tv.vdate_raw) END,
         etl.to_visit_date(tv.discharge_raw),
         CASE WHEN tv.type_raw IN ('outpatient', 'inpatient', 'emergency', 'telehealth', 'other') THEN tv.type_raw END,
         etl.jtext(tv.facility -> 'id'), etl.jtext(tv.facility -> 'name'),
         etl.jtext(tv.provider -> 'npi'), etl.jtext(tv.provider -> 'name'),
         tv.position
  FROM t_visits tv
  JOIN t_apply a ON a.document_id = tv.document_id;

  -- Children: each kind expanded once; the same rows feed the insert and the problem check.
  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*
    FROM t_visits tv
    JOIN t_apply a ON a.document_id = tv.document_id
    CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(etl.jarr(tv.v -> 'diagnoses'))
      AS (code jsonb, system jsonb, description jsonb, "primary" jsonb)) WITH ORDINALITY AS x(code, system, description, "primary", ord)
  ), ins AS (
    INSERT INTO clinical.diagnoses (patient_key, visit_key, visit_date, position, code, code_system, description, is_primary)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position,
           etl.jtext(s.code), coalesce(etl.jtext(s.system), 'ICD-10-CM'), etl.jtext(s.description),
           CASE WHEN jsonb_typeof(s."primary") = 'boolean' THEN s."primary"::boolean END
    FROM src s
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].diagnoses[%s].primary', s.vpos, s.position), 'not a boolean'
  FROM src s
  WHERE NOT etl.is_absent(s."primary") AND jsonb_typeof(s."primary") <> 'boolean';

  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*,
           CASE WHEN etl.is_absent(x.type) THEN 'medication'
                WHEN x.type #>> '{}' IN ('medication', 'procedure') THEN x.type #>> '{}' END AS treatment_type,
           etl.to_visit_date(x.start_date #>> '{}') AS start_d,
           etl.to_visit_date(x.end_date #>> '{}') AS end_d
    FROM t_visits tv
    JOIN t_apply a ON a.document_id = tv.document_id
    CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(etl.jarr(tv.v -> 'treatments'))
      AS (treatment_id jsonb, type jsonb, code jsonb, system jsonb, name jsonb, dose jsonb, route jsonb, frequency jsonb,
          start_date jsonb, end_date jsonb))
      WITH ORDINALITY AS x(treatment_id, type, code, system, name, dose, route, frequency, start_date, end_date, ord)
  ), ins AS (
    INSERT INTO clinical.treatments (patient_key, visit_key, visit_date, position, source_treatment_id, treatment_type,
                                     code, code_system, name, dose, route, frequency, start_date, end_date)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position, etl.jtext(s.treatment_id), s.treatment_type,
           etl.jtext(s.code), etl.jtext(s.system), etl.jtext(s.name),
           etl.jtext(s.dose), etl.jtext(s.route), etl.jtext(s.frequency), s.start_d, s.end_d
    FROM src s
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].treatments[%s].%s', s.vpos, s.position, f.field), f.problem
  FROM src s
  CROSS JOIN LATERAL (VALUES
    ('type', CASE WHEN s.treatment_type IS NULL THEN 'not one of medication, procedure' END),
    ('start_date', CASE WHEN s.start_d IS NULL AND NOT etl.is_absent(s.start_date) THEN 'not a valid date' END),
    ('end_date', CASE WHEN s.end_d IS NULL AND NOT etl.is_absent(s.end_date) THEN 'not a valid date' END)
  ) AS f(field, problem)
  WHERE (s.treatment_type IS NULL OR s.start_d IS NULL OR s.end_d IS NULL) AND f.problem IS NOT NULL;

  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*,
           etl.to_timestamptz(x.written_at #>> '{}') AS written_ts
    FROM t_visits tv
    JOIN t_apply a ON a.document_id = tv.document_id
    CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(etl.jarr(tv.v -> 'provider_notes'))
      AS (note_id jsonb, author jsonb, written_at jsonb, text jsonb)) WITH ORDINALITY AS x(note_id, author, written_at, text, ord)
  ), ins AS (
    INSERT INTO clinical.provider_notes (patient_key, visit_key, visit_date, position, source_note_id, author, written_at, note_text)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position,
           etl.jtext(s.note_id), etl.jtext(s.author), s.written_ts, etl.jtext(s.text)
    FROM src s
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].provider_notes[%s].written_at', s.vpos, s.position), 'not a valid RFC 3339 timestamp'
  FROM src s
  WHERE s.written_ts IS NULL AND NOT etl.is_absent(s.written_at);

  -- 12. Problems of the patient and visit levels (invalid optional values; never the value).
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT a.document_id, p_batch_id, c.field, c.problem
  FROM t_apply a
  JOIN t_docs d ON d.document_id = a.document_id
  CROSS JOIN LATERAL (VALUES
    ('birth_date', CASE WHEN NOT etl.is_absent(d.birth_date) AND etl.to_date(d.birth_date #>> '{}') IS NULL
                        THEN 'not a valid date (YYYY-MM-DD)' END),
    ('sex', CASE WHEN NOT etl.is_absent(d.sex) AND lower(d.sex #>> '{}') NOT IN ('female', 'male', 'other', 'unknown')
                 THEN 'not one of female, male, other, unknown' END),
    ('updated_at', CASE WHEN NOT etl.is_absent(d.updated_at) AND a.updated_at IS NULL
                        THEN 'not a valid RFC 3339 timestamp' END),
    ('name.given', CASE WHEN jsonb_typeof(d.name -> 'given') NOT IN ('string', 'array', 'null')
                          OR (jsonb_typeof(d.name -> 'given') = 'array'
                              AND jsonb_path_exists(d.name -> 'given', '$[*] ? (@.type() != "string")'))
                        THEN 'not a string or an array of strings' END)
  ) AS c(field, problem)
  WHERE c.problem IS NOT NULL
  UNION ALL
  SELECT tv.document_id, p_batch_id, format('visits[%s].%s', tv.position, c.field), c.problem
  FROM (SELECT tv0.* FROM t_visits tv0 JOIN t_apply a ON a.document_id = tv0.document_id
        WHERE (tv0.discharge_raw IS NOT NULL AND etl.to_visit_date(tv0.discharge_raw) IS NULL)
           OR tv0.type_raw NOT IN ('outpatient', 'inpatient', 'emergency', 'telehealth', 'other')) tv
  CROSS JOIN LATERAL (VALUES
    ('discharge_date', CASE WHEN tv.discharge_raw IS NOT NULL AND etl.to_visit_date(tv.discharge_raw) IS NULL THEN 'not a valid date' END),
    ('visit_type', CASE WHEN tv.type_raw NOT IN ('outpatient', 'inpatient', 'emergency', 'telehealth', 'other')
                        THEN 'not one of outpatient, inpatient, emergency, telehealth, other' END)
  ) AS c(field, problem)
  WHERE c.problem IS NOT NULL;

  -- 13. Outcomes onto the landing rows, and the batch is done.
  INSERT INTO t_outcome SELECT a.document_id, 'loaded' FROM t_apply a;
  UPDATE landing.raw_documents d SET status = o.status
  FROM t_outcome o WHERE o.document_id = d.document_id;

  UPDATE etl.batches b
  SET status = 'transformed', transformed_at = clock_timestamp(),
      staged_at = coalesce(b.staged_at, clock_timestamp())
  WHERE b.batch_id = p_batch_id;

  RETURN QUERY
  SELECT count(*),
         count(*) FILTER (WHERE o.status = 'loaded'),
         count(*) FILTER (WHERE o.status = 'rejected'),
         count(*) FILTER (WHERE o.status = 'duplicate'),
         count(*) FILTER (WHERE o.status = 'superseded'),
         (SELECT count(*) FROM etl.document_problems p WHERE p.batch_id = p_batch_id)
  FROM t_outcome o;
END
$fn$;
COMMENT ON FUNCTION etl.transform_batch(bigint) IS
  'Transform one staged batch into the clinical tables in one transaction; returns outcome counts.';
