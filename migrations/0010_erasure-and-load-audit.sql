-- Up Migration
-- Erasure (GDPR article 17, and a patient's request under a covered entity's policy):
-- * etl.erase_patient removes a patient everywhere: clinical rows, the identity (pseudonym, research
--   id), the landing table's payloads, rejects and problems of their documents, and the names of the
--   files those came in; it keeps a receipt without PHI (when, by whom, the keyed hash of the
--   identity under the 'erasure' key, which is never rotated);
-- * until etl.lift_erasure, every later document of that patient is counted 'erased' by the
--   transform (its payload dropped) instead of re-creating them.
-- Load audit: every batch records the database user that loaded it (etl.batches.db_user).
-- Restated: etl.transform_documents (calls etl.step_erased), etl.step_outcomes (an erased document
-- keeps no payload nor file name), etl.batch_summary (erased, db_user).
SET LOCAL search_path = pg_catalog, pg_temp;

ALTER TABLE landing.raw_documents DROP CONSTRAINT raw_documents_status_check,
  ADD CONSTRAINT raw_documents_status_check
  CHECK (status IN ('staged', 'loaded', 'rejected', 'duplicate', 'superseded', 'erased'));

ALTER TABLE etl.batches ADD COLUMN db_user text DEFAULT session_user;
COMMENT ON COLUMN etl.batches.db_user IS 'The database login that started the batch (session_user).';

CREATE TABLE etl.erasures (
  erasure_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  subject_hash  text NOT NULL,          -- etl.keyed_hash under the 'erasure' key: no PHI, not reversible without the key
  erased_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
  erased_by     text NOT NULL DEFAULT session_user,
  documents     bigint NOT NULL,        -- landing rows scrubbed at erasure
  clinical_rows bigint NOT NULL,        -- clinical rows deleted at erasure
  lifted_at     timestamptz,
  lifted_by     text
);
CREATE UNIQUE INDEX erasures_active_idx ON etl.erasures (subject_hash) WHERE lifted_at IS NULL;
COMMENT ON TABLE etl.erasures IS 'Erasure receipts (no PHI): who erased which keyed identity hash when, and who lifted the block.';

-- The keyed hash of an identity under the erasure key (owner only: it reads the key).
CREATE FUNCTION etl.erasure_hash(p_source_system text, p_patient_id text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT etl.keyed_hash(k.key, p_source_system, p_patient_id) FROM etl.secret_keys k WHERE k.purpose = 'erasure'
$$;

-- Replaces the stored name of every file that held one of p_documents (in batch_files, the landing
-- table and rejects) by '[erased <sha256 prefix>]' (or '[erased file N]' without one): file names can
-- be PHI (Synthea names a bundle after its patient). Returns how many files.
CREATE FUNCTION etl.forget_file_names(p_documents bigint[]) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_n bigint;
BEGIN
  CREATE TEMP TABLE t_forget ON COMMIT DROP AS
  SELECT f.batch_id, f.source_file,
         format('[erased %s]', coalesce(left(encode(f.file_sha256, 'hex'), 16),
                                        'file ' || row_number() OVER (PARTITION BY f.batch_id ORDER BY f.staged_at, f.source_file))) AS new_name
  FROM etl.batch_files f
  WHERE (f.batch_id, f.source_file) IN (SELECT d.batch_id, d.source_file FROM landing.raw_documents d WHERE d.document_id = ANY (p_documents))
    AND f.source_file NOT LIKE '[erased %]';
  -- Two files of one batch with the same bytes would get one name: the second keeps its row number.
  UPDATE t_forget t SET new_name = t.new_name || ' ' || x.n
  FROM (SELECT batch_id, source_file, row_number() OVER (PARTITION BY batch_id, new_name ORDER BY source_file) AS n FROM t_forget) x
  WHERE x.batch_id = t.batch_id AND x.source_file = t.source_file AND x.n > 1;
  UPDATE etl.batch_files f SET source_file = t.new_name FROM t_forget t
  WHERE f.batch_id = t.batch_id AND f.source_file = t.source_file;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  UPDATE landing.raw_documents d SET source_file = t.new_name FROM t_forget t
  WHERE d.batch_id = t.batch_id AND d.source_file = t.source_file;
  UPDATE etl.rejected_documents r SET source_file = t.new_name FROM t_forget t
  WHERE r.batch_id = t.batch_id AND r.source_file = t.source_file;
  DROP TABLE t_forget;
  RETURN v_n;
END
$$;

-- A patient id given as text (on a command line) in the canonical form of the documents' ids
-- (etl.patient_id_of), or as given when it has none.
CREATE FUNCTION etl.patient_id_from_text(p_patient_id text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(nullif(etl.patient_id_of(to_jsonb(p_patient_id)), ''), p_patient_id);

-- Deletes one patient's rows (clinical tables, then the identity: pseudonym and research id go
-- with it) and what is derived from them; returns how many clinical rows went. The one place that
-- knows what a patient's rows are: a migration adding something derived restates this function.
CREATE FUNCTION etl.erase_patient_rows(p_patient_key bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_rows bigint := 0;
  v_n bigint;
BEGIN
  DELETE FROM clinical.provider_notes WHERE patient_key = p_patient_key; GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
  DELETE FROM clinical.treatments WHERE patient_key = p_patient_key;     GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
  DELETE FROM clinical.diagnoses WHERE patient_key = p_patient_key;      GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
  DELETE FROM clinical.visits WHERE patient_key = p_patient_key;         GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
  DELETE FROM clinical.patients WHERE patient_key = p_patient_key;       GET DIAGNOSTICS v_n = ROW_COUNT; v_rows := v_rows + v_n;
  DELETE FROM etl.patient_keys WHERE patient_key = p_patient_key;
  RETURN v_rows;
END
$$;

-- Erases one patient (source system and id as in their documents) and blocks their later
-- documents until etl.lift_erasure. Waits for running transforms. Idempotent: erasing again scrubs
-- again under the same receipt. Returns the receipt and what went.
CREATE FUNCTION etl.erase_patient(p_source_system text, p_patient_id text)
RETURNS TABLE (erasure_id bigint, documents bigint, clinical_rows bigint, files bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_id text := etl.patient_id_from_text(p_patient_id);
  v_hash text;
  v_key bigint;
  v_docs bigint[];
  v_rows bigint := 0;
  v_files bigint;
BEGIN
  IF p_source_system IS NULL OR p_patient_id IS NULL THEN
    RAISE EXCEPTION 'erase needs a source system and a patient id' USING ERRCODE = 'HE010',
      HINT = 'healthetl erase --patient-id ID [--source-system S] (the source system defaults to "default").';
  END IF;
  PERFORM etl.lock_out_transforms();
  v_hash := etl.erasure_hash(p_source_system, v_id);
  SELECT k.patient_key INTO v_key FROM etl.patient_keys k
  WHERE k.source_system = p_source_system AND k.source_patient_id = v_id;

  -- Their documents: those that name them, and every copy of the same bytes (duplicates keep no payload).
  SELECT array_agg(d.document_id) INTO v_docs FROM landing.raw_documents d
  WHERE d.content_sha256 IN (
    SELECT r.content_sha256 FROM landing.raw_documents r
    WHERE r.payload IS NOT NULL AND jsonb_typeof(r.payload) = 'object'
      AND etl.source_system_of(r.payload -> 'source_system') = p_source_system
      AND etl.patient_id_of(r.payload -> 'patient_id') = v_id);
  v_docs := coalesce(v_docs, '{}');

  IF v_key IS NOT NULL THEN
    v_rows := etl.erase_patient_rows(v_key);
  END IF;
  DELETE FROM etl.document_problems WHERE document_id = ANY (v_docs);
  DELETE FROM etl.rejected_documents r
  WHERE r.content_sha256 IN (SELECT d.content_sha256 FROM landing.raw_documents d WHERE d.document_id = ANY (v_docs));
  v_files := etl.forget_file_names(v_docs);
  -- The landing rows stay (every received document is accounted for), without payload or fingerprint.
  UPDATE landing.raw_documents d
  SET payload = NULL, status = CASE WHEN d.status = 'staged' THEN 'staged' ELSE 'erased' END,
      content_sha256 = sha256(convert_to('erased document ' || d.document_id, 'UTF8'))
  WHERE d.document_id = ANY (v_docs) AND d.status <> 'staged';

  INSERT INTO etl.erasures AS e (subject_hash, documents, clinical_rows)
  VALUES (v_hash, cardinality(v_docs), v_rows)
  ON CONFLICT (subject_hash) WHERE lifted_at IS NULL
  DO UPDATE SET documents = e.documents + excluded.documents, clinical_rows = e.clinical_rows + excluded.clinical_rows;
  RETURN QUERY SELECT e.erasure_id, cardinality(v_docs)::bigint, v_rows, v_files
  FROM etl.erasures e WHERE e.subject_hash = v_hash AND e.lifted_at IS NULL;
END
$$;

-- Lifts the block of an erasure on purpose: the patient's next document loads again. Returns how
-- many receipts were lifted (0: the patient was not erased).
CREATE FUNCTION etl.lift_erasure(p_source_system text, p_patient_id text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_n bigint;
BEGIN
  UPDATE etl.erasures SET lifted_at = clock_timestamp(), lifted_by = session_user
  WHERE lifted_at IS NULL
    AND subject_hash = etl.erasure_hash(p_source_system, etl.patient_id_from_text(p_patient_id));
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- Reads t_docs, t_outcome, etl.erasures; writes t_outcome 'erased' for the documents of erased
-- patients (not lifted), before any rule looks at them.
CREATE FUNCTION etl.step_erased() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM etl.erasures e WHERE e.lifted_at IS NULL) THEN
    INSERT INTO t_outcome
    SELECT d.document_id, 'erased'
    FROM t_docs d
    CROSS JOIN (SELECT s.key FROM etl.secret_keys s WHERE s.purpose = 'erasure') k
    WHERE d.doc_type = 'object'
      AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id)
      AND etl.keyed_hash(k.key, etl.source_system_of(d.source_system), etl.patient_id_of(d.patient_id))
          IN (SELECT e.subject_hash FROM etl.erasures e WHERE e.lifted_at IS NULL);
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION etl.transform_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- Validation: every staged document gets one outcome, or goes on to the snapshot step.
  PERFORM etl.step_documents(p_batch_id, p_shard, p_shards, p_only);
  PERFORM etl.step_earlier_duplicates();
  PERFORM etl.step_erased();
  PERFORM etl.step_poison();
  PERFORM etl.step_document_rules();
  PERFORM etl.step_visits();
  PERFORM etl.step_visit_rules();
  PERFORM etl.step_child_rules();
  PERFORM etl.step_rejects();
  PERFORM etl.step_batch_copies();
  -- Snapshots: the newest document per patient replaces what the patient had.
  PERFORM etl.step_snapshots();
  PERFORM etl.step_patient_keys();
  PERFORM etl.step_delete_replaced(p_batch_id);
  -- Inserts.
  PERFORM etl.step_patients(p_batch_id);
  PERFORM etl.step_visit_partitions(p_batch_id, p_shard, p_shards);
  PERFORM etl.step_insert_visits();
  PERFORM etl.step_diagnoses(p_batch_id);
  PERFORM etl.step_treatments(p_batch_id);
  PERFORM etl.step_provider_notes(p_batch_id);
  PERFORM etl.step_problems(p_batch_id);
  PERFORM etl.step_outcomes(p_batch_id, p_shards);
END
$$;

-- Reads t_outcome, t_apply; writes each document's outcome to landing (no payload kept for a
-- duplicate, a repeated reject or an erased patient's document, whose file name goes too), then
-- finishes the batch once no document is left staged. Restated from 0006: erased documents.
CREATE OR REPLACE FUNCTION etl.step_outcomes(p_batch_id bigint, p_shards int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO t_outcome SELECT a.document_id, 'loaded' FROM t_apply a;
  UPDATE landing.raw_documents d
  SET status = o.status,
      payload = CASE WHEN o.status IN ('duplicate', 'erased') THEN NULL
                     WHEN o.status = 'rejected'
                          AND EXISTS (SELECT 1 FROM etl.rejected_documents r
                                      WHERE r.content_sha256 = d.content_sha256 AND r.document_id <> d.document_id) THEN NULL
                     ELSE d.payload END,
      content_sha256 = CASE WHEN o.status = 'erased' THEN sha256(convert_to('erased document ' || d.document_id, 'UTF8'))
                            ELSE d.content_sha256 END
  FROM t_outcome o WHERE o.document_id = d.document_id;
  IF EXISTS (SELECT 1 FROM t_outcome WHERE status = 'erased') THEN
    PERFORM etl.forget_file_names(ARRAY(SELECT document_id FROM t_outcome WHERE status = 'erased'));
  END IF;
  IF p_shards > 1 THEN
    PERFORM pg_advisory_xact_lock(etl.batch_finish_lock_key());
  END IF;
  PERFORM etl.finish_batch(p_batch_id);
END
$$;

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
         AND count(d.document_id) = count(d.document_id) FILTER (WHERE d.status IN ('staged', 'loaded', 'rejected', 'duplicate', 'superseded', 'erased'))
         AS balanced,
       b.error,
       (SELECT coalesce(sum(x.visits), 0) FROM etl.batch_deletes x WHERE x.batch_id = b.batch_id)::bigint AS deleted_visits,
       (SELECT coalesce(sum(x.diagnoses + x.treatments + x.provider_notes), 0) FROM etl.batch_deletes x
        WHERE x.batch_id = b.batch_id)::bigint AS deleted_children,
       count(d.document_id) FILTER (WHERE d.status = 'erased')     AS erased,
       b.db_user
FROM etl.batches b
CROSS JOIN LATERAL (SELECT coalesce(sum(f.documents), 0)::bigint AS loader_count FROM etl.batch_files f WHERE f.batch_id = b.batch_id) lf
LEFT JOIN landing.raw_documents d ON d.batch_id = b.batch_id
GROUP BY b.batch_id, lf.loader_count;
COMMENT ON VIEW etl.batch_summary IS
  'One row per batch: documents received and what became of them (erased: of a patient erased before or since); balanced says whether they add up; error, why its last transform failed; rows its snapshots deleted; who loaded it.';

SELECT etl.adopt_objects();

-- Down Migration
SET LOCAL search_path = pg_catalog, pg_temp;
DROP VIEW etl.batch_summary;
CREATE VIEW etl.batch_summary AS
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
         AS balanced,
       b.error,
       (SELECT coalesce(sum(x.visits), 0) FROM etl.batch_deletes x WHERE x.batch_id = b.batch_id)::bigint AS deleted_visits,
       (SELECT coalesce(sum(x.diagnoses + x.treatments + x.provider_notes), 0) FROM etl.batch_deletes x
        WHERE x.batch_id = b.batch_id)::bigint AS deleted_children
FROM etl.batches b
CROSS JOIN LATERAL (SELECT coalesce(sum(f.documents), 0)::bigint AS loader_count FROM etl.batch_files f WHERE f.batch_id = b.batch_id) lf
LEFT JOIN landing.raw_documents d ON d.batch_id = b.batch_id
GROUP BY b.batch_id, lf.loader_count;
COMMENT ON VIEW etl.batch_summary IS
  'One row per batch: documents received and what became of them; balanced says whether they add up; error, why its last transform failed; rows its snapshots deleted.';
GRANT SELECT ON etl.batch_summary TO healthetl_loader;

CREATE OR REPLACE FUNCTION etl.step_outcomes(p_batch_id bigint, p_shards int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO t_outcome SELECT a.document_id, 'loaded' FROM t_apply a;
  UPDATE landing.raw_documents d
  SET status = o.status,
      payload = CASE WHEN o.status = 'duplicate' THEN NULL
                     WHEN o.status = 'rejected'
                          AND EXISTS (SELECT 1 FROM etl.rejected_documents r
                                      WHERE r.content_sha256 = d.content_sha256 AND r.document_id <> d.document_id) THEN NULL
                     ELSE d.payload END
  FROM t_outcome o WHERE o.document_id = d.document_id;
  IF p_shards > 1 THEN
    PERFORM pg_advisory_xact_lock(etl.batch_finish_lock_key());
  END IF;
  PERFORM etl.finish_batch(p_batch_id);
END
$$;

CREATE OR REPLACE FUNCTION etl.transform_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- Validation: every staged document gets one outcome, or goes on to the snapshot step.
  PERFORM etl.step_documents(p_batch_id, p_shard, p_shards, p_only);
  PERFORM etl.step_earlier_duplicates();
  PERFORM etl.step_poison();
  PERFORM etl.step_document_rules();
  PERFORM etl.step_visits();
  PERFORM etl.step_visit_rules();
  PERFORM etl.step_child_rules();
  PERFORM etl.step_rejects();
  PERFORM etl.step_batch_copies();
  -- Snapshots: the newest document per patient replaces what the patient had.
  PERFORM etl.step_snapshots();
  PERFORM etl.step_patient_keys();
  PERFORM etl.step_delete_replaced(p_batch_id);
  -- Inserts.
  PERFORM etl.step_patients(p_batch_id);
  PERFORM etl.step_visit_partitions(p_batch_id, p_shard, p_shards);
  PERFORM etl.step_insert_visits();
  PERFORM etl.step_diagnoses(p_batch_id);
  PERFORM etl.step_treatments(p_batch_id);
  PERFORM etl.step_provider_notes(p_batch_id);
  PERFORM etl.step_problems(p_batch_id);
  PERFORM etl.step_outcomes(p_batch_id, p_shards);
END
$$;

DROP FUNCTION etl.step_erased();
DROP FUNCTION etl.lift_erasure(text, text);
DROP FUNCTION etl.erase_patient(text, text);
DROP FUNCTION etl.erase_patient_rows(bigint);
DROP FUNCTION etl.patient_id_from_text(text);
DROP FUNCTION etl.forget_file_names(bigint[]);
DROP FUNCTION etl.erasure_hash(text, text);
DROP TABLE etl.erasures;
ALTER TABLE etl.batches DROP COLUMN db_user;
-- Documents counted erased have lost their payload: they stay, as rejected (they did not load).
UPDATE landing.raw_documents SET status = 'rejected' WHERE status = 'erased';
ALTER TABLE landing.raw_documents DROP CONSTRAINT raw_documents_status_check,
  ADD CONSTRAINT raw_documents_status_check
  CHECK (status IN ('staged', 'loaded', 'rejected', 'duplicate', 'superseded'));
