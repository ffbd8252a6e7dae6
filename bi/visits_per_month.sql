-- Visits per month by visit type and facility.
-- Grain: one row per calendar month, visit type and facility that had at least one visit.
-- Columns: visit_month (first day of the month), visit_type, facility_id, facility_name,
--   visit_count (visits), patient_count (distinct patients seen).
-- Tier: analytics (limited data set); log in as bi_reader (role healthetl_analyst).
SELECT date_trunc('month', v.visit_date)::date AS visit_month,
       v.visit_type,
       v.facility_id,
       v.facility_name,
       count(*) AS visit_count,
       count(DISTINCT v.patient_pseudonym) AS patient_count
FROM analytics.visits v
GROUP BY 1, 2, 3, 4
ORDER BY visit_month, visit_type NULLS LAST, facility_id NULLS LAST, facility_name NULLS LAST;
