-- Up Migration
-- Schemas are public contracts: landing (raw input), etl (bookkeeping and the transform),
-- clinical (flattened tables), analytics and dq (reserved for masked views and data-quality checks).
CREATE SCHEMA landing;
CREATE SCHEMA etl;
CREATE SCHEMA clinical;
CREATE SCHEMA analytics;
CREATE SCHEMA dq;

COMMENT ON SCHEMA landing IS 'Raw documents exactly as received, one JSONB row per document.';
COMMENT ON SCHEMA etl IS 'Batches, rejects, problems and the set-based transform functions.';
COMMENT ON SCHEMA clinical IS 'Flattened clinical tables (contain PHI; analysts use the analytics views).';
COMMENT ON SCHEMA analytics IS 'Masked views for analysts.';
COMMENT ON SCHEMA dq IS 'Data-quality checks and their results.';

-- One row per loader invocation. Counts are not stored: they are derived from landing.raw_documents.
CREATE TABLE etl.batches (
  batch_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  status         text NOT NULL DEFAULT 'loading'
                 CHECK (status IN ('loading', 'staged', 'transformed', 'failed')),
  started_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
  staged_at      timestamptz,
  transformed_at timestamptz,
  loader         text,          -- e.g. 'healthetl 0.1.0 on host (pid 123)'; never a path or a patient value
  error          text
);

-- One row per input file of a batch: what was read, its fingerprint, and what became of it.
CREATE TABLE etl.batch_files (
  batch_id      bigint NOT NULL REFERENCES etl.batches,
  source_file   text   NOT NULL,
  size_bytes    bigint,
  file_sha256   bytea,          -- of the bytes on disk; NULL for standard input
  documents     bigint NOT NULL DEFAULT 0,
  status        text   NOT NULL CHECK (status IN ('staged', 'duplicate_file', 'unreadable', 'rejected', 'skipped')),
  duplicate_of_batch bigint,    -- for duplicate_file: the batch that staged the same bytes first
  duplicate_of_file  text,
  error         text,
  staged_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (batch_id, source_file)
);
CREATE INDEX batch_files_sha256_idx ON etl.batch_files (file_sha256) WHERE status = 'staged';

-- The ONE landing table. Every received document gets a row here, even when it could not be
-- parsed (payload NULL, status 'rejected'), so that received = sum of outcomes, per batch.
CREATE TABLE landing.raw_documents (
  document_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- also the arrival order
  batch_id       bigint NOT NULL REFERENCES etl.batches,
  source_file    text   NOT NULL,
  line           bigint,        -- 1-based line for NDJSON
  item           bigint,        -- 0-based index for a JSON array file
  byte_offset    bigint NOT NULL,  -- of the document's first byte in the (decompressed) stream
  content_sha256 bytea  NOT NULL,  -- of the document's bytes: identical re-deliveries are duplicates
  format         text   NOT NULL CHECK (format IN ('ndjson', 'json')),
  received_at    timestamptz NOT NULL DEFAULT now(),
  status         text   NOT NULL DEFAULT 'staged'
                 CHECK (status IN ('staged', 'loaded', 'rejected', 'duplicate', 'superseded')),
  payload        jsonb
);
CREATE INDEX raw_documents_batch_status_idx ON landing.raw_documents (batch_id, status);
CREATE INDEX raw_documents_sha256_idx ON landing.raw_documents (content_sha256);
-- lz4 (where the server has it) compresses at COPY and decompresses in the transform several
-- times faster than the default pglz; payloads are read a few times per transform.
DO $$
BEGIN
  ALTER TABLE landing.raw_documents ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
  RAISE NOTICE 'lz4 is not available on this server; landing payloads use the default compression';
END
$$;
COMMENT ON TABLE landing.raw_documents IS 'Every received document, as received. Unknown fields stay here.';

-- Documents refused whole, with the first reason (naming the field) and all reasons.
CREATE TABLE etl.rejected_documents (
  document_id  bigint PRIMARY KEY REFERENCES landing.raw_documents,
  batch_id     bigint NOT NULL REFERENCES etl.batches,
  source_file  text   NOT NULL,
  line         bigint,
  item         bigint,
  byte_offset  bigint NOT NULL,
  field        text   NOT NULL,   -- e.g. 'visits[2].visit_date', or '$' for the whole document
  reason       text   NOT NULL,   -- e.g. 'visits[2].visit_date: "2024-02-30" is not a valid date'
  all_reasons  text[] NOT NULL,
  rejected_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX rejected_documents_batch_idx ON etl.rejected_documents (batch_id);

-- Invalid optional values: the document loads, the column is NULL, the problem is kept here.
-- The value itself is not copied (it may be PHI); file and position find it.
CREATE TABLE etl.document_problems (
  document_id  bigint NOT NULL REFERENCES landing.raw_documents,
  batch_id     bigint NOT NULL,
  field        text   NOT NULL,   -- e.g. 'birth_date', 'visits[0].discharge_date'
  problem      text   NOT NULL,   -- e.g. 'not a valid date (YYYY-MM-DD)'
  PRIMARY KEY (document_id, field)
);
CREATE INDEX document_problems_batch_idx ON etl.document_problems (batch_id);

-- Patient identity registry: assigns the surrogate key once per (source_system, patient_id).
-- It lives outside clinical so that every clinical key can lead with patient_key (Citus co-location).
CREATE TABLE etl.patient_keys (
  patient_key        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  source_system      text NOT NULL,
  source_patient_id  text NOT NULL,
  UNIQUE (source_system, source_patient_id)
);

-- Down Migration
DROP SCHEMA dq CASCADE;
DROP SCHEMA analytics CASCADE;
DROP SCHEMA clinical CASCADE;
DROP SCHEMA etl CASCADE;
DROP SCHEMA landing CASCADE;
