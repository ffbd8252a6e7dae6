-- Up Migration
-- Data quality as code. The clinical tables have no foreign keys (integrity by construction, for
-- speed): these checks prove it after every batch, with the completeness, validity, uniqueness,
-- timeliness and volume checks beside them.
-- * dq.check_kinds: one small function per kind of check, and what its threshold means;
-- * dq.checks: the checks (data). A DBA tunes severity, threshold and enabled with an UPDATE (or
--   healthetl dq set); dq.check_changes records who changed what, when. A later migration adds
--   checks with INSERT ... ON CONFLICT DO NOTHING: it never overwrites a tuned one;
-- * dq.run(batch_id) runs every enabled check on one batch's patients (NULL: the whole database)
--   and keeps the results (dq.runs, dq.results) and up to 20 failing rows per check by surrogate
--   key only (dq.result_samples): never names, ids from the source, or values.
-- Restated: etl.erase_patient_rows (an erased patient's samples go too).
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE dq.check_kinds (
  kind              text PRIMARY KEY,
  measure           text NOT NULL CHECK (measure IN ('failing_ratio', 'hours', 'ratio_to_median')),
  threshold_meaning text NOT NULL
);
COMMENT ON TABLE dq.check_kinds IS 'Kinds of data-quality check: each is the function dq.check_<kind>; measure says how its threshold is read.';

CREATE TABLE dq.checks (
  check_name   text PRIMARY KEY,
  kind         text NOT NULL REFERENCES dq.check_kinds,
  relation     text NOT NULL,          -- what it looks at
  dimension    text NOT NULL CHECK (dimension IN ('completeness', 'validity', 'uniqueness', 'consistency', 'timeliness', 'volume')),
  description  text NOT NULL,
  params       jsonb NOT NULL DEFAULT '{}',
  severity     text NOT NULL CHECK (severity IN ('warn', 'error')),
  threshold    numeric NOT NULL CHECK (threshold >= 0),
  enabled      boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE dq.checks IS 'The data-quality checks. Tune severity, threshold and enabled with UPDATE (recorded in dq.check_changes); never renamed by a migration.';

CREATE TABLE dq.check_changes (
  change_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  check_name  text NOT NULL,
  setting     text NOT NULL,
  old_value   text,
  new_value   text,
  changed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
  changed_by  text NOT NULL DEFAULT session_user
);
COMMENT ON TABLE dq.check_changes IS 'Every change of a check''s severity, threshold or enabled: who, when, old and new value.';

-- Records a tuning change of dq.checks, one row per setting changed.
CREATE FUNCTION dq.record_check_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO dq.check_changes (check_name, setting, old_value, new_value)
  SELECT NEW.check_name, s.setting, s.old_value, s.new_value
  FROM (VALUES ('severity', OLD.severity, NEW.severity),
               ('threshold', OLD.threshold::text, NEW.threshold::text),
               ('enabled', OLD.enabled::text, NEW.enabled::text)) AS s(setting, old_value, new_value)
  WHERE s.old_value IS DISTINCT FROM s.new_value;
  RETURN NEW;
END
$$;
CREATE TRIGGER checks_record_change AFTER UPDATE ON dq.checks FOR EACH ROW EXECUTE FUNCTION dq.record_check_change();

CREATE TABLE dq.runs (
  run_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  batch_id     bigint,                 -- NULL: the whole database
  started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
  finished_at  timestamptz,
  run_by       text NOT NULL DEFAULT session_user
);
COMMENT ON TABLE dq.runs IS 'One row per dq.run: for one batch''s patients, or the whole database (batch_id NULL).';

CREATE TABLE dq.results (
  run_id         bigint NOT NULL REFERENCES dq.runs ON DELETE CASCADE,
  check_name     text NOT NULL,
  severity       text NOT NULL,
  threshold      numeric NOT NULL,
  rows_checked   bigint NOT NULL,
  rows_failing   bigint NOT NULL,
  failing_ratio  numeric,              -- rows_failing / rows_checked (NULL when nothing was checked)
  measured       numeric,              -- what the threshold is compared with (a ratio, hours, a ratio to the median)
  status         text NOT NULL CHECK (status IN ('pass', 'warn', 'fail')),
  sample_key     text,                 -- what the samples are: patient_key, visit_key, diagnosis_key, ... or batch_id
  PRIMARY KEY (run_id, check_name)
);
CREATE INDEX results_check_idx ON dq.results (check_name, run_id);
COMMENT ON TABLE dq.results IS 'One row per check per run: rows checked and failing, the measure against the threshold, and pass, warn (a warn-severity check failed) or fail (an error-severity check failed).';

CREATE TABLE dq.result_samples (
  run_id       bigint NOT NULL,
  check_name   text NOT NULL,
  patient_key  bigint,                 -- the failing row's patient (so that erasure finds it); NULL for a batch
  sample       bigint NOT NULL,        -- the surrogate key named by dq.results.sample_key
  FOREIGN KEY (run_id, check_name) REFERENCES dq.results ON DELETE CASCADE
);
CREATE INDEX result_samples_run_idx ON dq.result_samples (run_id, check_name);
CREATE INDEX result_samples_patient_idx ON dq.result_samples (patient_key);
COMMENT ON TABLE dq.result_samples IS 'Up to 20 failing rows per check and run, by surrogate key only (no PHI).';

-- ---- one function per kind of check ------------------------------------------------------------
-- Each returns rows_checked, rows_failing, measured (NULL: the failing ratio is the measure) and
-- samples (patient_key, sample key) for p_patients (NULL: every patient) or p_batch_id. Row checks
-- go through dq.measure_rows, their main table marked /*scope:alias*/.

CREATE TYPE dq.measurement AS (rows_checked bigint, rows_failing bigint, measured numeric, samples jsonb);

-- Builds a measurement from a query of (patient_key, key, failing) rows: the rows checked and
-- those failing in one scan; when some fail, a second scan keeps 20 of them as samples
-- (materializing every row for one pass would spill a million rows to disk for nothing). The
-- query marks its main table with /*scope:alias*/: for a batch (p_patients), a join to the
-- batch's patients goes there, from the analysed temporary table t_dq_scope that dq.run fills, so
-- the planner knows its size (= ANY over 50,000 keys is a linear search per row; a join to
-- unnest() is planned for 10 rows, as a nested loop).
CREATE FUNCTION dq.measure_rows(p_query text, p_patients bigint[]) RETURNS dq.measurement
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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
$$;

-- completeness: the column params.column of clinical.<relation> is present (NOT NULL).
CREATE FUNCTION dq.check_not_null(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN dq.measure_rows(format(
    'SELECT t.patient_key, t.%2$I AS key, t.%3$I IS NULL AS failing FROM %1$s t /*scope:t*/',
    c.relation::regclass, c.params ->> 'key', c.params ->> 'column'), p_patients);
END
$$;

-- validity: an ICD-10-CM code has the code's shape (letter, digit, digit or A/B, then up to 4
-- after a dot); only rows coded ICD-10-CM.
CREATE FUNCTION dq.check_icd10cm_shape(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT dq.measure_rows(
    $q$SELECT d.patient_key, d.diagnosis_key AS key, d.code !~ '^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$' AS failing
       FROM clinical.diagnoses d /*scope:d*/ WHERE d.code_system = 'ICD-10-CM'$q$, p_patients)
$$;

-- Whether a National Provider Identifier's check digit is right: Luhn over the prefix 80840 (which
-- adds 24) and the first 9 digits, the 1st, 3rd, 5th, 7th and 9th doubled. One expression, no
-- subquery, so that it is inlined: it runs for every visit.
CREATE FUNCTION dq.npi_ok(npi text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN npi ~ '^[0-9]{10}$' AND (24
  + 2 * substr(npi, 1, 1)::int - 9 * (substr(npi, 1, 1) >= '5')::int + substr(npi, 2, 1)::int
  + 2 * substr(npi, 3, 1)::int - 9 * (substr(npi, 3, 1) >= '5')::int + substr(npi, 4, 1)::int
  + 2 * substr(npi, 5, 1)::int - 9 * (substr(npi, 5, 1) >= '5')::int + substr(npi, 6, 1)::int
  + 2 * substr(npi, 7, 1)::int - 9 * (substr(npi, 7, 1) >= '5')::int + substr(npi, 8, 1)::int
  + 2 * substr(npi, 9, 1)::int - 9 * (substr(npi, 9, 1) >= '5')::int + substr(npi, 10, 1)::int) % 10 = 0;

-- validity: a visit's provider NPI, when given, has a valid check digit.
CREATE FUNCTION dq.check_npi_luhn(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT dq.measure_rows(
    $q$SELECT v.patient_key, v.visit_key AS key, NOT dq.npi_ok(v.provider_npi) AS failing
       FROM clinical.visits v /*scope:v*/ WHERE v.provider_npi IS NOT NULL$q$, p_patients)
$$;

-- validity: the document's sex was one of the codes (an unknown code loads as NULL, with a problem).
CREATE FUNCTION dq.check_sex_code(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT dq.measure_rows(
    $q$SELECT p.patient_key, p.patient_key AS key, x.document_id IS NOT NULL AS failing
       FROM clinical.patients p /*scope:p*/
       LEFT JOIN etl.document_problems x ON x.document_id = p.document_id AND x.field = 'sex'$q$, p_patients)
$$;

-- validity: no date in the future (params.columns of clinical.<relation>; one day's grace for time zones).
CREATE FUNCTION dq.check_not_future(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN dq.measure_rows(format(
    'SELECT t.patient_key, t.%2$I AS key, coalesce(greatest(%3$s) > current_date + 1, false) AS failing
     FROM %1$s t /*scope:t*/',
    c.relation::regclass, c.params ->> 'key',
    (SELECT string_agg(format('t.%I::date', col), ', ') FROM jsonb_array_elements_text(c.params -> 'columns') AS col)), p_patients);
END
$$;

-- validity: params.later is not before params.earlier in clinical.<relation> (discharge after
-- admission, treatment end after start); rows with both.
CREATE FUNCTION dq.check_not_before(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN dq.measure_rows(format(
    'SELECT t.patient_key, t.%2$I AS key, t.%4$I < t.%3$I AS failing FROM %1$s t /*scope:t*/
     WHERE t.%3$I IS NOT NULL AND t.%4$I IS NOT NULL',
    c.relation::regclass, c.params ->> 'key', c.params ->> 'earlier', c.params ->> 'later'), p_patients);
END
$$;

-- validity: no visit before its patient's birth date.
CREATE FUNCTION dq.check_visit_after_birth(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT dq.measure_rows(
    $q$SELECT v.patient_key, v.visit_key AS key, v.visit_date < p.birth_date AS failing
       FROM clinical.visits v /*scope:v*/ JOIN clinical.patients p ON p.patient_key = v.patient_key
       WHERE p.birth_date IS NOT NULL$q$, p_patients)
$$;

-- validity: age today between params.min and params.max years (a birth date ahead is an age below 0).
CREATE FUNCTION dq.check_age_range(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT dq.measure_rows(format(
    $q$SELECT p.patient_key, p.patient_key AS key,
              NOT (p.birth_date <= current_date AND date_part('year', age(current_date, p.birth_date)) BETWEEN %s AND %s) AS failing
       FROM clinical.patients p /*scope:p*/ WHERE p.birth_date IS NOT NULL$q$,
    (c.params ->> 'min')::int, (c.params ->> 'max')::int), p_patients)
$$;

-- uniqueness: probable duplicate patients, the same normalised name (lower case, letters only,
-- given then family) and birth date under different ids (in any source system). Counts each
-- patient of the scope that has such a twin anywhere.
CREATE FUNCTION dq.check_probable_duplicates(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT dq.measure_rows(
    $q$SELECT x.patient_key, x.patient_key AS key, x.twins > 1 AS failing
       FROM (SELECT p.patient_key,
                    count(*) OVER (PARTITION BY p.birth_date,
                                   regexp_replace(lower(concat_ws(' ', p.given_name, p.family_name)), '[^[:alpha:]]+', '', 'g')) AS twins
             FROM clinical.patients p WHERE p.birth_date IS NOT NULL AND p.family_name IS NOT NULL) x
       /*scope:x*/$q$, p_patients)
$$;

-- consistency: every row of clinical.<relation> has its visit (same patient, visit key and visit
-- date). (Outer joins, not NOT EXISTS in the select list, which runs once per row.)
CREATE FUNCTION dq.check_has_visit(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN dq.measure_rows(format(
    'SELECT t.patient_key, t.%2$I AS key, v.visit_key IS NULL AS failing
     FROM %1$s t /*scope:t*/
     LEFT JOIN clinical.visits v ON v.patient_key = t.patient_key AND v.visit_key = t.visit_key AND v.visit_date = t.visit_date',
    c.relation::regclass, c.params ->> 'key'), p_patients);
END
$$;

-- consistency: every visit has its patient.
CREATE FUNCTION dq.check_has_patient(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT dq.measure_rows(
    $q$SELECT v.patient_key, v.visit_key AS key, p.patient_key IS NULL AS failing
       FROM clinical.visits v /*scope:v*/ LEFT JOIN clinical.patients p ON p.patient_key = v.patient_key
       $q$, p_patients)
$$;

-- consistency: every batch (p_batch_id's, or all) reconciles: received = loaded + rejected +
-- duplicate + superseded + erased, and the loader's count agrees (etl.batch_summary.balanced).
CREATE FUNCTION dq.check_batch_reconciles(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT count(*), count(*) FILTER (WHERE NOT s.balanced), NULL::numeric,
         coalesce(jsonb_agg(jsonb_build_array(NULL, s.batch_id) ORDER BY s.batch_id) FILTER (WHERE NOT s.balanced), '[]')
  FROM etl.batch_summary s
  WHERE s.status = 'transformed' AND (p_batch_id IS NULL OR s.batch_id = p_batch_id)
$$;

-- timeliness: hours since the last batch was transformed (measured); one row checked.
CREATE FUNCTION dq.check_freshness(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT 1::bigint, (x.hours IS NULL OR x.hours > c.threshold)::int::bigint, x.hours, '[]'::jsonb
  FROM (SELECT round((extract(epoch FROM clock_timestamp() - max(b.transformed_at)) / 3600)::numeric, 2) AS hours
        FROM etl.batches b WHERE b.status = 'transformed') x
$$;

-- volume: the batch's (p_batch_id, else the latest transformed) count params.count (received or
-- loaded) over the median of the previous params.previous batches' (measured; needs 3 of them).
CREATE FUNCTION dq.check_volume(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
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
$$;

-- volume: the share of a batch's documents (p_batch_id's, else the latest transformed) rejected
-- or loaded with problems.
CREATE FUNCTION dq.check_reject_share(c dq.checks, p_patients bigint[], p_batch_id bigint) RETURNS dq.measurement
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(max(s.received), 0)::bigint,
         coalesce(max(s.rejected + (SELECT count(DISTINCT x.document_id) FROM etl.document_problems x
                                    JOIN landing.raw_documents d ON d.document_id = x.document_id AND d.status = 'loaded'
                                    WHERE x.batch_id = s.batch_id)), 0)::bigint,
         NULL::numeric, '[]'::jsonb
  FROM etl.batch_summary s
  WHERE s.batch_id = coalesce(p_batch_id, (SELECT max(batch_id) FROM etl.batches WHERE status = 'transformed'))
$$;

-- ---- the driver --------------------------------------------------------------------------------

-- Runs every enabled check, for one batch's patients (those whose current snapshot came in it) or
-- the whole database (p_batch_id NULL), and keeps the results. Returns the run's id.
CREATE FUNCTION dq.run(p_batch_id bigint DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
$$;

-- ---- reading the results ------------------------------------------------------------------------

-- Each enabled check's latest result, with since when it has not passed (the first run of its
-- current streak of warn/fail; NULL when it passes) and its description. A check disabled while it
-- failed drops out, so that it no longer holds the overall status at fail.
CREATE VIEW dq.latest_results AS
WITH r AS (
  SELECT res.*, run.batch_id, run.started_at AS checked_at,
         row_number() OVER (PARTITION BY res.check_name ORDER BY res.run_id DESC) AS age
  FROM dq.results res JOIN dq.runs run USING (run_id)
)
SELECT c.check_name, c.dimension, c.relation, c.description, k.measure, k.threshold_meaning,
       r.severity, r.threshold, r.rows_checked, r.rows_failing, r.failing_ratio, r.measured, r.status,
       r.run_id, r.batch_id, r.checked_at,
       CASE WHEN r.status <> 'pass' THEN
         (SELECT min(f.checked_at) FROM r f
          WHERE f.check_name = r.check_name AND f.status <> 'pass'
            AND f.run_id > coalesce((SELECT max(p.run_id) FROM r p WHERE p.check_name = r.check_name AND p.status = 'pass'), 0)) END
         AS failing_since
FROM dq.checks c
JOIN dq.check_kinds k USING (kind)
JOIN r ON r.check_name = c.check_name AND r.age = 1
WHERE c.enabled;
COMMENT ON VIEW dq.latest_results IS 'Each enabled check''s latest result, failing ones with the time of the first run of the current failing streak (a disabled check''s old result no longer counts).';

INSERT INTO dq.check_kinds (kind, measure, threshold_meaning) VALUES
  ('not_null', 'failing_ratio', 'the largest share of rows allowed to miss the value (0: none)'),
  ('icd10cm_shape', 'failing_ratio', 'the largest share of ICD-10-CM-coded diagnoses allowed a malformed code'),
  ('npi_luhn', 'failing_ratio', 'the largest share of visits allowed an NPI with a wrong check digit'),
  ('sex_code', 'failing_ratio', 'the largest share of patients allowed a sex outside the codes'),
  ('not_future', 'failing_ratio', 'the largest share of rows allowed a date more than a day ahead'),
  ('not_before', 'failing_ratio', 'the largest share of rows allowed an end before their start'),
  ('visit_after_birth', 'failing_ratio', 'the largest share of visits allowed before the patient''s birth'),
  ('age_range', 'failing_ratio', 'the largest share of patients allowed an age outside the range'),
  ('probable_duplicates', 'failing_ratio', 'the largest share of patients allowed a probable duplicate'),
  ('has_visit', 'failing_ratio', 'the largest share of rows allowed without their visit (0: none, as a foreign key)'),
  ('has_patient', 'failing_ratio', 'the largest share of visits allowed without their patient (0: none)'),
  ('batch_reconciles', 'failing_ratio', 'the largest share of batches allowed not to reconcile (0: none)'),
  ('freshness', 'hours', 'the most hours allowed since the last batch was transformed'),
  ('volume', 'ratio_to_median', 'how far the batch''s count may be from the median of the previous batches, as a ratio (0.5: half to one and a half times)'),
  ('reject_share', 'failing_ratio', 'the largest share of a batch''s documents allowed to be rejected or loaded with problems');

INSERT INTO dq.checks (check_name, kind, relation, dimension, description, params, severity, threshold) VALUES
  ('patients_birth_date_present', 'not_null', 'clinical.patients', 'completeness', 'Patients have a birth date.', '{"column": "birth_date", "key": "patient_key"}', 'warn', 0.01),
  ('patients_sex_present', 'not_null', 'clinical.patients', 'completeness', 'Patients have a sex.', '{"column": "sex", "key": "patient_key"}', 'warn', 0.01),
  ('visits_visit_type_present', 'not_null', 'clinical.visits', 'completeness', 'Visits have a visit type.', '{"column": "visit_type", "key": "visit_key"}', 'warn', 0.05),
  ('diagnoses_icd10cm_code_shape', 'icd10cm_shape', 'clinical.diagnoses', 'validity', 'ICD-10-CM codes have the shape of one (A00-Z99, then up to 4 characters after a dot).', '{"key": "diagnosis_key"}', 'warn', 0),
  ('visits_provider_npi_check_digit', 'npi_luhn', 'clinical.visits', 'validity', 'Provider NPIs have a valid check digit (Luhn with the 80840 prefix).', '{"key": "visit_key"}', 'warn', 0),
  ('patients_sex_code', 'sex_code', 'clinical.patients', 'validity', 'Patients'' sex was one of the codes (female, male, other, unknown).', '{"key": "patient_key"}', 'warn', 0),
  ('patients_birth_date_not_future', 'not_future', 'clinical.patients', 'validity', 'No birth date in the future.', '{"columns": ["birth_date"], "key": "patient_key"}', 'error', 0),
  ('visits_dates_not_future', 'not_future', 'clinical.visits', 'validity', 'No visit or discharge date in the future.', '{"columns": ["visit_date", "discharge_date"], "key": "visit_key"}', 'error', 0),
  ('treatments_dates_not_future', 'not_future', 'clinical.treatments', 'validity', 'No treatment start date in the future.', '{"columns": ["start_date"], "key": "treatment_key"}', 'warn', 0),
  ('visits_discharge_not_before_admission', 'not_before', 'clinical.visits', 'validity', 'No discharge before admission.', '{"earlier": "visit_date", "later": "discharge_date", "key": "visit_key"}', 'error', 0),
  ('treatments_end_not_before_start', 'not_before', 'clinical.treatments', 'validity', 'No treatment ending before it starts.', '{"earlier": "start_date", "later": "end_date", "key": "treatment_key"}', 'warn', 0),
  ('visits_not_before_birth', 'visit_after_birth', 'clinical.visits', 'validity', 'No visit before the patient''s birth.', '{"key": "visit_key"}', 'error', 0),
  ('patients_age_0_to_120', 'age_range', 'clinical.patients', 'validity', 'Patients are between 0 and 120 years old.', '{"min": 0, "max": 120, "key": "patient_key"}', 'warn', 0),
  ('patients_probable_duplicates', 'probable_duplicates', 'clinical.patients', 'uniqueness', 'No two patients with the same name and birth date under different ids.', '{"key": "patient_key"}', 'warn', 0),
  ('diagnoses_have_visit', 'has_visit', 'clinical.diagnoses', 'consistency', 'Every diagnosis has its visit, with the same visit date.', '{"key": "diagnosis_key"}', 'error', 0),
  ('treatments_have_visit', 'has_visit', 'clinical.treatments', 'consistency', 'Every treatment has its visit, with the same visit date.', '{"key": "treatment_key"}', 'error', 0),
  ('provider_notes_have_visit', 'has_visit', 'clinical.provider_notes', 'consistency', 'Every provider note has its visit, with the same visit date.', '{"key": "note_key"}', 'error', 0),
  ('visits_have_patient', 'has_patient', 'clinical.visits', 'consistency', 'Every visit has its patient.', '{"key": "visit_key"}', 'error', 0),
  ('batches_reconcile', 'batch_reconciles', 'etl.batch_summary', 'consistency', 'Every batch reconciles: received = loaded + rejected + duplicate + superseded + erased.', '{"key": "batch_id"}', 'error', 0),
  ('last_batch_recent', 'freshness', 'etl.batches', 'timeliness', 'The last batch was transformed recently.', '{}', 'warn', 36),
  ('batch_documents_near_median', 'volume', 'etl.batch_summary', 'volume', 'The batch''s document count is near the median of the previous 10 batches.', '{"count": "received", "previous": 10}', 'warn', 0.5),
  ('batch_loaded_near_median', 'volume', 'etl.batch_summary', 'volume', 'The batch''s loaded document count is near the median of the previous 10 batches.', '{"count": "loaded", "previous": 10}', 'warn', 0.5),
  ('batch_reject_share', 'reject_share', 'etl.batch_summary', 'volume', 'Few of the batch''s documents are rejected or loaded with problems.', '{"key": "batch_id"}', 'warn', 0.05);

-- ---- for analysts: freshness and quality, no PHI --------------------------------------------------

CREATE VIEW analytics.data_quality AS
SELECT l.check_name, l.dimension, l.description, l.severity, l.status, l.failing_ratio, l.checked_at, l.failing_since
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

CREATE VIEW analytics.data_freshness AS
SELECT (SELECT max(b.transformed_at) FROM etl.batches b WHERE b.status = 'transformed') AS data_as_of,
       (SELECT max(l.checked_at) FROM dq.latest_results l) AS quality_checked_at,
       CASE WHEN NOT EXISTS (SELECT 1 FROM dq.latest_results) THEN 'not checked'
            WHEN EXISTS (SELECT 1 FROM dq.latest_results l WHERE l.status = 'fail') THEN 'fail'
            WHEN EXISTS (SELECT 1 FROM dq.latest_results l WHERE l.status = 'warn') THEN 'warn'
            ELSE 'ok' END AS quality_status;
COMMENT ON VIEW analytics.data_freshness IS 'One row: when the data was last refreshed and the overall data-quality status, for a report''s "data as of ..., quality ok".';
COMMENT ON COLUMN analytics.data_freshness.data_as_of IS 'When the last batch was transformed into the clinical tables.';
COMMENT ON COLUMN analytics.data_freshness.quality_checked_at IS 'When the data-quality checks last ran.';
COMMENT ON COLUMN analytics.data_freshness.quality_status IS 'ok, warn, fail (the worst latest check) or not checked.';

-- Restated from 0010: the patient's data-quality samples go too.
-- Deletes one patient's rows (clinical tables, then the identity: pseudonym and research id go
-- with it) and what is derived from them; returns how many clinical rows went. The one place that
-- knows what a patient's rows are: a migration adding something derived restates this function.
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
  DELETE FROM etl.patient_keys WHERE patient_key = p_patient_key;
  DELETE FROM dq.result_samples WHERE patient_key = p_patient_key;
  RETURN v_rows;
END
$$;

SELECT etl.adopt_objects();
GRANT USAGE ON SCHEMA dq TO healthetl_loader;
GRANT EXECUTE ON FUNCTION dq.run(bigint) TO healthetl_loader;
GRANT SELECT ON dq.checks, dq.check_kinds, dq.check_changes, dq.runs, dq.results, dq.result_samples, dq.latest_results TO healthetl_loader;
GRANT SELECT ON analytics.data_quality, analytics.data_freshness TO healthetl_analyst;

-- Down Migration
SET LOCAL search_path = pg_catalog, pg_temp;
REVOKE ALL ON SCHEMA dq FROM healthetl_loader;
DROP VIEW analytics.data_freshness, analytics.data_quality;
DROP VIEW dq.latest_results;
DROP FUNCTION dq.run(bigint);
DROP FUNCTION dq.check_reject_share(dq.checks, bigint[], bigint), dq.check_volume(dq.checks, bigint[], bigint),
  dq.check_freshness(dq.checks, bigint[], bigint), dq.check_batch_reconciles(dq.checks, bigint[], bigint),
  dq.check_has_patient(dq.checks, bigint[], bigint), dq.check_has_visit(dq.checks, bigint[], bigint),
  dq.check_probable_duplicates(dq.checks, bigint[], bigint), dq.check_age_range(dq.checks, bigint[], bigint),
  dq.check_visit_after_birth(dq.checks, bigint[], bigint), dq.check_not_before(dq.checks, bigint[], bigint),
  dq.check_not_future(dq.checks, bigint[], bigint), dq.check_sex_code(dq.checks, bigint[], bigint),
  dq.check_npi_luhn(dq.checks, bigint[], bigint), dq.check_icd10cm_shape(dq.checks, bigint[], bigint),
  dq.check_not_null(dq.checks, bigint[], bigint);
DROP FUNCTION dq.npi_ok(text);
DROP FUNCTION dq.measure_rows(text, bigint[]);
DROP TYPE dq.measurement;
DROP TABLE dq.result_samples, dq.results, dq.runs;
DROP TRIGGER checks_record_change ON dq.checks;
DROP FUNCTION dq.record_check_change();
DROP TABLE dq.check_changes, dq.checks, dq.check_kinds;

-- 0010's erase_patient_rows, whole.
-- Deletes one patient's rows (clinical tables, then the identity: pseudonym and research id go
-- with it) and what is derived from them; returns how many clinical rows went. The one place that
-- knows what a patient's rows are: a migration adding something derived restates this function.
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
  DELETE FROM etl.patient_keys WHERE patient_key = p_patient_key;
  RETURN v_rows;
END
$$;
