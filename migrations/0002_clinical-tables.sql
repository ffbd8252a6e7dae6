-- Up Migration
-- Clinical tables: one row per current fact. Every table carries patient_key and every primary
-- or unique key starts with it, so the tables can be distributed and co-located by patient.
-- There are no row-level foreign keys from children to visits: the transform keeps integrity by
-- construction in one set-based statement, and a data-quality check verifies it in bulk
-- (a per-row FK check into the partitioned visits table made child inserts about 6x slower).

CREATE TABLE clinical.patients (
  patient_key        bigint PRIMARY KEY,            -- from etl.patient_keys
  source_system      text   NOT NULL,
  source_patient_id  text   NOT NULL,
  mrn                text,
  ssn                text,
  name_prefix        text,
  given_name         text,                          -- all given names, space separated
  family_name        text,
  name_suffix        text,
  birth_date         date,
  sex                text CHECK (sex IN ('female', 'male', 'other', 'unknown')),
  phone              text,
  email              text,
  address_lines      text[],
  city               text,
  state              text,
  postal_code        text,
  country            text,
  source_updated_at  timestamptz,                   -- the document's updated_at
  document_id        bigint NOT NULL,               -- landing row of the current snapshot
  content_sha256     bytea  NOT NULL,
  batch_id           bigint NOT NULL,
  loaded_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE clinical.visits (
  patient_key      bigint NOT NULL,
  visit_key        bigint NOT NULL,
  visit_date       date   NOT NULL,
  source_visit_id  text   NOT NULL,
  visit_start      timestamptz,                     -- when visit_date was given as a timestamp
  discharge_date   date,
  visit_type       text CHECK (visit_type IN ('outpatient', 'inpatient', 'emergency', 'telehealth', 'other')),
  facility_id      text,
  facility_name    text,
  provider_npi     text,
  provider_name    text,
  position         int    NOT NULL,                 -- 0-based index in the document's visits
  PRIMARY KEY (patient_key, visit_key, visit_date),
  UNIQUE (patient_key, source_visit_id, visit_date)
) PARTITION BY RANGE (visit_date);
-- Yearly partitions are created by the transform when a batch needs them (etl.ensure_visit_partitions).
CREATE INDEX visits_date_type_idx ON clinical.visits (visit_date, visit_type);
CREATE SEQUENCE clinical.visits_visit_key_seq AS bigint;

-- Children carry visit_date so that date filters prune without a join to visits.
CREATE TABLE clinical.diagnoses (
  patient_key    bigint NOT NULL,
  diagnosis_key  bigint GENERATED ALWAYS AS IDENTITY,
  visit_key      bigint NOT NULL,
  visit_date     date   NOT NULL,
  position       int    NOT NULL,
  code           text   NOT NULL,
  code_system    text   NOT NULL,
  description    text,
  is_primary     boolean,
  PRIMARY KEY (patient_key, diagnosis_key)
);
CREATE INDEX diagnoses_code_idx ON clinical.diagnoses (code);

CREATE TABLE clinical.treatments (
  patient_key          bigint NOT NULL,
  treatment_key        bigint GENERATED ALWAYS AS IDENTITY,
  visit_key            bigint NOT NULL,
  visit_date           date   NOT NULL,
  position             int    NOT NULL,
  source_treatment_id  text,
  treatment_type       text CHECK (treatment_type IN ('medication', 'procedure')),
  code                 text,
  code_system          text,
  name                 text,
  dose                 text,
  route                text,
  frequency            text,
  start_date           date,
  end_date             date,
  PRIMARY KEY (patient_key, treatment_key)
);
CREATE INDEX treatments_name_idx ON clinical.treatments (name);

CREATE TABLE clinical.provider_notes (
  patient_key     bigint NOT NULL,
  note_key        bigint GENERATED ALWAYS AS IDENTITY,
  visit_key       bigint NOT NULL,
  visit_date      date   NOT NULL,
  position        int    NOT NULL,
  source_note_id  text,
  author          text,
  written_at      timestamptz,
  note_text       text   NOT NULL,
  PRIMARY KEY (patient_key, note_key)
);

-- Down Migration
DROP TABLE clinical.provider_notes;
DROP TABLE clinical.treatments;
DROP TABLE clinical.diagnoses;
DROP SEQUENCE clinical.visits_visit_key_seq;
DROP TABLE clinical.visits;
DROP TABLE clinical.patients;
