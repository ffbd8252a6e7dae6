-- Data quality and freshness, for data stewards and a dashboard's "data as of ..., quality ...".
-- Grain: one row per data-quality check that does not pass (fail first, then warn); a single row
--   with empty check columns when every check passes or none has run yet.
-- Columns: data_as_of (when the last batch was transformed), quality_checked_at, quality_status
--   (ok, warn, fail or not checked), check_name, dimension, severity, status (warn or fail),
--   failing_ratio, failing_since, description.
-- Tier: analytics (analytics.data_freshness and analytics.data_quality, no PHI); log in as
--   bi_reader (role healthetl_analyst).
SELECT f.data_as_of,
       f.quality_checked_at,
       f.quality_status,
       q.check_name,
       q.dimension,
       q.severity,
       q.status,
       q.failing_ratio,
       q.failing_since,
       q.description
FROM analytics.data_freshness f
LEFT JOIN analytics.data_quality q ON q.status <> 'pass'
ORDER BY CASE q.status WHEN 'fail' THEN 1 WHEN 'warn' THEN 2 ELSE 3 END, q.check_name NULLS LAST;
