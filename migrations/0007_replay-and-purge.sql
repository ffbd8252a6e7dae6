-- Up Migration
-- Replay and retention:
-- * etl.replay_patients re-derives patients' clinical rows from their current snapshots in the
--   landing table under today's rules (after rows were deleted by hand, or a migration changed the
--   mapping), through the transform's own steps; a patient whose current snapshot today's rules
--   reject keeps its rows and is reported, never silently deleted;
-- * etl.purge removes what nothing needs any more: payloads of documents that are no longer a
--   patient's current snapshot, old rejects and old problems; never a current snapshot's payload.
-- Restated: etl.step_documents (it also takes given documents whatever their batch and status)
-- and etl.step_delete_replaced (a replay's deletes are not a batch's).
SET LOCAL search_path = pg_catalog, pg_temp;

-- Reads the batch's staged documents (of this shard; only p_only's when given) from landing, or,
-- with p_batch_id NULL, the documents p_only names whatever their batch and status (a replay);
-- writes t_docs (the top-level fields, extracted once; updated_at parsed once, as updated_ts; when
-- the document was received) and an empty t_outcome (document_id, status).
-- Restated from 0006: the replay's documents.
CREATE OR REPLACE FUNCTION etl.step_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_docs ON COMMIT DROP AS
  SELECT d.document_id, d.content_sha256, d.received_at, d.doc_type, d.visits_type, x.*,
         etl.to_timestamptz(x.updated_at #>> '{}') AS updated_ts
  FROM (SELECT r.document_id, r.content_sha256, r.received_at, r.payload, jsonb_typeof(r.payload) AS doc_type,
               jsonb_typeof(r.payload -> 'visits') AS visits_type
        FROM landing.raw_documents r
        WHERE r.batch_id = p_batch_id AND r.status = 'staged' AND (p_only IS NULL OR r.document_id = ANY (p_only))
        UNION ALL
        SELECT r.document_id, r.content_sha256, r.received_at, r.payload, jsonb_typeof(r.payload) AS doc_type,
               jsonb_typeof(r.payload -> 'visits') AS visits_type
        FROM landing.raw_documents r
        WHERE p_batch_id IS NULL AND r.document_id = ANY (p_only)
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

-- Reads t_apply; deletes the replaced patients' visits and children from clinical (the new
-- snapshot replaces them whole); writes t_deleted, and etl.batch_deletes for a batch (p_batch_id
-- NULL: a replay, whose deletes are re-inserted at once): how many of each went.
-- Restated from 0006: a replay records no batch_deletes row.
CREATE OR REPLACE FUNCTION etl.step_delete_replaced(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_notes bigint := 0;
  v_treatments bigint := 0;
  v_diagnoses bigint := 0;
  v_visits bigint := 0;
BEGIN
  CREATE TEMP TABLE t_deleted (visits bigint, diagnoses bigint, treatments bigint, provider_notes bigint) ON COMMIT DROP;
  IF EXISTS (SELECT 1 FROM t_apply WHERE replacing) THEN
    DELETE FROM clinical.provider_notes c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    GET DIAGNOSTICS v_notes = ROW_COUNT;
    DELETE FROM clinical.treatments     c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    GET DIAGNOSTICS v_treatments = ROW_COUNT;
    DELETE FROM clinical.diagnoses      c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    GET DIAGNOSTICS v_diagnoses = ROW_COUNT;
    DELETE FROM clinical.visits         c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    GET DIAGNOSTICS v_visits = ROW_COUNT;
  END IF;
  INSERT INTO t_deleted VALUES (v_visits, v_diagnoses, v_treatments, v_notes);
  IF p_batch_id IS NOT NULL AND v_visits + v_diagnoses + v_treatments + v_notes > 0 THEN
    INSERT INTO etl.batch_deletes (batch_id, visits, diagnoses, treatments, provider_notes)
    VALUES (p_batch_id, v_visits, v_diagnoses, v_treatments, v_notes);
  END IF;
END
$$;

-- Transform again, under today's rules, the given documents of one batch that are their patients'
-- current snapshots (a replay): the validation steps, then the patients' rows replaced as a
-- newer snapshot would replace them. Nothing of the batch's bookkeeping changes (outcomes,
-- rejects, deletes): the documents were accepted when they arrived. Reads t_replay (the patients
-- replayed); writes t_outcome: 'loaded' (replayed), 'rejected' (today's rules refuse it) or
-- 'identity' (today's identity rules name another patient); in both latter cases the patient keeps
-- its rows. And t_errors.
CREATE FUNCTION etl.replay_documents(p_batch_id bigint, p_documents bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM etl.step_documents(NULL, 0, 1, p_documents);
  PERFORM etl.step_document_rules();
  PERFORM etl.step_visits();
  PERFORM etl.step_visit_rules();
  PERFORM etl.step_child_rules();
  INSERT INTO t_outcome SELECT DISTINCT document_id, 'rejected' FROM t_errors;
  PERFORM etl.step_snapshots();
  -- A replay never moves a document to another patient: if today's identity rules name another
  -- patient than the one replayed (t_replay), it is kept as it is ('identity').
  INSERT INTO t_outcome
  SELECT a.document_id, 'identity'
  FROM t_apply a
  JOIN t_replay r ON r.document_id = a.document_id
  JOIN etl.patient_keys k ON k.patient_key = r.patient_key
  WHERE (k.source_system, k.source_patient_id) IS DISTINCT FROM (a.source_system, a.source_patient_id);
  DELETE FROM t_apply a USING t_outcome o WHERE o.document_id = a.document_id;
  PERFORM etl.step_patient_keys();
  DELETE FROM etl.document_problems p USING t_apply a WHERE p.document_id = a.document_id;
  PERFORM etl.step_delete_replaced(NULL);
  PERFORM etl.step_patients(p_batch_id);
  PERFORM etl.step_visit_partitions(p_batch_id, 0, 1);
  PERFORM etl.step_insert_visits();
  PERFORM etl.step_diagnoses(p_batch_id);
  PERFORM etl.step_treatments(p_batch_id);
  PERFORM etl.step_provider_notes(p_batch_id);
  PERFORM etl.step_problems(p_batch_id);
  INSERT INTO t_outcome SELECT a.document_id, 'loaded' FROM t_apply a;
END
$$;

-- Re-derive the clinical rows of the given patients (surrogate keys) from their current snapshots
-- in the landing table, under today's rules, in the caller's transaction (one per chunk of
-- patients), under the transform lock. Returns one row per patient: 'replayed', or 'kept' with
-- the field of the first reason today's rules give (the patient keeps its rows), or 'kept' with
-- field '$payload' when the current snapshot's payload is gone, or '$identity' when today's
-- identity rules would make it another patient. Patients without a row are skipped. The patients
-- given may come from at most 50 batches (HE007).
CREATE FUNCTION etl.replay_patients(p_patient_keys bigint[])
RETURNS TABLE (patient_key bigint, outcome text, field text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_batch bigint;
  v_documents bigint[];
BEGIN
  PERFORM etl.lock_out_transforms();
  DROP TABLE IF EXISTS pg_temp.t_replay;
  CREATE TEMP TABLE t_replay ON COMMIT DROP AS
  SELECT p.patient_key, p.document_id, d.batch_id, (d.payload IS NULL) AS no_payload, NULL::text AS outcome, NULL::text AS field
  FROM clinical.patients p
  JOIN landing.raw_documents d ON d.document_id = p.document_id
  WHERE p.patient_key = ANY (p_patient_keys);
  UPDATE t_replay r SET outcome = 'kept', field = '$payload' WHERE r.no_payload;
  -- Each source batch is a pass of the steps, whose temporary tables hold locks to the commit: a
  -- few hundred passes ran out of lock memory (max_locks_per_transaction). The caller chunks.
  IF (SELECT count(DISTINCT r.batch_id) FROM t_replay r WHERE r.outcome IS NULL) > 50 THEN
    RAISE EXCEPTION 'the patients given come from more than 50 batches: replay them in smaller groups'
      USING ERRCODE = 'HE007', HINT = 'healthetl replay groups patients by batch; from SQL, pass the patients of at most 50 batches per call.';
  END IF;
  FOR v_batch, v_documents IN
    SELECT r.batch_id, array_agg(r.document_id) FROM t_replay r WHERE r.outcome IS NULL GROUP BY r.batch_id ORDER BY r.batch_id
  LOOP
    PERFORM etl.step_settings();
    PERFORM etl.replay_documents(v_batch, v_documents);
    UPDATE t_replay r
    SET outcome = CASE WHEN o.status = 'loaded' THEN 'replayed' ELSE 'kept' END,
        field = CASE WHEN o.status = 'identity' THEN '$identity'
                     ELSE (SELECT e.field FROM t_errors e WHERE e.document_id = r.document_id ORDER BY e.sort_key LIMIT 1) END
    FROM t_outcome o WHERE o.document_id = r.document_id;
  END LOOP;
  RETURN QUERY SELECT r.patient_key, r.outcome, r.field FROM t_replay r ORDER BY r.patient_key;
END
$$;

-- Remove what nothing needs any more, of documents received more than p_older_than ago: the
-- payloads of documents that are not a patient's current snapshot (duplicates, superseded,
-- rejected, replaced: their landing rows stay, so every document is still accounted for), the
-- rejects last delivered before then, and the problems of documents that are no longer current.
-- Never a current snapshot's payload: etl.replay_patients needs it. Under the transform lock.
CREATE FUNCTION etl.purge(p_older_than interval)
RETURNS TABLE (payloads bigint, rejects bigint, problems bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_cutoff timestamptz := now() - p_older_than;
  v_payloads bigint;
  v_rejects bigint;
  v_problems bigint;
BEGIN
  IF p_older_than IS NULL OR p_older_than < interval '0' THEN
    RAISE EXCEPTION 'purge needs an age of zero or more (got %)', p_older_than
      USING ERRCODE = 'HE006', HINT = 'Call etl.purge(interval ''90 days''), or healthetl purge --older-than 90.';
  END IF;
  PERFORM etl.lock_out_transforms();
  UPDATE landing.raw_documents d SET payload = NULL
  WHERE d.payload IS NOT NULL AND d.received_at < v_cutoff AND d.status <> 'staged'
    AND NOT EXISTS (SELECT 1 FROM clinical.patients p WHERE p.document_id = d.document_id);
  GET DIAGNOSTICS v_payloads = ROW_COUNT;
  DELETE FROM etl.rejected_documents r WHERE r.last_rejected_at < v_cutoff;
  GET DIAGNOSTICS v_rejects = ROW_COUNT;
  DELETE FROM etl.document_problems x
  USING landing.raw_documents d
  WHERE d.document_id = x.document_id AND d.received_at < v_cutoff
    AND NOT EXISTS (SELECT 1 FROM clinical.patients p WHERE p.document_id = x.document_id);
  GET DIAGNOSTICS v_problems = ROW_COUNT;
  RETURN QUERY SELECT v_payloads, v_rejects, v_problems;
END
$$;

-- Down Migration
SET LOCAL search_path = pg_catalog, pg_temp;
DROP FUNCTION etl.purge(interval);
DROP FUNCTION etl.replay_patients(bigint[]);
DROP FUNCTION etl.replay_documents(bigint, bigint[]);

-- 0006's steps, whole.
CREATE OR REPLACE FUNCTION etl.step_delete_replaced(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_notes bigint := 0;
  v_treatments bigint := 0;
  v_diagnoses bigint := 0;
  v_visits bigint := 0;
BEGIN
  CREATE TEMP TABLE t_deleted (visits bigint, diagnoses bigint, treatments bigint, provider_notes bigint) ON COMMIT DROP;
  IF EXISTS (SELECT 1 FROM t_apply WHERE replacing) THEN
    DELETE FROM clinical.provider_notes c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    GET DIAGNOSTICS v_notes = ROW_COUNT;
    DELETE FROM clinical.treatments     c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    GET DIAGNOSTICS v_treatments = ROW_COUNT;
    DELETE FROM clinical.diagnoses      c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    GET DIAGNOSTICS v_diagnoses = ROW_COUNT;
    DELETE FROM clinical.visits         c USING t_apply a WHERE a.replacing AND c.patient_key = a.patient_key;
    GET DIAGNOSTICS v_visits = ROW_COUNT;
  END IF;
  INSERT INTO t_deleted VALUES (v_visits, v_diagnoses, v_treatments, v_notes);
  IF v_visits + v_diagnoses + v_treatments + v_notes > 0 THEN
    INSERT INTO etl.batch_deletes (batch_id, visits, diagnoses, treatments, provider_notes)
    VALUES (p_batch_id, v_visits, v_diagnoses, v_treatments, v_notes);
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION etl.step_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_docs ON COMMIT DROP AS
  SELECT d.document_id, d.content_sha256, d.received_at, d.doc_type, d.visits_type, x.*,
         etl.to_timestamptz(x.updated_at #>> '{}') AS updated_ts
  FROM (SELECT r.document_id, r.content_sha256, r.received_at, r.payload, jsonb_typeof(r.payload) AS doc_type,
               jsonb_typeof(r.payload -> 'visits') AS visits_type
        FROM landing.raw_documents r
        WHERE r.batch_id = p_batch_id AND r.status = 'staged' AND (p_only IS NULL OR r.document_id = ANY (p_only))
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

