-- The latest result of every data-quality check, failing ones first: what a DBA or data steward
-- runs in psql after a load, or when the scheduler's run exits with the data-quality code.
--
--   psql "$DATABASE_URL" -f sql/data_quality_checks.sql
--
-- Works as the loader or the owner (both may read dq). Counts and ratios only: the failing rows
-- are in dq.result_samples by surrogate key (patient_key, visit_key, ..., batch_id), never by value.
-- To run the checks first: SELECT dq.run();   (one batch's patients: SELECT dq.run(<batch_id>);)
-- To tune one: UPDATE dq.checks SET threshold = 0.02 WHERE check_name = '...';  (recorded in dq.check_changes)
\set QUIET on
\pset null '-'
\set QUIET off

SELECT l.status,
       l.check_name,
       l.dimension,
       l.severity,
       l.rows_failing || ' / ' || l.rows_checked AS failing,
       CASE l.measure WHEN 'failing_ratio' THEN round(100 * l.failing_ratio, 2) || ' %'
                      WHEN 'hours' THEN l.measured || ' h'
                      ELSE l.measured || ' x median' END AS measured,
       CASE l.measure WHEN 'failing_ratio' THEN round(100 * l.threshold, 2) || ' %'
                      WHEN 'hours' THEN l.threshold || ' h'
                      ELSE '+/- ' || l.threshold END AS threshold,
       to_char(l.failing_since, 'YYYY-MM-DD HH24:MI') AS failing_since,
       coalesce('batch ' || l.batch_id, 'all') AS scope,
       to_char(l.checked_at, 'YYYY-MM-DD HH24:MI') AS checked_at
FROM dq.latest_results l
ORDER BY CASE l.status WHEN 'fail' THEN 0 WHEN 'warn' THEN 1 ELSE 2 END, l.dimension, l.check_name;

-- Checks that did not run in the latest run (disabled since, or added by a migration after it).
SELECT c.check_name, c.enabled, c.severity, c.threshold
FROM dq.checks c
WHERE NOT EXISTS (SELECT 1 FROM dq.results r WHERE r.check_name = c.check_name AND r.run_id = (SELECT max(run_id) FROM dq.runs))
ORDER BY 1;
