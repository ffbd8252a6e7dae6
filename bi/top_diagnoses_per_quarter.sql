-- Top 10 diagnoses per quarter, by the number of distinct patients diagnosed.
-- Grain: one row per quarter and diagnosis code (code system and code), at most 10 per quarter;
--   ties are broken by the number of diagnoses, then by code system and code.
-- Columns: quarter_start (first day of the quarter), quarter (e.g. 2024-Q3), rank (1 to 10),
--   code_system, code, description (one description as sent, the smallest), patient_count
--   (distinct patient_pseudonym), diagnosis_count (diagnosis rows, a patient may count several times).
-- Tier: analytics (limited data set); log in as bi_reader (role healthetl_analyst).
WITH per_code AS (
  SELECT date_trunc('quarter', d.visit_date)::date AS quarter_start,
         d.code_system,
         d.code,
         min(d.description) AS description,
         count(DISTINCT d.patient_pseudonym) AS patient_count,
         count(*) AS diagnosis_count
  FROM analytics.diagnoses d
  GROUP BY 1, 2, 3
), ranked AS (
  SELECT p.*,
         row_number() OVER (PARTITION BY p.quarter_start
                            ORDER BY p.patient_count DESC, p.diagnosis_count DESC, p.code_system NULLS LAST, p.code) AS rank
  FROM per_code p
)
SELECT r.quarter_start,
       to_char(r.quarter_start, 'YYYY') || '-Q' || to_char(r.quarter_start, 'Q') AS quarter,
       r.rank,
       r.code_system,
       r.code,
       r.description,
       r.patient_count,
       r.diagnosis_count
FROM ranked r
WHERE r.rank <= 10
ORDER BY r.quarter_start, r.rank;
