-- Up Migration
-- FHIR R4 input (issue 12). The loader stages one landing row per resource (a Bundle is split into
-- its entries at load), format 'fhir-r4', with its resourceType and the source system it was
-- loaded under. The transform maps them beside the patient documents, set-based, one step per
-- resource type; the unit of accounting is the resource:
--   received = loaded + rejected + duplicate + superseded + erased + waiting.
-- A resource whose Patient or Encounter has not arrived yet is 'waiting': it keeps its payload and
-- every later transform of its shard looks at it again. etl.fhir_resources is the version index:
-- the current landing row of each (source system, type, id), with the patient and visit it became.
-- Restated: etl.step_documents (patient documents only), etl.step_poison (any landing row),
-- etl.replay_patients (FHIR patients are kept), etl.step_erased (FHIR resources too),
-- etl.step_visit_partitions (through etl.need_visit_partitions, which the Encounters share),
-- etl.transform_documents (the FHIR steps), etl.ensure_batch_partitions (Encounter years),
-- etl.stage_known_file (copies the new columns), etl.erase_patient and etl.erase_patient_rows
-- (FHIR resources name their patient by reference), etl.purge (keeps what FHIR still needs),
-- etl.batch_summary (waiting), the analyst views (death, onset, clinical status, visit end).
SET LOCAL search_path = pg_catalog, pg_temp;

-- Landing. NOT VALID then VALIDATE: the widened checks scan the table without blocking the loader.
ALTER TABLE landing.raw_documents
  ADD COLUMN resource_type text,   -- FHIR resourceType (NULL for patient documents)
  ADD COLUMN source_system text;   -- FHIR: the --source-system the resource was loaded under
ALTER TABLE landing.raw_documents DROP CONSTRAINT raw_documents_format_check;
ALTER TABLE landing.raw_documents ADD CONSTRAINT raw_documents_format_check
  CHECK (format IN ('ndjson', 'json', 'fhir-r4')) NOT VALID;
ALTER TABLE landing.raw_documents VALIDATE CONSTRAINT raw_documents_format_check;
ALTER TABLE landing.raw_documents DROP CONSTRAINT raw_documents_status_check;
ALTER TABLE landing.raw_documents ADD CONSTRAINT raw_documents_status_check
  CHECK (status IN ('staged', 'loaded', 'rejected', 'duplicate', 'superseded', 'erased', 'waiting')) NOT VALID;
ALTER TABLE landing.raw_documents VALIDATE CONSTRAINT raw_documents_status_check;
-- Every transform reads the waiting rows: a small partial index, empty when nothing waits.
CREATE INDEX raw_documents_waiting_idx ON landing.raw_documents (document_id) WHERE status = 'waiting';
-- Encounters name their Practitioner and Organization by id (bundles): found here, few rows.
CREATE INDEX raw_documents_fhir_directory_idx ON landing.raw_documents (resource_type, (payload ->> 'id'))
  WHERE resource_type IN ('Practitioner', 'Organization');
COMMENT ON COLUMN landing.raw_documents.resource_type IS 'FHIR resourceType of a fhir-r4 row; NULL for patient documents.';
COMMENT ON COLUMN landing.raw_documents.source_system IS 'Source system a fhir-r4 row was loaded under (healthetl load --source-system); NULL for patient documents, which name theirs.';

-- The version index of FHIR resources: one row per resource that loaded, its current landing row.
CREATE TABLE etl.fhir_resources (
  source_system  text   NOT NULL,
  resource_type  text   NOT NULL,
  resource_id    text   NOT NULL,
  document_id    bigint NOT NULL,   -- landing row of the current version
  last_updated   timestamptz,       -- meta.lastUpdated of that version
  patient_key    bigint,            -- the patient it belongs to (NULL: Practitioner, Organization, ...)
  visit_key      bigint,            -- Encounter: the visit it became
  visit_date     date,
  PRIMARY KEY (source_system, resource_type, resource_id)
);
CREATE INDEX fhir_resources_patient_idx ON etl.fhir_resources (patient_key) WHERE patient_key IS NOT NULL;
COMMENT ON TABLE etl.fhir_resources IS 'Current version of each loaded FHIR resource (by source system, type and id) and the patient and visit it became.';

-- Clinical columns the FHIR mapping fills (patient documents leave them NULL).
ALTER TABLE clinical.patients ADD COLUMN deceased boolean, ADD COLUMN deceased_at timestamptz;
ALTER TABLE clinical.visits ADD COLUMN visit_end timestamptz;
ALTER TABLE clinical.diagnoses ADD COLUMN source_diagnosis_id text, ADD COLUMN onset_at timestamptz,
  ADD COLUMN clinical_status text;

-- The id a reference points at, when it names a resource of type p_type (relative, absolute or
-- versioned) or is a bundle's urn:uuid; NULL for a conditional reference (Type?identifier=...).
-- (A bounded repeat such as {1,64} made this regex 10x slower: 70 us a call.)
CREATE FUNCTION etl.fhir_ref_id(p_ref text, p_type text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_ref LIKE 'urn:uuid:%' THEN substr(p_ref, 10)
            ELSE substring(p_ref FROM '(?:^|/)' || p_type || '/([A-Za-z0-9.-]+)(?:/_history/[^/]*)?$') END;

-- The value of a conditional reference's identifier (Practitioner?identifier=system|value).
CREATE FUNCTION etl.fhir_conditional_value(p_ref text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN substring(p_ref FROM '^[A-Za-z]+\?identifier=[^|]*\|(.+)$');

-- The patient a resource belongs to: its own id for a Patient, else its subject (or patient) reference.
CREATE FUNCTION etl.fhir_patient_id(p_type text, p jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_type = 'Patient' THEN etl.jtext(p -> 'id')
            ELSE etl.fhir_ref_id(coalesce(p #>> '{subject,reference}', p #>> '{patient,reference}'), 'Patient') END;

-- The Encounter a clinical resource belongs to, from its encounter and context elements
-- (DocumentReference.context.encounter is a list in R4).
CREATE FUNCTION etl.fhir_encounter_id(p_type text, p_encounter jsonb, p_context jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN etl.fhir_ref_id(CASE WHEN p_type = 'DocumentReference'
                            THEN coalesce(p_context #>> '{encounter,0,reference}', p_context #>> '{encounter,reference}')
                            ELSE p_encounter ->> 'reference' END, 'Encounter');

-- The shard of a FHIR resource: its patient's (patient documents: etl.shard_of on their fields).
CREATE FUNCTION etl.fhir_shard_of(p_source_system text, p_patient_id text, p_shards int) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN etl.shard_of(to_jsonb(coalesce(p_source_system, 'fhir')), to_jsonb(p_patient_id), p_shards);

-- The string elements of a JSON array (or a lone string), joined by spaces; NULL when there are none.
CREATE FUNCTION etl.fhir_strings(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT string_agg(x #>> '{}', ' ') FROM jsonb_path_query(j, '$[*] ? (@.type() == "string")') x);

-- A FHIR date or dateTime as a timestamp (a date alone: its midnight UTC); NULL when it is neither.
CREATE FUNCTION etl.fhir_instant(t text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_ymd(t) THEN (t || 'T00:00:00Z')::timestamptz ELSE etl.to_timestamptz(t) END;

-- A code system URI as the short name the clinical tables use (Synthea's spelling); others as given.
CREATE FUNCTION etl.code_system_of(p_uri text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p_uri WHEN 'http://snomed.info/sct' THEN 'SNOMED-CT'
                  WHEN 'http://hl7.org/fhir/sid/icd-10-cm' THEN 'ICD-10-CM'
                  WHEN 'http://hl7.org/fhir/sid/icd-10' THEN 'ICD-10'
                  WHEN 'http://www.nlm.nih.gov/research/umls/rxnorm' THEN 'RxNorm'
                  ELSE p_uri END;

-- The preferred coding of a CodeableConcept: the first SNOMED CT, ICD-10-CM or RxNorm one, else the first.
CREATE FUNCTION etl.fhir_coding(p_concept jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(jsonb_path_query_first(p_concept, '$.coding[*] ? (@.system == "http://snomed.info/sct"
                  || @.system == "http://hl7.org/fhir/sid/icd-10-cm" || @.system == "http://www.nlm.nih.gov/research/umls/rxnorm")'),
                p_concept -> 'coding' -> 0);

-- Encounter.class (v3-ActEncounterCode, which R4 binds to it) as a visit_type; NULL when unknown.
CREATE FUNCTION etl.visit_type_of_class(p_code text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_code = 'AMB' THEN 'outpatient'
            WHEN p_code IN ('IMP', 'ACUTE', 'NONAC') THEN 'inpatient'
            WHEN p_code = 'EMER' THEN 'emergency'
            WHEN p_code = 'VR' THEN 'telehealth'
            WHEN p_code IN ('HH', 'FLD', 'OBSENC', 'PRENC', 'SS') THEN 'other' END;

-- A name (HumanName) as one line: prefix, given names, family, suffix.
CREATE FUNCTION etl.fhir_name_text(n jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN nullif(concat_ws(' ', etl.fhir_strings(n -> 'prefix'), etl.fhir_strings(n -> 'given'), etl.jtext(n -> 'family')), '');

-- The text of a DocumentReference's first text/plain attachment (from its content), decoded; NULL
-- when there is none, '' marks data that is not base64 of UTF-8 text (a rule rejects it).
CREATE FUNCTION etl.fhir_note_text(p_content jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_data text := jsonb_path_query_first(p_content, '$[*].attachment ? (@.contentType starts with "text/plain").data') #>> '{}';
BEGIN
  IF v_data IS NULL THEN
    RETURN NULL;
  END IF;
  RETURN nullif(convert_from(decode(v_data, 'base64'), 'UTF8'), '');
EXCEPTION WHEN invalid_parameter_value OR character_not_in_repertoire OR untranslatable_character THEN
  RETURN '';
END
$$;

-- Patient documents only: FHIR rows are read by etl.step_fhir_documents.
CREATE OR REPLACE FUNCTION etl.step_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_docs ON COMMIT DROP AS
  SELECT d.document_id, d.content_sha256, d.received_at, d.doc_type, d.visits_type, x.*,
         etl.to_timestamptz(x.updated_at #>> '{}') AS updated_ts
  FROM (SELECT r.document_id, r.content_sha256, r.received_at, r.payload, jsonb_typeof(r.payload) AS doc_type,
               jsonb_typeof(r.payload -> 'visits') AS visits_type
        FROM landing.raw_documents r
        WHERE r.batch_id = p_batch_id AND r.status = 'staged' AND r.format <> 'fhir-r4'
          AND (p_only IS NULL OR r.document_id = ANY (p_only))
        UNION ALL
        SELECT r.document_id, r.content_sha256, r.received_at, r.payload, jsonb_typeof(r.payload) AS doc_type,
               jsonb_typeof(r.payload -> 'visits') AS visits_type
        FROM landing.raw_documents r
        WHERE p_batch_id IS NULL AND r.document_id = ANY (p_only) AND r.format <> 'fhir-r4'
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

-- FHIR rows to look at: the batch's staged ones and every waiting one of this shard (a resource's
-- shard is its patient's, so a patient's resources meet in one shard). What the later steps need
-- is extracted here, once: a payload over 2 kB is TOASTed, and every use of it would detoast again.
CREATE FUNCTION etl.step_fhir_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_fhir ON COMMIT DROP AS
  SELECT * FROM (
    SELECT r.document_id, r.batch_id, r.content_sha256, r.received_at, r.status AS was, r.resource_type AS rtype,
           coalesce(r.source_system, 'fhir') AS ss, r.doc_type,
           CASE WHEN jsonb_typeof(x.id) = 'string' THEN x.id #>> '{}' END AS rid,
           r.pid, etl.fhir_encounter_id(r.resource_type, x.encounter, x.context) AS eid,
           etl.fhir_instant(x.meta ->> 'lastUpdated') AS last_updated,
           x.subject ->> 'reference' AS subject_ref,
           CASE WHEN r.resource_type = 'Encounter' THEN x.period ->> 'start' END AS start_raw,
           etl.fhir_coding(CASE r.resource_type WHEN 'MedicationRequest' THEN x."medicationCodeableConcept"
                                                WHEN 'Condition' THEN x.code WHEN 'Procedure' THEN x.code END) AS coding,
           CASE WHEN r.resource_type = 'DocumentReference' THEN etl.fhir_note_text(x.content) END AS note_text,
           CASE WHEN r.resource_type = 'DocumentReference' THEN coalesce(x.author #>> '{0,display}', x.author ->> 'display') END AS note_author,
           CASE WHEN r.resource_type = 'DocumentReference' THEN etl.fhir_instant(x.date #>> '{}') END AS note_date
    -- A shard keeps its own rows before the extraction (notes decoded, codings picked) is done.
    FROM (SELECT r.* FROM (
           SELECT r.*, etl.fhir_patient_id(r.resource_type, r.payload) AS pid FROM (
            SELECT r.*, jsonb_typeof(r.payload) AS doc_type FROM landing.raw_documents r
            WHERE r.batch_id = p_batch_id AND r.status = 'staged' AND r.format = 'fhir-r4'
              AND (p_only IS NULL OR r.document_id = ANY (p_only))
            UNION ALL
            SELECT r.*, jsonb_typeof(r.payload) FROM landing.raw_documents r WHERE p_only IS NULL AND r.status = 'waiting'
            UNION ALL
            SELECT r.*, jsonb_typeof(r.payload) FROM landing.raw_documents r
            WHERE p_batch_id IS NULL AND r.document_id = ANY (p_only) AND r.format = 'fhir-r4'
            OFFSET 0) r
           OFFSET 0) r
          WHERE p_shards = 1 OR etl.fhir_shard_of(r.source_system, r.pid, p_shards) = p_shard
          OFFSET 0) r
    CROSS JOIN LATERAL jsonb_to_record(CASE WHEN r.doc_type = 'object' THEN r.payload ELSE '{}'::jsonb END)
      AS x(id jsonb, subject jsonb, patient jsonb, encounter jsonb, context jsonb, meta jsonb, period jsonb, code jsonb,
           "medicationCodeableConcept" jsonb, content jsonb, author jsonb, date jsonb)
  ) f;
  CREATE UNIQUE INDEX ON t_fhir (document_id);
  ANALYZE t_fhir;
END
$$;

-- FHIR resources whose identical bytes were seen before or earlier in this batch: duplicates.
CREATE FUNCTION etl.step_fhir_duplicates() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO t_outcome
  SELECT f.document_id, 'duplicate'
  FROM t_fhir f
  WHERE f.was = 'staged'
    AND EXISTS (SELECT 1 FROM landing.raw_documents o
                WHERE o.content_sha256 = f.content_sha256 AND o.document_id <> f.document_id
                  AND o.status IN ('loaded', 'superseded', 'duplicate', 'waiting'));
  INSERT INTO t_outcome
  SELECT f.document_id, 'duplicate'
  FROM (SELECT t.document_id, t.was, row_number() OVER (PARTITION BY t.content_sha256 ORDER BY t.document_id) AS copy_no
        FROM t_fhir t) f
  WHERE f.was = 'staged' AND f.copy_no > 1
    AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = f.document_id);
END
$$;

-- Reads t_docs, t_fhir, t_outcome, etl.erasures; writes t_outcome 'erased' for the documents and
-- FHIR resources of erased patients (not lifted), before any rule looks at them.
CREATE OR REPLACE FUNCTION etl.step_erased() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM etl.erasures e WHERE e.lifted_at IS NULL) THEN
    INSERT INTO t_outcome
    SELECT s.document_id, 'erased'
    FROM (SELECT d.document_id, etl.source_system_of(d.source_system) AS ss, etl.patient_id_of(d.patient_id) AS pid
          FROM t_docs d WHERE d.doc_type = 'object'
          UNION ALL
          SELECT f.document_id, f.ss, f.pid FROM t_fhir f WHERE f.pid IS NOT NULL) s
    CROSS JOIN (SELECT k.key FROM etl.secret_keys k WHERE k.purpose = 'erasure') k
    WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = s.document_id)
      AND etl.keyed_hash(k.key, s.ss, s.pid) IN (SELECT e.subject_hash FROM etl.erasures e WHERE e.lifted_at IS NULL);
  END IF;
END
$$;

-- What the mapping needs, as FHIRPath-like reasons into t_errors (the shared etl.step_rejects
-- records them). Checks only the types it maps; any other type needs an id and nothing else.
CREATE FUNCTION etl.step_fhir_rules() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO t_errors
  SELECT f.document_id, ARRAY[0, c.n], f.rtype || c.field, f.rtype || c.field || ': ' || c.msg
  -- Only the resources a cheap screen flags get their reasons worked out (nearly none, usually).
  FROM (SELECT * FROM t_fhir t
        WHERE t.doc_type <> 'object' OR t.rid IS NULL OR t.rid = '' OR octet_length(t.rid) > etl.max_key_bytes()
           OR (t.pid IS NULL AND t.rtype IN ('Encounter', 'Condition', 'MedicationRequest', 'Procedure', 'DocumentReference'))
           OR (t.rtype = 'Encounter' AND NOT coalesce(etl.visit_year_ok(etl.to_visit_date(t.start_raw), t.received_at), false))
           OR (t.rtype IN ('Condition', 'MedicationRequest', 'Procedure') AND coalesce(etl.jtext(t.coding -> 'code'), '') = '')
           OR (t.eid IS NULL AND t.rtype IN ('Condition', 'MedicationRequest', 'Procedure', 'DocumentReference'))
           OR t.note_text = '') f
  CROSS JOIN LATERAL (SELECT f.start_raw, etl.to_visit_date(f.start_raw) AS start_d, f.coding) x
  CROSS JOIN LATERAL (VALUES
    (1, '', CASE WHEN f.doc_type <> 'object' THEN format('is not a JSON object (found %s)', f.doc_type) END),
    (2, '.id', CASE WHEN f.doc_type = 'object' AND (f.rid IS NULL OR f.rid = '') THEN 'is required (a string)'
                    WHEN octet_length(f.rid) > etl.max_key_bytes() THEN format('is longer than %s bytes', etl.max_key_bytes()) END),
    (3, '.subject.reference', CASE WHEN f.rtype IN ('Encounter', 'Condition', 'MedicationRequest', 'Procedure', 'DocumentReference')
                                    AND f.pid IS NULL
                                   THEN CASE WHEN coalesce(f.subject_ref, '') = '' THEN 'is required'
                                             ELSE format('%s is not a Patient reference', to_jsonb(f.subject_ref)) END END),
    (4, '.period.start', CASE WHEN f.rtype = 'Encounter' THEN
                           CASE WHEN x.start_raw IS NULL THEN 'is required'
                                WHEN x.start_d IS NULL THEN format('%s is not a valid date or dateTime', to_jsonb(x.start_raw))
                                WHEN NOT etl.visit_year_ok(x.start_d, f.received_at) THEN format('%s is outside the years healthetl keeps (1900 to next year)', to_jsonb(x.start_raw)) END END),
    (5, CASE f.rtype WHEN 'MedicationRequest' THEN '.medicationCodeableConcept.coding.code' ELSE '.code.coding.code' END,
        CASE WHEN f.rtype IN ('Condition', 'MedicationRequest', 'Procedure') AND coalesce(etl.jtext(x.coding -> 'code'), '') = ''
             THEN 'is required' END),
    (6, CASE f.rtype WHEN 'DocumentReference' THEN '.context.encounter' ELSE '.encounter' END,
        CASE WHEN f.rtype IN ('Condition', 'MedicationRequest', 'Procedure', 'DocumentReference') AND f.eid IS NULL
             THEN 'is required (an Encounter reference: healthetl links every diagnosis, treatment and note to its visit)' END),
    (7, '.content.attachment.data', CASE WHEN f.note_text = '' THEN 'is not base64-encoded UTF-8 text' END)
  ) AS c(n, field, msg)
  WHERE c.msg IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = f.document_id);
  -- The Encounter a resource names belongs to another patient (loaded, or arriving now): as joins,
  -- not a subquery per resource.
  INSERT INTO t_errors
  SELECT DISTINCT f.document_id, ARRAY[0, 6], f.rtype || x.field, f.rtype || x.field || ': ' || format('Encounter/%s belongs to another patient', f.eid)
  FROM t_fhir f
  LEFT JOIN etl.patient_keys k ON k.source_system = f.ss AND k.source_patient_id = f.pid
  LEFT JOIN etl.fhir_resources e ON e.source_system = f.ss AND e.resource_type = 'Encounter' AND e.resource_id = f.eid
  LEFT JOIN t_fhir n ON n.rtype = 'Encounter' AND n.ss = f.ss AND n.rid = f.eid
  CROSS JOIN LATERAL (SELECT CASE f.rtype WHEN 'DocumentReference' THEN '.context.encounter' ELSE '.encounter' END AS field) x
  WHERE f.eid IS NOT NULL AND f.pid IS NOT NULL AND f.rtype IN ('Condition', 'MedicationRequest', 'Procedure', 'DocumentReference')
    AND ((e.resource_id IS NOT NULL AND e.patient_key IS DISTINCT FROM k.patient_key) OR n.pid <> f.pid)
    AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = f.document_id);
END
$$;

-- The visits partitions for these years: created in a whole-batch transform; in a shard they must
-- exist already (etl.ensure_batch_partitions made them in its own transaction), else HE005.
CREATE FUNCTION etl.need_visit_partitions(p_years int[], p_batch_id bigint, p_shard int, p_shards int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_shards = 1 THEN
    PERFORM etl.ensure_visit_partitions(p_years);
  ELSIF EXISTS (SELECT 1 FROM unnest(p_years) y
                WHERE y IS NOT NULL AND to_regclass(format('clinical.%I', etl.visit_partition_name(y))) IS NULL) THEN
    RAISE EXCEPTION 'batch %, shard % of %: a visits partition it needs does not exist', p_batch_id, p_shard, p_shards
      USING ERRCODE = 'HE005',
            HINT = 'Run "healthetl transform" again (it creates them first); from SQL, call etl.ensure_batch_partitions(batch_id, shard, shards) in its own transaction before the shard.';
  END IF;
END
$$;

-- The partitions the patient documents' visits need (etl.need_visit_partitions).
CREATE OR REPLACE FUNCTION etl.step_visit_partitions(p_batch_id bigint, p_shard int, p_shards int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM etl.need_visit_partitions(
    ARRAY(SELECT DISTINCT extract(year FROM tv.visit_date)::int FROM t_visits tv JOIN t_apply a ON a.document_id = tv.document_id),
    p_batch_id, p_shard, p_shards);
END
$$;

-- Versions: per resource, the newest (meta.lastUpdated, else arrival) applies; older ones, and
-- anything older than what is current, are superseded. t_fhir_apply holds what goes on, narrow
-- (its rows are updated step by step; the extracted fields stay in t_fhir); outcome NULL: loaded.
CREATE FUNCTION etl.step_fhir_versions() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  CREATE TEMP TABLE t_fhir_apply ON COMMIT DROP AS
  WITH ranked AS (
    SELECT f.document_id, f.batch_id, f.rtype, f.ss, f.rid, f.pid, f.eid, f.last_updated,
           row_number() OVER (PARTITION BY f.ss, f.rtype, f.rid
                              ORDER BY coalesce(f.last_updated, '-infinity') DESC, f.document_id DESC) AS rn
    FROM t_fhir f
    WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = f.document_id)
  )
  SELECT r.*, x.document_id AS current_doc, x.visit_key AS current_visit_key, x.visit_date AS current_visit_date,
         (x.document_id IS NOT NULL AND
          (coalesce(x.last_updated, '-infinity'), x.document_id) > (coalesce(r.last_updated, '-infinity'), r.document_id)) AS older,
         k.patient_key, NULL::bigint AS visit_key, NULL::date AS visit_date, NULL::text AS outcome
  FROM ranked r
  LEFT JOIN etl.fhir_resources x ON x.source_system = r.ss AND x.resource_type = r.rtype AND x.resource_id = r.rid
  LEFT JOIN etl.patient_keys k ON k.source_system = r.ss AND k.source_patient_id = r.pid;
  INSERT INTO t_outcome SELECT document_id, 'superseded' FROM t_fhir_apply WHERE rn > 1 OR older;
  DELETE FROM t_fhir_apply WHERE rn > 1 OR older;
  CREATE UNIQUE INDEX ON t_fhir_apply (document_id);
  ANALYZE t_fhir_apply;
END
$$;

-- Patient -> clinical.patients (a new version updates the row; its visits stay).
CREATE FUNCTION etl.step_fhir_patients(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO etl.patient_keys (source_system, source_patient_id)
  SELECT a.ss, a.pid FROM t_fhir_apply a WHERE a.rtype = 'Patient' AND a.patient_key IS NULL
  ORDER BY a.document_id
  ON CONFLICT DO NOTHING;
  UPDATE t_fhir_apply a SET patient_key = k.patient_key
  FROM etl.patient_keys k
  WHERE a.patient_key IS NULL AND k.source_system = a.ss AND k.source_patient_id = a.pid;

  INSERT INTO clinical.patients AS t (
    patient_key, source_system, source_patient_id, mrn, ssn, name_prefix, given_name, family_name, name_suffix,
    birth_date, sex, phone, email, address_lines, city, state, postal_code, country, deceased, deceased_at,
    source_updated_at, document_id, content_sha256, batch_id, loaded_at, pseudonym)
  SELECT a.patient_key, a.ss, a.pid,
         jsonb_path_query_first(r.payload, '$.identifier[*] ? (@.type.coding[*].code == "MR").value') #>> '{}',
         jsonb_path_query_first(r.payload, '$.identifier[*] ? (@.type.coding[*].code == "SS" || @.system == "http://hl7.org/fhir/sid/us-ssn").value') #>> '{}',
         etl.fhir_strings(n.n -> 'prefix'), etl.fhir_strings(n.n -> 'given'), etl.jtext(n.n -> 'family'),
         etl.fhir_strings(n.n -> 'suffix'),
         etl.to_date(r.payload ->> 'birthDate'), etl.sex_of(r.payload -> 'gender'),
         jsonb_path_query_first(r.payload, '$.telecom[*] ? (@.system == "phone").value') #>> '{}',
         jsonb_path_query_first(r.payload, '$.telecom[*] ? (@.system == "email").value') #>> '{}',
         ARRAY(SELECT l #>> '{}' FROM jsonb_path_query(ad.a, '$.line[*] ? (@.type() == "string")') l),
         etl.jtext(ad.a -> 'city'), etl.jtext(ad.a -> 'state'), etl.jtext(ad.a -> 'postalCode'), etl.jtext(ad.a -> 'country'),
         CASE WHEN jsonb_typeof(r.payload -> 'deceasedBoolean') = 'boolean' THEN (r.payload -> 'deceasedBoolean')::boolean
              WHEN r.payload ? 'deceasedDateTime' THEN true END,
         etl.fhir_instant(r.payload ->> 'deceasedDateTime'),
         a.last_updated, a.document_id, r.content_sha256, coalesce(p_batch_id, a.batch_id), now(),
         etl.keyed_uuid(k.key, a.ss, a.pid)
  FROM t_fhir_apply a
  JOIN landing.raw_documents r ON r.document_id = a.document_id
  CROSS JOIN LATERAL (SELECT coalesce(jsonb_path_query_first(r.payload, '$.name[*] ? (@.use == "official")'), r.payload -> 'name' -> 0) AS n) n
  CROSS JOIN LATERAL (SELECT coalesce(jsonb_path_query_first(r.payload, '$.address[*] ? (@.use == "home")'), r.payload -> 'address' -> 0) AS a) ad
  CROSS JOIN (SELECT s.key FROM etl.secret_keys s WHERE s.purpose = 'pseudonym') k
  WHERE a.rtype = 'Patient'
  ON CONFLICT (patient_key) DO UPDATE SET
    mrn = excluded.mrn, ssn = excluded.ssn, name_prefix = excluded.name_prefix, given_name = excluded.given_name,
    family_name = excluded.family_name, name_suffix = excluded.name_suffix, birth_date = excluded.birth_date,
    sex = excluded.sex, phone = excluded.phone, email = excluded.email, address_lines = excluded.address_lines,
    city = excluded.city, state = excluded.state, postal_code = excluded.postal_code, country = excluded.country,
    deceased = excluded.deceased, deceased_at = excluded.deceased_at, source_updated_at = excluded.source_updated_at,
    document_id = excluded.document_id, content_sha256 = excluded.content_sha256, batch_id = excluded.batch_id,
    loaded_at = excluded.loaded_at;
  -- A new birth date moves every visit's stored age.
  IF NOT EXISTS (SELECT 1 FROM t_fhir_apply a WHERE a.rtype = 'Patient' AND a.current_doc IS NOT NULL) THEN
    RETURN;
  END IF;
  UPDATE clinical.visits v SET age_at_visit = date_part('year', age(v.visit_date, p.birth_date))::int
  FROM t_fhir_apply a JOIN clinical.patients p ON p.patient_key = a.patient_key
  WHERE a.rtype = 'Patient' AND a.current_doc IS NOT NULL AND v.patient_key = a.patient_key
    AND v.age_at_visit IS DISTINCT FROM date_part('year', age(v.visit_date, p.birth_date))::int;
END
$$;

-- Encounter -> clinical.visits. Waits for its Patient; a new version keeps its visit_key (and its
-- children follow a changed date). Conditional references never wait: the NPI, the organisation
-- id and the display come from the reference; a bundle's urn:uuid ones from the Practitioner or
-- Organization in landing (staged or loaded, in any shard: they have no patient), else NULL.
CREATE FUNCTION etl.step_fhir_encounters(p_batch_id bigint, p_shard int, p_shards int) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE t_fhir_apply a SET outcome = 'waiting'
  WHERE a.rtype = 'Encounter' AND NOT EXISTS (SELECT 1 FROM clinical.patients p WHERE p.patient_key = a.patient_key);
  CREATE TEMP TABLE t_fhir_visits ON COMMIT DROP AS
  SELECT a.document_id, a.patient_key, coalesce(a.current_visit_key, nextval('clinical.visits_visit_key_seq')) AS visit_key,
         etl.to_visit_date(r.payload #>> '{period,start}') AS visit_date, a.rid,
         etl.to_timestamptz(r.payload #>> '{period,start}') AS visit_start,
         etl.to_timestamptz(r.payload #>> '{period,end}') AS visit_end,
         etl.to_visit_date(r.payload #>> '{period,end}') AS discharge_date, r.payload #>> '{period,end}' AS end_raw,
         r.payload #>> '{class,code}' AS class_code,
         r.payload -> 'serviceProvider' AS org_ref,
         (SELECT i FROM jsonb_path_query(r.payload, '$.participant[*].individual') i LIMIT 1) AS prac_ref,
         a.current_visit_key, a.current_visit_date, a.ss
  FROM t_fhir_apply a
  JOIN landing.raw_documents r ON r.document_id = a.document_id
  WHERE a.rtype = 'Encounter' AND a.outcome IS NULL;

  ANALYZE t_fhir_visits;
  -- New versions only (a first load has none: no statement then touches the clinical tables' other rows).
  IF EXISTS (SELECT 1 FROM t_fhir_visits t WHERE t.current_visit_key IS NOT NULL) THEN
    DELETE FROM clinical.visits v USING t_fhir_visits t
    WHERE t.current_visit_key IS NOT NULL AND v.patient_key = t.patient_key AND v.visit_key = t.current_visit_key
      AND v.visit_date = t.current_visit_date;
  END IF;
  PERFORM etl.need_visit_partitions(ARRAY(SELECT DISTINCT extract(year FROM t.visit_date)::int FROM t_fhir_visits t),
                                    p_batch_id, p_shard, p_shards);

  INSERT INTO clinical.visits (patient_key, visit_key, visit_date, source_visit_id, visit_start, visit_end, discharge_date,
                               visit_type, facility_id, facility_name, provider_npi, provider_name, position, pseudonym,
                               age_at_visit)
  SELECT t.patient_key, t.visit_key, t.visit_date, t.rid, t.visit_start, t.visit_end, t.discharge_date,
         etl.visit_type_of_class(t.class_code),
         coalesce(etl.fhir_conditional_value(t.org_ref ->> 'reference'), org.payload ->> 'id'),
         coalesce(etl.jtext(t.org_ref -> 'display'), etl.jtext(org.payload -> 'name')),
         coalesce(CASE WHEN t.prac_ref ->> 'reference' LIKE '%us-npi|%' THEN etl.fhir_conditional_value(t.prac_ref ->> 'reference') END,
                  jsonb_path_query_first(prac.payload, '$.identifier[*] ? (@.system == "http://hl7.org/fhir/sid/us-npi").value') #>> '{}'),
         coalesce(etl.jtext(t.prac_ref -> 'display'), etl.fhir_name_text(prac.payload -> 'name' -> 0)),
         0, p.pseudonym, date_part('year', age(t.visit_date, p.birth_date))::int
  FROM t_fhir_visits t
  JOIN clinical.patients p ON p.patient_key = t.patient_key
  LEFT JOIN LATERAL (SELECT o.payload FROM landing.raw_documents o
                     WHERE o.resource_type = 'Organization' AND o.payload ->> 'id' = etl.fhir_ref_id(t.org_ref ->> 'reference', 'Organization')
                       AND o.status IN ('staged', 'loaded') AND coalesce(o.source_system, 'fhir') = t.ss
                     ORDER BY o.document_id DESC LIMIT 1) org ON true
  LEFT JOIN LATERAL (SELECT o.payload FROM landing.raw_documents o
                     WHERE o.resource_type = 'Practitioner' AND o.payload ->> 'id' = etl.fhir_ref_id(t.prac_ref ->> 'reference', 'Practitioner')
                       AND o.status IN ('staged', 'loaded') AND coalesce(o.source_system, 'fhir') = t.ss
                     ORDER BY o.document_id DESC LIMIT 1) prac ON true;

  -- A visit whose date moved takes its children along (they carry visit_date for pruning).
  IF EXISTS (SELECT 1 FROM t_fhir_visits t WHERE t.current_visit_key IS NOT NULL AND t.visit_date <> t.current_visit_date) THEN
    UPDATE clinical.diagnoses c SET visit_date = t.visit_date FROM t_fhir_visits t
    WHERE t.current_visit_key IS NOT NULL AND t.visit_date <> t.current_visit_date AND c.patient_key = t.patient_key AND c.visit_key = t.visit_key;
    UPDATE clinical.treatments c SET visit_date = t.visit_date FROM t_fhir_visits t
    WHERE t.current_visit_key IS NOT NULL AND t.visit_date <> t.current_visit_date AND c.patient_key = t.patient_key AND c.visit_key = t.visit_key;
    UPDATE clinical.provider_notes c SET visit_date = t.visit_date FROM t_fhir_visits t
    WHERE t.current_visit_key IS NOT NULL AND t.visit_date <> t.current_visit_date AND c.patient_key = t.patient_key AND c.visit_key = t.visit_key;
  END IF;

  UPDATE t_fhir_apply a SET outcome = 'loaded', visit_key = t.visit_key, visit_date = t.visit_date
  FROM t_fhir_visits t WHERE t.document_id = a.document_id;
END
$$;

-- Clinical resources find their visit (loaded before, or just now); the rest wait for it. A new
-- version of a resource first removes the row its previous version made.
CREATE FUNCTION etl.step_fhir_links() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE t_fhir_apply a SET visit_key = e.visit_key, visit_date = e.visit_date
  FROM etl.fhir_resources e
  WHERE a.rtype IN ('Condition', 'MedicationRequest', 'Procedure', 'DocumentReference')
    AND e.source_system = a.ss AND e.resource_type = 'Encounter' AND e.resource_id = a.eid
    AND e.patient_key = a.patient_key;
  UPDATE t_fhir_apply a SET visit_key = e.visit_key, visit_date = e.visit_date
  FROM t_fhir_apply e
  WHERE a.rtype IN ('Condition', 'MedicationRequest', 'Procedure', 'DocumentReference') AND a.visit_key IS NULL
    AND e.rtype = 'Encounter' AND e.outcome = 'loaded' AND e.ss = a.ss AND e.rid = a.eid AND e.patient_key = a.patient_key;
  UPDATE t_fhir_apply a SET outcome = 'waiting'
  WHERE a.rtype IN ('Condition', 'MedicationRequest', 'Procedure', 'DocumentReference') AND a.visit_key IS NULL;

  IF NOT EXISTS (SELECT 1 FROM t_fhir_apply a WHERE a.current_doc IS NOT NULL AND a.outcome IS NULL
                 AND a.rtype IN ('Condition', 'MedicationRequest', 'Procedure', 'DocumentReference')) THEN
    RETURN;  -- a first load: nothing to replace
  END IF;
  DELETE FROM clinical.diagnoses c USING t_fhir_apply a
  WHERE a.rtype = 'Condition' AND a.current_doc IS NOT NULL AND a.outcome IS NULL
    AND c.patient_key = a.patient_key AND c.source_diagnosis_id = a.rid;
  DELETE FROM clinical.treatments c USING t_fhir_apply a
  WHERE a.rtype IN ('MedicationRequest', 'Procedure') AND a.current_doc IS NOT NULL AND a.outcome IS NULL
    AND c.patient_key = a.patient_key AND c.source_treatment_id = a.rid
    AND c.treatment_type = CASE a.rtype WHEN 'Procedure' THEN 'procedure' ELSE 'medication' END;
  DELETE FROM clinical.provider_notes c USING t_fhir_apply a
  WHERE a.rtype = 'DocumentReference' AND a.current_doc IS NOT NULL AND a.outcome IS NULL
    AND c.patient_key = a.patient_key AND c.source_note_id = a.rid;
END
$$;

-- Condition -> clinical.diagnoses (code system kept; onset; clinical status).
CREATE FUNCTION etl.step_fhir_conditions() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO clinical.diagnoses (patient_key, visit_key, visit_date, position, code, code_system, description, is_primary,
                                  pseudonym, source_diagnosis_id, onset_at, clinical_status)
  SELECT a.patient_key, a.visit_key, a.visit_date, 0, etl.jtext(c.coding -> 'code'),
         coalesce(etl.code_system_of(etl.jtext(c.coding -> 'system')), 'unknown'),
         coalesce(etl.jtext(c.coding -> 'display'), etl.jtext(r.payload #> '{code,text}')), NULL,
         p.pseudonym, a.rid, etl.fhir_instant(r.payload ->> 'onsetDateTime'),
         etl.jtext(r.payload #> '{clinicalStatus,coding,0,code}')
  FROM t_fhir_apply a
  JOIN t_fhir c ON c.document_id = a.document_id
  JOIN landing.raw_documents r ON r.document_id = a.document_id
  JOIN clinical.patients p ON p.patient_key = a.patient_key
  WHERE a.rtype = 'Condition' AND a.outcome IS NULL;
END
$$;

-- MedicationRequest and Procedure -> clinical.treatments (dose, route and frequency from the first
-- dosage instruction; dates from authoredOn, or the performed period).
CREATE FUNCTION etl.step_fhir_treatments() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO clinical.treatments (patient_key, visit_key, visit_date, position, source_treatment_id, treatment_type,
                                   code, code_system, name, dose, route, frequency, start_date, end_date, pseudonym)
  SELECT a.patient_key, a.visit_key, a.visit_date, 0, a.rid,
         CASE a.rtype WHEN 'Procedure' THEN 'procedure' ELSE 'medication' END,
         etl.jtext(c.coding -> 'code'), etl.code_system_of(etl.jtext(c.coding -> 'system')),
         left(coalesce(etl.jtext(c.coding -> 'display'), etl.jtext(c.concept -> 'text')), etl.max_key_bytes()),
         nullif(concat_ws(' ', etl.jtext(d.d #> '{doseAndRate,0,doseQuantity,value}'), etl.jtext(d.d #> '{doseAndRate,0,doseQuantity,unit}')), ''),
         coalesce(etl.jtext(d.d #> '{route,text}'), etl.jtext(d.d #> '{route,coding,0,display}')),
         coalesce(etl.jtext(d.d -> 'text'),
                  CASE WHEN d.d #> '{timing,repeat,frequency}' IS NOT NULL
                       THEN format('%s per %s %s', d.d #>> '{timing,repeat,frequency}', d.d #>> '{timing,repeat,period}',
                                   d.d #>> '{timing,repeat,periodUnit}') END),
         CASE a.rtype WHEN 'Procedure' THEN etl.to_visit_date(coalesce(r.payload #>> '{performedPeriod,start}', r.payload ->> 'performedDateTime'))
                      ELSE etl.to_visit_date(r.payload ->> 'authoredOn') END,
         CASE a.rtype WHEN 'Procedure' THEN etl.to_visit_date(r.payload #>> '{performedPeriod,end}')
                      ELSE etl.to_visit_date(r.payload #>> '{dispenseRequest,validityPeriod,end}') END,
         p.pseudonym
  FROM t_fhir_apply a
  JOIN landing.raw_documents r ON r.document_id = a.document_id
  JOIN clinical.patients p ON p.patient_key = a.patient_key
  CROSS JOIN LATERAL (SELECT CASE a.rtype WHEN 'Procedure' THEN r.payload -> 'code' ELSE r.payload -> 'medicationCodeableConcept' END AS concept) cc
  JOIN t_fhir f ON f.document_id = a.document_id
  CROSS JOIN LATERAL (SELECT cc.concept, f.coding) c
  CROSS JOIN LATERAL (SELECT r.payload #> '{dosageInstruction,0}' AS d) d
  WHERE a.rtype IN ('MedicationRequest', 'Procedure') AND a.outcome IS NULL;
END
$$;

-- DocumentReference -> clinical.provider_notes (the text/plain attachment, decoded and redacted).
-- Without a text/plain attachment it loads into landing only, with a problem saying so.
CREATE FUNCTION etl.step_fhir_notes() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO clinical.provider_notes (patient_key, visit_key, visit_date, position, source_note_id, author, written_at,
                                       note_text, note_text_redacted, pseudonym)
  SELECT a.patient_key, a.visit_key, a.visit_date, 0, a.rid, f.note_author, f.note_date, f.note_text,
         etl.redact_note(f.note_text, p.mrn, p.birth_date, concat_ws(' ', p.given_name, p.family_name)),
         p.pseudonym
  FROM t_fhir_apply a
  JOIN t_fhir f ON f.document_id = a.document_id AND f.note_text IS NOT NULL
  JOIN clinical.patients p ON p.patient_key = a.patient_key
  WHERE a.rtype = 'DocumentReference' AND a.outcome IS NULL;
END
$$;

-- The end of the FHIR path: other types load into landing only; loaded resources become current
-- in etl.fhir_resources; problems (values loaded as NULL) are kept; outcomes go to t_outcome.
CREATE FUNCTION etl.step_fhir_outcomes(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO etl.fhir_resources AS x (source_system, resource_type, resource_id, document_id, last_updated, patient_key, visit_key, visit_date)
  SELECT a.ss, a.rtype, a.rid, a.document_id, a.last_updated, a.patient_key, a.visit_key, a.visit_date
  FROM t_fhir_apply a WHERE coalesce(a.outcome, 'loaded') = 'loaded'
  ON CONFLICT (source_system, resource_type, resource_id) DO UPDATE SET
    document_id = excluded.document_id, last_updated = excluded.last_updated, patient_key = excluded.patient_key,
    visit_key = excluded.visit_key, visit_date = excluded.visit_date;
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT a.document_id, coalesce(p_batch_id, a.batch_id), a.rtype || c.field, c.problem
  FROM t_fhir_apply a
  JOIN t_fhir f ON f.document_id = a.document_id
  LEFT JOIN landing.raw_documents r ON r.document_id = a.document_id AND a.rtype = 'Patient'
  LEFT JOIN t_fhir_visits v ON v.document_id = a.document_id
  CROSS JOIN LATERAL (VALUES
    ('.birthDate', CASE WHEN a.rtype = 'Patient' AND r.payload ? 'birthDate' AND etl.to_date(r.payload ->> 'birthDate') IS NULL
                        THEN 'not a full date (YYYY-MM-DD): birth_date is NULL' END),
    ('.gender', CASE WHEN a.rtype = 'Patient' AND r.payload ? 'gender' AND etl.sex_of(r.payload -> 'gender') IS NULL
                     THEN 'not one of ' || array_to_string(etl.sex_codes(), ', ') END),
    ('.class.code', CASE WHEN a.rtype = 'Encounter' AND etl.visit_type_of_class(v.class_code) IS NULL
                         THEN 'not a v3-ActEncounterCode healthetl maps: visit_type is NULL' END),
    ('.period.end', CASE WHEN a.rtype = 'Encounter' AND v.end_raw IS NOT NULL AND v.visit_end IS NULL AND v.discharge_date IS NULL
                         THEN 'not a valid dateTime' END),
    ('.content', CASE WHEN a.rtype = 'DocumentReference' AND f.note_text IS NULL
                      THEN 'no text/plain attachment: not in provider_notes' END)
  ) AS c(field, problem)
  WHERE a.outcome IS DISTINCT FROM 'waiting' AND a.rtype IN ('Patient', 'Encounter', 'DocumentReference') AND c.problem IS NOT NULL
  ON CONFLICT DO NOTHING;
  INSERT INTO t_outcome SELECT a.document_id, coalesce(a.outcome, 'loaded') FROM t_fhir_apply a;
END
$$;

-- A patient is loaded either from patient documents or from FHIR resources, never both: a
-- patient document's snapshot would delete the FHIR rows (and leave etl.fhir_resources pointing
-- at visits that are gone), a FHIR Patient would overwrite a snapshot's patient row.
CREATE FUNCTION etl.step_source_kinds() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO t_errors
  SELECT d.document_id, ARRAY[0, 9], 'source_system',
         format('source_system: patient %s of %s is loaded from FHIR resources; a patient document may not replace it (send it under another source_system)',
                to_jsonb(k.source_patient_id), to_jsonb(k.source_system))
  FROM t_docs d
  JOIN etl.patient_keys k ON k.source_system = etl.source_system_of(d.source_system) AND k.source_patient_id = etl.patient_id_of(d.patient_id)
  JOIN clinical.patients p ON p.patient_key = k.patient_key
  JOIN landing.raw_documents r ON r.document_id = p.document_id AND r.format = 'fhir-r4'
  WHERE d.doc_type = 'object' AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = d.document_id);
  INSERT INTO t_errors
  SELECT f.document_id, ARRAY[0, 9], f.rtype || x.field,
         format('%s%s: patient %s of %s is loaded from patient documents; load FHIR resources under another --source-system',
                f.rtype, x.field, to_jsonb(f.pid), to_jsonb(f.ss))
  FROM t_fhir f
  CROSS JOIN LATERAL (SELECT CASE f.rtype WHEN 'Patient' THEN '.id' ELSE '.subject' END AS field) x
  JOIN etl.patient_keys k ON k.source_system = f.ss AND k.source_patient_id = f.pid
  JOIN clinical.patients p ON p.patient_key = k.patient_key
  JOIN landing.raw_documents r ON r.document_id = p.document_id AND r.format <> 'fhir-r4'
  WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = f.document_id);
END
$$;

-- Replay re-derives patients from their current patient document; FHIR patients are kept as they are.
CREATE OR REPLACE FUNCTION etl.replay_patients(p_patient_keys bigint[])
 RETURNS TABLE(patient_key bigint, outcome text, field text)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_batch bigint;
  v_documents bigint[];
BEGIN
  PERFORM etl.lock_out_transforms();
  DROP TABLE IF EXISTS pg_temp.t_replay;
  CREATE TEMP TABLE t_replay ON COMMIT DROP AS
  SELECT p.patient_key, p.document_id, d.batch_id, (d.payload IS NULL) AS no_payload, NULL::text AS outcome, NULL::text AS field,
         d.format
  FROM clinical.patients p
  JOIN landing.raw_documents d ON d.document_id = p.document_id
  WHERE p.patient_key = ANY (p_patient_keys);
  UPDATE t_replay r SET outcome = 'kept', field = '$payload' WHERE r.no_payload;
  -- A FHIR patient is many resources, not one snapshot: replayed by loading its resources again.
  UPDATE t_replay r SET outcome = 'kept', field = '$fhir' WHERE r.outcome IS NULL AND r.format = 'fhir-r4';
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
$function$;

-- A batch's transform: validation, then the documents' snapshots, then the FHIR resources.
CREATE OR REPLACE FUNCTION etl.transform_documents(p_batch_id bigint, p_shard int, p_shards int, p_only bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- Validation: every staged document gets one outcome, or goes on to the snapshot step.
  PERFORM etl.step_documents(p_batch_id, p_shard, p_shards, p_only);
  PERFORM etl.step_fhir_documents(p_batch_id, p_shard, p_shards, p_only);
  PERFORM etl.step_earlier_duplicates();
  PERFORM etl.step_fhir_duplicates();
  PERFORM etl.step_erased();
  PERFORM etl.step_poison();
  PERFORM etl.step_document_rules();
  PERFORM etl.step_visits();
  PERFORM etl.step_visit_rules();
  PERFORM etl.step_child_rules();
  PERFORM etl.step_fhir_rules();
  PERFORM etl.step_source_kinds();
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
  -- FHIR: each resource replaces its own earlier version; patients, then encounters, then what
  -- hangs off an encounter, so a whole export resolves in one pass.
  PERFORM etl.step_fhir_versions();
  PERFORM etl.step_fhir_patients(p_batch_id);
  PERFORM etl.step_fhir_encounters(p_batch_id, p_shard, p_shards);
  PERFORM etl.step_fhir_links();
  PERFORM etl.step_fhir_conditions();
  PERFORM etl.step_fhir_treatments();
  PERFORM etl.step_fhir_notes();
  PERFORM etl.step_fhir_outcomes(p_batch_id);
  PERFORM etl.step_outcomes(p_batch_id, p_shards);
END
$$;

-- Poisoned rows (found by etl.find_poison) are rejected whatever their format.
CREATE OR REPLACE FUNCTION etl.step_poison() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM t_poison) THEN
    RETURN;
  END IF;
  PERFORM etl.clear_new_rejects();
  INSERT INTO t_new_rejects
  SELECT r.content_sha256, r.document_id, r.batch_id, r.source_file, r.line, r.item, r.byte_offset, '$', x.reason, ARRAY[x.reason]
  FROM t_poison p
  JOIN landing.raw_documents r ON r.document_id = p.document_id
  CROSS JOIN LATERAL (SELECT format('$: PostgreSQL refused the document while transforming it (SQLSTATE %s)', p.sqlstate) AS reason) x
  WHERE (EXISTS (SELECT 1 FROM t_docs d WHERE d.document_id = p.document_id)
         OR EXISTS (SELECT 1 FROM t_fhir f WHERE f.document_id = p.document_id))
    AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = p.document_id);
  PERFORM etl.record_rejects();
  INSERT INTO t_outcome
  SELECT p.document_id, 'rejected' FROM t_poison p
  WHERE (EXISTS (SELECT 1 FROM t_docs d WHERE d.document_id = p.document_id)
         OR EXISTS (SELECT 1 FROM t_fhir f WHERE f.document_id = p.document_id))
    AND NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = p.document_id);
END
$$;

-- The visit years a shard of a batch needs: patient documents' visit dates and FHIR Encounters'
-- period starts (the batch's staged ones and the waiting ones).
CREATE OR REPLACE FUNCTION etl.ensure_batch_partitions(p_batch_id bigint, p_shard int DEFAULT 0, p_shards int DEFAULT 1) RETURNS int
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
  SELECT etl.ensure_visit_partitions(ARRAY(
    SELECT DISTINCT extract(year FROM vd.d)::int
    FROM landing.raw_documents r
    CROSS JOIN LATERAL jsonb_to_record(CASE WHEN jsonb_typeof(r.payload) = 'object' THEN r.payload ELSE '{}'::jsonb END)
      AS x(source_system jsonb, patient_id jsonb, visits jsonb)
    CROSS JOIN LATERAL jsonb_path_query(x.visits, 'strict $[*].visit_date', '{}', true) AS v(d)
    CROSS JOIN LATERAL (SELECT etl.to_visit_date(v.d #>> '{}') AS d) vd
    WHERE r.batch_id = p_batch_id AND r.status = 'staged' AND r.format <> 'fhir-r4'
      AND etl.shard_of(x.source_system, x.patient_id, p_shards) = p_shard
      AND etl.patient_id_problem(x.patient_id) IS NULL AND etl.source_system_problem(x.source_system) IS NULL
      AND etl.visit_year_ok(vd.d, r.received_at)
    UNION
    SELECT extract(year FROM etl.to_visit_date(r.payload #>> '{period,start}'))::int
    FROM landing.raw_documents r
    WHERE ((r.batch_id = p_batch_id AND r.status = 'staged') OR r.status = 'waiting')
      AND r.format = 'fhir-r4' AND r.resource_type = 'Encounter'
      AND etl.fhir_shard_of(r.source_system, etl.fhir_patient_id(r.resource_type, r.payload), p_shards) = p_shard
      AND etl.visit_year_ok(etl.to_visit_date(r.payload #>> '{period,start}'), r.received_at)))
$$;

-- A file whose bytes were staged before: its rows again, as duplicates (with their FHIR columns).
CREATE OR REPLACE FUNCTION etl.stage_known_file(p_batch_id bigint, p_source_file text, p_size bigint, p_sha256 bytea) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
  INSERT INTO landing.raw_documents (batch_id, source_file, line, item, byte_offset, content_sha256, format, status, payload,
                                     resource_type, source_system)
  SELECT p_batch_id, p_source_file, d.line, d.item, d.byte_offset, d.content_sha256, d.format, 'duplicate', NULL,
         d.resource_type, d.source_system
  FROM landing.raw_documents d
  WHERE d.batch_id = v_of_batch AND d.source_file = v_of_file
  ORDER BY d.document_id;
  GET DIAGNOSTICS n = ROW_COUNT;
  INSERT INTO etl.batch_files (batch_id, source_file, size_bytes, file_sha256, documents, status, duplicate_of_batch, duplicate_of_file)
  VALUES (p_batch_id, p_source_file, p_size, p_sha256, n, 'duplicate_file', v_of_batch, v_of_file);
  RETURN n;
END
$$;

-- Erasure: FHIR resources name their patient by reference (subject, patient, or their own id).
CREATE OR REPLACE FUNCTION etl.erase_patient(p_source_system text, p_patient_id text)
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

  -- Their documents and resources (waiting ones too): those that name them, and every copy of the
  -- same bytes (duplicates keep no payload).
  SELECT array_agg(d.document_id) INTO v_docs FROM landing.raw_documents d
  WHERE d.content_sha256 IN (
    SELECT r.content_sha256 FROM landing.raw_documents r
    WHERE r.payload IS NOT NULL AND jsonb_typeof(r.payload) = 'object'
      AND CASE WHEN r.format = 'fhir-r4'
               THEN coalesce(r.source_system, 'fhir') = p_source_system AND etl.fhir_patient_id(r.resource_type, r.payload) = v_id
               ELSE etl.source_system_of(r.payload -> 'source_system') = p_source_system
                    AND etl.patient_id_of(r.payload -> 'patient_id') = v_id END);
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

-- Deletes one patient's rows (clinical tables, then the identity: pseudonym and research id go
-- with it) and what is derived from them; returns how many clinical rows went. The one place that
-- knows every table holding a patient's rows: a table added later is added here.
CREATE OR REPLACE FUNCTION etl.erase_patient_rows(p_patient_key bigint) RETURNS bigint
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
  DELETE FROM etl.fhir_resources WHERE patient_key = p_patient_key;
  DELETE FROM etl.patient_keys WHERE patient_key = p_patient_key;
  DELETE FROM dq.result_samples WHERE patient_key = p_patient_key;
  RETURN v_rows;
END
$$;

-- Purge keeps what the transform still reads: current snapshots, current FHIR resources (a later
-- Encounter looks up its Practitioner there) and waiting resources.
CREATE OR REPLACE FUNCTION etl.purge(p_older_than interval)
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
  WHERE d.payload IS NOT NULL AND d.received_at < v_cutoff AND d.status NOT IN ('staged', 'waiting')
    AND NOT EXISTS (SELECT 1 FROM clinical.patients p WHERE p.document_id = d.document_id)
    AND NOT EXISTS (SELECT 1 FROM etl.fhir_resources x WHERE x.document_id = d.document_id);
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
CREATE INDEX fhir_resources_document_idx ON etl.fhir_resources (document_id);

-- Reconciliation: received = staged + loaded + rejected + duplicate + superseded + erased + waiting.
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
         AND count(d.document_id) = count(d.document_id) FILTER (WHERE d.status IN ('staged', 'loaded', 'rejected', 'duplicate', 'superseded', 'erased', 'waiting'))
         AS balanced,
       b.error,
       (SELECT coalesce(sum(x.visits), 0) FROM etl.batch_deletes x WHERE x.batch_id = b.batch_id)::bigint AS deleted_visits,
       (SELECT coalesce(sum(x.diagnoses + x.treatments + x.provider_notes), 0) FROM etl.batch_deletes x
        WHERE x.batch_id = b.batch_id)::bigint AS deleted_children,
       count(d.document_id) FILTER (WHERE d.status = 'erased')     AS erased,
       b.db_user,
       count(d.document_id) FILTER (WHERE d.status = 'waiting')    AS waiting,
       min(d.received_at) FILTER (WHERE d.status = 'waiting')      AS waiting_since
FROM etl.batches b
CROSS JOIN LATERAL (SELECT coalesce(sum(f.documents), 0)::bigint AS loader_count FROM etl.batch_files f WHERE f.batch_id = b.batch_id) lf
LEFT JOIN landing.raw_documents d ON d.batch_id = b.batch_id
GROUP BY b.batch_id, lf.loader_count;
COMMENT ON VIEW etl.batch_summary IS
  'One row per batch: documents (FHIR: resources) received and what became of them (erased: of a patient erased before or since; waiting: FHIR resources whose Patient or Encounter has not arrived); balanced says whether they add up; error, why its last transform failed; rows its snapshots deleted; who loaded it.';

-- FHIR resources in landing by type and outcome, for healthetl status (no payload is read).
CREATE VIEW etl.fhir_summary AS
SELECT d.resource_type, d.status, count(*) AS resources, min(d.received_at) AS oldest_received_at
FROM landing.raw_documents d
WHERE d.format = 'fhir-r4'
GROUP BY d.resource_type, d.status;
COMMENT ON VIEW etl.fhir_summary IS 'FHIR resources in landing by resourceType and status (waiting: its Patient or Encounter has not arrived yet), with the oldest arrival.';
GRANT SELECT ON etl.fhir_summary TO healthetl_loader;

-- ---- data quality: resources waiting too long ------------------------------------------------
-- waiting_too_long: FHIR resources waiting for their Patient or Encounter for more than the
-- threshold in hours (an export that never completes, or references that will never resolve).
CREATE FUNCTION dq.check_waiting_too_long(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT count(*), count(*) FILTER (WHERE d.received_at < clock_timestamp() - make_interval(secs => c.threshold * 3600)),
         round((extract(epoch FROM clock_timestamp() - min(d.received_at)) / 3600)::numeric, 2), '[]'::jsonb
  FROM landing.raw_documents d WHERE d.status = 'waiting'
$$;
INSERT INTO dq.check_kinds (kind, measure, threshold_meaning) VALUES
  ('waiting_too_long', 'hours', 'how many hours a FHIR resource may wait for its Patient or Encounter')
ON CONFLICT DO NOTHING;
INSERT INTO dq.checks (check_name, kind, relation, dimension, description, params, severity, threshold) VALUES
  ('landing_fhir_waiting_too_long', 'waiting_too_long', 'landing.raw_documents', 'timeliness',
   'FHIR resources do not wait for their Patient or Encounter longer than the threshold (hours).', '{}', 'warn', 72)
ON CONFLICT DO NOTHING;

-- ---- analyst views: the new columns, masked like their neighbours (added at the end: the views
-- are a contract for saved reports, columns are never renamed or removed) ---------------------
-- An age stops at death.
CREATE OR REPLACE VIEW analytics.patients AS
SELECT p.pseudonym AS patient_pseudonym,
       p.source_system,
       p.birth_date,
       date_part('year', age(coalesce(p.deceased_at::date, current_date), p.birth_date))::int AS age_years,
       p.sex,
       p.city,
       p.state,
       CASE WHEN p.postal_code ~ '^[0-9]{5}(-?[0-9]{4})?$'
             AND coalesce(upper(p.country), 'US') IN ('US', 'USA', 'UNITED STATES', 'UNITED STATES OF AMERICA')
            THEN left(p.postal_code, 5) END AS zip5,
       p.country,
       p.source_updated_at AS record_updated_at,
       p.loaded_at,
       p.deceased,
       p.deceased_at::date AS death_date
FROM clinical.patients p;
COMMENT ON COLUMN analytics.patients.age_years IS 'Age in whole years today, or at death for a patient who died.';
COMMENT ON COLUMN analytics.patients.deceased IS 'Whether the source says the patient died (NULL: not stated).';
COMMENT ON COLUMN analytics.patients.death_date IS 'Date of death (kept in a limited data set; FHIR Patient.deceasedDateTime).';

CREATE OR REPLACE VIEW analytics.visits AS
SELECT v.pseudonym AS patient_pseudonym,
       v.visit_key,
       v.visit_date,
       v.visit_start,
       v.discharge_date,
       v.discharge_date - v.visit_date AS length_of_stay_days,
       v.visit_type,
       v.facility_id,
       v.facility_name,
       v.provider_npi,
       v.provider_name,
       v.age_at_visit,
       v.visit_end
FROM clinical.visits v;
COMMENT ON COLUMN analytics.visits.visit_end IS 'When the visit ended, when the source gives a time (FHIR Encounter.period.end).';

CREATE OR REPLACE VIEW analytics.diagnoses AS
SELECT d.pseudonym AS patient_pseudonym, d.visit_key, d.visit_date, d.position,
       d.code, d.code_system, d.description, d.is_primary,
       d.onset_at::date AS onset_date, d.clinical_status
FROM clinical.diagnoses d;
COMMENT ON COLUMN analytics.diagnoses.onset_date IS 'When the condition began (FHIR Condition.onsetDateTime; NULL for patient documents).';
COMMENT ON COLUMN analytics.diagnoses.clinical_status IS 'FHIR Condition.clinicalStatus code: active, recurrence, relapse, inactive, remission or resolved (NULL for patient documents).';

-- A death year is a date element: suppressed, like the birth year, for anyone 90 or over today
-- (who keeps '90+' as age); below that, the age stops at death.
CREATE OR REPLACE VIEW deid.patients AS
SELECT k.research_id,
       CASE WHEN x.age < 90 THEN extract(year FROM p.birth_date)::int END AS birth_year,
       CASE WHEN x.age >= 90 THEN '90+'
            ELSE date_part('year', age(coalesce(p.deceased_at::date, current_date), p.birth_date))::int::text END AS age,
       p.sex,
       p.state,
       CASE WHEN p.postal_code ~ '^[0-9]{5}(-?[0-9]{4})?$'
             AND coalesce(upper(p.country), 'US') IN ('US', 'USA', 'UNITED STATES', 'UNITED STATES OF AMERICA')
            THEN CASE WHEN EXISTS (SELECT 1 FROM etl.restricted_zip3 z WHERE z.zip3 = left(p.postal_code, 3)) THEN '000'
                      ELSE left(p.postal_code, 3) END END AS zip3,
       p.deceased,
       CASE WHEN x.age < 90 THEN extract(year FROM p.deceased_at)::int END AS death_year
FROM clinical.patients p
JOIN etl.patient_keys k ON k.patient_key = p.patient_key
CROSS JOIN LATERAL (SELECT date_part('year', age(current_date, p.birth_date))::int AS age) x;
COMMENT ON COLUMN deid.patients.age IS 'Age in whole years today, or at death for a patient who died; ''90+'' for anyone who is (or would be) 90 or over today.';
COMMENT ON COLUMN deid.patients.deceased IS 'Whether the source says the patient died (NULL: not stated).';
COMMENT ON COLUMN deid.patients.death_year IS 'Year of death; NULL when not stated, and for patients who would be 90 or over today.';

CREATE OR REPLACE VIEW deid.diagnoses AS
SELECT k.research_id, v.research_visit_id, extract(year FROM d.visit_date)::int AS visit_year, d.position,
       d.code, d.code_system, d.is_primary,
       extract(year FROM d.onset_at)::int AS onset_year, d.clinical_status
FROM clinical.diagnoses d
LEFT JOIN etl.patient_keys k ON k.patient_key = d.patient_key
LEFT JOIN clinical.visits v ON v.patient_key = d.patient_key AND v.visit_key = d.visit_key AND v.visit_date = d.visit_date;
COMMENT ON COLUMN deid.diagnoses.onset_year IS 'Year the condition began (FHIR Condition.onsetDateTime; NULL for patient documents).';
COMMENT ON COLUMN deid.diagnoses.clinical_status IS 'FHIR Condition.clinicalStatus code: active, recurrence, relapse, inactive, remission or resolved (NULL for patient documents).';

COMMENT ON COLUMN clinical.patients.deceased IS 'FHIR Patient.deceased[x]: true when deceasedBoolean is true or a deceasedDateTime is given.';
COMMENT ON COLUMN clinical.patients.deceased_at IS 'FHIR Patient.deceasedDateTime.';
COMMENT ON COLUMN clinical.visits.visit_end IS 'FHIR Encounter.period.end.';
COMMENT ON COLUMN clinical.diagnoses.source_diagnosis_id IS 'FHIR Condition.id (patient documents have no diagnosis id).';

SELECT etl.adopt_objects();

-- Down Migration
SET LOCAL search_path = pg_catalog, pg_temp;
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM landing.raw_documents WHERE format = 'fhir-r4' OR status = 'waiting') THEN
    RAISE EXCEPTION 'this database holds FHIR resources: migrating below 0012 would lose them'
      USING ERRCODE = 'HE012', HINT = 'Erase or purge them first, or restore a backup taken before 0012.';
  END IF;
END
$$;

DROP VIEW analytics.patients, analytics.visits, analytics.diagnoses, deid.patients, deid.diagnoses;
CREATE VIEW analytics.patients AS
SELECT p.pseudonym AS patient_pseudonym,
       p.source_system,
       p.birth_date,
       date_part('year', age(current_date, p.birth_date))::int AS age_years,
       p.sex,
       p.city,
       p.state,
       CASE WHEN p.postal_code ~ '^[0-9]{5}(-?[0-9]{4})?$'
             AND coalesce(upper(p.country), 'US') IN ('US', 'USA', 'UNITED STATES', 'UNITED STATES OF AMERICA')
            THEN left(p.postal_code, 5) END AS zip5,
       p.country,
       p.source_updated_at AS record_updated_at,
       p.loaded_at
FROM clinical.patients p;
CREATE VIEW analytics.visits AS
SELECT v.pseudonym AS patient_pseudonym,
       v.visit_key,
       v.visit_date,
       v.visit_start,
       v.discharge_date,
       v.discharge_date - v.visit_date AS length_of_stay_days,
       v.visit_type,
       v.facility_id,
       v.facility_name,
       v.provider_npi,
       v.provider_name,
       v.age_at_visit
FROM clinical.visits v;
CREATE VIEW analytics.diagnoses AS
SELECT d.pseudonym AS patient_pseudonym, d.visit_key, d.visit_date, d.position,
       d.code, d.code_system, d.description, d.is_primary
FROM clinical.diagnoses d;
CREATE VIEW deid.patients AS
SELECT k.research_id,
       CASE WHEN x.age < 90 THEN extract(year FROM p.birth_date)::int END AS birth_year,
       CASE WHEN x.age >= 90 THEN '90+' ELSE x.age::text END AS age,
       p.sex,
       p.state,
       CASE WHEN p.postal_code ~ '^[0-9]{5}(-?[0-9]{4})?$'
             AND coalesce(upper(p.country), 'US') IN ('US', 'USA', 'UNITED STATES', 'UNITED STATES OF AMERICA')
            THEN CASE WHEN EXISTS (SELECT 1 FROM etl.restricted_zip3 z WHERE z.zip3 = left(p.postal_code, 3)) THEN '000'
                      ELSE left(p.postal_code, 3) END END AS zip3
FROM clinical.patients p
JOIN etl.patient_keys k ON k.patient_key = p.patient_key
CROSS JOIN LATERAL (SELECT date_part('year', age(current_date, p.birth_date))::int AS age) x;
CREATE VIEW deid.diagnoses AS
SELECT k.research_id, v.research_visit_id, extract(year FROM d.visit_date)::int AS visit_year, d.position,
       d.code, d.code_system, d.is_primary
FROM clinical.diagnoses d
LEFT JOIN etl.patient_keys k ON k.patient_key = d.patient_key
LEFT JOIN clinical.visits v ON v.patient_key = d.patient_key AND v.visit_key = d.visit_key AND v.visit_date = d.visit_date;
COMMENT ON VIEW analytics.patients IS 'One row per patient (HIPAA limited data set): no names, SSN, MRN, phone, email, street lines or source ids.';
COMMENT ON VIEW analytics.visits IS 'One row per visit, with the patient''s age at the visit (limited data set: dates of service kept; no visit ids from the source). Join analytics.patients on patient_pseudonym for sex or residence.';
COMMENT ON VIEW analytics.diagnoses IS 'One row per diagnosis of a visit (limited data set).';
COMMENT ON VIEW deid.patients IS 'One row per patient (HIPAA Safe Harbor): no identifiers, no full dates, ages over 89 grouped, ZIP to 3 digits.';
COMMENT ON VIEW deid.diagnoses IS 'One row per diagnosis (Safe Harbor): codes only, no description text.';
COMMENT ON COLUMN analytics.patients.patient_pseudonym IS 'Keyed pseudonym (uuid): the first 128 bits of an HMAC-SHA256 of source system and patient id under a secret key; stable across loads, changes only when the key is rotated.';
COMMENT ON COLUMN analytics.patients.source_system IS 'The system the record came from (an organisation, not a person).';
COMMENT ON COLUMN analytics.patients.birth_date IS 'Date of birth (kept in a limited data set).';
COMMENT ON COLUMN analytics.patients.age_years IS 'Age in whole years today.';
COMMENT ON COLUMN analytics.patients.sex IS 'female, male, other or unknown.';
COMMENT ON COLUMN analytics.patients.city IS 'City of residence (kept in a limited data set).';
COMMENT ON COLUMN analytics.patients.state IS 'State of residence.';
COMMENT ON COLUMN analytics.patients.zip5 IS 'US 5-digit ZIP code (ZIP+4 cut to 5 digits); NULL for other postal codes.';
COMMENT ON COLUMN analytics.patients.country IS 'Country of residence as sent.';
COMMENT ON COLUMN analytics.patients.record_updated_at IS 'When the source last updated the record (its updated_at).';
COMMENT ON COLUMN analytics.patients.loaded_at IS 'When healthetl loaded the current record.';
COMMENT ON COLUMN analytics.visits.patient_pseudonym IS 'The patient''s keyed pseudonym (as in analytics.patients).';
COMMENT ON COLUMN analytics.visits.visit_key IS 'Surrogate key of the visit, assigned by healthetl (not from the source); joins diagnoses, treatments and notes.';
COMMENT ON COLUMN analytics.visits.visit_date IS 'Date of the visit (admission for a stay).';
COMMENT ON COLUMN analytics.visits.visit_start IS 'Time the visit started, when the source gave one.';
COMMENT ON COLUMN analytics.visits.discharge_date IS 'Date of discharge, for stays.';
COMMENT ON COLUMN analytics.visits.length_of_stay_days IS 'discharge_date - visit_date, in days.';
COMMENT ON COLUMN analytics.visits.visit_type IS 'outpatient, inpatient, emergency, telehealth or other.';
COMMENT ON COLUMN analytics.visits.facility_id IS 'Facility id from the source.';
COMMENT ON COLUMN analytics.visits.facility_name IS 'Facility name.';
COMMENT ON COLUMN analytics.visits.provider_npi IS 'The provider''s National Provider Identifier (a provider, not the patient).';
COMMENT ON COLUMN analytics.visits.provider_name IS 'The provider''s name (a provider, not the patient).';
COMMENT ON COLUMN analytics.visits.age_at_visit IS 'The patient''s age in whole years on the visit date.';
COMMENT ON COLUMN analytics.diagnoses.patient_pseudonym IS 'The patient''s keyed pseudonym.';
COMMENT ON COLUMN analytics.diagnoses.visit_key IS 'The visit (analytics.visits.visit_key).';
COMMENT ON COLUMN analytics.diagnoses.visit_date IS 'Date of the visit.';
COMMENT ON COLUMN analytics.diagnoses.position IS 'Order of the diagnosis in the visit (0-based).';
COMMENT ON COLUMN analytics.diagnoses.code IS 'Diagnosis code.';
COMMENT ON COLUMN analytics.diagnoses.code_system IS 'Code system of code (for example ICD-10-CM, SNOMED CT).';
COMMENT ON COLUMN analytics.diagnoses.description IS 'Description of the code as sent.';
COMMENT ON COLUMN analytics.diagnoses.is_primary IS 'Whether this is the visit''s primary diagnosis.';
COMMENT ON COLUMN deid.patients.research_id IS 'Random research id (not derived from any identifier; not the analytics pseudonym, so the tiers cannot be linked).';
COMMENT ON COLUMN deid.patients.birth_year IS 'Year of birth; NULL for patients aged 90 or over.';
COMMENT ON COLUMN deid.patients.age IS 'Age in whole years today, as text; 90+ for every age over 89.';
COMMENT ON COLUMN deid.patients.sex IS 'female, male, other or unknown.';
COMMENT ON COLUMN deid.patients.state IS 'State of residence.';
COMMENT ON COLUMN deid.patients.zip3 IS 'First 3 digits of a US ZIP code; 000 for the restricted prefixes (etl.restricted_zip3); NULL for non-US postal codes.';
COMMENT ON COLUMN deid.diagnoses.research_id IS 'The patient''s research id.';
COMMENT ON COLUMN deid.diagnoses.research_visit_id IS 'The visit (deid.visits.research_visit_id).';
COMMENT ON COLUMN deid.diagnoses.visit_year IS 'Year of the visit.';
COMMENT ON COLUMN deid.diagnoses.position IS 'Order of the diagnosis in the visit (0-based).';
COMMENT ON COLUMN deid.diagnoses.code IS 'Diagnosis code.';
COMMENT ON COLUMN deid.diagnoses.code_system IS 'Code system of code.';
COMMENT ON COLUMN deid.diagnoses.is_primary IS 'Whether this is the visit''s primary diagnosis.';
GRANT SELECT ON analytics.patients, analytics.visits, analytics.diagnoses TO healthetl_analyst;
GRANT SELECT ON deid.patients, deid.diagnoses TO healthetl_researcher;

DELETE FROM dq.results WHERE check_name = 'landing_fhir_waiting_too_long';
DELETE FROM dq.checks WHERE check_name = 'landing_fhir_waiting_too_long';
DELETE FROM dq.check_changes WHERE check_name = 'landing_fhir_waiting_too_long';
DELETE FROM dq.check_kinds WHERE kind = 'waiting_too_long';
DROP FUNCTION dq.check_waiting_too_long(dq.checks, bigint[], bigint);

DROP VIEW etl.fhir_summary;
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

GRANT SELECT ON etl.batch_summary TO healthetl_loader;

-- 0011's etl.step_documents, whole.
CREATE OR REPLACE FUNCTION etl.step_documents(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[])
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

-- 0011's etl.transform_documents, whole.
CREATE OR REPLACE FUNCTION etl.transform_documents(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[])
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

-- 0011's etl.step_poison, whole.
CREATE OR REPLACE FUNCTION etl.step_poison()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

-- 0011's etl.ensure_batch_partitions, whole.
CREATE OR REPLACE FUNCTION etl.ensure_batch_partitions(p_batch_id bigint, p_shard integer DEFAULT 0, p_shards integer DEFAULT 1)
 RETURNS integer
 LANGUAGE sql
 SECURITY DEFINER
 SET jit TO 'off'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

-- 0011's etl.stage_known_file, whole.
CREATE OR REPLACE FUNCTION etl.stage_known_file(p_batch_id bigint, p_source_file text, p_size bigint, p_sha256 bytea)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

-- 0011's etl.erase_patient, whole.
CREATE OR REPLACE FUNCTION etl.erase_patient(p_source_system text, p_patient_id text)
 RETURNS TABLE(erasure_id bigint, documents bigint, clinical_rows bigint, files bigint)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

-- 0011's etl.erase_patient_rows, whole.
CREATE OR REPLACE FUNCTION etl.erase_patient_rows(p_patient_key bigint)
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
  DELETE FROM dq.result_samples WHERE patient_key = p_patient_key;
  RETURN v_rows;
END
$function$;

-- 0011's etl.purge, whole.
CREATE OR REPLACE FUNCTION etl.purge(p_older_than interval)
 RETURNS TABLE(payloads bigint, rejects bigint, problems bigint)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

-- The previous etl.replay_patients (0007), whole.
CREATE OR REPLACE FUNCTION etl.replay_patients(p_patient_keys bigint[])
 RETURNS TABLE(patient_key bigint, outcome text, field text)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

-- The previous etl.step_visit_partitions (0005) and etl.step_erased (0010), whole.
CREATE OR REPLACE FUNCTION etl.step_visit_partitions(p_batch_id bigint, p_shard integer, p_shards integer)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION etl.step_erased()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

DROP FUNCTION etl.need_visit_partitions(int[], bigint, int, int);
DROP FUNCTION etl.step_source_kinds();
DROP FUNCTION etl.step_fhir_outcomes(bigint), etl.step_fhir_notes(), etl.step_fhir_treatments(), etl.step_fhir_conditions(),
  etl.step_fhir_links(), etl.step_fhir_encounters(bigint, int, int), etl.step_fhir_patients(bigint), etl.step_fhir_versions(),
  etl.step_fhir_rules(), etl.step_fhir_duplicates(), etl.step_fhir_documents(bigint, int, int, bigint[]);
DROP FUNCTION etl.fhir_note_text(jsonb), etl.fhir_name_text(jsonb), etl.visit_type_of_class(text), etl.fhir_coding(jsonb),
  etl.code_system_of(text), etl.fhir_instant(text), etl.fhir_encounter_id(text, jsonb, jsonb), etl.fhir_shard_of(text, text, int), etl.fhir_strings(jsonb), etl.fhir_patient_id(text, jsonb),
  etl.fhir_conditional_value(text), etl.fhir_ref_id(text, text);
ALTER TABLE clinical.diagnoses DROP COLUMN source_diagnosis_id, DROP COLUMN onset_at, DROP COLUMN clinical_status;
ALTER TABLE clinical.visits DROP COLUMN visit_end;
ALTER TABLE clinical.patients DROP COLUMN deceased, DROP COLUMN deceased_at;
DROP TABLE etl.fhir_resources;
DROP INDEX landing.raw_documents_waiting_idx, landing.raw_documents_fhir_directory_idx;
ALTER TABLE landing.raw_documents DROP CONSTRAINT raw_documents_status_check;
ALTER TABLE landing.raw_documents ADD CONSTRAINT raw_documents_status_check
  CHECK (status IN ('staged', 'loaded', 'rejected', 'duplicate', 'superseded', 'erased'));
ALTER TABLE landing.raw_documents DROP CONSTRAINT raw_documents_format_check;
ALTER TABLE landing.raw_documents ADD CONSTRAINT raw_documents_format_check CHECK (format IN ('ndjson', 'json'));
ALTER TABLE landing.raw_documents DROP COLUMN resource_type, DROP COLUMN source_system;

SELECT etl.adopt_objects();
