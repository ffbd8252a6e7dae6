-- Up Migration
-- Two tiers of masked views over the clinical tables, which analysts never read:
-- * analytics (HIPAA limited data set, for operational BI; role healthetl_analyst): no names, SSN,
--   MRN, phone, email, street lines or source ids; dates, birth date, city, state and 5-digit ZIP
--   kept; the patient is a keyed pseudonym (the first 128 bits of an HMAC-SHA256, key in
--   etl.secret_keys, as a uuid); note text is redacted;
-- * deid (HIPAA Safe Harbor, for research; role healthetl_researcher): also every date reduced to its
--   year, ages over 89 in one '90+' group with their birth year suppressed, ZIP to 3 digits ('000'
--   for the restricted prefixes), no free text; the patient is a random research id, not derived
--   from any identifier (45 CFR 164.514(c)), which the analytics tier does not show.
-- Everything the views show is stored by the transform (pseudonym, redacted note, research id): a
-- view calls no hash and no redaction per row (date arithmetic and a ZIP-shape test only), and none
-- of our functions (analysts may execute none). The pseudonym is stored on every clinical table, so that the child views need no
-- join to patients: with the join, a top-diagnoses query took 1.4-1.7 times the base tables' time
-- (a hash of all patients, a wide sort); without it, 1.0 (measured on 50,000 patients). No view filters rows, so none needs security_barrier (which would stop the planner
-- pushing BI filters down, and so partition pruning).
SET LOCAL search_path = pg_catalog, pg_temp;
-- A transform running meanwhile would write rows without a pseudonym: wait for it, and hold the
-- next ones off until this commits (they wait on its locks anyway).
SELECT etl.lock_out_transforms();

CREATE SCHEMA deid;
COMMENT ON SCHEMA deid IS 'De-identified views for researchers (HIPAA Safe Harbor).';

-- ---- stored masks ------------------------------------------------------------------------------

-- The pseudonym is computed when the transform writes the patient (etl.step_patients), from the
-- source system and id under the 'pseudonym' key, and copied to the patient's rows in the other
-- clinical tables as they are written; etl.rotate_pseudonym_key replaces all of them.
-- The first 128 bits of the HMAC-SHA256, as a uuid: compact, compared fast, a type BI tools know.
CREATE FUNCTION etl.keyed_uuid(p_key bytea, p_source_system text, p_patient_id text) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN left(etl.keyed_hash(p_key, p_source_system, p_patient_id), 32)::uuid;

ALTER TABLE clinical.patients ADD COLUMN pseudonym uuid;
UPDATE clinical.patients p SET pseudonym = etl.keyed_uuid(k.key, p.source_system, p.source_patient_id)
FROM etl.secret_keys k WHERE k.purpose = 'pseudonym';
ALTER TABLE clinical.patients ALTER COLUMN pseudonym SET NOT NULL;
CREATE INDEX patients_pseudonym_idx ON clinical.patients (pseudonym);
ALTER TABLE clinical.visits ADD COLUMN pseudonym uuid;
-- The patient's age at the visit, fixed by the snapshot that wrote both (a new snapshot rewrites
-- every visit): stored, so that analytics.visits needs no join to patients, and a date filter on it
-- can still be answered from the (visit_date, visit_type) index alone.
ALTER TABLE clinical.visits ADD COLUMN age_at_visit int;
ALTER TABLE clinical.diagnoses ADD COLUMN pseudonym uuid;
ALTER TABLE clinical.treatments ADD COLUMN pseudonym uuid;
ALTER TABLE clinical.provider_notes ADD COLUMN pseudonym uuid;
UPDATE clinical.visits c SET pseudonym = p.pseudonym, age_at_visit = date_part('year', age(c.visit_date, p.birth_date))::int
FROM clinical.patients p WHERE p.patient_key = c.patient_key;
UPDATE clinical.diagnoses c SET pseudonym = p.pseudonym FROM clinical.patients p WHERE p.patient_key = c.patient_key;
UPDATE clinical.treatments c SET pseudonym = p.pseudonym FROM clinical.patients p WHERE p.patient_key = c.patient_key;
UPDATE clinical.provider_notes c SET pseudonym = p.pseudonym FROM clinical.patients p WHERE p.patient_key = c.patient_key;
ALTER TABLE clinical.visits ALTER COLUMN pseudonym SET NOT NULL;
ALTER TABLE clinical.diagnoses ALTER COLUMN pseudonym SET NOT NULL;
ALTER TABLE clinical.treatments ALTER COLUMN pseudonym SET NOT NULL;
ALTER TABLE clinical.provider_notes ALTER COLUMN pseudonym SET NOT NULL;
-- A patient's history by pseudonym, as the base tables find it by patient_key.
CREATE INDEX visits_pseudonym_idx ON clinical.visits (pseudonym);
CREATE INDEX diagnoses_pseudonym_idx ON clinical.diagnoses (pseudonym, visit_key);
CREATE INDEX treatments_pseudonym_idx ON clinical.treatments (pseudonym, visit_key);
CREATE INDEX provider_notes_pseudonym_idx ON clinical.provider_notes (pseudonym, visit_key);

-- A random research id per patient identity, given once (a volatile default: one value per row).
ALTER TABLE etl.patient_keys ADD COLUMN research_id uuid NOT NULL DEFAULT gen_random_uuid();
-- And one per visit: deid shows it instead of visit_key, which analytics shows, so that the tiers
-- share no key (through visit_key, a deid row could be joined to the limited data set's dates). A
-- visit written again by a newer snapshot gets a new one.
ALTER TABLE clinical.visits ADD COLUMN research_visit_id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE etl.patient_keys ADD CONSTRAINT patient_keys_research_id_key UNIQUE (research_id);

-- HIPAA Safe Harbor's restricted 3-digit ZIP prefixes (populations of 20,000 or fewer), as data with
-- its source. The deid views use the union of the lists (the stricter choice); an organisation may
-- add its own list (INSERT with its source), and the next deid query uses it.
CREATE TABLE etl.restricted_zip3 (
  zip3    text NOT NULL CHECK (zip3 ~ '^[0-9]{3}$'),
  source  text NOT NULL,
  PRIMARY KEY (zip3, source)
);
COMMENT ON TABLE etl.restricted_zip3 IS 'Restricted 3-digit ZIP prefixes (45 CFR 164.514(b)(2)(i)(B)), one row per prefix and list; deid shows 000 for any of them.';
INSERT INTO etl.restricted_zip3 (zip3, source)
SELECT z, 'Census 2000, HHS OCR de-identification guidance (2012)'
FROM unnest(ARRAY['036', '059', '063', '102', '203', '556', '692', '790', '821', '823', '830', '831', '878', '879', '884', '890', '893']) AS z
UNION ALL
SELECT z, 'Census 2010, microsoft/Tools-for-Health-Data-Anonymization configuration-sample.json (restrictedZipCodeTabulationAreas)'
FROM unnest(ARRAY['036', '059', '102', '203', '205', '369', '556', '692', '821', '823', '878', '879', '884', '893']) AS z;

-- Redacts identifiers from a note: email addresses, phone numbers and SSN-shaped numbers anywhere,
-- and the patient's own MRN, birth date (ISO, US and European numeric forms, month names) and
-- names, each replaced by a marker ([EMAIL], [PHONE], [SSN], [MRN], [DOB], [NAME]). Dates of
-- service stay. Called by the transform once per note; the result is stored. Each pattern runs only
-- when a cheap test (a character, a digit run, the value as a substring) says it can match: the
-- per-patient patterns differ for every patient, and compiling them is most of the cost.
CREATE FUNCTION etl.redact_note(p_text text, p_mrn text, p_birth_date date, p_names text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t text := p_text;
  v_lower text;
  -- not after or before a letter or digit
  b text := '(?<![[:alnum:]])';
  a text := '(?![[:alnum:]])';
  v_names text;
  w text;
  y text; m text; d text;
  v_month text;
BEGIN
  IF t IS NULL THEN
    RETURN NULL;
  END IF;
  IF strpos(t, '@') > 0 THEN
    t := regexp_replace(t, '[[:alnum:]._%+-]+@[[:alnum:]-]+(\.[[:alnum:]-]+)*\.[[:alpha:]]{2,}', '[EMAIL]', 'g');
  END IF;
  IF t ~ '[0-9]{3}' THEN
    -- a separator before the last four digits: a bare 10-digit number may be an NPI
    t := regexp_replace(t, '(?<![[:alnum:]+])(\+?1[ .-]?)?(\(\d{3}\) ?|\d{3}[ .-]?)\d{3}[ .-]\d{4}' || a, '[PHONE]', 'g');
    t := regexp_replace(t, b || '\d{3}([- ]?)\d{2}\1\d{4}' || a, '[SSN]', 'g');
  END IF;
  v_lower := lower(t);
  IF length(btrim(p_mrn)) >= 2 AND strpos(v_lower, lower(btrim(p_mrn))) > 0 THEN
    -- every character that is not a letter or digit is escaped: the MRN is matched literally
    t := regexp_replace(t, b || regexp_replace(btrim(p_mrn), '([^[:alnum:]])', '\\\1', 'g') || a, '[MRN]', 'gi');
  END IF;
  IF p_birth_date IS NOT NULL THEN
    y := extract(year FROM p_birth_date)::text;
    -- the year, or its last two digits after a separator (3/15/80)
    IF strpos(t, y) > 0 OR strpos(t, '/' || right(y, 2)) > 0 OR strpos(t, '-' || right(y, 2)) > 0
       OR strpos(t, '.' || right(y, 2)) > 0 THEN
      m := extract(month FROM p_birth_date)::text;
      d := extract(day FROM p_birth_date)::text;
      v_month := format('(%s|%s)\.?', to_char(p_birth_date, 'FMMonth'), to_char(p_birth_date, 'Mon'));
      t := regexp_replace(t, b || '(' || concat_ws('|',
             format('%s[/.-]0?%s[/.-]0?%s', y, m, d),                                  -- 1980-03-15
             format('0?%s[/.-]0?%s[/.-](%s|%s)', m, d, y, right(y, 2)),                 -- 3/15/1980, 03-15-80
             format('0?%s[/.-]0?%s[/.-]%s', d, m, y),                                   -- 15.03.1980
             to_char(p_birth_date, 'YYYYMMDD'),                                         -- 19800315
             format('%s 0?%s(st|nd|rd|th)?,? %s', v_month, d, y),                       -- March 15, 1980
             format('0?%s(st|nd|rd|th)? (of )?%s,? %s', d, v_month, y)) || ')' || a,   -- 15 March 1980
           '[DOB]', 'gi');
    END IF;
  END IF;
  -- names of two letters or more, each word on its own, only those the text holds (a loop, not a
  -- query: this runs for every note)
  FOREACH w IN ARRAY regexp_split_to_array(coalesce(p_names, ''), '[[:space:],]+') LOOP
    IF length(w) >= 2 AND strpos(v_lower, lower(w)) > 0 THEN
      v_names := concat_ws('|', v_names, regexp_replace(w, '([^[:alnum:]])', '\\\1', 'g'));
    END IF;
  END LOOP;
  IF v_names IS NOT NULL THEN
    t := regexp_replace(t, b || '(' || v_names || ')' || a, '[NAME]', 'gi');
  END IF;
  RETURN t;
END
$$;

ALTER TABLE clinical.provider_notes ADD COLUMN note_text_redacted text;
UPDATE clinical.provider_notes n
SET note_text_redacted = etl.redact_note(n.note_text, p.mrn, p.birth_date,
                                         concat_ws(' ', p.given_name, p.family_name))
FROM clinical.patients p WHERE p.patient_key = n.patient_key;

-- Reads t_apply, t_docs, etl.secret_keys; writes clinical.patients: inserts or replaces each
-- patient's row, with its pseudonym. Restated from 0005: the pseudonym.
CREATE OR REPLACE FUNCTION etl.step_patients(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO clinical.patients AS p (
    patient_key, source_system, source_patient_id, mrn, ssn, name_prefix, given_name, family_name, name_suffix,
    birth_date, sex, phone, email, address_lines, city, state, postal_code, country,
    source_updated_at, document_id, content_sha256, batch_id, loaded_at, pseudonym)
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
         a.updated_at, a.document_id, a.content_sha256, p_batch_id, now(),
         etl.keyed_uuid(k.key, a.source_system, a.source_patient_id)
  FROM t_apply a
  JOIN t_docs d ON d.document_id = a.document_id
  CROSS JOIN (SELECT s.key FROM etl.secret_keys s WHERE s.purpose = 'pseudonym') k
  ON CONFLICT (patient_key) DO UPDATE SET
    source_system = excluded.source_system, source_patient_id = excluded.source_patient_id,
    mrn = excluded.mrn, ssn = excluded.ssn, name_prefix = excluded.name_prefix,
    given_name = excluded.given_name, family_name = excluded.family_name, name_suffix = excluded.name_suffix,
    birth_date = excluded.birth_date, sex = excluded.sex, phone = excluded.phone, email = excluded.email,
    address_lines = excluded.address_lines, city = excluded.city, state = excluded.state,
    postal_code = excluded.postal_code, country = excluded.country,
    source_updated_at = excluded.source_updated_at, document_id = excluded.document_id,
    content_sha256 = excluded.content_sha256, batch_id = excluded.batch_id, loaded_at = excluded.loaded_at,
    pseudonym = excluded.pseudonym;
END
$$;

-- Reads t_visits, t_apply, clinical.patients (written by etl.step_patients); writes clinical.visits
-- (keys assigned by etl.step_visits) with the patient's pseudonym and age at the visit. Restated
-- from 0005: the pseudonym, the age.
CREATE OR REPLACE FUNCTION etl.step_insert_visits() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO clinical.visits (patient_key, visit_key, visit_date, source_visit_id, visit_start, discharge_date,
                               visit_type, facility_id, facility_name, provider_npi, provider_name, position, pseudonym,
                               age_at_visit)
  SELECT a.patient_key, tv.visit_key, tv.visit_date, tv.vid,
         CASE WHEN NOT etl.is_ymd(tv.vdate_raw) THEN etl.to_timestamptz(tv.vdate_raw) END,
         etl.to_visit_date(tv.discharge_raw),
         etl.visit_type_of(tv.type_raw),
         etl.jtext(tv.facility -> 'id'), etl.jtext(tv.facility -> 'name'),
         etl.jtext(tv.provider -> 'npi'), etl.jtext(tv.provider -> 'name'),
         tv.position, p.pseudonym, date_part('year', age(tv.visit_date, p.birth_date))::int
  FROM t_visits tv
  JOIN t_apply a ON a.document_id = tv.document_id
  JOIN clinical.patients p ON p.patient_key = a.patient_key;
END
$$;

-- Reads t_visits, t_apply, clinical.patients; writes clinical.diagnoses (with the pseudonym), and
-- etl.document_problems for a `primary` that is not a boolean (the rows are expanded once and feed
-- both). Restated from 0005: the pseudonym.
CREATE OR REPLACE FUNCTION etl.step_diagnoses(p_batch_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  WITH src AS MATERIALIZED (
    SELECT a.patient_key, tv.document_id, tv.position AS vpos, tv.visit_key, tv.visit_date, (x.ord - 1)::int AS position, x.*
    FROM t_visits tv
    JOIN t_apply a ON a.document_id = tv.document_id
    CROSS JOIN LATERAL ROWS FROM (jsonb_to_recordset(etl.jarr(tv.v -> 'diagnoses'))
      AS (code jsonb, system jsonb, description jsonb, "primary" jsonb)) WITH ORDINALITY AS x(code, system, description, "primary", ord)
  ), ins AS (
    INSERT INTO clinical.diagnoses (patient_key, visit_key, visit_date, position, code, code_system, description, is_primary, pseudonym)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position,
           etl.jtext(s.code), coalesce(etl.jtext(s.system), 'ICD-10-CM'), etl.jtext(s.description),
           CASE WHEN jsonb_typeof(s."primary") = 'boolean' THEN s."primary"::boolean END, p.pseudonym
    FROM src s
    JOIN clinical.patients p ON p.patient_key = s.patient_key
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].diagnoses[%s].primary', s.vpos, s.position), 'not a boolean'
  FROM src s
  WHERE NOT etl.is_absent(s."primary") AND jsonb_typeof(s."primary") <> 'boolean';
END
$$;

-- Reads t_visits, t_apply, clinical.patients; writes clinical.treatments (with the pseudonym), and
-- etl.document_problems for an unknown type, an invalid start or end date, or a name over
-- etl.max_key_bytes() (it is indexed; the name is optional, so it loads as NULL). Restated from
-- 0006: the pseudonym.
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
                                     code, code_system, name, dose, route, frequency, start_date, end_date, pseudonym)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position, etl.jtext(s.treatment_id), s.treatment_type,
           etl.jtext(s.code), etl.jtext(s.system), CASE WHEN s.name_too_long THEN NULL ELSE etl.jtext(s.name) END,
           etl.jtext(s.dose), etl.jtext(s.route), etl.jtext(s.frequency), s.start_d, s.end_d, p.pseudonym
    FROM src s
    JOIN clinical.patients p ON p.patient_key = s.patient_key
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

-- Reads t_visits, t_apply, clinical.patients (written by etl.step_patients); writes
-- clinical.provider_notes with each note's redacted text and the pseudonym, and
-- etl.document_problems for an invalid written_at. Restated from 0005: the redacted text, the pseudonym.
CREATE OR REPLACE FUNCTION etl.step_provider_notes(p_batch_id bigint) RETURNS void
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
    INSERT INTO clinical.provider_notes (patient_key, visit_key, visit_date, position, source_note_id, author, written_at,
                                         note_text, note_text_redacted, pseudonym)
    SELECT s.patient_key, s.visit_key, s.visit_date, s.position,
           etl.jtext(s.note_id), etl.jtext(s.author), s.written_ts, etl.jtext(s.text),
           etl.redact_note(etl.jtext(s.text), p.mrn, p.birth_date, concat_ws(' ', p.given_name, p.family_name)),
           p.pseudonym
    FROM src s
    JOIN clinical.patients p ON p.patient_key = s.patient_key
  )
  INSERT INTO etl.document_problems (document_id, batch_id, field, problem)
  SELECT s.document_id, p_batch_id, format('visits[%s].provider_notes[%s].written_at', s.vpos, s.position), 'not a valid RFC 3339 timestamp'
  FROM src s
  WHERE s.written_ts IS NULL AND NOT etl.is_absent(s.written_at);
END
$$;

-- Replaces the pseudonym key and every stored pseudonym (patients and their rows), in the caller's
-- transaction (saved reports keyed by old pseudonyms stop matching: that is the point). Waits for
-- running transforms first.
-- Returns how many patients got a new pseudonym.
CREATE FUNCTION etl.rotate_pseudonym_key() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_n bigint;
BEGIN
  PERFORM etl.lock_out_transforms();
  UPDATE etl.secret_keys SET key = crypto.gen_random_bytes(32), created_at = clock_timestamp() WHERE purpose = 'pseudonym';
  UPDATE clinical.patients p SET pseudonym = etl.keyed_uuid(k.key, p.source_system, p.source_patient_id)
  FROM etl.secret_keys k WHERE k.purpose = 'pseudonym';
  GET DIAGNOSTICS v_n = ROW_COUNT;
  UPDATE clinical.visits c SET pseudonym = p.pseudonym FROM clinical.patients p WHERE p.patient_key = c.patient_key;
  UPDATE clinical.diagnoses c SET pseudonym = p.pseudonym FROM clinical.patients p WHERE p.patient_key = c.patient_key;
  UPDATE clinical.treatments c SET pseudonym = p.pseudonym FROM clinical.patients p WHERE p.patient_key = c.patient_key;
  UPDATE clinical.provider_notes c SET pseudonym = p.pseudonym FROM clinical.patients p WHERE p.patient_key = c.patient_key;
  RETURN v_n;
END
$$;

-- ---- analytics: the limited data set ----------------------------------------------------------

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

CREATE VIEW analytics.treatments AS
SELECT t.pseudonym AS patient_pseudonym, t.visit_key, t.visit_date, t.position,
       t.treatment_type, t.code, t.code_system, t.name, t.dose, t.route, t.frequency,
       t.start_date, t.end_date, t.end_date - t.start_date AS duration_days
FROM clinical.treatments t;

CREATE VIEW analytics.provider_notes AS
SELECT n.pseudonym AS patient_pseudonym, n.visit_key, n.visit_date, n.position,
       n.author, n.written_at, n.note_text_redacted AS note_text
FROM clinical.provider_notes n;

-- ---- deid: Safe Harbor ------------------------------------------------------------------------

-- Age in whole years, as text, with every age over 89 in '90+' (Safe Harbor's single group).
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

-- A patient who is 90 or over today gets no exact age at any visit (with the visit's year it would
-- give the birth year that deid.patients suppresses).
CREATE VIEW deid.visits AS
SELECT k.research_id,
       v.research_visit_id,
       extract(year FROM v.visit_date)::int AS visit_year,
       CASE WHEN x.age_now >= 90 OR x.age_then >= 90 THEN '90+' ELSE x.age_then::text END AS age_at_visit,
       v.discharge_date - v.visit_date AS length_of_stay_days,
       v.visit_type
FROM clinical.visits v
LEFT JOIN etl.patient_keys k ON k.patient_key = v.patient_key
LEFT JOIN clinical.patients p ON p.patient_key = v.patient_key
CROSS JOIN LATERAL (SELECT date_part('year', age(current_date, p.birth_date))::int AS age_now,
                           date_part('year', age(v.visit_date, p.birth_date))::int AS age_then) x;

CREATE VIEW deid.diagnoses AS
SELECT k.research_id, v.research_visit_id, extract(year FROM d.visit_date)::int AS visit_year, d.position,
       d.code, d.code_system, d.is_primary
FROM clinical.diagnoses d
LEFT JOIN etl.patient_keys k ON k.patient_key = d.patient_key
LEFT JOIN clinical.visits v ON v.patient_key = d.patient_key AND v.visit_key = d.visit_key AND v.visit_date = d.visit_date;

CREATE VIEW deid.treatments AS
SELECT k.research_id, v.research_visit_id, extract(year FROM t.visit_date)::int AS visit_year, t.position,
       t.treatment_type, t.code, t.code_system, t.route,
       extract(year FROM t.start_date)::int AS start_year, extract(year FROM t.end_date)::int AS end_year,
       t.end_date - t.start_date AS duration_days
FROM clinical.treatments t
LEFT JOIN etl.patient_keys k ON k.patient_key = t.patient_key
LEFT JOIN clinical.visits v ON v.patient_key = t.patient_key AND v.visit_key = t.visit_key AND v.visit_date = t.visit_date;

-- ---- what each view and column holds, and how it is masked (docs/data-dictionary.md is made from these)
COMMENT ON VIEW analytics.patients IS 'One row per patient (HIPAA limited data set): no names, SSN, MRN, phone, email, street lines or source ids.';
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

COMMENT ON VIEW analytics.visits IS 'One row per visit, with the patient''s age at the visit (limited data set: dates of service kept; no visit ids from the source). Join analytics.patients on patient_pseudonym for sex or residence.';
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

COMMENT ON VIEW analytics.diagnoses IS 'One row per diagnosis of a visit (limited data set).';
COMMENT ON COLUMN analytics.diagnoses.patient_pseudonym IS 'The patient''s keyed pseudonym.';
COMMENT ON COLUMN analytics.diagnoses.visit_key IS 'The visit (analytics.visits.visit_key).';
COMMENT ON COLUMN analytics.diagnoses.visit_date IS 'Date of the visit.';
COMMENT ON COLUMN analytics.diagnoses.position IS 'Order of the diagnosis in the visit (0-based).';
COMMENT ON COLUMN analytics.diagnoses.code IS 'Diagnosis code.';
COMMENT ON COLUMN analytics.diagnoses.code_system IS 'Code system of code (for example ICD-10-CM, SNOMED CT).';
COMMENT ON COLUMN analytics.diagnoses.description IS 'Description of the code as sent.';
COMMENT ON COLUMN analytics.diagnoses.is_primary IS 'Whether this is the visit''s primary diagnosis.';

COMMENT ON VIEW analytics.treatments IS 'One row per medication or procedure of a visit (limited data set).';
COMMENT ON COLUMN analytics.treatments.patient_pseudonym IS 'The patient''s keyed pseudonym.';
COMMENT ON COLUMN analytics.treatments.visit_key IS 'The visit (analytics.visits.visit_key).';
COMMENT ON COLUMN analytics.treatments.visit_date IS 'Date of the visit.';
COMMENT ON COLUMN analytics.treatments.position IS 'Order of the treatment in the visit (0-based).';
COMMENT ON COLUMN analytics.treatments.treatment_type IS 'medication or procedure.';
COMMENT ON COLUMN analytics.treatments.code IS 'Treatment code.';
COMMENT ON COLUMN analytics.treatments.code_system IS 'Code system of code (for example RxNorm, CPT, SNOMED CT).';
COMMENT ON COLUMN analytics.treatments.name IS 'Name of the drug or procedure as sent.';
COMMENT ON COLUMN analytics.treatments.dose IS 'Dose as sent.';
COMMENT ON COLUMN analytics.treatments.route IS 'Route of administration.';
COMMENT ON COLUMN analytics.treatments.frequency IS 'Frequency as sent.';
COMMENT ON COLUMN analytics.treatments.start_date IS 'Start date.';
COMMENT ON COLUMN analytics.treatments.end_date IS 'End date.';
COMMENT ON COLUMN analytics.treatments.duration_days IS 'end_date - start_date, in days.';

COMMENT ON VIEW analytics.provider_notes IS 'One row per provider note, its text redacted at load time (limited data set).';
COMMENT ON COLUMN analytics.provider_notes.patient_pseudonym IS 'The patient''s keyed pseudonym.';
COMMENT ON COLUMN analytics.provider_notes.visit_key IS 'The visit (analytics.visits.visit_key).';
COMMENT ON COLUMN analytics.provider_notes.visit_date IS 'Date of the visit.';
COMMENT ON COLUMN analytics.provider_notes.position IS 'Order of the note in the visit (0-based).';
COMMENT ON COLUMN analytics.provider_notes.author IS 'Who wrote the note (a provider).';
COMMENT ON COLUMN analytics.provider_notes.written_at IS 'When the note was written.';
COMMENT ON COLUMN analytics.provider_notes.note_text IS 'Note text with SSNs, phone numbers, email addresses and the patient''s MRN, birth date and names replaced by [SSN], [PHONE], [EMAIL], [MRN], [DOB], [NAME]; dates of service kept.';

COMMENT ON VIEW deid.patients IS 'One row per patient (HIPAA Safe Harbor): no identifiers, no full dates, ages over 89 grouped, ZIP to 3 digits.';
COMMENT ON COLUMN deid.patients.research_id IS 'Random research id (not derived from any identifier; not the analytics pseudonym, so the tiers cannot be linked).';
COMMENT ON COLUMN deid.patients.birth_year IS 'Year of birth; NULL for patients aged 90 or over.';
COMMENT ON COLUMN deid.patients.age IS 'Age in whole years today, as text; 90+ for every age over 89.';
COMMENT ON COLUMN deid.patients.sex IS 'female, male, other or unknown.';
COMMENT ON COLUMN deid.patients.state IS 'State of residence.';
COMMENT ON COLUMN deid.patients.zip3 IS 'First 3 digits of a US ZIP code; 000 for the restricted prefixes (etl.restricted_zip3); NULL for non-US postal codes.';

COMMENT ON VIEW deid.visits IS 'One row per visit (Safe Harbor): the year only.';
COMMENT ON COLUMN deid.visits.research_id IS 'The patient''s research id (deid.patients).';
COMMENT ON COLUMN deid.visits.research_visit_id IS 'Random id of the visit (not the analytics visit_key, so the tiers share no key; new when a newer record of the patient arrives); joins deid.diagnoses and deid.treatments.';
COMMENT ON COLUMN deid.visits.visit_year IS 'Year of the visit.';
COMMENT ON COLUMN deid.visits.age_at_visit IS 'Age in whole years at the visit, as text; 90+ for ages over 89 and for every visit of a patient who is 90 or over today.';
COMMENT ON COLUMN deid.visits.length_of_stay_days IS 'Length of stay in days (a duration, not a date).';
COMMENT ON COLUMN deid.visits.visit_type IS 'outpatient, inpatient, emergency, telehealth or other.';

COMMENT ON VIEW deid.diagnoses IS 'One row per diagnosis (Safe Harbor): codes only, no description text.';
COMMENT ON COLUMN deid.diagnoses.research_id IS 'The patient''s research id.';
COMMENT ON COLUMN deid.diagnoses.research_visit_id IS 'The visit (deid.visits.research_visit_id).';
COMMENT ON COLUMN deid.diagnoses.visit_year IS 'Year of the visit.';
COMMENT ON COLUMN deid.diagnoses.position IS 'Order of the diagnosis in the visit (0-based).';
COMMENT ON COLUMN deid.diagnoses.code IS 'Diagnosis code.';
COMMENT ON COLUMN deid.diagnoses.code_system IS 'Code system of code.';
COMMENT ON COLUMN deid.diagnoses.is_primary IS 'Whether this is the visit''s primary diagnosis.';

COMMENT ON VIEW deid.treatments IS 'One row per medication or procedure (Safe Harbor): codes and years only, no free text.';
COMMENT ON COLUMN deid.treatments.research_id IS 'The patient''s research id.';
COMMENT ON COLUMN deid.treatments.research_visit_id IS 'The visit (deid.visits.research_visit_id).';
COMMENT ON COLUMN deid.treatments.visit_year IS 'Year of the visit.';
COMMENT ON COLUMN deid.treatments.position IS 'Order of the treatment in the visit (0-based).';
COMMENT ON COLUMN deid.treatments.treatment_type IS 'medication or procedure.';
COMMENT ON COLUMN deid.treatments.code IS 'Treatment code.';
COMMENT ON COLUMN deid.treatments.code_system IS 'Code system of code.';
COMMENT ON COLUMN deid.treatments.route IS 'Route of administration.';
COMMENT ON COLUMN deid.treatments.start_year IS 'Year the treatment started.';
COMMENT ON COLUMN deid.treatments.end_year IS 'Year the treatment ended.';
COMMENT ON COLUMN deid.treatments.duration_days IS 'Duration in days (a duration, not a date).';

-- The k-anonymity of the deid tier: patients grouped by their quasi-identifiers (birth year or
-- 90+, sex, 3-digit ZIP, as deid.patients shows them); how small the smallest group is and how
-- many patients are in groups smaller than p_k. Counts only.
CREATE FUNCTION etl.privacy_report(p_k int DEFAULT 11)
RETURNS TABLE (k int, patients bigint, groups bigint, smallest_group bigint, groups_below_k bigint, patients_below_k bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT p_k, coalesce(sum(g.n), 0)::bigint, count(*), min(g.n),
         count(*) FILTER (WHERE g.n < p_k), coalesce(sum(g.n) FILTER (WHERE g.n < p_k), 0)::bigint
  FROM (SELECT count(*) AS n FROM deid.patients d
        GROUP BY coalesce(d.birth_year::text, d.age), d.sex, d.zip3) g
$$;

SELECT etl.adopt_objects();
GRANT USAGE ON SCHEMA analytics TO healthetl_analyst;
GRANT SELECT ON analytics.patients, analytics.visits, analytics.diagnoses, analytics.treatments, analytics.provider_notes
  TO healthetl_analyst;
GRANT USAGE ON SCHEMA deid TO healthetl_researcher;
GRANT SELECT ON deid.patients, deid.visits, deid.diagnoses, deid.treatments TO healthetl_researcher;
GRANT EXECUTE ON FUNCTION etl.privacy_report(int) TO healthetl_loader;

-- Down Migration
SET LOCAL search_path = pg_catalog, pg_temp;
DROP FUNCTION etl.privacy_report(int);
DROP VIEW deid.treatments, deid.diagnoses, deid.visits, deid.patients;
DROP VIEW analytics.provider_notes, analytics.treatments, analytics.diagnoses, analytics.visits, analytics.patients;
REVOKE ALL ON SCHEMA analytics FROM healthetl_analyst;
DROP FUNCTION etl.rotate_pseudonym_key();

-- Reads t_visits, t_apply; writes clinical.provider_notes, and etl.document_problems for an invalid
-- written_at.
CREATE OR REPLACE FUNCTION etl.step_provider_notes(p_batch_id bigint) RETURNS void
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

-- Reads t_apply, t_docs; writes clinical.patients: inserts or replaces each patient's row.
CREATE OR REPLACE FUNCTION etl.step_patients(p_batch_id bigint) RETURNS void
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

-- 0005's step_insert_visits and step_diagnoses and 0006's step_treatments, whole.
-- Reads t_visits, t_apply; writes clinical.visits (keys assigned by etl.step_visits).
CREATE OR REPLACE FUNCTION etl.step_insert_visits() RETURNS void
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
CREATE OR REPLACE FUNCTION etl.step_diagnoses(p_batch_id bigint) RETURNS void
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

ALTER TABLE clinical.provider_notes DROP COLUMN note_text_redacted;
DROP FUNCTION etl.redact_note(text, text, date, text);
DROP TABLE etl.restricted_zip3;
ALTER TABLE etl.patient_keys DROP COLUMN research_id;
ALTER TABLE clinical.provider_notes DROP COLUMN pseudonym;
ALTER TABLE clinical.treatments DROP COLUMN pseudonym;
ALTER TABLE clinical.diagnoses DROP COLUMN pseudonym;
ALTER TABLE clinical.visits DROP COLUMN research_visit_id;
ALTER TABLE clinical.visits DROP COLUMN age_at_visit;
ALTER TABLE clinical.visits DROP COLUMN pseudonym;
ALTER TABLE clinical.patients DROP COLUMN pseudonym;
DROP FUNCTION etl.keyed_uuid(bytea, text, text);
DROP SCHEMA deid;
