-- Type 2 diabetes cohort and its treatments per year: patients with at least one ICD-10-CM E11%
-- diagnosis, and every medication or procedure they had (before or after the diagnosis).
-- Grain: one row per cohort patient, treatment year, treatment type and treatment name; a cohort
--   patient with no treatment has no row.
-- Columns: patient_pseudonym, cohort_entry_date (first visit date with an E11 diagnosis),
--   treatment_year (year of the start date, else of the visit date), treatment_type,
--   treatment_name (name as sent, lower case and trimmed), treatment_count.
-- Tier: analytics (limited data set); log in as bi_reader (role healthetl_analyst).
WITH cohort AS (
  SELECT d.patient_pseudonym, min(d.visit_date) AS cohort_entry_date
  FROM analytics.diagnoses d
  WHERE d.code_system = 'ICD-10-CM' AND d.code LIKE 'E11%'
  GROUP BY d.patient_pseudonym
)
SELECT c.patient_pseudonym,
       c.cohort_entry_date,
       extract(year FROM coalesce(t.start_date, t.visit_date))::int AS treatment_year,
       t.treatment_type,
       lower(btrim(t.name)) AS treatment_name,
       count(*) AS treatment_count
FROM cohort c
JOIN analytics.treatments t ON t.patient_pseudonym = c.patient_pseudonym
GROUP BY 1, 2, 3, 4, 5
ORDER BY c.patient_pseudonym, treatment_year, treatment_type NULLS LAST, treatment_name NULLS LAST;
