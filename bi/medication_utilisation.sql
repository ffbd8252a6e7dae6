-- Medication utilisation: how many patients were on each drug, and for how long.
-- Grain: one row per drug name (medications only; the name as sent, lower case and trimmed).
-- Columns: drug_name, patient_count (distinct patients), treatment_count (medication rows),
--   with_duration_count (rows with both a start and an end date), median_duration_days
--   (percentile_cont(0.5) of duration_days over those rows; NULL when none has one).
-- Tier: analytics (limited data set); log in as bi_reader (role healthetl_analyst).
SELECT lower(btrim(t.name)) AS drug_name,
       count(DISTINCT t.patient_pseudonym) AS patient_count,
       count(*) AS treatment_count,
       count(t.duration_days) AS with_duration_count,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY t.duration_days) AS median_duration_days
FROM analytics.treatments t
WHERE t.treatment_type = 'medication'
GROUP BY 1
ORDER BY patient_count DESC, drug_name NULLS LAST;
