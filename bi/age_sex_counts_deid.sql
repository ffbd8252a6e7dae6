-- Patient counts by age band and sex, with small cells suppressed (public-health reporting).
-- Grain: one row per age band (0-17, 18-44, 45-64, 65-89, 90+, unknown) and sex that has patients.
-- Columns: age_band, sex (female, male, other, unknown; missing counts as unknown), patient_count
--   (NULL when fewer than 11 patients), suppressed (true when the count is hidden).
--   Primary suppression only: a hidden cell can be worked out from totals published elsewhere.
-- Tier: deid (Safe Harbor); log in as research_reader (role healthetl_researcher).
WITH banded AS (
  SELECT CASE
           WHEN p.age = '90+' THEN '90+'
           WHEN p.age !~ '^[0-9]+$' THEN 'unknown'
           WHEN p.age::int < 18 THEN '0-17'
           WHEN p.age::int < 45 THEN '18-44'
           WHEN p.age::int < 65 THEN '45-64'
           WHEN p.age::int < 90 THEN '65-89'
           ELSE '90+'
         END AS age_band,
         coalesce(p.sex, 'unknown') AS sex
  FROM deid.patients p
), counted AS (
  SELECT b.age_band, b.sex, count(*) AS n
  FROM banded b
  GROUP BY 1, 2
)
SELECT c.age_band,
       c.sex,
       CASE WHEN c.n < 11 THEN NULL ELSE c.n END AS patient_count,
       c.n < 11 AS suppressed
FROM counted c
ORDER BY CASE c.age_band WHEN '0-17' THEN 1 WHEN '18-44' THEN 2 WHEN '45-64' THEN 3
                         WHEN '65-89' THEN 4 WHEN '90+' THEN 5 ELSE 6 END,
         c.sex;
