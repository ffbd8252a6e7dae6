-- The catalog of the healthetl schemas after all migrations, rendered by test/schema-snapshot.test.ts.
-- Generated: do not edit. A migration that changes the schema regenerates it (README, "Tests").
-- The same on PostgreSQL 15 and 18. For review, not for running: partitions, owners, OIDs and
-- column compression are left out; index lines include those behind primary and unique keys.

-- ==== schema analytics ==========================================================================

CREATE SCHEMA analytics;
COMMENT ON SCHEMA analytics IS 'Masked views for analysts.';
-- grants on schema analytics (besides its owner): healthetl_analyst USAGE

-- view analytics.data_freshness columns:
--   data_as_of timestamp with time zone
--   quality_checked_at timestamp with time zone
--   quality_status text
CREATE VIEW analytics.data_freshness AS
 SELECT ( SELECT max(b.transformed_at) AS max
           FROM etl.batches b
          WHERE (b.status = 'transformed'::text)) AS data_as_of,
    ( SELECT max(l.checked_at) AS max
           FROM dq.latest_results l) AS quality_checked_at,
        CASE
            WHEN (NOT (EXISTS ( SELECT 1
               FROM dq.latest_results))) THEN 'not checked'::text
            WHEN (EXISTS ( SELECT 1
               FROM dq.latest_results l
              WHERE (l.status = 'fail'::text))) THEN 'fail'::text
            WHEN (EXISTS ( SELECT 1
               FROM dq.latest_results l
              WHERE (l.status = 'warn'::text))) THEN 'warn'::text
            ELSE 'ok'::text
        END AS quality_status;
COMMENT ON VIEW analytics.data_freshness IS 'One row: when the data was last refreshed and the overall data-quality status, for a report''s "data as of ..., quality ok".';
COMMENT ON COLUMN analytics.data_freshness.data_as_of IS 'When the last batch was transformed into the clinical tables.';
COMMENT ON COLUMN analytics.data_freshness.quality_checked_at IS 'When the data-quality checks last ran.';
COMMENT ON COLUMN analytics.data_freshness.quality_status IS 'ok, warn, fail (the worst latest check) or not checked.';
-- grants on view analytics.data_freshness (besides its owner): healthetl_analyst SELECT

-- view analytics.data_quality columns:
--   check_name text
--   dimension text
--   description text
--   severity text
--   status text
--   failing_ratio numeric
--   checked_at timestamp with time zone
--   failing_since timestamp with time zone
CREATE VIEW analytics.data_quality AS
 SELECT check_name,
    dimension,
    description,
    severity,
    status,
    failing_ratio,
    checked_at,
    failing_since
   FROM dq.latest_results l;
COMMENT ON VIEW analytics.data_quality IS 'Each data-quality check''s latest status (no PHI: counts and ratios only).';
COMMENT ON COLUMN analytics.data_quality.check_name IS 'Name of the check.';
COMMENT ON COLUMN analytics.data_quality.dimension IS 'completeness, validity, uniqueness, consistency, timeliness or volume.';
COMMENT ON COLUMN analytics.data_quality.description IS 'What the check asks of the data.';
COMMENT ON COLUMN analytics.data_quality.severity IS 'warn or error: how much a failure matters.';
COMMENT ON COLUMN analytics.data_quality.status IS 'pass, warn (a warn check failed) or fail (an error check failed).';
COMMENT ON COLUMN analytics.data_quality.failing_ratio IS 'Share of the rows checked that failed.';
COMMENT ON COLUMN analytics.data_quality.checked_at IS 'When the check last ran.';
COMMENT ON COLUMN analytics.data_quality.failing_since IS 'Since when it has not passed (NULL when it passes).';
-- grants on view analytics.data_quality (besides its owner): healthetl_analyst SELECT

-- view analytics.diagnoses columns:
--   patient_pseudonym uuid
--   visit_key bigint
--   visit_date date
--   position integer
--   code text
--   code_system text
--   description text
--   is_primary boolean
--   onset_date date
--   clinical_status text
CREATE VIEW analytics.diagnoses AS
 SELECT pseudonym AS patient_pseudonym,
    visit_key,
    visit_date,
    "position",
    code,
    code_system,
    description,
    is_primary,
    (onset_at)::date AS onset_date,
    clinical_status
   FROM clinical.diagnoses d;
COMMENT ON VIEW analytics.diagnoses IS 'One row per diagnosis of a visit (limited data set).';
COMMENT ON COLUMN analytics.diagnoses.patient_pseudonym IS 'The patient''s keyed pseudonym.';
COMMENT ON COLUMN analytics.diagnoses.visit_key IS 'The visit (analytics.visits.visit_key).';
COMMENT ON COLUMN analytics.diagnoses.visit_date IS 'Date of the visit.';
COMMENT ON COLUMN analytics.diagnoses.position IS 'Order of the diagnosis in the visit (0-based).';
COMMENT ON COLUMN analytics.diagnoses.code IS 'Diagnosis code.';
COMMENT ON COLUMN analytics.diagnoses.code_system IS 'Code system of code (for example ICD-10-CM, SNOMED CT).';
COMMENT ON COLUMN analytics.diagnoses.description IS 'Description of the code as sent.';
COMMENT ON COLUMN analytics.diagnoses.is_primary IS 'Whether this is the visit''s primary diagnosis.';
COMMENT ON COLUMN analytics.diagnoses.onset_date IS 'When the condition began (FHIR Condition.onsetDateTime; NULL for patient documents).';
COMMENT ON COLUMN analytics.diagnoses.clinical_status IS 'FHIR Condition.clinicalStatus code: active, recurrence, relapse, inactive, remission or resolved (NULL for patient documents).';
-- grants on view analytics.diagnoses (besides its owner): healthetl_analyst SELECT

-- view analytics.patients columns:
--   patient_pseudonym uuid
--   source_system text
--   birth_date date
--   age_years integer
--   sex text
--   city text
--   state text
--   zip5 text
--   country text
--   record_updated_at timestamp with time zone
--   loaded_at timestamp with time zone
--   deceased boolean
--   death_date date
CREATE VIEW analytics.patients AS
 SELECT pseudonym AS patient_pseudonym,
    source_system,
    birth_date,
    (date_part('year'::text, age((COALESCE((deceased_at)::date, CURRENT_DATE))::timestamp with time zone, (birth_date)::timestamp with time zone)))::integer AS age_years,
    sex,
    city,
    state,
        CASE
            WHEN ((postal_code ~ '^[0-9]{5}(-?[0-9]{4})?$'::text) AND (COALESCE(upper(country), 'US'::text) = ANY (ARRAY['US'::text, 'USA'::text, 'UNITED STATES'::text, 'UNITED STATES OF AMERICA'::text]))) THEN "left"(postal_code, 5)
            ELSE NULL::text
        END AS zip5,
    country,
    source_updated_at AS record_updated_at,
    loaded_at,
    deceased,
    (deceased_at)::date AS death_date
   FROM clinical.patients p;
COMMENT ON VIEW analytics.patients IS 'One row per patient (HIPAA limited data set): no names, SSN, MRN, phone, email, street lines or source ids.';
COMMENT ON COLUMN analytics.patients.patient_pseudonym IS 'Keyed pseudonym (uuid): the first 128 bits of an HMAC-SHA256 of source system and patient id under a secret key; stable across loads, changes only when the key is rotated.';
COMMENT ON COLUMN analytics.patients.source_system IS 'The system the record came from (an organisation, not a person).';
COMMENT ON COLUMN analytics.patients.birth_date IS 'Date of birth (kept in a limited data set).';
COMMENT ON COLUMN analytics.patients.age_years IS 'Age in whole years today, or at death for a patient who died.';
COMMENT ON COLUMN analytics.patients.sex IS 'female, male, other or unknown.';
COMMENT ON COLUMN analytics.patients.city IS 'City of residence (kept in a limited data set).';
COMMENT ON COLUMN analytics.patients.state IS 'State of residence.';
COMMENT ON COLUMN analytics.patients.zip5 IS 'US 5-digit ZIP code (ZIP+4 cut to 5 digits); NULL for other postal codes.';
COMMENT ON COLUMN analytics.patients.country IS 'Country of residence as sent.';
COMMENT ON COLUMN analytics.patients.record_updated_at IS 'When the source last updated the record (its updated_at).';
COMMENT ON COLUMN analytics.patients.loaded_at IS 'When healthetl loaded the current record.';
COMMENT ON COLUMN analytics.patients.deceased IS 'Whether the source says the patient died (NULL: not stated).';
COMMENT ON COLUMN analytics.patients.death_date IS 'Date of death (kept in a limited data set; FHIR Patient.deceasedDateTime).';
-- grants on view analytics.patients (besides its owner): healthetl_analyst SELECT

-- view analytics.provider_notes columns:
--   patient_pseudonym uuid
--   visit_key bigint
--   visit_date date
--   position integer
--   author text
--   written_at timestamp with time zone
--   note_text text
CREATE VIEW analytics.provider_notes AS
 SELECT pseudonym AS patient_pseudonym,
    visit_key,
    visit_date,
    "position",
    author,
    written_at,
    note_text_redacted AS note_text
   FROM clinical.provider_notes n;
COMMENT ON VIEW analytics.provider_notes IS 'One row per provider note, its text redacted at load time (limited data set).';
COMMENT ON COLUMN analytics.provider_notes.patient_pseudonym IS 'The patient''s keyed pseudonym.';
COMMENT ON COLUMN analytics.provider_notes.visit_key IS 'The visit (analytics.visits.visit_key).';
COMMENT ON COLUMN analytics.provider_notes.visit_date IS 'Date of the visit.';
COMMENT ON COLUMN analytics.provider_notes.position IS 'Order of the note in the visit (0-based).';
COMMENT ON COLUMN analytics.provider_notes.author IS 'Who wrote the note (a provider).';
COMMENT ON COLUMN analytics.provider_notes.written_at IS 'When the note was written.';
COMMENT ON COLUMN analytics.provider_notes.note_text IS 'Note text with SSNs, phone numbers, email addresses and the patient''s MRN, birth date and names replaced by [SSN], [PHONE], [EMAIL], [MRN], [DOB], [NAME]; dates of service kept.';
-- grants on view analytics.provider_notes (besides its owner): healthetl_analyst SELECT

-- view analytics.treatments columns:
--   patient_pseudonym uuid
--   visit_key bigint
--   visit_date date
--   position integer
--   treatment_type text
--   code text
--   code_system text
--   name text
--   dose text
--   route text
--   frequency text
--   start_date date
--   end_date date
--   duration_days integer
CREATE VIEW analytics.treatments AS
 SELECT pseudonym AS patient_pseudonym,
    visit_key,
    visit_date,
    "position",
    treatment_type,
    code,
    code_system,
    name,
    dose,
    route,
    frequency,
    start_date,
    end_date,
    (end_date - start_date) AS duration_days
   FROM clinical.treatments t;
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
-- grants on view analytics.treatments (besides its owner): healthetl_analyst SELECT

-- view analytics.visits columns:
--   patient_pseudonym uuid
--   visit_key bigint
--   visit_date date
--   visit_start timestamp with time zone
--   discharge_date date
--   length_of_stay_days integer
--   visit_type text
--   facility_id text
--   facility_name text
--   provider_npi text
--   provider_name text
--   age_at_visit integer
--   visit_end timestamp with time zone
CREATE VIEW analytics.visits AS
 SELECT pseudonym AS patient_pseudonym,
    visit_key,
    visit_date,
    visit_start,
    discharge_date,
    (discharge_date - visit_date) AS length_of_stay_days,
    visit_type,
    facility_id,
    facility_name,
    provider_npi,
    provider_name,
    age_at_visit,
    visit_end
   FROM clinical.visits v;
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
COMMENT ON COLUMN analytics.visits.visit_end IS 'When the visit ended, when the source gives a time (FHIR Encounter.period.end).';
-- grants on view analytics.visits (besides its owner): healthetl_analyst SELECT

-- ==== schema clinical ===========================================================================

CREATE SCHEMA clinical;
COMMENT ON SCHEMA clinical IS 'Flattened clinical tables (contain PHI; analysts use the analytics views).';
-- grants on schema clinical (besides its owner): none

CREATE TABLE clinical.diagnoses (
  patient_key bigint NOT NULL,
  diagnosis_key bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  visit_key bigint NOT NULL,
  visit_date date NOT NULL,
  position integer NOT NULL,
  code text NOT NULL,
  code_system text NOT NULL,
  description text,
  is_primary boolean,
  pseudonym uuid NOT NULL,
  source_diagnosis_id text,
  onset_at timestamp with time zone,
  clinical_status text,
  CONSTRAINT diagnoses_pkey PRIMARY KEY (patient_key, diagnosis_key)
);
CREATE INDEX diagnoses_code_idx ON clinical.diagnoses USING btree (code);
CREATE UNIQUE INDEX diagnoses_pkey ON clinical.diagnoses USING btree (patient_key, diagnosis_key);
CREATE INDEX diagnoses_pseudonym_idx ON clinical.diagnoses USING btree (pseudonym, visit_key);
COMMENT ON COLUMN clinical.diagnoses.source_diagnosis_id IS 'FHIR Condition.id (patient documents have no diagnosis id).';
-- grants on table clinical.diagnoses (besides its owner): none

CREATE TABLE clinical.patients (
  patient_key bigint NOT NULL,
  source_system text NOT NULL,
  source_patient_id text NOT NULL,
  mrn text,
  ssn text,
  name_prefix text,
  given_name text,
  family_name text,
  name_suffix text,
  birth_date date,
  sex text,
  phone text,
  email text,
  address_lines text[],
  city text,
  state text,
  postal_code text,
  country text,
  source_updated_at timestamp with time zone,
  document_id bigint NOT NULL,
  content_sha256 bytea NOT NULL,
  batch_id bigint NOT NULL,
  loaded_at timestamp with time zone DEFAULT now() NOT NULL,
  pseudonym uuid NOT NULL,
  deceased boolean,
  deceased_at timestamp with time zone,
  CONSTRAINT patients_pkey PRIMARY KEY (patient_key),
  CONSTRAINT patients_sex_check CHECK ((sex = ANY (ARRAY['female'::text, 'male'::text, 'other'::text, 'unknown'::text])))
);
CREATE UNIQUE INDEX patients_pkey ON clinical.patients USING btree (patient_key);
CREATE INDEX patients_pseudonym_idx ON clinical.patients USING btree (pseudonym);
COMMENT ON COLUMN clinical.patients.deceased IS 'FHIR Patient.deceased[x]: true when deceasedBoolean is true or a deceasedDateTime is given.';
COMMENT ON COLUMN clinical.patients.deceased_at IS 'FHIR Patient.deceasedDateTime.';
-- grants on table clinical.patients (besides its owner): none

CREATE TABLE clinical.provider_notes (
  patient_key bigint NOT NULL,
  note_key bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  visit_key bigint NOT NULL,
  visit_date date NOT NULL,
  position integer NOT NULL,
  source_note_id text,
  author text,
  written_at timestamp with time zone,
  note_text text NOT NULL,
  pseudonym uuid NOT NULL,
  note_text_redacted text,
  CONSTRAINT provider_notes_pkey PRIMARY KEY (patient_key, note_key)
);
CREATE UNIQUE INDEX provider_notes_pkey ON clinical.provider_notes USING btree (patient_key, note_key);
CREATE INDEX provider_notes_pseudonym_idx ON clinical.provider_notes USING btree (pseudonym, visit_key);
-- grants on table clinical.provider_notes (besides its owner): none

CREATE TABLE clinical.treatments (
  patient_key bigint NOT NULL,
  treatment_key bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  visit_key bigint NOT NULL,
  visit_date date NOT NULL,
  position integer NOT NULL,
  source_treatment_id text,
  treatment_type text,
  code text,
  code_system text,
  name text,
  dose text,
  route text,
  frequency text,
  start_date date,
  end_date date,
  pseudonym uuid NOT NULL,
  CONSTRAINT treatments_pkey PRIMARY KEY (patient_key, treatment_key),
  CONSTRAINT treatments_treatment_type_check CHECK ((treatment_type = ANY (ARRAY['medication'::text, 'procedure'::text])))
);
CREATE INDEX treatments_name_idx ON clinical.treatments USING btree (name);
CREATE UNIQUE INDEX treatments_pkey ON clinical.treatments USING btree (patient_key, treatment_key);
CREATE INDEX treatments_pseudonym_idx ON clinical.treatments USING btree (pseudonym, visit_key);
-- grants on table clinical.treatments (besides its owner): none

CREATE TABLE clinical.visits (
  patient_key bigint NOT NULL,
  visit_key bigint NOT NULL,
  visit_date date NOT NULL,
  source_visit_id text NOT NULL,
  visit_start timestamp with time zone,
  discharge_date date,
  visit_type text,
  facility_id text,
  facility_name text,
  provider_npi text,
  provider_name text,
  position integer NOT NULL,
  pseudonym uuid NOT NULL,
  age_at_visit integer,
  research_visit_id uuid DEFAULT gen_random_uuid() NOT NULL,
  visit_end timestamp with time zone,
  CONSTRAINT visits_patient_key_source_visit_id_visit_date_key UNIQUE (patient_key, source_visit_id, visit_date),
  CONSTRAINT visits_pkey PRIMARY KEY (patient_key, visit_key, visit_date),
  CONSTRAINT visits_visit_type_check CHECK ((visit_type = ANY (ARRAY['outpatient'::text, 'inpatient'::text, 'emergency'::text, 'telehealth'::text, 'other'::text])))
) PARTITION BY RANGE (visit_date);
CREATE INDEX visits_date_type_idx ON ONLY clinical.visits USING btree (visit_date, visit_type);
CREATE UNIQUE INDEX visits_patient_key_source_visit_id_visit_date_key ON ONLY clinical.visits USING btree (patient_key, source_visit_id, visit_date);
CREATE UNIQUE INDEX visits_pkey ON ONLY clinical.visits USING btree (patient_key, visit_key, visit_date);
CREATE INDEX visits_pseudonym_idx ON ONLY clinical.visits USING btree (pseudonym);
COMMENT ON COLUMN clinical.visits.visit_end IS 'FHIR Encounter.period.end.';
-- grants on table clinical.visits (besides its owner): none

CREATE SEQUENCE clinical.diagnoses_diagnosis_key_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence clinical.diagnoses_diagnosis_key_seq (besides its owner): none

CREATE SEQUENCE clinical.provider_notes_note_key_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence clinical.provider_notes_note_key_seq (besides its owner): none

CREATE SEQUENCE clinical.treatments_treatment_key_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence clinical.treatments_treatment_key_seq (besides its owner): none

CREATE SEQUENCE clinical.visits_visit_key_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence clinical.visits_visit_key_seq (besides its owner): none

-- ==== schema crypto =============================================================================

CREATE SCHEMA crypto;
COMMENT ON SCHEMA crypto IS 'pgcrypto, for the owner only (keyed pseudonyms, keys).';
-- grants on schema crypto (besides its owner): none

-- ==== schema deid ===============================================================================

CREATE SCHEMA deid;
COMMENT ON SCHEMA deid IS 'De-identified views for researchers (HIPAA Safe Harbor).';
-- grants on schema deid (besides its owner): healthetl_researcher USAGE

-- view deid.diagnoses columns:
--   research_id uuid
--   research_visit_id uuid
--   visit_year integer
--   position integer
--   code text
--   code_system text
--   is_primary boolean
--   onset_year integer
--   clinical_status text
CREATE VIEW deid.diagnoses AS
 SELECT k.research_id,
    v.research_visit_id,
    (EXTRACT(year FROM d.visit_date))::integer AS visit_year,
    d."position",
    d.code,
    d.code_system,
    d.is_primary,
    (EXTRACT(year FROM d.onset_at))::integer AS onset_year,
    d.clinical_status
   FROM ((clinical.diagnoses d
     LEFT JOIN etl.patient_keys k ON ((k.patient_key = d.patient_key)))
     LEFT JOIN clinical.visits v ON (((v.patient_key = d.patient_key) AND (v.visit_key = d.visit_key) AND (v.visit_date = d.visit_date))));
COMMENT ON VIEW deid.diagnoses IS 'One row per diagnosis (Safe Harbor): codes only, no description text.';
COMMENT ON COLUMN deid.diagnoses.research_id IS 'The patient''s research id.';
COMMENT ON COLUMN deid.diagnoses.research_visit_id IS 'The visit (deid.visits.research_visit_id).';
COMMENT ON COLUMN deid.diagnoses.visit_year IS 'Year of the visit.';
COMMENT ON COLUMN deid.diagnoses.position IS 'Order of the diagnosis in the visit (0-based).';
COMMENT ON COLUMN deid.diagnoses.code IS 'Diagnosis code.';
COMMENT ON COLUMN deid.diagnoses.code_system IS 'Code system of code.';
COMMENT ON COLUMN deid.diagnoses.is_primary IS 'Whether this is the visit''s primary diagnosis.';
COMMENT ON COLUMN deid.diagnoses.onset_year IS 'Year the condition began (FHIR Condition.onsetDateTime; NULL for patient documents).';
COMMENT ON COLUMN deid.diagnoses.clinical_status IS 'FHIR Condition.clinicalStatus code: active, recurrence, relapse, inactive, remission or resolved (NULL for patient documents).';
-- grants on view deid.diagnoses (besides its owner): healthetl_researcher SELECT

-- view deid.patients columns:
--   research_id uuid
--   birth_year integer
--   age text
--   sex text
--   state text
--   zip3 text
--   deceased boolean
--   death_year integer
CREATE VIEW deid.patients AS
 SELECT k.research_id,
        CASE
            WHEN (x.age < 90) THEN (EXTRACT(year FROM p.birth_date))::integer
            ELSE NULL::integer
        END AS birth_year,
        CASE
            WHEN (x.age >= 90) THEN '90+'::text
            ELSE ((date_part('year'::text, age((COALESCE((p.deceased_at)::date, CURRENT_DATE))::timestamp with time zone, (p.birth_date)::timestamp with time zone)))::integer)::text
        END AS age,
    p.sex,
    p.state,
        CASE
            WHEN ((p.postal_code ~ '^[0-9]{5}(-?[0-9]{4})?$'::text) AND (COALESCE(upper(p.country), 'US'::text) = ANY (ARRAY['US'::text, 'USA'::text, 'UNITED STATES'::text, 'UNITED STATES OF AMERICA'::text]))) THEN
            CASE
                WHEN (EXISTS ( SELECT 1
                   FROM etl.restricted_zip3 z
                  WHERE (z.zip3 = "left"(p.postal_code, 3)))) THEN '000'::text
                ELSE "left"(p.postal_code, 3)
            END
            ELSE NULL::text
        END AS zip3,
    p.deceased,
        CASE
            WHEN (x.age < 90) THEN (EXTRACT(year FROM p.deceased_at))::integer
            ELSE NULL::integer
        END AS death_year
   FROM ((clinical.patients p
     JOIN etl.patient_keys k ON ((k.patient_key = p.patient_key)))
     CROSS JOIN LATERAL ( SELECT (date_part('year'::text, age((CURRENT_DATE)::timestamp with time zone, (p.birth_date)::timestamp with time zone)))::integer AS age) x);
COMMENT ON VIEW deid.patients IS 'One row per patient (HIPAA Safe Harbor): no identifiers, no full dates, ages over 89 grouped, ZIP to 3 digits.';
COMMENT ON COLUMN deid.patients.research_id IS 'Random research id (not derived from any identifier; not the analytics pseudonym, so the tiers cannot be linked).';
COMMENT ON COLUMN deid.patients.birth_year IS 'Year of birth; NULL for patients aged 90 or over.';
COMMENT ON COLUMN deid.patients.age IS 'Age in whole years today, or at death for a patient who died; ''90+'' for anyone who is (or would be) 90 or over today.';
COMMENT ON COLUMN deid.patients.sex IS 'female, male, other or unknown.';
COMMENT ON COLUMN deid.patients.state IS 'State of residence.';
COMMENT ON COLUMN deid.patients.zip3 IS 'First 3 digits of a US ZIP code; 000 for the restricted prefixes (etl.restricted_zip3); NULL for non-US postal codes.';
COMMENT ON COLUMN deid.patients.deceased IS 'Whether the source says the patient died (NULL: not stated).';
COMMENT ON COLUMN deid.patients.death_year IS 'Year of death; NULL when not stated, and for patients who would be 90 or over today.';
-- grants on view deid.patients (besides its owner): healthetl_researcher SELECT

-- view deid.treatments columns:
--   research_id uuid
--   research_visit_id uuid
--   visit_year integer
--   position integer
--   treatment_type text
--   code text
--   code_system text
--   route text
--   start_year integer
--   end_year integer
--   duration_days integer
CREATE VIEW deid.treatments AS
 SELECT k.research_id,
    v.research_visit_id,
    (EXTRACT(year FROM t.visit_date))::integer AS visit_year,
    t."position",
    t.treatment_type,
    t.code,
    t.code_system,
    t.route,
    (EXTRACT(year FROM t.start_date))::integer AS start_year,
    (EXTRACT(year FROM t.end_date))::integer AS end_year,
    (t.end_date - t.start_date) AS duration_days
   FROM ((clinical.treatments t
     LEFT JOIN etl.patient_keys k ON ((k.patient_key = t.patient_key)))
     LEFT JOIN clinical.visits v ON (((v.patient_key = t.patient_key) AND (v.visit_key = t.visit_key) AND (v.visit_date = t.visit_date))));
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
-- grants on view deid.treatments (besides its owner): healthetl_researcher SELECT

-- view deid.visits columns:
--   research_id uuid
--   research_visit_id uuid
--   visit_year integer
--   age_at_visit text
--   length_of_stay_days integer
--   visit_type text
CREATE VIEW deid.visits AS
 SELECT k.research_id,
    v.research_visit_id,
    (EXTRACT(year FROM v.visit_date))::integer AS visit_year,
        CASE
            WHEN ((x.age_now >= 90) OR (x.age_then >= 90)) THEN '90+'::text
            ELSE (x.age_then)::text
        END AS age_at_visit,
    (v.discharge_date - v.visit_date) AS length_of_stay_days,
    v.visit_type
   FROM (((clinical.visits v
     LEFT JOIN etl.patient_keys k ON ((k.patient_key = v.patient_key)))
     LEFT JOIN clinical.patients p ON ((p.patient_key = v.patient_key)))
     CROSS JOIN LATERAL ( SELECT (date_part('year'::text, age((CURRENT_DATE)::timestamp with time zone, (p.birth_date)::timestamp with time zone)))::integer AS age_now,
            (date_part('year'::text, age((v.visit_date)::timestamp with time zone, (p.birth_date)::timestamp with time zone)))::integer AS age_then) x);
COMMENT ON VIEW deid.visits IS 'One row per visit (Safe Harbor): the year only.';
COMMENT ON COLUMN deid.visits.research_id IS 'The patient''s research id (deid.patients).';
COMMENT ON COLUMN deid.visits.research_visit_id IS 'Random id of the visit (not the analytics visit_key, so the tiers share no key; new when a newer record of the patient arrives); joins deid.diagnoses and deid.treatments.';
COMMENT ON COLUMN deid.visits.visit_year IS 'Year of the visit.';
COMMENT ON COLUMN deid.visits.age_at_visit IS 'Age in whole years at the visit, as text; 90+ for ages over 89 and for every visit of a patient who is 90 or over today.';
COMMENT ON COLUMN deid.visits.length_of_stay_days IS 'Length of stay in days (a duration, not a date).';
COMMENT ON COLUMN deid.visits.visit_type IS 'outpatient, inpatient, emergency, telehealth or other.';
-- grants on view deid.visits (besides its owner): healthetl_researcher SELECT

-- ==== schema dq =================================================================================

CREATE SCHEMA dq;
COMMENT ON SCHEMA dq IS 'Data-quality checks and their results.';
-- grants on schema dq (besides its owner): healthetl_loader USAGE

CREATE TYPE dq.measurement AS (
  rows_checked bigint,
  rows_failing bigint,
  measured numeric,
  samples jsonb
);
-- grants on type dq.measurement (besides its owner): none

CREATE TABLE dq.check_changes (
  change_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  check_name text NOT NULL,
  setting text NOT NULL,
  old_value text,
  new_value text,
  changed_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  changed_by text DEFAULT SESSION_USER NOT NULL,
  CONSTRAINT check_changes_pkey PRIMARY KEY (change_id)
);
CREATE UNIQUE INDEX check_changes_pkey ON dq.check_changes USING btree (change_id);
COMMENT ON TABLE dq.check_changes IS 'Every change of a check''s severity, threshold or enabled: who, when, old and new value.';
-- grants on table dq.check_changes (besides its owner): healthetl_loader SELECT

CREATE TABLE dq.check_kinds (
  kind text NOT NULL,
  measure text NOT NULL,
  threshold_meaning text NOT NULL,
  CONSTRAINT check_kinds_measure_check CHECK ((measure = ANY (ARRAY['failing_ratio'::text, 'hours'::text, 'ratio_to_median'::text]))),
  CONSTRAINT check_kinds_pkey PRIMARY KEY (kind)
);
CREATE UNIQUE INDEX check_kinds_pkey ON dq.check_kinds USING btree (kind);
COMMENT ON TABLE dq.check_kinds IS 'Kinds of data-quality check: each is the function dq.check_<kind>; measure says how its threshold is read.';
-- grants on table dq.check_kinds (besides its owner): healthetl_loader SELECT

CREATE TABLE dq.checks (
  check_name text NOT NULL,
  kind text NOT NULL,
  relation text NOT NULL,
  dimension text NOT NULL,
  description text NOT NULL,
  params jsonb DEFAULT '{}'::jsonb NOT NULL,
  severity text NOT NULL,
  threshold numeric NOT NULL,
  enabled boolean DEFAULT true NOT NULL,
  CONSTRAINT checks_dimension_check CHECK ((dimension = ANY (ARRAY['completeness'::text, 'validity'::text, 'uniqueness'::text, 'consistency'::text, 'timeliness'::text, 'volume'::text]))),
  CONSTRAINT checks_kind_fkey FOREIGN KEY (kind) REFERENCES dq.check_kinds(kind),
  CONSTRAINT checks_pkey PRIMARY KEY (check_name),
  CONSTRAINT checks_severity_check CHECK ((severity = ANY (ARRAY['warn'::text, 'error'::text]))),
  CONSTRAINT checks_threshold_check CHECK ((threshold >= (0)::numeric))
);
CREATE UNIQUE INDEX checks_pkey ON dq.checks USING btree (check_name);
CREATE TRIGGER checks_record_change AFTER UPDATE ON dq.checks FOR EACH ROW EXECUTE FUNCTION dq.record_check_change();
COMMENT ON TABLE dq.checks IS 'The data-quality checks. Tune severity, threshold and enabled with UPDATE (recorded in dq.check_changes); never renamed by a migration.';
-- grants on table dq.checks (besides its owner): healthetl_loader SELECT

CREATE TABLE dq.result_samples (
  run_id bigint NOT NULL,
  check_name text NOT NULL,
  patient_key bigint,
  sample bigint NOT NULL,
  CONSTRAINT result_samples_run_id_check_name_fkey FOREIGN KEY (run_id, check_name) REFERENCES dq.results(run_id, check_name) ON DELETE CASCADE
);
CREATE INDEX result_samples_patient_idx ON dq.result_samples USING btree (patient_key);
CREATE INDEX result_samples_run_idx ON dq.result_samples USING btree (run_id, check_name);
COMMENT ON TABLE dq.result_samples IS 'Up to 20 failing rows per check and run, by surrogate key only (no PHI).';
-- grants on table dq.result_samples (besides its owner): healthetl_loader SELECT

CREATE TABLE dq.results (
  run_id bigint NOT NULL,
  check_name text NOT NULL,
  severity text NOT NULL,
  threshold numeric NOT NULL,
  rows_checked bigint NOT NULL,
  rows_failing bigint NOT NULL,
  failing_ratio numeric,
  measured numeric,
  status text NOT NULL,
  sample_key text,
  CONSTRAINT results_pkey PRIMARY KEY (run_id, check_name),
  CONSTRAINT results_run_id_fkey FOREIGN KEY (run_id) REFERENCES dq.runs(run_id) ON DELETE CASCADE,
  CONSTRAINT results_status_check CHECK ((status = ANY (ARRAY['pass'::text, 'warn'::text, 'fail'::text])))
);
CREATE INDEX results_check_idx ON dq.results USING btree (check_name, run_id);
CREATE UNIQUE INDEX results_pkey ON dq.results USING btree (run_id, check_name);
COMMENT ON TABLE dq.results IS 'One row per check per run: rows checked and failing, the measure against the threshold, and pass, warn (a warn-severity check failed) or fail (an error-severity check failed).';
-- grants on table dq.results (besides its owner): healthetl_loader SELECT

CREATE TABLE dq.runs (
  run_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  batch_id bigint,
  started_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  finished_at timestamp with time zone,
  run_by text DEFAULT SESSION_USER NOT NULL,
  CONSTRAINT runs_pkey PRIMARY KEY (run_id)
);
CREATE UNIQUE INDEX runs_pkey ON dq.runs USING btree (run_id);
COMMENT ON TABLE dq.runs IS 'One row per dq.run: for one batch''s patients, or the whole database (batch_id NULL).';
-- grants on table dq.runs (besides its owner): healthetl_loader SELECT

CREATE SEQUENCE dq.check_changes_change_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence dq.check_changes_change_id_seq (besides its owner): none

CREATE SEQUENCE dq.runs_run_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence dq.runs_run_id_seq (besides its owner): none

-- view dq.latest_results columns:
--   check_name text
--   dimension text
--   relation text
--   description text
--   measure text
--   threshold_meaning text
--   severity text
--   threshold numeric
--   rows_checked bigint
--   rows_failing bigint
--   failing_ratio numeric
--   measured numeric
--   status text
--   run_id bigint
--   batch_id bigint
--   checked_at timestamp with time zone
--   failing_since timestamp with time zone
CREATE VIEW dq.latest_results AS
 WITH r AS (
         SELECT res.run_id,
            res.check_name,
            res.severity,
            res.threshold,
            res.rows_checked,
            res.rows_failing,
            res.failing_ratio,
            res.measured,
            res.status,
            res.sample_key,
            run.batch_id,
            run.started_at AS checked_at,
            row_number() OVER (PARTITION BY res.check_name ORDER BY res.run_id DESC) AS age
           FROM (dq.results res
             JOIN dq.runs run USING (run_id))
        )
 SELECT c.check_name,
    c.dimension,
    c.relation,
    c.description,
    k.measure,
    k.threshold_meaning,
    r.severity,
    r.threshold,
    r.rows_checked,
    r.rows_failing,
    r.failing_ratio,
    r.measured,
    r.status,
    r.run_id,
    r.batch_id,
    r.checked_at,
        CASE
            WHEN (r.status <> 'pass'::text) THEN ( SELECT min(f.checked_at) AS min
               FROM r f
              WHERE ((f.check_name = r.check_name) AND (f.status <> 'pass'::text) AND (f.run_id > COALESCE(( SELECT max(p.run_id) AS max
                       FROM r p
                      WHERE ((p.check_name = r.check_name) AND (p.status = 'pass'::text))), (0)::bigint))))
            ELSE NULL::timestamp with time zone
        END AS failing_since
   FROM ((dq.checks c
     JOIN dq.check_kinds k USING (kind))
     JOIN r ON (((r.check_name = c.check_name) AND (r.age = 1))))
  WHERE c.enabled;
COMMENT ON VIEW dq.latest_results IS 'Each enabled check''s latest result, failing ones with the time of the first run of the current failing streak (a disabled check''s old result no longer counts).';
-- grants on view dq.latest_results (besides its owner): healthetl_loader SELECT

CREATE OR REPLACE FUNCTION dq.check_age_range(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT dq.measure_rows(format(
    $q$SELECT p.patient_key, p.patient_key AS key,
              NOT (p.birth_date <= current_date AND date_part('year', age(current_date, p.birth_date)) BETWEEN %s AND %s) AS failing
       FROM clinical.patients p /*scope:p*/ WHERE p.birth_date IS NOT NULL$q$,
    (c.params ->> 'min')::int, (c.params ->> 'max')::int), p_patients)
$function$;
-- grants on function dq.check_age_range(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_batch_reconciles(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT count(*), count(*) FILTER (WHERE NOT s.balanced), NULL::numeric,
         coalesce(jsonb_agg(jsonb_build_array(NULL, s.batch_id) ORDER BY s.batch_id) FILTER (WHERE NOT s.balanced), '[]')
  FROM etl.batch_summary s
  WHERE s.status = 'transformed' AND (p_batch_id IS NULL OR s.batch_id = p_batch_id)
$function$;
-- grants on function dq.check_batch_reconciles(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_freshness(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT 1::bigint, (x.hours IS NULL OR x.hours > c.threshold)::int::bigint, x.hours, '[]'::jsonb
  FROM (SELECT round((extract(epoch FROM clock_timestamp() - max(b.transformed_at)) / 3600)::numeric, 2) AS hours
        FROM etl.batches b WHERE b.status = 'transformed') x
$function$;
-- grants on function dq.check_freshness(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_has_patient(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT dq.measure_rows(
    $q$SELECT v.patient_key, v.visit_key AS key, p.patient_key IS NULL AS failing
       FROM clinical.visits v /*scope:v*/ LEFT JOIN clinical.patients p ON p.patient_key = v.patient_key
       $q$, p_patients)
$function$;
-- grants on function dq.check_has_patient(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_has_visit(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  RETURN dq.measure_rows(format(
    'SELECT t.patient_key, t.%2$I AS key, v.visit_key IS NULL AS failing
     FROM %1$s t /*scope:t*/
     LEFT JOIN clinical.visits v ON v.patient_key = t.patient_key AND v.visit_key = t.visit_key AND v.visit_date = t.visit_date',
    c.relation::regclass, c.params ->> 'key'), p_patients);
END
$function$;
-- grants on function dq.check_has_visit(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_icd10cm_shape(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT dq.measure_rows(
    $q$SELECT d.patient_key, d.diagnosis_key AS key, d.code !~ '^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$' AS failing
       FROM clinical.diagnoses d /*scope:d*/ WHERE d.code_system = 'ICD-10-CM'$q$, p_patients)
$function$;
-- grants on function dq.check_icd10cm_shape(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_not_before(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  RETURN dq.measure_rows(format(
    'SELECT t.patient_key, t.%2$I AS key, t.%4$I < t.%3$I AS failing FROM %1$s t /*scope:t*/
     WHERE t.%3$I IS NOT NULL AND t.%4$I IS NOT NULL',
    c.relation::regclass, c.params ->> 'key', c.params ->> 'earlier', c.params ->> 'later'), p_patients);
END
$function$;
-- grants on function dq.check_not_before(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_not_future(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  RETURN dq.measure_rows(format(
    'SELECT t.patient_key, t.%2$I AS key, coalesce(greatest(%3$s) > current_date + 1, false) AS failing
     FROM %1$s t /*scope:t*/',
    c.relation::regclass, c.params ->> 'key',
    (SELECT string_agg(format('t.%I::date', col), ', ') FROM jsonb_array_elements_text(c.params -> 'columns') AS col)), p_patients);
END
$function$;
-- grants on function dq.check_not_future(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_not_null(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  RETURN dq.measure_rows(format(
    'SELECT t.patient_key, t.%2$I AS key, t.%3$I IS NULL AS failing FROM %1$s t /*scope:t*/',
    c.relation::regclass, c.params ->> 'key', c.params ->> 'column'), p_patients);
END
$function$;
-- grants on function dq.check_not_null(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_npi_luhn(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT dq.measure_rows(
    $q$SELECT v.patient_key, v.visit_key AS key, NOT dq.npi_ok(v.provider_npi) AS failing
       FROM clinical.visits v /*scope:v*/ WHERE v.provider_npi IS NOT NULL$q$, p_patients)
$function$;
-- grants on function dq.check_npi_luhn(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_probable_duplicates(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT dq.measure_rows(
    $q$SELECT x.patient_key, x.patient_key AS key, x.twins > 1 AS failing
       FROM (SELECT p.patient_key,
                    count(*) OVER (PARTITION BY p.birth_date,
                                   regexp_replace(lower(concat_ws(' ', p.given_name, p.family_name)), '[^[:alpha:]]+', '', 'g')) AS twins
             FROM clinical.patients p WHERE p.birth_date IS NOT NULL AND p.family_name IS NOT NULL) x
       /*scope:x*/$q$, p_patients)
$function$;
-- grants on function dq.check_probable_duplicates(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_reject_share(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT coalesce(max(s.received), 0)::bigint,
         coalesce(max(s.rejected + (SELECT count(DISTINCT x.document_id) FROM etl.document_problems x
                                    JOIN landing.raw_documents d ON d.document_id = x.document_id AND d.status = 'loaded'
                                    WHERE x.batch_id = s.batch_id)), 0)::bigint,
         NULL::numeric, '[]'::jsonb
  FROM etl.batch_summary s
  WHERE s.batch_id = coalesce(p_batch_id, (SELECT max(batch_id) FROM etl.batches WHERE status = 'transformed'))
$function$;
-- grants on function dq.check_reject_share(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_sex_code(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT dq.measure_rows(
    $q$SELECT p.patient_key, p.patient_key AS key, x.document_id IS NOT NULL AS failing
       FROM clinical.patients p /*scope:p*/
       LEFT JOIN etl.document_problems x ON x.document_id = p.document_id AND x.field = 'sex'$q$, p_patients)
$function$;
-- grants on function dq.check_sex_code(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_visit_after_birth(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT dq.measure_rows(
    $q$SELECT v.patient_key, v.visit_key AS key, v.visit_date < p.birth_date AS failing
       FROM clinical.visits v /*scope:v*/ JOIN clinical.patients p ON p.patient_key = v.patient_key
       WHERE p.birth_date IS NOT NULL$q$, p_patients)
$function$;
-- grants on function dq.check_visit_after_birth(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_volume(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  WITH b AS (
    SELECT s.batch_id, CASE c.params ->> 'count' WHEN 'loaded' THEN s.loaded ELSE s.received END AS n
    FROM etl.batch_summary s WHERE s.status = 'transformed'
  ), this AS (
    SELECT * FROM b WHERE b.batch_id = coalesce(p_batch_id, (SELECT max(batch_id) FROM b))
  ), prev AS (
    SELECT b.n FROM b, this WHERE b.batch_id < this.batch_id ORDER BY b.batch_id DESC LIMIT coalesce((c.params ->> 'previous')::int, 10)
  ), m AS (
    SELECT CASE WHEN count(*) >= 3 THEN percentile_cont(0.5) WITHIN GROUP (ORDER BY prev.n) END AS median FROM prev
  )
  SELECT count(this.batch_id), count(this.batch_id) FILTER (WHERE abs(this.n / nullif(m.median, 0) - 1) > c.threshold),
         round((this.n / nullif(m.median, 0))::numeric, 3),
         coalesce(jsonb_agg(jsonb_build_array(NULL, this.batch_id)) FILTER (WHERE abs(this.n / nullif(m.median, 0) - 1) > c.threshold), '[]')
  FROM m LEFT JOIN this ON true
  GROUP BY this.n, m.median
$function$;
-- grants on function dq.check_volume(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.check_waiting_too_long(c dq.checks, p_patients bigint[], p_batch_id bigint)
 RETURNS dq.measurement
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT count(*), count(*) FILTER (WHERE d.received_at < clock_timestamp() - make_interval(secs => c.threshold * 3600)),
         round((extract(epoch FROM clock_timestamp() - min(d.received_at)) / 3600)::numeric, 2), '[]'::jsonb
  FROM landing.raw_documents d WHERE d.status = 'waiting'
$function$;
-- grants on function dq.check_waiting_too_long(c dq.checks, p_patients bigint[], p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.measure_rows(p_query text, p_patients bigint[])
 RETURNS dq.measurement
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  m dq.measurement;
  q text := regexp_replace(p_query, '/\*scope:(\w+)\*/',
                           CASE WHEN p_patients IS NULL THEN ''
                                ELSE 'JOIN t_dq_scope scope ON scope.patient_key = \1.patient_key' END);
BEGIN
  EXECUTE format('SELECT count(*), count(*) FILTER (WHERE x.failing), NULL::numeric, ''[]''::jsonb FROM (%s) x', q)
  INTO m USING p_patients;
  IF m.rows_failing > 0 THEN
    EXECUTE format('SELECT coalesce(jsonb_agg(jsonb_build_array(s.patient_key, s.key)), ''[]'')
                    FROM (SELECT x.patient_key, x.key FROM (%s) x WHERE x.failing ORDER BY x.patient_key, x.key LIMIT 20) s', q)
    INTO m.samples USING p_patients;
  END IF;
  RETURN m;
END
$function$;
-- grants on function dq.measure_rows(p_query text, p_patients bigint[]) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.npi_ok(npi text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((npi ~ '^[0-9]{10}$'::text) AND (((((((((((((((((24 + (2 * (substr(npi, 1, 1))::integer)) - (9 * ((substr(npi, 1, 1) >= '5'::text))::integer)) + (substr(npi, 2, 1))::integer) + (2 * (substr(npi, 3, 1))::integer)) - (9 * ((substr(npi, 3, 1) >= '5'::text))::integer)) + (substr(npi, 4, 1))::integer) + (2 * (substr(npi, 5, 1))::integer)) - (9 * ((substr(npi, 5, 1) >= '5'::text))::integer)) + (substr(npi, 6, 1))::integer) + (2 * (substr(npi, 7, 1))::integer)) - (9 * ((substr(npi, 7, 1) >= '5'::text))::integer)) + (substr(npi, 8, 1))::integer) + (2 * (substr(npi, 9, 1))::integer)) - (9 * ((substr(npi, 9, 1) >= '5'::text))::integer)) + (substr(npi, 10, 1))::integer) % 10) = 0));
-- grants on function dq.npi_ok(npi text) (besides its owner): none

CREATE OR REPLACE FUNCTION dq.record_check_change()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  INSERT INTO dq.check_changes (check_name, setting, old_value, new_value)
  SELECT NEW.check_name, s.setting, s.old_value, s.new_value
  FROM (VALUES ('severity', OLD.severity, NEW.severity),
               ('threshold', OLD.threshold::text, NEW.threshold::text),
               ('enabled', OLD.enabled::text, NEW.enabled::text)) AS s(setting, old_value, new_value)
  WHERE s.old_value IS DISTINCT FROM s.new_value;
  RETURN NEW;
END
$function$;
-- grants on function dq.record_check_change() (besides its owner): none

CREATE OR REPLACE FUNCTION dq.run(p_batch_id bigint DEFAULT NULL::bigint)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_run bigint;
  v_patients bigint[];
  c dq.checks;
  k dq.check_kinds;
  m dq.measurement;
  v_ratio numeric;
  v_failed boolean;
BEGIN
  IF p_batch_id IS NOT NULL THEN
    IF NOT EXISTS (SELECT 1 FROM etl.batches b WHERE b.batch_id = p_batch_id) THEN
      RAISE EXCEPTION 'batch % does not exist', p_batch_id USING ERRCODE = 'HE001', HINT = 'Run "healthetl status" to list batches.';
    END IF;
    v_patients := ARRAY(SELECT p.patient_key FROM clinical.patients p WHERE p.batch_id = p_batch_id);
    DROP TABLE IF EXISTS t_dq_scope;
    CREATE TEMP TABLE t_dq_scope (patient_key bigint PRIMARY KEY) ON COMMIT DROP;
    INSERT INTO t_dq_scope SELECT unnest(v_patients);
    ANALYZE t_dq_scope;
  END IF;
  INSERT INTO dq.runs (batch_id) VALUES (p_batch_id) RETURNING run_id INTO v_run;
  FOR c IN SELECT * FROM dq.checks WHERE enabled ORDER BY check_name LOOP
    SELECT * INTO k FROM dq.check_kinds WHERE kind = c.kind;
    -- FROM, not (f()).*, which would call the check once per column of its result
    EXECUTE format('SELECT * FROM dq.%I($1, $2, $3)', 'check_' || c.kind) INTO m USING c, v_patients, p_batch_id;
    v_ratio := round(m.rows_failing::numeric / nullif(m.rows_checked, 0), 6);
    v_failed := CASE k.measure WHEN 'failing_ratio' THEN coalesce(v_ratio > c.threshold, false)
                               ELSE m.rows_failing > 0 END;
    INSERT INTO dq.results (run_id, check_name, severity, threshold, rows_checked, rows_failing, failing_ratio, measured, status, sample_key)
    VALUES (v_run, c.check_name, c.severity, c.threshold, m.rows_checked, m.rows_failing, v_ratio,
            CASE k.measure WHEN 'failing_ratio' THEN v_ratio ELSE m.measured END,
            CASE WHEN NOT v_failed THEN 'pass' WHEN c.severity = 'error' THEN 'fail' ELSE 'warn' END,
            coalesce(c.params ->> 'key', CASE WHEN k.measure = 'failing_ratio' THEN 'patient_key' ELSE 'batch_id' END));
    INSERT INTO dq.result_samples (run_id, check_name, patient_key, sample)
    SELECT v_run, c.check_name, (s ->> 0)::bigint, (s ->> 1)::bigint FROM jsonb_array_elements(m.samples) AS s;
  END LOOP;
  UPDATE dq.runs SET finished_at = clock_timestamp() WHERE run_id = v_run;
  RETURN v_run;
END
$function$;
-- grants on function dq.run(p_batch_id bigint) (besides its owner): healthetl_loader EXECUTE

-- ==== schema etl ================================================================================

CREATE SCHEMA etl;
COMMENT ON SCHEMA etl IS 'Batches, rejects, problems and the set-based transform functions.';
-- grants on schema etl (besides its owner): healthetl_loader USAGE

CREATE TABLE etl.batch_deletes (
  batch_id bigint NOT NULL,
  visits bigint NOT NULL,
  diagnoses bigint NOT NULL,
  treatments bigint NOT NULL,
  provider_notes bigint NOT NULL,
  deleted_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL
);
CREATE INDEX batch_deletes_batch_idx ON etl.batch_deletes USING btree (batch_id);
COMMENT ON TABLE etl.batch_deletes IS 'Rows deleted from replaced patients by each transform of a batch (or shard).';
-- grants on table etl.batch_deletes (besides its owner): healthetl_loader SELECT

CREATE TABLE etl.batch_files (
  batch_id bigint NOT NULL,
  source_file text NOT NULL,
  size_bytes bigint,
  file_sha256 bytea,
  documents bigint DEFAULT 0 NOT NULL,
  status text NOT NULL,
  duplicate_of_batch bigint,
  duplicate_of_file text,
  error text,
  staged_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  CONSTRAINT batch_files_batch_id_fkey FOREIGN KEY (batch_id) REFERENCES etl.batches(batch_id),
  CONSTRAINT batch_files_pkey PRIMARY KEY (batch_id, source_file),
  CONSTRAINT batch_files_status_check CHECK ((status = ANY (ARRAY['staged'::text, 'duplicate_file'::text, 'unreadable'::text, 'rejected'::text, 'skipped'::text])))
);
CREATE UNIQUE INDEX batch_files_pkey ON etl.batch_files USING btree (batch_id, source_file);
CREATE INDEX batch_files_sha256_idx ON etl.batch_files USING btree (file_sha256) WHERE (status = 'staged'::text);
-- grants on table etl.batch_files (besides its owner): healthetl_loader SELECT

CREATE TABLE etl.batches (
  batch_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  status text DEFAULT 'loading'::text NOT NULL,
  started_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  staged_at timestamp with time zone,
  transformed_at timestamp with time zone,
  loader text,
  error text,
  db_user text DEFAULT SESSION_USER,
  CONSTRAINT batches_pkey PRIMARY KEY (batch_id),
  CONSTRAINT batches_status_check CHECK ((status = ANY (ARRAY['loading'::text, 'staged'::text, 'transformed'::text, 'failed'::text])))
);
CREATE UNIQUE INDEX batches_pkey ON etl.batches USING btree (batch_id);
COMMENT ON COLUMN etl.batches.db_user IS 'The database login that started the batch (session_user).';
-- grants on table etl.batches (besides its owner): healthetl_loader SELECT

CREATE TABLE etl.document_problems (
  document_id bigint NOT NULL,
  batch_id bigint NOT NULL,
  field text NOT NULL,
  problem text NOT NULL,
  CONSTRAINT document_problems_document_id_fkey FOREIGN KEY (document_id) REFERENCES landing.raw_documents(document_id),
  CONSTRAINT document_problems_pkey PRIMARY KEY (document_id, field)
);
CREATE INDEX document_problems_batch_idx ON etl.document_problems USING btree (batch_id);
CREATE UNIQUE INDEX document_problems_pkey ON etl.document_problems USING btree (document_id, field);
-- grants on table etl.document_problems (besides its owner): healthetl_loader SELECT

CREATE TABLE etl.erasures (
  erasure_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  subject_hash text NOT NULL,
  erased_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  erased_by text DEFAULT SESSION_USER NOT NULL,
  documents bigint NOT NULL,
  clinical_rows bigint NOT NULL,
  lifted_at timestamp with time zone,
  lifted_by text,
  CONSTRAINT erasures_pkey PRIMARY KEY (erasure_id)
);
CREATE UNIQUE INDEX erasures_active_idx ON etl.erasures USING btree (subject_hash) WHERE (lifted_at IS NULL);
CREATE UNIQUE INDEX erasures_pkey ON etl.erasures USING btree (erasure_id);
COMMENT ON TABLE etl.erasures IS 'Erasure receipts (no PHI): who erased which keyed identity hash when, and who lifted the block.';
-- grants on table etl.erasures (besides its owner): none

CREATE TABLE etl.fhir_resources (
  source_system text NOT NULL,
  resource_type text NOT NULL,
  resource_id text NOT NULL,
  document_id bigint NOT NULL,
  last_updated timestamp with time zone,
  patient_key bigint,
  visit_key bigint,
  visit_date date,
  CONSTRAINT fhir_resources_pkey PRIMARY KEY (source_system, resource_type, resource_id)
);
CREATE INDEX fhir_resources_document_idx ON etl.fhir_resources USING btree (document_id);
CREATE INDEX fhir_resources_patient_idx ON etl.fhir_resources USING btree (patient_key) WHERE (patient_key IS NOT NULL);
CREATE UNIQUE INDEX fhir_resources_pkey ON etl.fhir_resources USING btree (source_system, resource_type, resource_id);
COMMENT ON TABLE etl.fhir_resources IS 'Current version of each loaded FHIR resource (by source system, type and id) and the patient and visit it became.';
-- grants on table etl.fhir_resources (besides its owner): none

CREATE TABLE etl.patient_keys (
  patient_key bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  source_system text NOT NULL,
  source_patient_id text NOT NULL,
  research_id uuid DEFAULT gen_random_uuid() NOT NULL,
  CONSTRAINT patient_keys_pkey PRIMARY KEY (patient_key),
  CONSTRAINT patient_keys_research_id_key UNIQUE (research_id),
  CONSTRAINT patient_keys_source_system_source_patient_id_key UNIQUE (source_system, source_patient_id)
);
CREATE UNIQUE INDEX patient_keys_pkey ON etl.patient_keys USING btree (patient_key);
CREATE UNIQUE INDEX patient_keys_research_id_key ON etl.patient_keys USING btree (research_id);
CREATE UNIQUE INDEX patient_keys_source_system_source_patient_id_key ON etl.patient_keys USING btree (source_system, source_patient_id);
-- grants on table etl.patient_keys (besides its owner): none

CREATE TABLE etl.rejected_documents (
  document_id bigint NOT NULL,
  batch_id bigint NOT NULL,
  source_file text NOT NULL,
  line bigint,
  item bigint,
  byte_offset bigint NOT NULL,
  field text NOT NULL,
  reason text NOT NULL,
  all_reasons text[] NOT NULL,
  rejected_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  content_sha256 bytea NOT NULL,
  deliveries bigint DEFAULT 1 NOT NULL,
  last_batch_id bigint NOT NULL,
  last_document_id bigint NOT NULL,
  last_rejected_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  CONSTRAINT rejected_documents_batch_id_fkey FOREIGN KEY (batch_id) REFERENCES etl.batches(batch_id),
  CONSTRAINT rejected_documents_content_sha256_key UNIQUE (content_sha256),
  CONSTRAINT rejected_documents_document_id_fkey FOREIGN KEY (document_id) REFERENCES landing.raw_documents(document_id),
  CONSTRAINT rejected_documents_pkey PRIMARY KEY (document_id)
);
CREATE INDEX rejected_documents_batch_idx ON etl.rejected_documents USING btree (batch_id);
CREATE UNIQUE INDEX rejected_documents_content_sha256_key ON etl.rejected_documents USING btree (content_sha256);
CREATE UNIQUE INDEX rejected_documents_pkey ON etl.rejected_documents USING btree (document_id);
COMMENT ON TABLE etl.rejected_documents IS 'One row per distinct rejected content: its first delivery, its last, how many, and the reasons. Every delivery: etl.batch_rejects.';
-- grants on table etl.rejected_documents (besides its owner): healthetl_loader SELECT

CREATE TABLE etl.restricted_zip3 (
  zip3 text NOT NULL,
  source text NOT NULL,
  CONSTRAINT restricted_zip3_pkey PRIMARY KEY (zip3, source),
  CONSTRAINT restricted_zip3_zip3_check CHECK ((zip3 ~ '^[0-9]{3}$'::text))
);
CREATE UNIQUE INDEX restricted_zip3_pkey ON etl.restricted_zip3 USING btree (zip3, source);
COMMENT ON TABLE etl.restricted_zip3 IS 'Restricted 3-digit ZIP prefixes (45 CFR 164.514(b)(2)(i)(B)), one row per prefix and list; deid shows 000 for any of them.';
-- grants on table etl.restricted_zip3 (besides its owner): none

CREATE TABLE etl.secret_keys (
  purpose text NOT NULL,
  key bytea NOT NULL,
  created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  CONSTRAINT secret_keys_key_check CHECK ((octet_length(key) >= 32)),
  CONSTRAINT secret_keys_pkey PRIMARY KEY (purpose),
  CONSTRAINT secret_keys_purpose_check CHECK ((purpose = ANY (ARRAY['pseudonym'::text, 'erasure'::text])))
);
CREATE UNIQUE INDEX secret_keys_pkey ON etl.secret_keys USING btree (purpose);
COMMENT ON TABLE etl.secret_keys IS 'Secret HMAC keys (pseudonym, erasure). Readable by healthetl_owner only; never exported.';
-- grants on table etl.secret_keys (besides its owner): none

CREATE SEQUENCE etl.batches_batch_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence etl.batches_batch_id_seq (besides its owner): none

CREATE SEQUENCE etl.erasures_erasure_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence etl.erasures_erasure_id_seq (besides its owner): none

CREATE SEQUENCE etl.patient_keys_patient_key_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence etl.patient_keys_patient_key_seq (besides its owner): none

-- view etl.batch_rejects columns:
--   batch_id bigint
--   document_id bigint
--   source_file text
--   line bigint
--   item bigint
--   byte_offset bigint
--   field text
--   reason text
--   all_reasons text[]
--   deliveries bigint
CREATE VIEW etl.batch_rejects AS
 SELECT d.batch_id,
    d.document_id,
    d.source_file,
    d.line,
    d.item,
    d.byte_offset,
    r.field,
    r.reason,
    r.all_reasons,
    r.deliveries
   FROM (landing.raw_documents d
     JOIN etl.rejected_documents r ON ((r.content_sha256 = d.content_sha256)))
  WHERE (d.status = 'rejected'::text);
COMMENT ON VIEW etl.batch_rejects IS 'Every rejected delivery of every batch (one row per landing row rejected), with the reason; reasons may quote values.';
-- grants on view etl.batch_rejects (besides its owner): healthetl_loader SELECT

-- view etl.batch_summary columns:
--   batch_id bigint
--   status text
--   started_at timestamp with time zone
--   staged_at timestamp with time zone
--   transformed_at timestamp with time zone
--   received bigint
--   staged bigint
--   loaded bigint
--   rejected bigint
--   duplicate bigint
--   superseded bigint
--   files bigint
--   failed_files bigint
--   loader_count bigint
--   balanced boolean
--   error text
--   deleted_visits bigint
--   deleted_children bigint
--   erased bigint
--   db_user text
--   waiting bigint
--   waiting_since timestamp with time zone
CREATE VIEW etl.batch_summary AS
 SELECT b.batch_id,
    b.status,
    b.started_at,
    b.staged_at,
    b.transformed_at,
    count(d.document_id) AS received,
    count(d.document_id) FILTER (WHERE (d.status = 'staged'::text)) AS staged,
    count(d.document_id) FILTER (WHERE (d.status = 'loaded'::text)) AS loaded,
    count(d.document_id) FILTER (WHERE (d.status = 'rejected'::text)) AS rejected,
    count(d.document_id) FILTER (WHERE (d.status = 'duplicate'::text)) AS duplicate,
    count(d.document_id) FILTER (WHERE (d.status = 'superseded'::text)) AS superseded,
    ( SELECT count(*) AS count
           FROM etl.batch_files f
          WHERE (f.batch_id = b.batch_id)) AS files,
    ( SELECT count(*) AS count
           FROM etl.batch_files f
          WHERE ((f.batch_id = b.batch_id) AND (f.status = ANY (ARRAY['unreadable'::text, 'rejected'::text])))) AS failed_files,
    lf.loader_count,
    ((lf.loader_count = count(d.document_id)) AND (count(d.document_id) = count(d.document_id) FILTER (WHERE (d.status = ANY (ARRAY['staged'::text, 'loaded'::text, 'rejected'::text, 'duplicate'::text, 'superseded'::text, 'erased'::text, 'waiting'::text]))))) AS balanced,
    b.error,
    (( SELECT COALESCE(sum(x.visits), (0)::numeric) AS "coalesce"
           FROM etl.batch_deletes x
          WHERE (x.batch_id = b.batch_id)))::bigint AS deleted_visits,
    (( SELECT COALESCE(sum(((x.diagnoses + x.treatments) + x.provider_notes)), (0)::numeric) AS "coalesce"
           FROM etl.batch_deletes x
          WHERE (x.batch_id = b.batch_id)))::bigint AS deleted_children,
    count(d.document_id) FILTER (WHERE (d.status = 'erased'::text)) AS erased,
    b.db_user,
    count(d.document_id) FILTER (WHERE (d.status = 'waiting'::text)) AS waiting,
    min(d.received_at) FILTER (WHERE (d.status = 'waiting'::text)) AS waiting_since
   FROM ((etl.batches b
     CROSS JOIN LATERAL ( SELECT (COALESCE(sum(f.documents), (0)::numeric))::bigint AS loader_count
           FROM etl.batch_files f
          WHERE (f.batch_id = b.batch_id)) lf)
     LEFT JOIN landing.raw_documents d ON ((d.batch_id = b.batch_id)))
  GROUP BY b.batch_id, lf.loader_count;
COMMENT ON VIEW etl.batch_summary IS 'One row per batch: documents (FHIR: resources) received and what became of them (erased: of a patient erased before or since; waiting: FHIR resources whose Patient or Encounter has not arrived); balanced says whether they add up; error, why its last transform failed; rows its snapshots deleted; who loaded it.';
-- grants on view etl.batch_summary (besides its owner): healthetl_loader SELECT

-- view etl.fhir_summary columns:
--   resource_type text
--   status text
--   resources bigint
--   oldest_received_at timestamp with time zone
CREATE VIEW etl.fhir_summary AS
 SELECT resource_type,
    status,
    count(*) AS resources,
    min(received_at) AS oldest_received_at
   FROM landing.raw_documents d
  WHERE (format = 'fhir-r4'::text)
  GROUP BY resource_type, status;
COMMENT ON VIEW etl.fhir_summary IS 'FHIR resources in landing by resourceType and status (waiting: its Patient or Encounter has not arrived yet), with the oldest arrival.';
-- grants on view etl.fhir_summary (besides its owner): healthetl_loader SELECT

CREATE OR REPLACE FUNCTION etl.adopt_objects()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  o record;
  v_schemas text[] := ARRAY['landing', 'etl', 'clinical', 'analytics', 'dq', 'deid', 'crypto'];
BEGIN
  FOR o IN SELECT n.nspname FROM pg_namespace n
           WHERE n.nspname = ANY (v_schemas) AND n.nspowner <> 'healthetl_owner'::regrole LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO healthetl_owner', o.nspname);
  END LOOP;
  -- Tables, views, composite types and free-standing sequences (an identity sequence follows its table).
  FOR o IN SELECT c.oid::regclass AS rel, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = ANY (v_schemas) AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S', 'c')
             AND c.relowner <> 'healthetl_owner'::regrole
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                             AND d.deptype IN ('i', 'a') AND c.relkind = 'S')
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') LOOP
    EXECUTE format('ALTER %s %s OWNER TO healthetl_owner',
                   CASE o.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                                  WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END, o.rel);
  END LOOP;
  FOR o IN SELECT p.oid::regprocedure AS fn, p.prokind FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = ANY (v_schemas) AND p.proowner <> 'healthetl_owner'::regrole
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') LOOP
    EXECUTE format('ALTER %s %s OWNER TO healthetl_owner', CASE o.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, o.fn);
  END LOOP;
  FOR o IN SELECT n.nspname FROM pg_namespace n WHERE n.nspname = ANY (v_schemas) LOOP
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', o.nspname);
    CONTINUE WHEN o.nspname = 'crypto'; -- pgcrypto's own functions: not ours to change (the schema is closed)
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', o.nspname);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', o.nspname);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM PUBLIC', o.nspname);
  END LOOP;
END
$function$;
-- grants on function etl.adopt_objects() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.batch_finish_lock_key()
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ('4848000000000000'::bigint - 3);
-- grants on function etl.batch_finish_lock_key() (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.begin_transform(p_batch_id bigint, p_wait boolean DEFAULT true)
 RETURNS TABLE(waiting text, status text, staged bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.begin_transform(p_batch_id bigint, p_wait boolean) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.clear_new_rejects()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS t_new_rejects (
    content_sha256 bytea NOT NULL, document_id bigint NOT NULL, batch_id bigint NOT NULL, source_file text NOT NULL,
    line bigint, item bigint, byte_offset bigint NOT NULL, field text NOT NULL, reason text NOT NULL, all_reasons text[] NOT NULL
  ) ON COMMIT DELETE ROWS;
  TRUNCATE t_new_rejects;
END
$function$;
-- grants on function etl.clear_new_rejects() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.code_system_of(p_uri text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE p_uri WHEN 'http://snomed.info/sct'::text THEN 'SNOMED-CT'::text WHEN 'http://hl7.org/fhir/sid/icd-10-cm'::text THEN 'ICD-10-CM'::text WHEN 'http://hl7.org/fhir/sid/icd-10'::text THEN 'ICD-10'::text WHEN 'http://www.nlm.nih.gov/research/umls/rxnorm'::text THEN 'RxNorm'::text ELSE p_uri END;
-- grants on function etl.code_system_of(p_uri text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.ensure_batch_partitions(p_batch_id bigint, p_shard integer DEFAULT 0, p_shards integer DEFAULT 1)
 RETURNS integer
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET jit TO 'off'
AS $function$
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
$function$;
-- grants on function etl.ensure_batch_partitions(p_batch_id bigint, p_shard integer, p_shards integer) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.ensure_visit_partitions(years integer[])
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.ensure_visit_partitions(years integer[]) (besides its owner): none

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
$function$;
-- grants on function etl.erase_patient(p_source_system text, p_patient_id text) (besides its owner): none

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
  DELETE FROM etl.fhir_resources WHERE patient_key = p_patient_key;
  DELETE FROM etl.patient_keys WHERE patient_key = p_patient_key;
  DELETE FROM dq.result_samples WHERE patient_key = p_patient_key;
  RETURN v_rows;
END
$function$;
-- grants on function etl.erase_patient_rows(p_patient_key bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.erasure_hash(p_source_system text, p_patient_id text)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT etl.keyed_hash(k.key, p_source_system, p_patient_id) FROM etl.secret_keys k WHERE k.purpose = 'erasure'
$function$;
-- grants on function etl.erasure_hash(p_source_system text, p_patient_id text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_coding(p_concept jsonb)
 RETURNS jsonb
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN COALESCE(jsonb_path_query_first(p_concept, '$."coding"[*]?((@."system" == "http://snomed.info/sct" || @."system" == "http://hl7.org/fhir/sid/icd-10-cm") || @."system" == "http://www.nlm.nih.gov/research/umls/rxnorm")'::jsonpath), ((p_concept -> 'coding'::text) -> 0));
-- grants on function etl.fhir_coding(p_concept jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_conditional_value(p_ref text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN "substring"(p_ref, '^[A-Za-z]+\?identifier=[^|]*\|(.+)$'::text);
-- grants on function etl.fhir_conditional_value(p_ref text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_encounter_id(p_type text, p_encounter jsonb, p_context jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN etl.fhir_ref_id(CASE WHEN (p_type = 'DocumentReference'::text) THEN COALESCE((p_context #>> '{encounter,0,reference}'::text[]), (p_context #>> '{encounter,reference}'::text[])) ELSE (p_encounter ->> 'reference'::text) END, 'Encounter'::text);
-- grants on function etl.fhir_encounter_id(p_type text, p_encounter jsonb, p_context jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_instant(t text)
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_ymd(t) THEN ((t || 'T00:00:00Z'::text))::timestamp with time zone ELSE etl.to_timestamptz(t) END;
-- grants on function etl.fhir_instant(t text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_name_text(n jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN NULLIF(concat_ws(' '::text, etl.fhir_strings((n -> 'prefix'::text)), etl.fhir_strings((n -> 'given'::text)), etl.jtext((n -> 'family'::text))), ''::text);
-- grants on function etl.fhir_name_text(n jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_note_text(p_content jsonb)
 RETURNS text
 LANGUAGE plpgsql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.fhir_note_text(p_content jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_patient_id(p_type text, p jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (p_type = 'Patient'::text) THEN etl.jtext((p -> 'id'::text)) ELSE etl.fhir_ref_id(COALESCE((p #>> '{subject,reference}'::text[]), (p #>> '{patient,reference}'::text[])), 'Patient'::text) END;
-- grants on function etl.fhir_patient_id(p_type text, p jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_ref_id(p_ref text, p_type text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (p_ref ~~ 'urn:uuid:%'::text) THEN substr(p_ref, 10) ELSE "substring"(p_ref, (('(?:^|/)'::text || p_type) || '/([A-Za-z0-9.-]+)(?:/_history/[^/]*)?$'::text)) END;
-- grants on function etl.fhir_ref_id(p_ref text, p_type text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_shard_of(p_source_system text, p_patient_id text, p_shards integer)
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN etl.shard_of(to_jsonb(COALESCE(p_source_system, 'fhir'::text)), to_jsonb(p_patient_id), p_shards);
-- grants on function etl.fhir_shard_of(p_source_system text, p_patient_id text, p_shards integer) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.fhir_strings(j jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN (SELECT string_agg((x.x #>> '{}'::text[]), ' '::text) AS string_agg FROM jsonb_path_query(fhir_strings.j, '$[*]?(@.type() == "string")'::jsonpath) x(x));
-- grants on function etl.fhir_strings(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.find_poison(p_batch_id bigint, p_shard integer, p_shards integer, p_sqlstate text)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.find_poison(p_batch_id bigint, p_shard integer, p_shards integer, p_sqlstate text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.finish_batch(p_batch_id bigint)
 RETURNS boolean
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  WITH done AS (
    UPDATE etl.batches b
    SET status = 'transformed', transformed_at = clock_timestamp(), staged_at = coalesce(b.staged_at, clock_timestamp()),
        error = NULL
    WHERE b.batch_id = p_batch_id AND b.status <> 'transformed'
      AND NOT EXISTS (SELECT 1 FROM landing.raw_documents d WHERE d.batch_id = p_batch_id AND d.status = 'staged')
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM done)
$function$;
-- grants on function etl.finish_batch(p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.finish_staging(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  UPDATE etl.batches SET status = 'staged', staged_at = clock_timestamp() WHERE batch_id = p_batch_id;
  PERFORM pg_advisory_unlock(etl.loader_lock_key(p_batch_id));
END
$function$;
-- grants on function etl.finish_staging(p_batch_id bigint) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.forget_file_names(p_documents bigint[])
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.forget_file_names(p_documents bigint[]) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.holds_advisory_lock(p_pid integer, p_key bigint)
 RETURNS boolean
 LANGUAGE sql
 STABLE
RETURN (EXISTS (SELECT 1 FROM pg_locks l WHERE ((l.locktype = 'advisory'::text) AND (l.pid = holds_advisory_lock.p_pid) AND l.granted AND (l.mode = 'ExclusiveLock'::text) AND (l.objsubid = 1) AND (l.database = (SELECT pg_database.oid FROM pg_database WHERE (pg_database.datname = current_database()))) AND ((((l.classid)::bigint << 32) | (l.objid)::bigint) = holds_advisory_lock.p_key))));
-- grants on function etl.holds_advisory_lock(p_pid integer, p_key bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.is_absent(j jsonb)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((j IS NULL) OR (jsonb_typeof(j) = 'null'::text));
-- grants on function etl.is_absent(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.is_blank(j jsonb)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((j IS NULL) OR (jsonb_typeof(j) = 'null'::text) OR (j = '""'::jsonb));
-- grants on function etl.is_blank(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.is_rfc3339(t text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((t ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9](\.[0-9]{1,9})?|60(\.0{1,9})?)([Zz]|[+-](0[0-9]|1[0-5]):[0-5][0-9])$'::text) AND etl.is_ymd(substr(t, 1, 10)));
-- grants on function etl.is_rfc3339(t text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.is_ymd(t text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (t ~ '^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$'::text) THEN (((substr(t, 1, 4))::integer >= 1) AND ((substr(t, 9, 2))::integer <= CASE WHEN ((substr(t, 6, 2))::integer = ANY (ARRAY[4, 6, 9, 11])) THEN 30 WHEN ((substr(t, 6, 2))::integer = 2) THEN CASE WHEN (((((substr(t, 1, 4))::integer % 4) = 0) AND (((substr(t, 1, 4))::integer % 100) <> 0)) OR (((substr(t, 1, 4))::integer % 400) = 0)) THEN 29 ELSE 28 END ELSE 31 END)) ELSE false END;
-- grants on function etl.is_ymd(t text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.jarr(j jsonb)
 RETURNS jsonb
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (jsonb_typeof(j) = 'array'::text) THEN j ELSE '[]'::jsonb END;
-- grants on function etl.jarr(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.jtext(j jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (jsonb_typeof(j) = ANY (ARRAY['string'::text, 'number'::text, 'boolean'::text])) THEN (j #>> '{}'::text[]) ELSE NULL::text END;
-- grants on function etl.jtext(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.keyed_hash(p_key bytea, p_source_system text, p_patient_id text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
RETURN encode(crypto.hmac(convert_to((((length(p_source_system) || ':'::text) || p_source_system) || p_patient_id), 'UTF8'::name), p_key, 'sha256'::text), 'hex'::text);
-- grants on function etl.keyed_hash(p_key bytea, p_source_system text, p_patient_id text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.keyed_uuid(p_key bytea, p_source_system text, p_patient_id text)
 RETURNS uuid
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
RETURN ("left"(etl.keyed_hash(p_key, p_source_system, p_patient_id), 32))::uuid;
-- grants on function etl.keyed_uuid(p_key bytea, p_source_system text, p_patient_id text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.lift_erasure(p_source_system text, p_patient_id text)
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n bigint;
BEGIN
  UPDATE etl.erasures SET lifted_at = clock_timestamp(), lifted_by = session_user
  WHERE lifted_at IS NULL
    AND subject_hash = etl.erasure_hash(p_source_system, etl.patient_id_from_text(p_patient_id));
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$function$;
-- grants on function etl.lift_erasure(p_source_system text, p_patient_id text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.loader_lock_key(batch_id bigint)
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ('4848000000000000'::bigint + batch_id);
-- grants on function etl.loader_lock_key(batch_id bigint) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.lock_out_transforms()
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  PERFORM pg_advisory_xact_lock(etl.transform_lock_key());
  PERFORM pg_advisory_lock(etl.shard_lock_key());
  PERFORM pg_advisory_unlock(etl.shard_lock_key());
END
$function$;
-- grants on function etl.lock_out_transforms() (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.max_key_bytes()
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN 1000;
-- grants on function etl.max_key_bytes() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.need_visit_partitions(p_years integer[], p_batch_id bigint, p_shard integer, p_shards integer)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.need_visit_partitions(p_years integer[], p_batch_id bigint, p_shard integer, p_shards integer) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.patient_id_from_text(p_patient_id text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN COALESCE(NULLIF(etl.patient_id_of(to_jsonb(p_patient_id)), ''::text), p_patient_id);
-- grants on function etl.patient_id_from_text(p_patient_id text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.patient_id_of(j jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE jsonb_typeof(j) WHEN 'number'::text THEN CASE WHEN ((j)::numeric = trunc((j)::numeric)) THEN (trunc((j)::numeric))::text ELSE NULL::text END WHEN 'string'::text THEN btrim(NORMALIZE((j #>> '{}'::text[]), NFC), ' 	
'::text) ELSE NULL::text END;
-- grants on function etl.patient_id_of(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.patient_id_problem(j jsonb)
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_blank(j) THEN 'is required'::text WHEN (jsonb_typeof(j) <> ALL (ARRAY['string'::text, 'number'::text])) THEN format('must be a string or a number (found %s)'::text, jsonb_typeof(j)) WHEN (etl.patient_id_of(j) IS NULL) THEN format('must be an integer when it is a number (found %s)'::text, (j)::text) WHEN (etl.patient_id_of(j) = ''::text) THEN 'is required'::text WHEN (octet_length(etl.patient_id_of(j)) > etl.max_key_bytes()) THEN format('is longer than %s bytes'::text, etl.max_key_bytes()) ELSE NULL::text END;
-- grants on function etl.patient_id_problem(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.pending_batches()
 RETURNS SETOF bigint
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT b.batch_id FROM etl.batches b
  WHERE b.status IN ('loading', 'staged')
    AND EXISTS (SELECT 1 FROM landing.raw_documents d WHERE d.batch_id = b.batch_id AND d.status = 'staged')
  ORDER BY b.batch_id
$function$;
-- grants on function etl.pending_batches() (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.privacy_report(p_k integer DEFAULT 11)
 RETURNS TABLE(k integer, patients bigint, groups bigint, smallest_group bigint, groups_below_k bigint, patients_below_k bigint)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  SELECT p_k, coalesce(sum(g.n), 0)::bigint, count(*), min(g.n),
         count(*) FILTER (WHERE g.n < p_k), coalesce(sum(g.n) FILTER (WHERE g.n < p_k), 0)::bigint
  FROM (SELECT count(*) AS n FROM deid.patients d
        GROUP BY coalesce(d.birth_year::text, d.age), d.sex, d.zip3) g
$function$;
-- grants on function etl.privacy_report(p_k integer) (besides its owner): healthetl_loader EXECUTE

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
$function$;
-- grants on function etl.purge(p_older_than interval) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.record_batch_failure(p_batch_id bigint, p_sqlstate text, p_message text)
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  UPDATE etl.batches SET error = format('SQLSTATE %s at %s: %s', p_sqlstate, to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), p_message)
  WHERE batch_id = p_batch_id AND status <> 'transformed'
$function$;
-- grants on function etl.record_batch_failure(p_batch_id bigint, p_sqlstate text, p_message text) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.record_file(p_batch_id bigint, p_source_file text, p_size bigint, p_sha256 bytea, p_documents bigint, p_status text, p_error text)
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  INSERT INTO etl.batch_files AS f (batch_id, source_file, size_bytes, file_sha256, documents, status, error)
  VALUES (p_batch_id, p_source_file, p_size, p_sha256, p_documents, p_status, p_error)
  ON CONFLICT (batch_id, source_file) DO UPDATE SET documents = f.documents + excluded.documents
  WHERE excluded.status IN ('staged', 'rejected')
$function$;
-- grants on function etl.record_file(p_batch_id bigint, p_source_file text, p_size bigint, p_sha256 bytea, p_documents bigint, p_status text, p_error text) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.record_rejects()
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.record_rejects() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.redact_note(p_text text, p_mrn text, p_birth_date date, p_names text)
 RETURNS text
 LANGUAGE plpgsql
 STABLE PARALLEL SAFE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.redact_note(p_text text, p_mrn text, p_birth_date date, p_names text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.reject_key(p_sha256 bytea, p_source_file text, p_line bigint, p_item bigint, p_byte_offset bigint, p_reason text)
 RETURNS bytea
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (p_sha256 = '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea) THEN sha256(convert_to(concat_ws('
'::text, p_source_file, p_line, p_item, p_byte_offset, p_reason), 'UTF8'::name)) ELSE p_sha256 END;
-- grants on function etl.reject_key(p_sha256 bytea, p_source_file text, p_line bigint, p_item bigint, p_byte_offset bigint, p_reason text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.replay_documents(p_batch_id bigint, p_documents bigint[])
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.replay_documents(p_batch_id bigint, p_documents bigint[]) (besides its owner): none

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
-- grants on function etl.replay_patients(p_patient_keys bigint[]) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.restrict_database()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO healthetl_owner, healthetl_loader, healthetl_analyst, healthetl_researcher',
                 current_database());
  EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO healthetl_owner', current_database());
  -- PostgreSQL 15 and later already take CREATE on public from PUBLIC; older servers did not.
  REVOKE CREATE ON SCHEMA public FROM PUBLIC;
END
$function$;
-- grants on function etl.restrict_database() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.rotate_pseudonym_key()
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.rotate_pseudonym_key() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.sex_codes()
 RETURNS text[]
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ARRAY['female'::text, 'male'::text, 'other'::text, 'unknown'::text];
-- grants on function etl.sex_codes() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.sex_of(j jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (lower((j #>> '{}'::text[])) = ANY (etl.sex_codes())) THEN lower((j #>> '{}'::text[])) ELSE NULL::text END;
-- grants on function etl.sex_of(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.shard_lock_key()
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ('4848000000000000'::bigint - 2);
-- grants on function etl.shard_lock_key() (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.shard_of(source_system jsonb, patient_id jsonb, shards integer)
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (shards <= 1) THEN 0 ELSE (((hashtextextended(((etl.source_system_of(source_system) || '
'::text) || COALESCE(etl.patient_id_of(patient_id), ''::text)), (0)::bigint) & '9223372036854775807'::bigint) % (shards)::bigint))::integer END;
-- grants on function etl.shard_of(source_system jsonb, patient_id jsonb, shards integer) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.source_system_of(j jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN COALESCE(NULLIF(etl.jtext(j), ''::text), 'default'::text);
-- grants on function etl.source_system_of(j jsonb) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.source_system_problem(j jsonb)
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
RETURN CASE WHEN (jsonb_typeof(j) <> ALL (ARRAY['string'::text, 'null'::text])) THEN format('must be a string (found %s)'::text, jsonb_typeof(j)) WHEN (octet_length((j #>> '{}'::text[])) > etl.max_key_bytes()) THEN format('is longer than %s bytes'::text, etl.max_key_bytes()) ELSE NULL::text END;
-- grants on function etl.source_system_problem(j jsonb) (besides its owner): none

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
$function$;
-- grants on function etl.stage_known_file(p_batch_id bigint, p_source_file text, p_size bigint, p_sha256 bytea) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.stage_rejects(p_batch_id bigint, p_rejects jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.stage_rejects(p_batch_id bigint, p_rejects jsonb) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.start_batch(p_loader text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_batch_id bigint;
BEGIN
  INSERT INTO etl.batches (loader) VALUES (p_loader) RETURNING batch_id INTO v_batch_id;
  PERFORM pg_advisory_lock(etl.loader_lock_key(v_batch_id));
  RETURN v_batch_id;
END
$function$;
-- grants on function etl.start_batch(p_loader text) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.step_batch_copies()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  INSERT INTO t_outcome
  SELECT d.document_id, 'duplicate'
  FROM (SELECT t.document_id, row_number() OVER (PARTITION BY t.content_sha256 ORDER BY t.document_id) AS copy_no
        FROM t_docs t
        WHERE NOT EXISTS (SELECT 1 FROM t_outcome o WHERE o.document_id = t.document_id)) d
  WHERE d.copy_no > 1;
END
$function$;
-- grants on function etl.step_batch_copies() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_child_rules()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_child_rules() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_delete_replaced(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_delete_replaced(p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_diagnoses(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_diagnoses(p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_document_rules()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_document_rules() (besides its owner): none

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
$function$;
-- grants on function etl.step_documents(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[]) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_earlier_duplicates()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  INSERT INTO t_outcome
  SELECT d.document_id, 'duplicate'
  FROM t_docs d
  WHERE EXISTS (SELECT 1 FROM landing.raw_documents o
                WHERE o.content_sha256 = d.content_sha256
                  AND o.status IN ('loaded', 'superseded', 'duplicate'));
END
$function$;
-- grants on function etl.step_earlier_duplicates() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_erased()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_erased() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_conditions()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_conditions() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_documents(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[])
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_documents(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[]) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_duplicates()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_duplicates() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_encounters(p_batch_id bigint, p_shard integer, p_shards integer)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_encounters(p_batch_id bigint, p_shard integer, p_shards integer) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_links()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_links() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_notes()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_notes() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_outcomes(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_outcomes(p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_patients(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_patients(p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_rules()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_rules() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_treatments()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_treatments() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_fhir_versions()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_fhir_versions() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_insert_visits()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_insert_visits() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_lock_batch(p_batch_id bigint, p_shard integer, p_shards integer, p_coordinator integer)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_lock_batch(p_batch_id bigint, p_shard integer, p_shards integer, p_coordinator integer) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_outcomes(p_batch_id bigint, p_shards integer)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_outcomes(p_batch_id bigint, p_shards integer) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_patient_keys()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_patient_keys() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_patients(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_patients(p_batch_id bigint) (besides its owner): none

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
$function$;
-- grants on function etl.step_poison() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_problems(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_problems(p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_provider_notes(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_provider_notes(p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_rejects()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_rejects() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_settings()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_settings() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_snapshots()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_snapshots() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_source_kinds()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_source_kinds() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_treatments(p_batch_id bigint)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_treatments(p_batch_id bigint) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_visit_partitions(p_batch_id bigint, p_shard integer, p_shards integer)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  PERFORM etl.need_visit_partitions(
    ARRAY(SELECT DISTINCT extract(year FROM tv.visit_date)::int FROM t_visits tv JOIN t_apply a ON a.document_id = tv.document_id),
    p_batch_id, p_shard, p_shards);
END
$function$;
-- grants on function etl.step_visit_partitions(p_batch_id bigint, p_shard integer, p_shards integer) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_visit_rules()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_visit_rules() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.step_visits()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.step_visits() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.to_date(t text)
 RETURNS date
 LANGUAGE sql
 STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_ymd(t) THEN (t)::date ELSE NULL::date END;
-- grants on function etl.to_date(t text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.to_timestamptz(t text)
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_rfc3339(t) THEN (t)::timestamp with time zone ELSE NULL::timestamp with time zone END;
-- grants on function etl.to_timestamptz(t text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.to_visit_date(t text)
 RETURNS date
 LANGUAGE sql
 STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_ymd(t) THEN (t)::date WHEN etl.is_rfc3339(t) THEN (substr(t, 1, 10))::date ELSE NULL::date END;
-- grants on function etl.to_visit_date(t text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.transform_batch(p_batch_id bigint, p_shard integer DEFAULT 0, p_shards integer DEFAULT 1, p_coordinator integer DEFAULT NULL::integer)
 RETURNS TABLE(documents bigint, loaded bigint, rejected bigint, duplicate bigint, superseded bigint, problems bigint, deleted_visits bigint, deleted_children bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION etl.transform_batch(p_batch_id bigint, p_shard integer, p_shards integer, p_coordinator integer) IS 'Transform one staged batch (or one shard of it) into the clinical tables in one transaction; returns outcome counts.';
-- grants on function etl.transform_batch(p_batch_id bigint, p_shard integer, p_shards integer, p_coordinator integer) (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.transform_documents(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[])
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
-- grants on function etl.transform_documents(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[]) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.transform_lock_key()
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ('4848000000000000'::bigint - 1);
-- grants on function etl.transform_lock_key() (besides its owner): healthetl_loader EXECUTE

CREATE OR REPLACE FUNCTION etl.treatment_types()
 RETURNS text[]
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ARRAY['medication'::text, 'procedure'::text];
-- grants on function etl.treatment_types() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.try_transform(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[])
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  PERFORM etl.transform_documents(p_batch_id, p_shard, p_shards, p_only);
  RAISE EXCEPTION 'a trial transform is always rolled back' USING ERRCODE = 'HE009';
EXCEPTION
  WHEN SQLSTATE 'HE009' THEN
    RETURN NULL;
  WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded THEN
    RETURN SQLSTATE;
END
$function$;
-- grants on function etl.try_transform(p_batch_id bigint, p_shard integer, p_shards integer, p_only bigint[]) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.updated_at_problem(j jsonb, ts timestamp with time zone, received_at timestamp with time zone)
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
RETURN CASE WHEN etl.is_absent(j) THEN NULL::text WHEN (ts IS NULL) THEN format('%s is not an RFC 3339 timestamp with an offset'::text, (j)::text) WHEN (ts > (received_at + '24:00:00'::interval)) THEN format('%s is more than 24 hours after the document was received'::text, (j)::text) ELSE NULL::text END;
-- grants on function etl.updated_at_problem(j jsonb, ts timestamp with time zone, received_at timestamp with time zone) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.visit_partition_name(y integer)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ('visits_y'::text || lpad((y)::text, 4, '0'::text));
-- grants on function etl.visit_partition_name(y integer) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.visit_type_of(t text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (t = ANY (etl.visit_types())) THEN t ELSE NULL::text END;
-- grants on function etl.visit_type_of(t text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.visit_type_of_class(p_code text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (p_code = 'AMB'::text) THEN 'outpatient'::text WHEN (p_code = ANY (ARRAY['IMP'::text, 'ACUTE'::text, 'NONAC'::text])) THEN 'inpatient'::text WHEN (p_code = 'EMER'::text) THEN 'emergency'::text WHEN (p_code = 'VR'::text) THEN 'telehealth'::text WHEN (p_code = ANY (ARRAY['HH'::text, 'FLD'::text, 'OBSENC'::text, 'PRENC'::text, 'SS'::text])) THEN 'other'::text ELSE NULL::text END;
-- grants on function etl.visit_type_of_class(p_code text) (besides its owner): none

CREATE OR REPLACE FUNCTION etl.visit_types()
 RETURNS text[]
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ARRAY['outpatient'::text, 'inpatient'::text, 'emergency'::text, 'telehealth'::text, 'other'::text];
-- grants on function etl.visit_types() (besides its owner): none

CREATE OR REPLACE FUNCTION etl.visit_year_ok(d date, received_at timestamp with time zone)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((d >= '1900-01-01'::date) AND (d < ((date_trunc('year'::text, (received_at AT TIME ZONE 'UTC'::text)) + '2 years'::interval))::date));
-- grants on function etl.visit_year_ok(d date, received_at timestamp with time zone) (besides its owner): none

-- ==== schema landing ============================================================================

CREATE SCHEMA landing;
COMMENT ON SCHEMA landing IS 'Raw documents exactly as received, one JSONB row per document.';
-- grants on schema landing (besides its owner): healthetl_loader USAGE

CREATE TABLE landing.raw_documents (
  document_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  batch_id bigint NOT NULL,
  source_file text NOT NULL,
  line bigint,
  item bigint,
  byte_offset bigint NOT NULL,
  content_sha256 bytea NOT NULL,
  format text NOT NULL,
  received_at timestamp with time zone DEFAULT now() NOT NULL,
  status text DEFAULT 'staged'::text NOT NULL,
  payload jsonb,
  resource_type text,
  source_system text,
  CONSTRAINT raw_documents_batch_id_fkey FOREIGN KEY (batch_id) REFERENCES etl.batches(batch_id),
  CONSTRAINT raw_documents_format_check CHECK ((format = ANY (ARRAY['ndjson'::text, 'json'::text, 'fhir-r4'::text]))),
  CONSTRAINT raw_documents_pkey PRIMARY KEY (document_id),
  CONSTRAINT raw_documents_status_check CHECK ((status = ANY (ARRAY['staged'::text, 'loaded'::text, 'rejected'::text, 'duplicate'::text, 'superseded'::text, 'erased'::text, 'waiting'::text])))
);
CREATE INDEX raw_documents_batch_status_idx ON landing.raw_documents USING btree (batch_id, status);
CREATE INDEX raw_documents_fhir_directory_idx ON landing.raw_documents USING btree (resource_type, ((payload ->> 'id'::text))) WHERE (resource_type = ANY (ARRAY['Practitioner'::text, 'Organization'::text]));
CREATE UNIQUE INDEX raw_documents_pkey ON landing.raw_documents USING btree (document_id);
CREATE INDEX raw_documents_sha256_idx ON landing.raw_documents USING btree (content_sha256);
CREATE INDEX raw_documents_waiting_idx ON landing.raw_documents USING btree (document_id) WHERE (status = 'waiting'::text);
COMMENT ON TABLE landing.raw_documents IS 'Every received document, as received. Unknown fields stay here.';
COMMENT ON COLUMN landing.raw_documents.resource_type IS 'FHIR resourceType of a fhir-r4 row; NULL for patient documents.';
COMMENT ON COLUMN landing.raw_documents.source_system IS 'Source system a fhir-r4 row was loaded under (healthetl load --source-system); NULL for patient documents, which name theirs.';
-- grants on table landing.raw_documents (besides its owner): healthetl_loader INSERT

CREATE SEQUENCE landing.raw_documents_document_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1;
-- grants on sequence landing.raw_documents_document_id_seq (besides its owner): none
