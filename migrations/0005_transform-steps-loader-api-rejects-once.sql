-- Up Migration
-- The transform restated as a short driver calling one small function per step, so that a later
-- change to one rule restates one small function (and its Down that function's previous body),
-- not the whole transform. Behaviour is unchanged, apart from the one item below. Also:
-- * the rules shared by several steps are defined once: the enumerations (sex codes, visit
--   types, treatment types) and the patient identity (source system, patient id) that the
--   snapshot step and etl.shard_of both use;
-- * every write the loader makes to etl and landing goes through a function here (COPY aside):
--   etl.start_batch, etl.stage_known_file, etl.record_file, etl.stage_rejects, etl.finish_staging;
--   the transform's coordinator starts with etl.begin_transform; etl.pending_batches lists work;
-- * a rejected document is stored once: etl.rejected_documents holds one row per distinct
--   rejected content (its first delivery, its last, and how many), not a copy per delivery;
--   etl.batch_rejects lists every rejected delivery of a batch with its reason.
-- Every function created or restated here cannot be hijacked by objects in other schemas: the
-- PL/pgSQL ones and the SQL ones called once per batch pin search_path (pg_catalog, pg_temp);
-- the small SQL rules called per value have SQL-standard bodies (names bound when created), so
-- they are still inlined into the statements that use them.
-- The steps talk through temporary tables of the transaction (t_docs, t_outcome, t_errors,
-- t_visits, t_dup, t_apply), never through per-row calls.

-- Names in the SQL-standard bodies below are bound now: resolve them in pg_catalog only.
SET LOCAL search_path = pg_catalog, pg_temp;

-- ---- rules defined once ---------------------------------------------------------------------

-- The sex codes clinical.patients.sex takes (its CHECK constraint lists the same).
CREATE FUNCTION etl.sex_codes() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['female', 'male', 'other', 'unknown'];

-- The visit types clinical.visits.visit_type takes (its CHECK constraint lists the same).
CREATE FUNCTION etl.visit_types() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['outpatient', 'inpatient', 'emergency', 'telehealth', 'other'];

-- The treatment types clinical.treatments.treatment_type takes (its CHECK constraint lists the same).
CREATE FUNCTION etl.treatment_types() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['medication', 'procedure'];

-- A document's sex as stored: one of etl.sex_codes() (any case in the document), else NULL.
CREATE FUNCTION etl.sex_of(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN lower(j #>> '{}') = ANY (etl.sex_codes()) THEN lower(j #>> '{}') END;

-- A visit's type as stored: one of etl.visit_types() (exact spelling), else NULL.
CREATE FUNCTION etl.visit_type_of(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN t = ANY (etl.visit_types()) THEN t END;

-- A document's source system as the patient's identity takes it ('default' when absent or empty).
CREATE FUNCTION etl.source_system_of(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(nullif(etl.jtext(j), ''), 'default');

-- A document's patient id as the patient's identity takes it (a number as its JSON text).
CREATE FUNCTION etl.patient_id_of(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN etl.jtext(j);

-- Which of `shards` shards a document belongs to: by its patient identity (etl.source_system_of,
-- etl.patient_id_of), so every snapshot of one patient is in the same shard, and so are
-- byte-identical copies. Any document has exactly one shard, valid or not.
-- Restated from 0004 to use the identity functions (same result for every input).
CREATE OR REPLACE FUNCTION etl.shard_of(source_system jsonb, patient_id jsonb, shards int) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN shards <= 1 THEN 0 ELSE
    ((hashtextextended(etl.source_system_of(source_system) || E'\n' || coalesce(etl.patient_id_of(patient_id), ''), 0)
      & 9223372036854775807) % shards)::int END;

-- The key that identifies a rejected content: its sha256; for a document whose bytes the loader
-- did not keep (larger than the limit: the all-zero sha256), a hash of where it was and why.
CREATE FUNCTION etl.reject_key(p_sha256 bytea, p_source_file text, p_line bigint, p_item bigint,
                               p_byte_offset bigint, p_reason text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_sha256 = '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea
              THEN sha256(convert_to(concat_ws(E'\n', p_source_file, p_line, p_item, p_byte_offset, p_reason), 'UTF8'))
              ELSE p_sha256 END;

-- ---- rejects stored once --------------------------------------------------------------------

-- One row per distinct rejected content. The position columns (document_id, batch_id,
-- source_file, line, item, byte_offset, rejected_at) are the first delivery's; field, reason and
-- all_reasons as last judged (existing copies fold into the first's, whose reasons they share
-- unless a rule changed in between). Every delivery is a landing row (status 'rejected') with the same
-- content_sha256: etl.batch_rejects lists them by batch.
ALTER TABLE etl.rejected_documents
  ADD COLUMN content_sha256   bytea,
  ADD COLUMN deliveries       bigint NOT NULL DEFAULT 1,
  ADD COLUMN last_batch_id    bigint,
  ADD COLUMN last_document_id bigint,
  ADD COLUMN last_rejected_at timestamptz;

-- Loader rejects without bytes get their key in the landing row too, so deliveries join to it.
UPDATE landing.raw_documents d
SET content_sha256 = etl.reject_key(d.content_sha256, r.source_file, r.line, r.item, r.byte_offset, r.reason)
FROM etl.rejected_documents r
WHERE r.document_id = d.document_id
  AND d.content_sha256 = '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;

UPDATE etl.rejected_documents r
SET content_sha256 = d.content_sha256, last_batch_id = r.batch_id, last_document_id = r.document_id,
    last_rejected_at = r.rejected_at
FROM landing.raw_documents d WHERE d.document_id = r.document_id;

-- Existing copies fold into their first delivery's row.
WITH g AS (
  SELECT content_sha256, min(document_id) AS first_id, max(document_id) AS last_id, count(*) AS n,
         max(rejected_at) AS last_at
  FROM etl.rejected_documents GROUP BY content_sha256 HAVING count(*) > 1
), upd AS (
  UPDATE etl.rejected_documents r
  SET deliveries = g.n, last_document_id = g.last_id, last_rejected_at = g.last_at,
      last_batch_id = (SELECT d.batch_id FROM landing.raw_documents d WHERE d.document_id = g.last_id)
  FROM g WHERE r.document_id = g.first_id
  RETURNING 1
)
DELETE FROM etl.rejected_documents r USING g
WHERE r.content_sha256 = g.content_sha256 AND r.document_id <> g.first_id;

ALTER TABLE etl.rejected_documents
  ALTER COLUMN content_sha256 SET NOT NULL,
  ALTER COLUMN last_batch_id SET NOT NULL,
  ALTER COLUMN last_document_id SET NOT NULL,
  ALTER COLUMN last_rejected_at SET NOT NULL,
  ALTER COLUMN last_rejected_at SET DEFAULT clock_timestamp(),
  ADD CONSTRAINT rejected_documents_content_sha256_key UNIQUE (content_sha256);
COMMENT ON TABLE etl.rejected_documents IS
  'One row per distinct rejected content: its first delivery, its last, how many, and the reasons. Every delivery: etl.batch_rejects.';

-- Every rejected delivery, by batch: where it was and why it was rejected.
CREATE VIEW etl.batch_rejects AS
SELECT d.batch_id, d.document_id, d.source_file, d.line, d.item, d.byte_offset,
       r.field, r.reason, r.all_reasons, r.deliveries
FROM landing.raw_documents d
JOIN etl.rejected_documents r ON r.content_sha256 = d.content_sha256
WHERE d.status = 'rejected';
COMMENT ON VIEW etl.batch_rejects IS
  'Every rejected delivery of every batch (one row per landing row rejected), with the reason; reasons may quote values.';

-- An empty pg_temp.t_new_rejects, the rejects a caller hands to etl.record_rejects: one row per
-- delivery. Created once per session (emptied at each commit), so a loader flushing rejects
-- thousands of times in one file's transaction does not create thousands of tables.
CREATE FUNCTION etl.clear_new_rejects() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS t_new_rejects (
    content_sha256 bytea NOT NULL, document_id bigint NOT NULL, batch_id bigint NOT NULL, source_file text NOT NULL,
    line bigint, item bigint, byte_offset bigint NOT NULL, field text NOT NULL, reason text NOT NULL, all_reasons text[] NOT NULL
  ) ON COMMIT DELETE ROWS;
  TRUNCATE t_new_rejects;
END
$$;

-- Record the rejects in t_new_rejects (etl.clear_new_rejects), grouped by content: a new content
-- gets a row, a content rejected before counts more deliveries and moves its last batch; field
-- and reasons as last judged. Returns how many deliveries it recorded. (A table, not a JSON
-- argument: a document with half a million reasons took minutes as JSON, whose cap is 256 MB.)
CREATE FUNCTION etl.record_rejects() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  n bigint;
BEGIN
  WITH r AS (
    SELECT x.*, count(*) OVER w AS deliveries, max(x.document_id) OVER w AS last_document_id,
           row_number() OVER (w ORDER BY x.document_id) AS rn
    FROM t_new_rejects x
    WINDOW w AS (PARTITION BY x.content_sha256)
  )
  INSERT INTO etl.rejected_documents AS rd (document_id, batch_id, source_file, line, item, byte_offset, field, reason,
                                            all_reasons, content_sha256, deliveries, last_batch_id, last_document_id)
  SELECT r.document_id, r.batch_id, r.source_file, r.line, r.item, r.byte_offset, r.field, r.reason,
         r.all_reasons, r.content_sha256, r.deliveries, r.batch_id, r.last_document_id
  FROM r WHERE r.rn = 1
  ON CONFLICT (content_sha256) DO UPDATE SET
    deliveries = rd.deliveries + excluded.deliveries, last_batch_id = excluded.last_batch_id,
    last_document_id = excluded.last_document_id, last_rejected_at = clock_timestamp(),
    field = excluded.field, reason = excluded.reason, all_reasons = excluded.all_reasons;
  SELECT count(*) INTO n FROM t_new_rejects;
  RETURN n;
END
$$;

-- ---- the loader's API -----------------------------------------------------------------------

-- Record documents the loader refused before staging (unparseable, too large): one landing row
-- each (payload NULL, status rejected), and the reject stored once per content (etl.record_rejects).
-- p_rejects is a JSON array of {source_file, line, item, byte_offset, sha256 (hex), format, reason}.
-- Restated from 0003: rejects are stored once per content.
CREATE OR REPLACE FUNCTION etl.stage_rejects(p_batch_id bigint, p_rejects jsonb) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM etl.clear_new_rejects();
  WITH r AS (
    SELECT x.*, substring(x.reason FROM '^[^:]*') AS field,
           etl.reject_key(decode(x.sha256, 'hex'), x.source_file, x.line, x.item, x.byte_offset, x.reason) AS reject_key
    FROM jsonb_to_recordset(p_rejects) AS x(source_file text, line bigint, item bigint, byte_offset bigint,
                                            sha256 text, format text, reason text)
  ), ins AS (
    INSERT INTO landing.raw_documents (batch_id, source_file, line, item, byte_offset, content_sha256, format, status, payload)
    SELECT p_batch_id, r.source_file, r.line, r.item, r.byte_offset, r.reject_key, r.format, 'rejected', NULL
    FROM r
    RETURNING document_id, source_file, byte_offset
  )
  INSERT INTO t_new_rejects
  SELECT r.reject_key, ins.document_id, p_batch_id, r.source_file, r.line, r.item, r.byte_offset, r.field, r.reason, ARRAY[r.reason]
  FROM ins JOIN r ON r.source_file = ins.source_file AND r.byte_offset = ins.byte_offset;
  RETURN etl.record_rejects();
END
$$;

-- Open a batch for this session's loader; the session holds the batch's loader lock (so a
-- transform knows the loader is alive) until etl.finish_staging or the session ends.
CREATE FUNCTION etl.start_batch(p_loader text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_batch_id bigint;
BEGIN
  INSERT INTO etl.batches (loader) VALUES (p_loader) RETURNING batch_id INTO v_batch_id;
  PERFORM pg_advisory_lock(etl.loader_lock_key(v_batch_id));
  RETURN v_batch_id;
END
$$;

-- Mark this session's batch staged (every file read) and release its loader lock.
CREATE FUNCTION etl.finish_staging(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE etl.batches SET status = 'staged', staged_at = clock_timestamp() WHERE batch_id = p_batch_id;
  PERFORM pg_advisory_unlock(etl.loader_lock_key(p_batch_id));
END
$$;

-- Record one input file of a batch (etl.batch_files). A second row for the same path adds its
-- documents when it was read ('staged', 'rejected') and is ignored otherwise.
CREATE FUNCTION etl.record_file(p_batch_id bigint, p_source_file text, p_size bigint, p_sha256 bytea,
                                p_documents bigint, p_status text, p_error text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  INSERT INTO etl.batch_files AS f (batch_id, source_file, size_bytes, file_sha256, documents, status, error)
  VALUES (p_batch_id, p_source_file, p_size, p_sha256, p_documents, p_status, p_error)
  ON CONFLICT (batch_id, source_file) DO UPDATE SET documents = f.documents + excluded.documents
  WHERE excluded.status IN ('staged', 'rejected')
$$;

-- If a file with these bytes was staged before, record this one as 'duplicate_file' with its
-- documents as duplicates (copied from the first staging's positions, nothing parsed) and return
-- how many; NULL when the bytes are new and the loader must read the file.
-- Only a transformed batch counts: the transform takes a 'duplicate' row as proof that the bytes
-- were accepted, so pointing at a batch still waiting for its transform made that batch's own
-- documents duplicates of these rows and nobody loaded them. A file with rejected documents is
-- read again, so that they are reported again.
CREATE FUNCTION etl.stage_known_file(p_batch_id bigint, p_source_file text, p_size bigint, p_sha256 bytea) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_of_batch bigint;
  v_of_file text;
  n bigint;
BEGIN
  SELECT f.batch_id, f.source_file INTO v_of_batch, v_of_file
  FROM etl.batch_files f
  JOIN etl.batches b ON b.batch_id = f.batch_id AND b.status = 'transformed'
  WHERE f.file_sha256 = p_sha256 AND f.status = 'staged'
    AND NOT EXISTS (SELECT 1 FROM landing.raw_documents d
                    WHERE d.batch_id = f.batch_id AND d.source_file = f.source_file AND d.status = 'rejected')
  ORDER BY f.batch_id LIMIT 1;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  INSERT INTO landing.raw_documents (batch_id, source_file, line, item, byte_offset, content_sha256, format, status, payload)
  SELECT p_batch_id, p_source_file, d.line, d.item, d.byte_offset, d.content_sha256, d.format, 'duplicate', NULL
  FROM landing.raw_documents d
  WHERE d.batch_id = v_of_batch AND d.source_file = v_of_file
  ORDER BY d.document_id;
  GET DIAGNOSTICS n = ROW_COUNT;
  INSERT INTO etl.batch_files (batch_id, source_file, size_bytes, file_sha256, documents, status, duplicate_of_batch, duplicate_of_file)
  VALUES (p_batch_id, p_source_file, p_size, p_sha256, n, 'duplicate_file', v_of_batch, v_of_file);
  RETURN n;
END
$$;
DROP FUNCTION etl.stage_duplicate_file(bigint, text, bigint, bytea, bigint, text);

-- Batches with staged documents that a transform should take, oldest first (a batch whose loader
-- is still alive is among them: etl.begin_transform says so when it is its turn).
CREATE FUNCTION etl.pending_batches() RETURNS SETOF bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT b.batch_id FROM etl.batches b
  WHERE b.status IN ('loading', 'staged')
    AND EXISTS (SELECT 1 FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'staged')
  ORDER BY b.batch_id
$$;

-- Wait for and hold, to the end of the transaction, the transform lock, after any shards of a lost
-- coordinator have finished (each holds etl.shard_lock_key() shared). The shard lock is a session
-- lock taken and released at once: held to the commit, the next transform could find it still
-- held for an instant after the transform lock was already free. What etl.begin_transform does
-- when it may wait, and what replay and purge take so that they never run beside a transform.
CREATE FUNCTION etl.lock_out_transforms() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(etl.transform_lock_key());
  PERFORM pg_advisory_lock(etl.shard_lock_key());
  PERFORM pg_advisory_unlock(etl.shard_lock_key());
END
$$;

-- Start transforming a batch, in the caller's transaction: take the transform lock, then wait for
-- the shards of a lost coordinator (each holds etl.shard_lock_key() shared). With p_wait false it
-- only tries, and returns waiting = 'transform' or 'shards' instead of waiting (the caller says
-- so, then calls again with p_wait true, having set lock_timeout to what it will wait).
-- Raises HE001 for a batch that does not exist and HE002 for one whose loader is alive
-- (checked before anything locks the batch's row, which would wait for the loader's open file
-- transaction). Returns the batch's status and how many of its documents are staged.
CREATE FUNCTION etl.begin_transform(p_batch_id bigint, p_wait boolean DEFAULT true)
RETURNS TABLE (waiting text, status text, staged bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_status text;
BEGIN
  IF p_wait THEN
    PERFORM etl.lock_out_transforms();
  ELSIF NOT pg_try_advisory_xact_lock(etl.transform_lock_key()) THEN
    RETURN QUERY SELECT 'transform'::text, NULL::text, NULL::bigint;
    RETURN;
  ELSIF NOT pg_try_advisory_lock(etl.shard_lock_key()) THEN
    RETURN QUERY SELECT 'shards'::text, NULL::text, NULL::bigint;
    RETURN;
  ELSE
    PERFORM pg_advisory_unlock(etl.shard_lock_key());
  END IF;

  SELECT b.status INTO v_status FROM etl.batches b WHERE b.batch_id = p_batch_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'batch % does not exist', p_batch_id
      USING ERRCODE = 'HE001', HINT = 'Run "healthetl status" to list batches.';
  END IF;
  -- A loader holds this lock while it stages; if we can take it, the loader is gone and what it
  -- committed (whole files) is complete and can be transformed.
  IF v_status = 'loading' AND NOT pg_try_advisory_xact_lock(etl.loader_lock_key(p_batch_id)) THEN
    RAISE EXCEPTION 'batch % is still being loaded', p_batch_id
      USING ERRCODE = 'HE002', HINT = 'Wait for its loader to finish, then run "healthetl transform".';
  END IF;
  RETURN QUERY SELECT NULL::text, v_status,
    (SELECT count(*) FROM landing.raw_documents d WHERE d.batch_id = p_batch_id AND d.status = 'staged');
END
$$;

-- ---- the transform's steps, in the order the driver calls them -------------------------------
-- Each step reads and writes the temporary tables of the transaction named in its header.

-- Lock for a transform of a batch (or one shard of it) and check it may run.
-- Whole batch: the transform lock (etl.begin_transform), then the batch's row. A shard: the shard
-- lock shared, its coordinator's transform lock, the batch's row shared. Raises HE001-HE004.
CREATE FUNCTION etl.step_lock_batch(p_batch_id bigint, p_shard int, p_shards int, p_coordinator int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_status text;
BEGIN
  IF p_shards IS NULL OR p_shards < 1 OR p_shard IS NULL OR p_shard < 0 OR p_shard >= p_shards THEN
    RAISE EXCEPTION 'shard % of % does not exist: shards are numbered 0 to shards - 1', p_shard, p_shards
      USING ERRCODE = 'HE003', HINT = 'Call etl.transform_batch(batch_id) to transform the whole batch.';
  END IF;
  IF p_shards = 1 THEN
    PERFORM etl.begin_transform(p_batch_id, true);
    PERFORM FROM etl.batches b WHERE b.batch_id = p_batch_id FOR UPDATE;
    RETURN;
  END IF;
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
  IF NOT FOUND THEN
    RAISE EXCEPTION 'batch % does not exist', p_batch_id
      USING ERRCODE = 'HE001', HINT = 'Run "healthetl status" to list batches.';
  END IF;
  -- The coordinator took the loader's lock if the loader is gone (etl.begin_transform).
  IF v_status = 'loading' AND NOT pg_try_advisory_xact_lock(etl.loader_lock_key(p_batch_id))
     AND NOT etl.holds_advisory_lock(p_coordinator, etl.loader_lock_key(p_batch_id)) THEN
    RAISE EXCEPTION 'batch % is still being loaded', p_batch_id
      USING ERRCODE = 'HE002', HINT = 'Wait for its loader to finish, then run "healthetl transform".';
  END IF;
END
$$;

-- Settings for the transform's transaction, and a clean slate of its temporary tables.
CREATE FUNCTION etl.step_settings() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;

-- Reads the batch's staged documents (of this shard) from landing; writes t_docs (the top-level
-- fields, extracted once) and an empty t_outcome (document_id, status).
CREATE FUNCTION etl.step_documents(p_batch_id bigint, p_shard int, p_shards int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;

-- Reads t_docs and landing; writes t_outcome 'duplicate' for bytes accepted in earlier batches.
-- Accepted: loaded, superseded, or a duplicate of accepted bytes. Bytes rejected before are judged
-- again, so a re-sent bad document shows up as rejected in the new batch too. Copies within this
-- batch are sorted out after validation (etl.step_batch_copies), so a copy of a bad one is rejected.
CREATE FUNCTION etl.step_earlier_duplicates() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO t_outcome
  SELECT d.document_id, 'duplicate'
  FROM t_docs d
  WHERE EXISTS (SELECT 1 FROM landing.raw_documents o
                WHERE o.content_sha256 = d.content_sha256
                  AND o.status IN ('loaded', 'superseded', 'duplicate'));
END
$$;

-- Reads t_docs, t_outcome; writes t_errors (document_id, sort_key, field, reason) for the
-- document-level rules. sort_key orders a document's reasons: the first one is reported.
CREATE FUNCTION etl.step_document_rules() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;

-- Reads t_docs, t_outcome and the landing payloads; writes t_visits (one row per visit of the
-- documents still in play, keys taken from the sequence up front, `bad` marking the few rows
-- the visit and child rules must look at) and t_dup (visit_ids repeated within a document).
CREATE FUNCTION etl.step_visits() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;

-- Reads t_visits, t_dup; writes t_errors for the visit-level rules (flagged rows only).
CREATE FUNCTION etl.step_visit_rules() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;

-- Reads t_visits; writes t_errors for the child-level rules (flagged visits only): every element
-- an object; diagnoses need a code, notes a text, each a string or a number (their columns are
-- NOT NULL text: an array or object there must be a reject, not a failed batch).
CREATE FUNCTION etl.step_child_rules() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;

-- Reads t_errors and landing; writes etl.rejected_documents (once per content, with the first
-- reason and up to 100 of them: etl.record_rejects) and t_outcome 'rejected'.
CREATE FUNCTION etl.step_rejects() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM etl.clear_new_rejects();
  INSERT INTO t_new_rejects
  SELECT r.content_sha256, r.document_id, r.batch_id, r.source_file, r.line, r.item, r.byte_offset,
         e.fields[1], e.reasons[1], e.reasons[1:100]
  FROM (SELECT document_id, array_agg(field ORDER BY sort_key) AS fields, array_agg(reason ORDER BY sort_key) AS reasons
        FROM t_errors GROUP BY document_id) e
  JOIN landing.raw_documents r ON r.document_id = e.document_id;
  PERFORM etl.record_rejects();
  INSERT INTO t_outcome SELECT DISTINCT document_id, 'rejected' FROM t_errors;
END
$$;

-- Reads t_docs, t_outcome; writes t_outcome 'duplicate' for copies within this batch of a
-- document that passed: the first one counts.
CREATE FUNCTION etl.step_batch_copies() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO t_outcome
  SELECT d.document_id, 'duplicate'
  FROM (SELECT t.document_id, row_number() OVER (PARTITION BY t.content_sha256 ORDER BY t.document_id) AS copy_no
        FROM t_docs t
        WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = t.document_id)) d
  WHERE d.copy_no > 1;
END
$$;

-- Reads t_docs, t_outcome, etl.patient_keys, clinical.patients; writes t_apply (the newest
-- snapshot per patient, when it is newer than the current one) and t_outcome 'superseded'.
-- Order of snapshots: updated_at (missing or invalid = oldest), then arrival (document_id).
CREATE FUNCTION etl.step_snapshots() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_apply ON COMMIT DROP AS
  WITH cand AS (
    SELECT d.document_id, d.content_sha256,
           etl.source_system_of(d.source_system)      AS source_system,
           etl.patient_id_of(d.patient_id)            AS source_patient_id,
           etl.to_timestamptz(d.updated_at #>> '{}')  AS updated_at
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
END
$$;

-- Reads and writes t_apply; writes etl.patient_keys: a surrogate key for each new patient.
CREATE FUNCTION etl.step_patient_keys() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO etl.patient_keys (source_system, source_patient_id)
  SELECT a.source_system, a.source_patient_id FROM t_apply a WHERE a.patient_key IS NULL
  ORDER BY a.document_id
  ON CONFLICT DO NOTHING;
  UPDATE t_apply a SET patient_key = k.patient_key
  FROM etl.patient_keys k
  WHERE a.patient_key IS NULL AND k.source_system = a.source_system AND k.source_patient_id = a.source_patient_id;
  CREATE UNIQUE INDEX ON t_apply (document_id);
  ANALYZE t_apply;
END
$$;

-- Reads t_apply; deletes the replaced patients' visits and children from clinical (the new
-- snapshot replaces them whole).
CREATE FUNCTION etl.step_delete_replaced() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM t_apply WHERE replacing) THEN
    DELETE FROM clinical.provider_notes c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.treatments     c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.diagnoses      c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    DELETE FROM clinical.visits         c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
  END IF;
END
$$;

-- Reads t_apply, t_docs; writes clinical.patients: inserts or replaces each patient's row.
CREATE FUNCTION etl.step_patients(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
         etl.sex_of(d.sex),
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
END
$$;

-- Reads t_visits, t_apply; creates the yearly visits partitions the applied visits need (whole
-- batch), or checks that they exist (a shard: its caller created them first, in their own
-- transaction, with etl.ensure_batch_partitions; raises HE005 otherwise).
CREATE FUNCTION etl.step_visit_partitions(p_batch_id bigint, p_shard int, p_shards int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_years int[];
BEGIN
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
END
$$;

-- Reads t_visits, t_apply; writes clinical.visits (keys assigned by etl.step_visits).
CREATE FUNCTION etl.step_insert_visits() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO clinical.visits (patient_key, visit_key, visit_date, source_visit_id, visit_start, discharge_date,
                               visit_type, facility_id, facility_name, provider_npi, provider_name, position)
  SELECT a.patient_key, tv.visit_key, tv.visit_date, tv.vid,
         CASE WHEN NOT etl.is_ymd(tv.vdate_raw) THEN etl.to_timestamptz(tv.vdate_raw) END,
         etl.to_visit_date(tv.discharge_raw),
         etl.visit_type_of(tv.type_raw),
         etl.jtext(tv.facility -> 'id'), etl.jtext(tv.facility -> 'name'),
         etl.jtext(tv.provider -> 'npi'), etl.jtext(tv.provider -> 'name'),
         tv.position
  FROM t_visits tv
  JOIN t_apply a ON a.document_id = tv.document_id;
END
$$;

-- Reads t_visits, t_apply; writes clinical.diagnoses, and etl.document_problems for a `primary`
-- that is not a boolean (the rows are expanded once and feed both).
CREATE FUNCTION etl.step_diagnoses(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;

-- Reads t_visits, t_apply; writes clinical.treatments, and etl.document_problems for an unknown
-- type or an invalid start or end date.
CREATE FUNCTION etl.step_treatments(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*,
           CASE WHEN etl.is_absent(x.type) THEN 'medication'
                WHEN x.type #>> '{}' = ANY (etl.treatment_types()) THEN x.type #>> '{}' END AS treatment_type,
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
    ('type', CASE WHEN s.treatment_type IS NULL THEN 'not one of ' || array_to_string(etl.treatment_types(), ', ') END),
    ('start_date', CASE WHEN s.start_d IS NULL AND NOT etl.is_absent(s.start_date) THEN 'not a valid date' END),
    ('end_date', CASE WHEN s.end_d IS NULL AND NOT etl.is_absent(s.end_date) THEN 'not a valid date' END)
  ) AS f(field, problem)
  WHERE (s.treatment_type IS NULL OR s.start_d IS NULL OR s.end_d IS NULL) AND f.problem IS NOT NULL;
END
$$;

-- Reads t_visits, t_apply; writes clinical.provider_notes, and etl.document_problems for an
-- invalid written_at.
CREATE FUNCTION etl.step_provider_notes(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
END
$$;

-- Reads t_apply, t_docs, t_visits; writes etl.document_problems for the patient- and visit-level
-- optional values that are invalid (loaded as NULL; the problem names the field, never the value).
CREATE FUNCTION etl.step_problems(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT a.document_id, p_batch_id, c.field, c.problem
  FROM t_apply a
  JOIN t_docs d ON d.document_id = a.document_id
  CROSS JOIN LATERAL (VALUES
    ('birth_date', CASE WHEN NOT etl.is_absent(d.birth_date) AND etl.to_date(d.birth_date #>> '{}') IS NULL
                        THEN 'not a valid date (YYYY-MM-DD)' END),
    ('sex', CASE WHEN NOT etl.is_absent(d.sex) AND etl.sex_of(d.sex) IS NULL
                 THEN 'not one of ' || array_to_string(etl.sex_codes(), ', ') END),
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
           OR etl.visit_type_of(tv0.type_raw) IS NULL AND tv0.type_raw IS NOT NULL) tv
  CROSS JOIN LATERAL (VALUES
    ('discharge_date', CASE WHEN tv.discharge_raw IS NOT NULL AND etl.to_visit_date(tv.discharge_raw) IS NULL THEN 'not a valid date' END),
    ('visit_type', CASE WHEN etl.visit_type_of(tv.type_raw) IS NULL AND tv.type_raw IS NOT NULL
                        THEN 'not one of ' || array_to_string(etl.visit_types(), ', ') END)
  ) AS c(field, problem)
  WHERE c.problem IS NOT NULL;
END
$$;

-- Reads t_apply, t_outcome; writes t_outcome 'loaded', the outcomes onto the landing rows, and
-- finishes the batch when nothing of it is left staged (etl.finish_batch). Shards take turns
-- here: each then sees the shards committed before it, so the last one finds nothing staged and
-- finishes the batch (a failed shard leaves its documents staged, and the batch unfinished).
CREATE FUNCTION etl.step_outcomes(p_batch_id bigint, p_shards int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO t_outcome SELECT a.document_id, 'loaded' FROM t_apply a;
  UPDATE landing.raw_documents d SET status = o.status
  FROM t_outcome o WHERE o.document_id = d.document_id;
  IF p_shards > 1 THEN
    PERFORM pg_advisory_xact_lock(etl.batch_finish_lock_key());
  END IF;
  PERFORM etl.finish_batch(p_batch_id);
END
$$;

-- ---- the driver -----------------------------------------------------------------------------

-- Transform one staged batch (or one shard of it) into the clinical tables, atomically, and
-- return the outcome counts of the documents it took. Restated from 0004 as a driver of steps.
-- Shards: with p_shards > 1 the call takes only the documents of shard p_shard (by patient, see
-- etl.shard_of), so shards of one batch can run at once in separate sessions. They are started
-- by a coordinator session that holds the transform lock (p_coordinator is its backend pid);
-- each shard first calls etl.ensure_batch_partitions in its own transaction (tables are not
-- created inside concurrent transactions); the last shard to commit finishes the batch.
-- Performance notes (measured with npm run bench):
-- * each payload is decompressed a few times only: the top-level fields come out of ONE
--   jsonb_to_record call into t_docs, visits out of one jsonb_array_elements pass into t_visits;
--   every later step reads those small values, never the landing payload again;
-- * checks first compute a cheap boolean per row and build messages only for the rows that fail;
-- * visit keys are taken from the sequence up front, so children never join back to find them.
CREATE OR REPLACE FUNCTION etl.transform_batch(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1,
                                               p_coordinator int DEFAULT NULL)
RETURNS TABLE (documents bigint, loaded bigint, rejected bigint, duplicate bigint, superseded bigint, problems bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  PERFORM etl.step_lock_batch(p_batch_id, p_shard, p_shards, p_coordinator);
  PERFORM etl.step_settings();
  -- Validation: every staged document gets one outcome, or goes on to the snapshot step.
  PERFORM etl.step_documents(p_batch_id, p_shard, p_shards);
  PERFORM etl.step_earlier_duplicates();
  PERFORM etl.step_document_rules();
  PERFORM etl.step_visits();
  PERFORM etl.step_visit_rules();
  PERFORM etl.step_child_rules();
  PERFORM etl.step_rejects();
  PERFORM etl.step_batch_copies();
  -- Snapshots: the newest document per patient replaces what the patient had.
  PERFORM etl.step_snapshots();
  PERFORM etl.step_patient_keys();
  PERFORM etl.step_delete_replaced();
  -- Inserts.
  PERFORM etl.step_patients(p_batch_id);
  PERFORM etl.step_visit_partitions(p_batch_id, p_shard, p_shards);
  PERFORM etl.step_insert_visits();
  PERFORM etl.step_diagnoses(p_batch_id);
  PERFORM etl.step_treatments(p_batch_id);
  PERFORM etl.step_provider_notes(p_batch_id);
  PERFORM etl.step_problems(p_batch_id);
  PERFORM etl.step_outcomes(p_batch_id, p_shards);

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

-- Down Migration
SET LOCAL search_path = pg_catalog, pg_temp;
-- 0004's transform_batch, whole (it reverts to one function, before anything it used is dropped).
CREATE OR REPLACE FUNCTION etl.transform_batch(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1,
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

DROP FUNCTION etl.step_outcomes(bigint, int);
DROP FUNCTION etl.step_problems(bigint);
DROP FUNCTION etl.step_provider_notes(bigint);
DROP FUNCTION etl.step_treatments(bigint);
DROP FUNCTION etl.step_diagnoses(bigint);
DROP FUNCTION etl.step_insert_visits();
DROP FUNCTION etl.step_visit_partitions(bigint, int, int);
DROP FUNCTION etl.step_patients(bigint);
DROP FUNCTION etl.step_delete_replaced();
DROP FUNCTION etl.step_patient_keys();
DROP FUNCTION etl.step_snapshots();
DROP FUNCTION etl.step_batch_copies();
DROP FUNCTION etl.step_rejects();
DROP FUNCTION etl.step_child_rules();
DROP FUNCTION etl.step_visit_rules();
DROP FUNCTION etl.step_visits();
DROP FUNCTION etl.step_document_rules();
DROP FUNCTION etl.step_earlier_duplicates();
DROP FUNCTION etl.step_documents(bigint, int, int);
DROP FUNCTION etl.step_settings();
DROP FUNCTION etl.step_lock_batch(bigint, int, int, int);
DROP FUNCTION etl.begin_transform(bigint, boolean);
DROP FUNCTION etl.lock_out_transforms();
DROP FUNCTION etl.pending_batches();
DROP FUNCTION etl.stage_known_file(bigint, text, bigint, bytea);
DROP FUNCTION etl.record_file(bigint, text, bigint, bytea, bigint, text, text);
DROP FUNCTION etl.finish_staging(bigint);
DROP FUNCTION etl.start_batch(text);

-- 0003's loader functions, whole.
-- Record a file whose bytes are identical to a file already staged: its documents are counted as
-- duplicates, copied from the first staging's positions, without reading or parsing them again.
CREATE FUNCTION etl.stage_duplicate_file(p_batch_id bigint, p_source_file text, p_size bigint, p_sha256 bytea,
                                         p_of_batch bigint, p_of_file text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  n bigint;
BEGIN
  INSERT INTO landing.raw_documents (batch_id, source_file, line, item, byte_offset, content_sha256, format, status, payload)
  SELECT p_batch_id, p_source_file, d.line, d.item, d.byte_offset, d.content_sha256, d.format, 'duplicate', NULL
  FROM landing.raw_documents d
  WHERE d.batch_id = p_of_batch AND d.source_file = p_of_file
  ORDER BY d.document_id;
  GET DIAGNOSTICS n = ROW_COUNT;
  INSERT INTO etl.batch_files (batch_id, source_file, size_bytes, file_sha256, documents, status, duplicate_of_batch, duplicate_of_file)
  VALUES (p_batch_id, p_source_file, p_size, p_sha256, n, 'duplicate_file', p_of_batch, p_of_file);
  RETURN n;
END
$$;

-- Record documents the loader refused before staging (unparseable, too large): one landing row
CREATE OR REPLACE FUNCTION etl.stage_rejects(p_batch_id bigint, p_rejects jsonb) RETURNS bigint
LANGUAGE sql AS $$
  WITH r AS (
    SELECT x.*, substring(x.reason FROM '^[^:]*') AS field
    FROM jsonb_to_recordset(p_rejects) AS x(source_file text, line bigint, item bigint, byte_offset bigint,
                                            sha256 text, format text, reason text)
  ), ins AS (
    INSERT INTO landing.raw_documents (batch_id, source_file, line, item, byte_offset, content_sha256, format, status, payload)
    SELECT p_batch_id, r.source_file, r.line, r.item, r.byte_offset, decode(r.sha256, 'hex'), r.format, 'rejected', NULL
    FROM r
    RETURNING document_id, source_file, byte_offset, line, item
  ), rej AS (
    INSERT INTO etl.rejected_documents (document_id, batch_id, source_file, line, item, byte_offset, field, reason, all_reasons)
    SELECT ins.document_id, p_batch_id, ins.source_file, ins.line, ins.item, ins.byte_offset, r.field, r.reason, ARRAY[r.reason]
    FROM ins JOIN r ON r.source_file = ins.source_file AND r.byte_offset = ins.byte_offset
    RETURNING 1
  )
  SELECT count(*) FROM rej
$$;

-- Rejects back to one row per delivery, each with its content's reasons.
CREATE TEMP TABLE t_rejects_once ON COMMIT DROP AS SELECT * FROM etl.rejected_documents;
DROP VIEW etl.batch_rejects;
ALTER TABLE etl.rejected_documents
  DROP CONSTRAINT rejected_documents_content_sha256_key,
  DROP COLUMN content_sha256,
  DROP COLUMN deliveries,
  DROP COLUMN last_batch_id,
  DROP COLUMN last_document_id,
  DROP COLUMN last_rejected_at;
COMMENT ON TABLE etl.rejected_documents IS NULL;
INSERT INTO etl.rejected_documents (document_id, batch_id, source_file, line, item, byte_offset, field, reason, all_reasons, rejected_at)
SELECT d.document_id, d.batch_id, d.source_file, d.line, d.item, d.byte_offset, o.field, o.reason, o.all_reasons, o.last_rejected_at
FROM landing.raw_documents d
JOIN t_rejects_once o ON o.content_sha256 = d.content_sha256
WHERE d.status = 'rejected' AND d.document_id <> o.document_id;
-- Loader rejects without bytes get back the all-zero sha256 they were staged with.
UPDATE landing.raw_documents d
SET content_sha256 = '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea
FROM etl.rejected_documents r
WHERE r.document_id = d.document_id AND d.payload IS NULL
  AND d.content_sha256 = etl.reject_key('\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
                                        r.source_file, r.line, r.item, r.byte_offset, r.reason);
DROP FUNCTION etl.record_rejects();
DROP FUNCTION etl.clear_new_rejects();
DROP FUNCTION etl.reject_key(bytea, text, bigint, bigint, bigint, text);

-- 0004's shard_of, whole.
CREATE OR REPLACE FUNCTION etl.shard_of(source_system jsonb, patient_id jsonb, shards int) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN shards <= 1 THEN 0 ELSE
    ((hashtextextended(coalesce(nullif(etl.jtext(source_system), ''), 'default') || E'\n' || coalesce(etl.jtext(patient_id), ''), 0)
      & 9223372036854775807) % shards)::int END
$$;

DROP FUNCTION etl.patient_id_of(jsonb);
DROP FUNCTION etl.source_system_of(jsonb);
DROP FUNCTION etl.visit_type_of(text);
DROP FUNCTION etl.sex_of(jsonb);
DROP FUNCTION etl.treatment_types();
DROP FUNCTION etl.visit_types();
DROP FUNCTION etl.sex_codes();
