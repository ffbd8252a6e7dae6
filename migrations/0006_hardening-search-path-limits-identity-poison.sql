-- Up Migration
-- Hardening (issue "no single document jams a batch"; "functions cannot be hijacked"; "snapshots
-- that are silently lost"):
-- * every function in our schemas has a pinned search_path or a SQL-standard body: the per-value
--   helpers of 0003/0004 are restated with RETURN bodies (names bound when created, still
--   inlined), the others get SET search_path = pg_catalog, pg_temp;
-- * only ASCII digits count as digits (\d also matched other scripts' digits on an ICU database,
--   and the cast then failed the batch);
-- * limits are checked up front, each a reject naming the field: an indexed value (patient_id,
--   source_system, visit_id, a diagnosis code) over 1,000 bytes, a visit year outside 1900 ..
--   the year received + 1 (each year is a partition); a treatment name over 1,000 bytes is a
--   problem (it is optional);
-- * updated_at that is not RFC 3339 with an offset, or more than 24 hours after its batch was
--   received, is a reject (it was a problem, and a real update could vanish as superseded);
-- * patient identity has one canonical form: a numeric id must be an integer and is its decimal
--   text (12, 12.0, 1.2e1 and "12" are one patient), a string id is NFC-normalised and trimmed;
--   patients that collide under the new form are merged here (the newest snapshot wins);
-- * the last line of defence: if a batch (or shard) still fails on a data error (SQLSTATE
--   classes 22, 23, 54), the documents that cause it are found by halving, each trial rolled
--   back inside the same transaction, and rejected with the SQLSTATE; the others load;
-- * a batch that fails keeps its error (etl.record_batch_failure), shown by etl.batch_summary;
-- * a duplicate, or a rejected content delivered again, keeps its landing row without its payload.
-- Identity, canonical values and the year rule need a UTF8 database (normalize()).
-- Names in the SQL-standard bodies below are bound now: resolve them in pg_catalog only.
SET LOCAL search_path = pg_catalog, pg_temp;
DO $$
BEGIN
  IF pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
    RAISE EXCEPTION 'healthetl needs a UTF8 database (this one is %)', pg_catalog.getdatabaseencoding()
      USING HINT = 'Create the database with ENCODING ''UTF8'' (createdb -E UTF8 -T template0 ...), then run "healthetl migrate up" again.';
  END IF;
END
$$;

-- ---- per-value helpers with SQL-standard bodies (restated from 0003/0004) --------------------

-- Is the text a real calendar date written YYYY-MM-DD (ASCII digits)? (no exception handler: cheap in bulk)
CREATE OR REPLACE FUNCTION etl.is_ymd(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN t ~ '^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$' THEN
    substr(t, 1, 4)::int >= 1
    AND substr(t, 9, 2)::int <= CASE
      WHEN substr(t, 6, 2)::int IN (4, 6, 9, 11) THEN 30
      WHEN substr(t, 6, 2)::int = 2 THEN
        CASE WHEN (substr(t, 1, 4)::int % 4 = 0 AND substr(t, 1, 4)::int % 100 <> 0)
               OR substr(t, 1, 4)::int % 400 = 0 THEN 29 ELSE 28 END
      ELSE 31 END
  ELSE false END;

-- Is the text an RFC 3339 timestamp with a real calendar date and an explicit offset (ASCII
-- digits)? A leap second (:60) is accepted only without a fraction (or .000), as the cast does.
CREATE OR REPLACE FUNCTION etl.is_rfc3339(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN t ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9](\.[0-9]{1,9})?|60(\.0{1,9})?)([Zz]|[+-](0[0-9]|1[0-5]):[0-5][0-9])$'
     AND etl.is_ymd(substr(t, 1, 10));

-- YYYY-MM-DD text to date, NULL when it is not a real date.
CREATE OR REPLACE FUNCTION etl.to_date(t text) RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_ymd(t) THEN t::date END;

-- RFC 3339 text to timestamptz, NULL when it is not one.
CREATE OR REPLACE FUNCTION etl.to_timestamptz(t text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_rfc3339(t) THEN t::timestamptz END;

-- YYYY-MM-DD or RFC 3339 text to the calendar date as written, NULL when neither.
CREATE OR REPLACE FUNCTION etl.to_visit_date(t text) RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_ymd(t) THEN t::date
            WHEN etl.is_rfc3339(t) THEN substr(t, 1, 10)::date END;

-- The array itself, or an empty array for anything else (so element functions never raise).
CREATE OR REPLACE FUNCTION etl.jarr(j jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(j) = 'array' THEN j ELSE '[]'::jsonb END;

-- A string or number as text; NULL for JSON null, missing, or a structure.
CREATE OR REPLACE FUNCTION etl.jtext(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(j) IN ('string', 'number', 'boolean') THEN j #>> '{}' END;

-- Is an optional value absent: missing or JSON null? (An empty string is a value, and a problem.)
CREATE OR REPLACE FUNCTION etl.is_absent(j jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN j IS NULL OR jsonb_typeof(j) = 'null';

-- Is the value absent for a required field: missing, JSON null or the empty string?
CREATE OR REPLACE FUNCTION etl.is_blank(j jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN j IS NULL OR jsonb_typeof(j) = 'null' OR j = '""'::jsonb;

-- The name of a yearly visits partition.
CREATE OR REPLACE FUNCTION etl.visit_partition_name(y int) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'visits_y' || lpad(y::text, 4, '0');

-- The advisory lock a loader holds on its batch while it stages documents.
CREATE OR REPLACE FUNCTION etl.loader_lock_key(batch_id bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 4848000000000000 + batch_id;

-- The advisory lock that serializes transforms (one at a time keeps them deadlock-free).
CREATE OR REPLACE FUNCTION etl.transform_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 4848000000000000::bigint - 1;

-- Held shared by every running shard; a new transform takes it exclusively first, so it waits
-- for the shards of a coordinator that was lost (its connection ended while they ran).
CREATE OR REPLACE FUNCTION etl.shard_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 4848000000000000::bigint - 2;

-- Shards of a batch take turns on this at their end, so exactly the last one to commit finds
-- nothing left staged and finishes the batch (even if the coordinator is gone by then).
CREATE OR REPLACE FUNCTION etl.batch_finish_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 4848000000000000::bigint - 3;

-- Does backend p_pid hold the advisory lock p_key exclusively? (How a shard checks its coordinator.)
CREATE OR REPLACE FUNCTION etl.holds_advisory_lock(p_pid int, p_key bigint) RETURNS boolean
LANGUAGE sql STABLE
RETURN EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.pid = p_pid AND l.granted AND l.mode = 'ExclusiveLock'
      AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((l.classid::bigint << 32) | l.objid::bigint) = p_key);

-- The PL/pgSQL function of 0003/0004 that is not restated below.
ALTER FUNCTION etl.ensure_visit_partitions(int[]) SET search_path = pg_catalog, pg_temp;

-- ---- rules defined once: limits, identity, dates ---------------------------------------------

-- The most bytes a document's value may have where it goes into an index (a btree entry holds
-- about 2,700 bytes, and etl.patient_keys indexes source_system and patient_id together).
CREATE FUNCTION etl.max_key_bytes() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 1000;

-- A document's patient id as the patient's identity takes it: a number must be an integer and is
-- its decimal text (12, 12.0 and 1.2e1 are "12"); a string is NFC-normalised and trimmed of
-- spaces, tabs and line breaks ("12", " 12" are one id). NULL for anything else.
-- Restated from 0005 (it was the JSON text: 12 and 12.0 were two patients, NFC and NFD too).
CREATE OR REPLACE FUNCTION etl.patient_id_of(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE jsonb_typeof(j)
    WHEN 'number' THEN CASE WHEN j::numeric = trunc(j::numeric) THEN trunc(j::numeric)::text END
    WHEN 'string' THEN btrim(normalize(j #>> '{}', NFC), E' \t\r\n') END;

-- What is wrong with a document's patient_id (the text after "patient_id: "), NULL when nothing.
-- STABLE, not IMMUTABLE, like format(): an IMMUTABLE function calling a STABLE one is not inlined,
-- and this one is evaluated for every document (measured: 5x slower as a function call).
CREATE FUNCTION etl.patient_id_problem(j jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE
    WHEN etl.is_blank(j) THEN 'is required'
    WHEN jsonb_typeof(j) NOT IN ('string', 'number') THEN format('must be a string or a number (found %s)', jsonb_typeof(j))
    WHEN etl.patient_id_of(j) IS NULL THEN format('must be an integer when it is a number (found %s)', j::text)
    WHEN etl.patient_id_of(j) = '' THEN 'is required'
    WHEN octet_length(etl.patient_id_of(j)) > etl.max_key_bytes() THEN format('is longer than %s bytes', etl.max_key_bytes()) END;

-- What is wrong with a document's source_system, NULL when nothing (it is optional). STABLE, as
-- etl.patient_id_problem.
CREATE FUNCTION etl.source_system_problem(j jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE
    WHEN jsonb_typeof(j) NOT IN ('string', 'null') THEN format('must be a string (found %s)', jsonb_typeof(j))
    WHEN octet_length(j #>> '{}') > etl.max_key_bytes() THEN format('is longer than %s bytes', etl.max_key_bytes()) END;

-- What is wrong with a document's updated_at j (parsed: ts = etl.to_timestamptz of its text, done
-- once per document in t_docs) given when the document was received, NULL when nothing: absent is
-- fine (the oldest snapshot); otherwise RFC 3339 with an offset, and at most 24 hours after it was
-- received (the received time, not the clock, so a re-run decides the same way).
CREATE FUNCTION etl.updated_at_problem(j jsonb, ts timestamptz, received_at timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE
    WHEN etl.is_absent(j) THEN NULL
    WHEN ts IS NULL THEN format('%s is not an RFC 3339 timestamp with an offset', j::text)
    WHEN ts > received_at + interval '24 hours'
      THEN format('%s is more than 24 hours after the document was received', j::text) END;

-- Is a visit date's year one the visits table takes a partition for: 1900 to the year the
-- document was received + 1 (UTC)? Stricter plausibility is a data-quality check, not a reject.
-- (Date arithmetic, not extract(): extract returns numeric, and this runs for every visit.)
CREATE FUNCTION etl.visit_year_ok(d date, received_at timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN d >= DATE '1900-01-01' AND d < (date_trunc('year', received_at AT TIME ZONE 'UTC') + interval '2 years')::date;

-- ---- steps restated (each whole; its previous body is in the Down) ---------------------------

-- Settings for the transform's transaction, a clean slate of its temporary tables, and an empty
-- t_poison (document_id, sqlstate): documents found to make the server fail (etl.find_poison).
-- Restated from 0005: t_poison.
CREATE OR REPLACE FUNCTION etl.step_settings() RETURNS void
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
  DROP TABLE IF EXISTS pg_temp.t_docs, pg_temp.t_errors, pg_temp.t_visits, pg_temp.t_outcome, pg_temp.t_apply,
    pg_temp.t_dup, pg_temp.t_poison, pg_temp.t_deleted;
  CREATE TEMP TABLE t_poison (document_id bigint PRIMARY KEY, sqlstate text NOT NULL) ON COMMIT DROP;
END
$$;

-- Reads the batch's staged documents (of this shard; only p_only's when given) from landing;
-- writes t_docs (the top-level fields, extracted once; updated_at parsed once, as updated_ts; when
-- the document was received) and an empty t_outcome (document_id, status).
-- Restated from 0005: received_at, updated_ts, p_only.
DROP FUNCTION etl.step_documents(bigint, int, int);
CREATE FUNCTION etl.step_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
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

-- Reads t_poison, t_docs, t_outcome and landing; writes the rejects of the documents the server
-- refused while transforming them (etl.find_poison found them), whose reason is the SQLSTATE
-- only, never the server's message (it can quote a value), and t_outcome 'rejected'.
CREATE FUNCTION etl.step_poison() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM t_poison) THEN
    RETURN;
  END IF;
  PERFORM etl.clear_new_rejects();
  INSERT INTO t_new_rejects
  SELECT r.content_sha256, r.document_id, r.batch_id, r.source_file, r.line, r.item, r.byte_offset, '$', x.reason, ARRAY[x.reason]
  FROM t_poison p
  JOIN t_docs d ON d.document_id = p.document_id
  JOIN landing.raw_documents r ON r.document_id = p.document_id
  CROSS JOIN LATERAL (SELECT format('$: PostgreSQL refused the document while transforming it (SQLSTATE %s)', p.sqlstate) AS reason) x
  WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = p.document_id);
  PERFORM etl.record_rejects();
  INSERT INTO t_outcome
  SELECT p.document_id, 'rejected' FROM t_poison p JOIN t_docs d ON d.document_id = p.document_id
  WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = p.document_id);
END
$$;

-- Reads t_docs, t_outcome; writes t_errors (document_id, sort_key, field, reason) for the
-- document-level rules. sort_key orders a document's reasons: the first one is reported.
-- Restated from 0005: patient_id and source_system by etl.patient_id_problem and
-- etl.source_system_problem (integers, lengths), and updated_at (etl.updated_at_problem).
CREATE OR REPLACE FUNCTION etl.step_document_rules() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_errors (document_id bigint, sort_key int[], field text, reason text) ON COMMIT DROP;
  INSERT INTO t_errors
  SELECT d.document_id, ARRAY[0, c.n], c.field, c.field || ': ' || c.msg
  FROM t_docs d
  CROSS JOIN LATERAL (VALUES
    (1, '$', CASE WHEN d.doc_type <> 'object' THEN format('document is not a JSON object (found %s)', d.doc_type) END),
    (2, 'patient_id', CASE WHEN d.doc_type = 'object' THEN etl.patient_id_problem(d.patient_id) END),
    (3, 'source_system', CASE WHEN d.doc_type = 'object' THEN etl.source_system_problem(d.source_system) END),
    (4, 'visits', CASE WHEN d.doc_type = 'object' AND d.visits_type NOT IN ('array', 'null')
        THEN format('must be an array (found %s)', d.visits_type) END),
    (5, 'updated_at', CASE WHEN d.doc_type = 'object' THEN etl.updated_at_problem(d.updated_at, d.updated_ts, d.received_at) END)
  ) AS c(n, field, msg)
  WHERE c.msg IS NOT NULL
    AND (d.doc_type <> 'object' OR etl.patient_id_problem(d.patient_id) IS NOT NULL
         OR etl.source_system_problem(d.source_system) IS NOT NULL OR d.visits_type NOT IN ('array', 'null')
         OR etl.updated_at_problem(d.updated_at, d.updated_ts, d.received_at) IS NOT NULL)
    AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id);
END
$$;

-- Visits and child rows deleted from replaced patients, per transform of a batch or shard (each
-- shard adds its own row: shards never update a shared row). etl.batch_summary sums them.
CREATE TABLE etl.batch_deletes (
  batch_id        bigint NOT NULL,
  visits          bigint NOT NULL,
  diagnoses       bigint NOT NULL,
  treatments      bigint NOT NULL,
  provider_notes  bigint NOT NULL,
  deleted_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX batch_deletes_batch_idx ON etl.batch_deletes (batch_id);
COMMENT ON TABLE etl.batch_deletes IS 'Rows deleted from replaced patients by each transform of a batch (or shard).';

-- Reads t_apply; deletes the replaced patients' visits and children from clinical (the new
-- snapshot replaces them whole); writes t_deleted and etl.batch_deletes: how many of each went.
-- Restated from 0005 (as a new function: it takes the batch id now) to count what it deletes.
DROP FUNCTION etl.step_delete_replaced();
CREATE FUNCTION etl.step_delete_replaced(p_batch_id bigint) RETURNS void
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

-- Reads t_docs, t_outcome and the landing payloads; writes t_visits (one row per visit of the
-- documents still in play, keys taken from the sequence up front, `bad` marking the few rows
-- the visit and child rules must look at) and t_dup (visit_ids repeated within a document).
-- Restated from 0005: received_at, and `bad` also marks a visit_id over etl.max_key_bytes(), a
-- visit year etl.visit_year_ok refuses, and diagnoses bigger than etl.max_key_bytes() in all (a
-- cheap screen for a code over the limit: pg_column_size reads a length; a like_regex on every
-- code cost 0.7 s per 50,000 patients; etl.step_child_rules measures each code).
CREATE OR REPLACE FUNCTION etl.step_visits() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_visits ON COMMIT DROP AS
  SELECT v.*,
         (v.vtype <> 'object' OR etl.is_blank(v.vid_j) OR jsonb_typeof(v.vid_j) NOT IN ('string', 'number')
          OR v.visit_date IS NULL
          OR coalesce(octet_length(v.vid) > etl.max_key_bytes(), false)
          OR coalesce(NOT etl.visit_year_ok(v.visit_date, v.received_at), false)
          OR coalesce(jsonb_typeof(v.v -> 'diagnoses') NOT IN ('array', 'null'), false)
          OR coalesce(jsonb_typeof(v.v -> 'treatments') NOT IN ('array', 'null'), false)
          OR coalesce(jsonb_typeof(v.v -> 'provider_notes') NOT IN ('array', 'null'), false)
          -- children without their required field, or not objects (jsonpath: one C-level pass)
          -- (type() does not unwrap arrays, so an array or object code/text is caught too)
          OR v.v @? '$.diagnoses[*] ? (@.type() != "object" || !exists(@.code) || @.code == ""
                                       || (@.code.type() != "string" && @.code.type() != "number"))'
          OR coalesce(pg_column_size(v.v -> 'diagnoses') > etl.max_key_bytes(), false)
          OR v.v @? '$.treatments[*] ? (@.type() != "object")'
          OR v.v @? '$.provider_notes[*] ? (@.type() != "object" || !exists(@.text) || @.text == ""
                                            || (@.text.type() != "string" && @.text.type() != "number"))'
         ) AS bad
  FROM (
    SELECT d.document_id,
           d.received_at,
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
-- Restated from 0005: a visit_id over etl.max_key_bytes(), a visit year etl.visit_year_ok refuses.
CREATE OR REPLACE FUNCTION etl.step_visit_rules() RETURNS void
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
        WHEN octet_length(v.vid) > etl.max_key_bytes() THEN format('is longer than %s bytes', etl.max_key_bytes())
        WHEN v.position > v.first_pos
          THEN format('%s is a duplicate of visits[%s].visit_id', to_json(v.vid), v.first_pos) END END),
    (3, format('visits[%s].visit_date', v.position), CASE WHEN v.vtype = 'object' THEN CASE
        WHEN etl.is_blank(v.v -> 'visit_date') THEN 'is required'
        WHEN v.visit_date IS NULL THEN format('%s is not a valid date', (v.v -> 'visit_date')::text)
        WHEN NOT etl.visit_year_ok(v.visit_date, v.received_at)
          THEN format('%s is outside the years 1900 to %s', (v.v -> 'visit_date')::text,
                      extract(year FROM v.received_at AT TIME ZONE 'UTC')::int + 1) END END),
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
-- NOT NULL text: an array or object there must be a reject, not a failed batch); a diagnosis
-- code is indexed, so at most etl.max_key_bytes(). Restated from 0005: the code's length.
CREATE OR REPLACE FUNCTION etl.step_child_rules() RETURNS void
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
              WHEN jsonb_typeof(c.e -> k.required) NOT IN ('string', 'number')
              THEN format('visits[%s].%s[%s].%s: must be a string or a number (found %s)',
                          tv.position, k.kind, c.ord - 1, k.required, jsonb_typeof(c.e -> k.required))
              ELSE format('visits[%s].%s[%s].%s: is longer than %s bytes',
                          tv.position, k.kind, c.ord - 1, k.required, etl.max_key_bytes()) END
  FROM t_visits tv
  CROSS JOIN LATERAL (VALUES (1, 'diagnoses', 'code', true), (2, 'treatments', NULL, false), (3, 'provider_notes', 'text', false))
    AS k(n, kind, required, indexed)
  CROSS JOIN LATERAL jsonb_array_elements(etl.jarr(tv.v -> k.kind)) WITH ORDINALITY AS c(e, ord)
  WHERE tv.bad AND tv.vtype = 'object'
    AND (jsonb_typeof(c.e) <> 'object'
         OR (k.required IS NOT NULL AND (etl.is_blank(c.e -> k.required)
                                         OR jsonb_typeof(c.e -> k.required) NOT IN ('string', 'number')))
         OR (k.indexed AND octet_length(c.e ->> k.required) > etl.max_key_bytes()));
END
$$;

-- Reads t_docs, t_outcome, etl.patient_keys, clinical.patients; writes t_apply (the newest
-- snapshot per patient, when it is newer than the current one) and t_outcome 'superseded'.
-- Order of snapshots: updated_at (missing = oldest; invalid is a reject now), then arrival
-- (document_id). Restated from 0005: updated_at parsed once, in t_docs (updated_ts).
CREATE OR REPLACE FUNCTION etl.step_snapshots() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_apply ON COMMIT DROP AS
  WITH cand AS (
    SELECT d.document_id, d.content_sha256,
           etl.source_system_of(d.source_system)      AS source_system,
           etl.patient_id_of(d.patient_id)            AS source_patient_id,
           d.updated_ts                               AS updated_at
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

-- Reads t_visits, t_apply; writes clinical.treatments, and etl.document_problems for an unknown
-- type, an invalid start or end date, or a name over etl.max_key_bytes() (it is indexed; the
-- name is optional, so it loads as NULL). Restated from 0005: the name's length.
CREATE OR REPLACE FUNCTION etl.step_treatments(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*,
           CASE WHEN etl.is_absent(x.type) THEN 'medication'
                WHEN x.type #>> '{}' = ANY (etl.treatment_types()) THEN x.type #>> '{}' END AS treatment_type,
           etl.to_visit_date(x.start_date #>> '{}') AS start_d,
           etl.to_visit_date(x.end_date #>> '{}') AS end_d,
           octet_length(etl.jtext(x.name)) > etl.max_key_bytes() AS name_too_long
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
           etl.jtext(s.code), etl.jtext(s.system), CASE WHEN s.name_too_long THEN NULL ELSE etl.jtext(s.name) END,
           etl.jtext(s.dose), etl.jtext(s.route), etl.jtext(s.frequency), s.start_d, s.end_d
    FROM src s
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].treatments[%s].%s', s.vpos, s.position, f.field), f.problem
  FROM src s
  CROSS JOIN LATERAL (VALUES
    ('type', CASE WHEN s.treatment_type IS NULL THEN 'not one of ' || array_to_string(etl.treatment_types(), ', ') END),
    ('name', CASE WHEN s.name_too_long THEN format('longer than %s bytes', etl.max_key_bytes()) END),
    ('start_date', CASE WHEN s.start_d IS NULL AND NOT etl.is_absent(s.start_date) THEN 'not a valid date' END),
    ('end_date', CASE WHEN s.end_d IS NULL AND NOT etl.is_absent(s.end_date) THEN 'not a valid date' END)
  ) AS f(field, problem)
  WHERE (s.treatment_type IS NULL OR s.start_d IS NULL OR s.end_d IS NULL OR s.name_too_long) AND f.problem IS NOT NULL;
END
$$;

-- Reads t_apply, t_docs, t_visits; writes etl.document_problems for the patient- and visit-level
-- optional values that are invalid (loaded as NULL; the problem names the field, never the value).
-- Restated from 0005: an invalid updated_at is a reject now (etl.step_document_rules).
CREATE OR REPLACE FUNCTION etl.step_problems(p_batch_id bigint) RETURNS void
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
           OR (etl.visit_type_of(tv0.type_raw) IS NULL AND tv0.type_raw IS NOT NULL)) tv
  CROSS JOIN LATERAL (VALUES
    ('discharge_date', CASE WHEN tv.discharge_raw IS NOT NULL AND etl.to_visit_date(tv.discharge_raw) IS NULL THEN 'not a valid date' END),
    ('visit_type', CASE WHEN etl.visit_type_of(tv.type_raw) IS NULL AND tv.type_raw IS NOT NULL
                        THEN 'not one of ' || array_to_string(etl.visit_types(), ', ') END)
  ) AS c(field, problem)
  WHERE c.problem IS NOT NULL;
END
$$;

-- Reads t_apply, t_outcome; writes t_outcome 'loaded', the outcomes onto the landing rows, and
-- finishes the batch when nothing of it is left staged (etl.finish_batch). A duplicate, or a
-- rejected content delivered before, keeps its landing row (every document is accounted for)
-- but not its payload: nothing needs it, and a re-sent file no longer doubles the landing table.
-- Shards take turns at the end: each then sees the shards committed before it, so the last one
-- finds nothing staged and finishes the batch (a failed shard leaves its documents staged).
-- Restated from 0005: payloads of duplicates and repeated rejects are dropped.
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

-- Mark a batch transformed once none of its documents is left staged (after all its shards),
-- clearing the error of a failed earlier attempt. Returns whether it did.
-- Restated from 0004: the error is cleared.
CREATE OR REPLACE FUNCTION etl.finish_batch(p_batch_id bigint) RETURNS boolean
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  WITH done AS (
    UPDATE etl.batches b
    SET status = 'transformed', transformed_at = clock_timestamp(), staged_at = coalesce(b.staged_at, clock_timestamp()),
        error = NULL
    WHERE b.batch_id = p_batch_id AND b.status <> 'transformed'
      AND NOT EXISTS (SELECT 1 FROM landing.raw_documents d WHERE d.batch_id = p_batch_id AND d.status = 'staged')
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM done)
$$;

-- Record why a batch could not be transformed: its SQLSTATE and a message without values from
-- the data (the caller's). The batch stays staged (the next run tries again); etl.batch_summary
-- shows the error until a transform finishes the batch.
CREATE FUNCTION etl.record_batch_failure(p_batch_id bigint, p_sqlstate text, p_message text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  UPDATE etl.batches SET error = format('SQLSTATE %s at %s: %s', p_sqlstate, to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), p_message)
  WHERE batch_id = p_batch_id AND status <> 'transformed'
$$;

-- Create the visits partitions the staged documents of one shard of a batch need, in the
-- caller's (short) transaction, before the shard's transform. Returns how many it created.
-- strict + silent: a document whose visits are malformed yields no year (it will be rejected).
-- Only for documents the document-level identity rules accept and years etl.visit_year_ok
-- accepts (a rejected document's years would only make empty partitions; one rejected by another
-- rule may still add one). No JIT, for the reason given in etl.step_settings.
-- Restated from 0004: the identity rules and the year range are the transform's own functions.
CREATE OR REPLACE FUNCTION etl.ensure_batch_partitions(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1) RETURNS int
LANGUAGE sql SET jit = off SET search_path = pg_catalog, pg_temp AS $$
  SELECT etl.ensure_visit_partitions(ARRAY(
    SELECT DISTINCT extract(year FROM vd.d)::int
    FROM landing.raw_documents r
    CROSS JOIN LATERAL jsonb_to_record(CASE WHEN jsonb_typeof(r.payload) = 'object' THEN r.payload ELSE '{}'::jsonb END)
      AS x(source_system jsonb, patient_id jsonb, visits jsonb)
    CROSS JOIN LATERAL jsonb_path_query(x.visits, 'strict $[*].visit_date', '{}', true) AS v(d)
    CROSS JOIN LATERAL (SELECT etl.to_visit_date(v.d #>> '{}') AS d) vd
    WHERE r.batch_id = p_batch_id AND r.status = 'staged'
      AND etl.shard_of(x.source_system, x.patient_id, p_shards) = p_shard
      AND etl.patient_id_problem(x.patient_id) IS NULL AND etl.source_system_problem(x.source_system) IS NULL
      AND etl.visit_year_ok(vd.d, r.received_at)))
$$;

-- ---- the driver, and the last line of defence ------------------------------------------------

-- Run the transform's steps over the staged documents of a batch (or shard): all of them, or
-- only p_only's (a trial of etl.find_poison). Documents in t_poison are rejected, not transformed.
CREATE FUNCTION etl.transform_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
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

-- One trial of the transform on some documents, rolled back whatever happens: NULL when it
-- succeeds, else the SQLSTATE of the data error (classes 22, 23, 54) it meets; others propagate.
CREATE FUNCTION etl.try_transform(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM etl.transform_documents(p_batch_id, p_shard, p_shards, p_only);
  RAISE EXCEPTION 'a trial transform is always rolled back' USING ERRCODE = 'HE009';
EXCEPTION
  WHEN SQLSTATE 'HE009' THEN
    RETURN NULL;
  WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded THEN
    RETURN SQLSTATE;
END
$$;

-- Find the documents of a batch (or shard) that make its transform fail on a data error, by
-- halving, each trial rolled back inside the caller's transaction: of a range known to fail, the
-- first half is tried; if it fails it is halved in turn and the second half is tried later; if it
-- passes, the second half is the one (inferred, confirmed by a trial once it is one document,
-- in case the failure came from two documents together). Found documents go into t_poison with
-- their SQLSTATE. At most 128 trials (one bad document among 50,000 takes about 17, three about
-- 60). Returns how many it found.
CREATE FUNCTION etl.find_poison(p_batch_id bigint, p_shard int, p_shards int, p_sqlstate text) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_ids bigint[];
  v_lo int[];     -- a stack of ranges [lo, hi) of v_ids, each with its SQLSTATE and what is known:
  v_hi int[];     -- 'failed' (tried), 'inferred' (its sibling passed) or 'unknown'
  v_state text[];
  v_known text[];
  lo int;
  hi int;
  mid int;
  st text;
  known text;
  v_trials int := 0;
  v_found int := 0;
BEGIN
  SELECT array_agg(d.document_id ORDER BY d.document_id) INTO v_ids
  FROM landing.raw_documents d
  CROSS JOIN LATERAL jsonb_to_record(CASE WHEN jsonb_typeof(d.payload) = 'object' THEN d.payload ELSE '{}'::jsonb END)
    AS x(source_system jsonb, patient_id jsonb)
  WHERE d.batch_id = p_batch_id AND d.status = 'staged'
    AND (p_shards = 1 OR etl.shard_of(x.source_system, x.patient_id, p_shards) = p_shard)
    AND NOT EXISTS (SELECT 1 FROM t_poison p WHERE p.document_id = d.document_id);
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  v_lo := ARRAY[1];
  v_hi := ARRAY[cardinality(v_ids) + 1];
  v_state := ARRAY[p_sqlstate];
  v_known := ARRAY['failed'];
  WHILE cardinality(v_lo) > 0 LOOP
    lo := v_lo[cardinality(v_lo)];
    hi := v_hi[cardinality(v_hi)];
    st := v_state[cardinality(v_state)];
    known := v_known[cardinality(v_known)];
    v_lo := trim_array(v_lo, 1);
    v_hi := trim_array(v_hi, 1);
    v_state := trim_array(v_state, 1);
    v_known := trim_array(v_known, 1);
    IF known = 'unknown' OR (known = 'inferred' AND hi - lo = 1) THEN
      IF v_trials >= 128 THEN
        RETURN v_found;
      END IF;
      v_trials := v_trials + 1;
      st := etl.try_transform(p_batch_id, p_shard, p_shards, v_ids[lo:hi - 1]);
      CONTINUE WHEN st IS NULL;
    END IF;
    IF hi - lo = 1 THEN
      INSERT INTO t_poison (document_id, sqlstate) VALUES (v_ids[lo], st);
      v_found := v_found + 1;
      CONTINUE;
    END IF;
    IF v_trials >= 128 THEN
      RETURN v_found;
    END IF;
    v_trials := v_trials + 1;
    mid := (lo + hi) / 2;
    v_lo := v_lo || mid;
    v_hi := v_hi || hi;
    v_state := v_state || st;
    st := etl.try_transform(p_batch_id, p_shard, p_shards, v_ids[lo:mid - 1]);
    IF st IS NOT NULL THEN
      v_known := v_known || 'unknown'::text;
      v_lo := v_lo || lo;
      v_hi := v_hi || mid;
      v_state := v_state || st;
      v_known := v_known || 'failed'::text;
    ELSE
      v_known := v_known || 'inferred'::text;
    END IF;
  END LOOP;
  RETURN v_found;
END
$$;

-- Transform one staged batch (or one shard of it) into the clinical tables, atomically, and
-- return the outcome counts of the documents it took. Restated from 0005: when the steps fail on
-- a data error (SQLSTATE classes 22, 23 and 54 only: not 53, a server short of memory is not a
-- bad document), the documents that cause it are found (etl.find_poison) and rejected with the
-- SQLSTATE, and the steps run again without them, in the same transaction (so --shards 1 is
-- still one transaction per batch). If none is found, the error propagates as before.
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
-- Returns, besides the outcome counts, how many visits and child rows (diagnoses, treatments,
-- notes) it deleted from replaced patients: a snapshot without visits deletes them all, as the
-- contract says, and a mistake of that size should be seen (healthetl run and status print it).
DROP FUNCTION etl.transform_batch(bigint, int, int, int);
CREATE FUNCTION etl.transform_batch(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1,
                                    p_coordinator int DEFAULT NULL)
RETURNS TABLE (documents bigint, loaded bigint, rejected bigint, duplicate bigint, superseded bigint, problems bigint,
               deleted_visits bigint, deleted_children bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  PERFORM etl.step_lock_batch(p_batch_id, p_shard, p_shards, p_coordinator);
  PERFORM etl.step_settings();
  BEGIN
    PERFORM etl.transform_documents(p_batch_id, p_shard, p_shards, NULL);
  EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded THEN
    PERFORM etl.find_poison(p_batch_id, p_shard, p_shards, SQLSTATE);
    PERFORM etl.transform_documents(p_batch_id, p_shard, p_shards, NULL);
  END;

  RETURN QUERY
  SELECT count(*),
         count(*) FILTER (WHERE o.status = 'loaded'),
         count(*) FILTER (WHERE o.status = 'rejected'),
         count(*) FILTER (WHERE o.status = 'duplicate'),
         count(*) FILTER (WHERE o.status = 'superseded'),
         (SELECT count(*) FROM etl.document_problems p JOIN t_outcome t ON t.document_id = p.document_id
          WHERE p.batch_id = p_batch_id),
         coalesce((SELECT sum(x.visits) FROM t_deleted x), 0)::bigint,
         coalesce((SELECT sum(x.diagnoses + x.treatments + x.provider_notes) FROM t_deleted x), 0)::bigint
  FROM t_outcome o;
END
$fn$;
COMMENT ON FUNCTION etl.transform_batch(bigint, int, int, int) IS
  'Transform one staged batch (or one shard of it) into the clinical tables in one transaction; returns outcome counts.';

-- ---- bookkeeping ---------------------------------------------------------------------------

-- Counts of a batch's documents by outcome, restated from 0004 with columns added at the end:
-- error, why the last attempt to transform the batch failed (etl.record_batch_failure), until a
-- transform finishes it (healthetl status reports such a batch as failed); deleted_visits and
-- deleted_children, the rows its snapshots deleted from replaced patients (etl.batch_deletes).
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

-- ---- patient identity: existing ids in the canonical form ------------------------------------

-- Every patient's id is recomputed from its current snapshot's patient_id (a number and a string
-- are told apart there; without a snapshot the stored text is taken as a string). Patients whose
-- ids become one are merged: the newest snapshot (updated_at, then arrival) keeps its key and rows;
-- the others' clinical rows go and their current documents count as superseded.
CREATE TEMP TABLE t_canon ON COMMIT DROP AS
SELECT k.patient_key, k.source_system, k.source_patient_id AS old_id,
       -- an id without a canonical form (12.5, or blank) keeps its text: it is not merged with others
       coalesce(nullif(CASE WHEN r.payload IS NOT NULL THEN etl.patient_id_of(r.payload -> 'patient_id')
                            ELSE etl.patient_id_of(to_jsonb(k.source_patient_id)) END, ''), k.source_patient_id) AS new_id,
       p.document_id, coalesce(p.source_updated_at, '-infinity') AS updated_at
FROM etl.patient_keys k
LEFT JOIN clinical.patients p ON p.patient_key = k.patient_key
LEFT JOIN landing.raw_documents r ON r.document_id = p.document_id;

CREATE TEMP TABLE t_merged ON COMMIT DROP AS
SELECT c.patient_key, c.document_id
FROM (SELECT c.*, row_number() OVER (PARTITION BY c.source_system, c.new_id
                                     ORDER BY c.updated_at DESC, c.document_id DESC NULLS LAST) AS rn
      FROM t_canon c) c
WHERE c.rn > 1;

DELETE FROM clinical.provider_notes x USING t_merged m WHERE x.patient_key = m.patient_key;
DELETE FROM clinical.treatments x USING t_merged m WHERE x.patient_key = m.patient_key;
DELETE FROM clinical.diagnoses x USING t_merged m WHERE x.patient_key = m.patient_key;
DELETE FROM clinical.visits x USING t_merged m WHERE x.patient_key = m.patient_key;
DELETE FROM clinical.patients x USING t_merged m WHERE x.patient_key = m.patient_key;
UPDATE landing.raw_documents d SET status = 'superseded' FROM t_merged m WHERE d.document_id = m.document_id;
DELETE FROM etl.patient_keys k USING t_merged m WHERE k.patient_key = m.patient_key;
UPDATE etl.patient_keys k SET source_patient_id = c.new_id
FROM t_canon c WHERE c.patient_key = k.patient_key AND c.new_id <> c.old_id;
UPDATE clinical.patients p SET source_patient_id = c.new_id
FROM t_canon c WHERE c.patient_key = p.patient_key AND c.new_id <> c.old_id;

-- Current snapshots dated more than 24 hours after they were received froze their patients: every
-- genuine later update was superseded. Their order date is cleared (the oldest), so the next
-- snapshot wins; the Down restores it from the payload.
CREATE TEMP TABLE t_unfrozen ON COMMIT DROP AS
SELECT p.patient_key FROM clinical.patients p JOIN landing.raw_documents d ON d.document_id = p.document_id
WHERE p.source_updated_at > d.received_at + interval '24 hours';
UPDATE clinical.patients p SET source_updated_at = NULL FROM t_unfrozen u WHERE u.patient_key = p.patient_key;

DO $$
DECLARE
  v_rewritten bigint;
  v_merged bigint;
BEGIN
  SELECT count(*) INTO v_rewritten FROM t_canon c WHERE c.new_id <> c.old_id
    AND NOT EXISTS (SELECT 1 FROM t_merged m WHERE m.patient_key = c.patient_key);
  SELECT count(*) INTO v_merged FROM t_merged;
  RAISE NOTICE 'patient ids in canonical form: % rewritten; % patients merged into the patient with the newest snapshot of the same id; % patients whose updated_at was more than 24 hours after it was received no longer block later snapshots',
    v_rewritten, v_merged, (SELECT count(*) FROM t_unfrozen);
END
$$;

-- Down Migration
-- Merged patients stay merged and ids stay in their canonical form (valid under 0005's rules too);
-- everything else is restored as 0005 left it.
SET LOCAL search_path = pg_catalog, pg_temp;

-- Snapshots dated far ahead get their order date back (the Up cleared it).
UPDATE clinical.patients p SET source_updated_at = etl.to_timestamptz(d.payload ->> 'updated_at')
FROM landing.raw_documents d
WHERE d.document_id = p.document_id AND p.source_updated_at IS NULL
  AND etl.to_timestamptz(d.payload ->> 'updated_at') > d.received_at + interval '24 hours';

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
         AS balanced
FROM etl.batches b
CROSS JOIN LATERAL (SELECT coalesce(sum(f.documents), 0)::bigint AS loader_count FROM etl.batch_files f WHERE f.batch_id = b.batch_id) lf
LEFT JOIN landing.raw_documents d ON d.batch_id = b.batch_id
GROUP BY b.batch_id, lf.loader_count;
COMMENT ON VIEW etl.batch_summary IS 'One row per batch: documents received and what became of them; balanced says whether they add up.';

-- 0005's driver, whole.
DROP FUNCTION etl.transform_batch(bigint, int, int, int);
CREATE FUNCTION etl.transform_batch(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1,
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
COMMENT ON FUNCTION etl.transform_batch(bigint, int, int, int) IS
  'Transform one staged batch (or one shard of it) into the clinical tables in one transaction; returns outcome counts.';
DROP FUNCTION etl.find_poison(bigint, int, int, text);
DROP FUNCTION etl.try_transform(bigint, int, int, bigint[]);
DROP FUNCTION etl.transform_documents(bigint, int, int, bigint[]);
DROP FUNCTION etl.record_batch_failure(bigint, text, text);

-- 0004's ensure_batch_partitions and finish_batch, whole.
CREATE OR REPLACE FUNCTION etl.ensure_batch_partitions(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1) RETURNS int
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

CREATE OR REPLACE FUNCTION etl.finish_batch(p_batch_id bigint) RETURNS boolean
LANGUAGE sql AS $$
  WITH done AS (
    UPDATE etl.batches b
    SET status = 'transformed', transformed_at = clock_timestamp(), staged_at = coalesce(b.staged_at, clock_timestamp())
    WHERE b.batch_id = p_batch_id AND b.status <> 'transformed'
      AND NOT EXISTS (SELECT 1 FROM landing.raw_documents d WHERE d.batch_id = p_batch_id AND d.status = 'staged')
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM done)
$$;

-- 0005's steps, whole.
CREATE OR REPLACE FUNCTION etl.step_outcomes(p_batch_id bigint, p_shards int) RETURNS void
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

CREATE OR REPLACE FUNCTION etl.step_problems(p_batch_id bigint) RETURNS void
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

CREATE OR REPLACE FUNCTION etl.step_treatments(p_batch_id bigint) RETURNS void
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

CREATE OR REPLACE FUNCTION etl.step_child_rules() RETURNS void
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

CREATE OR REPLACE FUNCTION etl.step_visit_rules() RETURNS void
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

CREATE OR REPLACE FUNCTION etl.step_visits() RETURNS void
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

CREATE OR REPLACE FUNCTION etl.step_document_rules() RETURNS void
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

CREATE OR REPLACE FUNCTION etl.step_settings() RETURNS void
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

DROP FUNCTION etl.step_delete_replaced(bigint);
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
DROP TABLE etl.batch_deletes;
CREATE OR REPLACE FUNCTION etl.step_snapshots() RETURNS void
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

DROP FUNCTION etl.step_poison();
DROP FUNCTION etl.step_documents(bigint, int, int, bigint[]);
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

DROP FUNCTION etl.visit_year_ok(date, timestamptz);
DROP FUNCTION etl.updated_at_problem(jsonb, timestamptz, timestamptz);
DROP FUNCTION etl.source_system_problem(jsonb);
DROP FUNCTION etl.patient_id_problem(jsonb);
CREATE OR REPLACE FUNCTION etl.patient_id_of(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN etl.jtext(j);
DROP FUNCTION etl.max_key_bytes();

ALTER FUNCTION etl.ensure_visit_partitions(int[]) RESET search_path;

-- The helpers of 0003 and 0004, whole.
CREATE OR REPLACE FUNCTION etl.holds_advisory_lock(p_pid int, p_key bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.pid = p_pid AND l.granted AND l.mode = 'ExclusiveLock'
      AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((l.classid::bigint << 32) | l.objid::bigint) = p_key)
$$;

CREATE OR REPLACE FUNCTION etl.batch_finish_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 4848000000000000::bigint - 3
$$;

CREATE OR REPLACE FUNCTION etl.shard_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 4848000000000000::bigint - 2
$$;

CREATE OR REPLACE FUNCTION etl.transform_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 4848000000000000::bigint - 1
$$;

CREATE OR REPLACE FUNCTION etl.loader_lock_key(batch_id bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 4848000000000000 + batch_id
$$;

CREATE OR REPLACE FUNCTION etl.visit_partition_name(y int) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 'visits_y' || lpad(y::text, 4, '0')
$$;

CREATE OR REPLACE FUNCTION etl.is_blank(j jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT j IS NULL OR jsonb_typeof(j) = 'null' OR j = '""'::jsonb
$$;

CREATE OR REPLACE FUNCTION etl.is_absent(j jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT j IS NULL OR jsonb_typeof(j) = 'null'
$$;

CREATE OR REPLACE FUNCTION etl.jtext(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN jsonb_typeof(j) IN ('string', 'number', 'boolean') THEN j #>> '{}' END
$$;

CREATE OR REPLACE FUNCTION etl.jarr(j jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN jsonb_typeof(j) = 'array' THEN j ELSE '[]'::jsonb END
$$;

CREATE OR REPLACE FUNCTION etl.to_visit_date(t text) RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN etl.is_ymd(t) THEN t::date
              WHEN etl.is_rfc3339(t) THEN substr(t, 1, 10)::date END
$$;

CREATE OR REPLACE FUNCTION etl.to_timestamptz(t text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN etl.is_rfc3339(t) THEN t::timestamptz END
$$;

CREATE OR REPLACE FUNCTION etl.to_date(t text) RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN etl.is_ymd(t) THEN t::date END
$$;

CREATE OR REPLACE FUNCTION etl.is_rfc3339(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT t ~ '^\d{4}-\d{2}-\d{2}[Tt ]([01]\d|2[0-3]):[0-5]\d:([0-5]\d(\.\d{1,9})?|60(\.0{1,9})?)([Zz]|[+-](0\d|1[0-5]):[0-5]\d)$'
     AND etl.is_ymd(substr(t, 1, 10))
$$;

CREATE OR REPLACE FUNCTION etl.is_ymd(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN t ~ '^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$' THEN
    substr(t, 1, 4)::int >= 1
    AND substr(t, 9, 2)::int <= CASE
      WHEN substr(t, 6, 2)::int IN (4, 6, 9, 11) THEN 30
      WHEN substr(t, 6, 2)::int = 2 THEN
        CASE WHEN (substr(t, 1, 4)::int % 4 = 0 AND substr(t, 1, 4)::int % 100 <> 0)
               OR substr(t, 1, 4)::int % 400 = 0 THEN 29 ELSE 28 END
      ELSE 31 END
  ELSE false END
$$;
