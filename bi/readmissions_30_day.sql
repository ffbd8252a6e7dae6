-- 30-day readmissions: an inpatient stay that starts 0 to 30 days after the discharge date of the
-- same patient's previous inpatient stay.
-- Grain: one row per readmission (the later stay), paired with the stay just before it (the index
--   stay, ordered by admission date); an index stay without a discharge date pairs with nothing.
-- Columns: patient_pseudonym, index_visit_key, index_admission_date, index_discharge_date,
--   readmission_visit_key, readmission_date, days_after_discharge (readmission_date - index_discharge_date).
-- Tier: analytics (limited data set); log in as bi_reader (role healthetl_analyst).
WITH stays AS (
  SELECT v.patient_pseudonym,
         v.visit_key,
         v.visit_date,
         v.discharge_date,
         lag(v.visit_key) OVER w AS prev_visit_key,
         lag(v.visit_date) OVER w AS prev_visit_date,
         lag(v.discharge_date) OVER w AS prev_discharge_date
  FROM analytics.visits v
  WHERE v.visit_type = 'inpatient'
  WINDOW w AS (PARTITION BY v.patient_pseudonym ORDER BY v.visit_date, v.visit_key)
)
SELECT s.patient_pseudonym,
       s.prev_visit_key AS index_visit_key,
       s.prev_visit_date AS index_admission_date,
       s.prev_discharge_date AS index_discharge_date,
       s.visit_key AS readmission_visit_key,
       s.visit_date AS readmission_date,
       s.visit_date - s.prev_discharge_date AS days_after_discharge
FROM stays s
WHERE s.prev_discharge_date IS NOT NULL
  AND s.visit_date - s.prev_discharge_date BETWEEN 0 AND 30
ORDER BY readmission_date, patient_pseudonym, readmission_visit_key;
