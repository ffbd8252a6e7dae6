-- What happened to recent batches, for a DBA at psql:
--   psql "$DATABASE_URL" -f sql/batch-report.sql                 (the last 10 batches)
--   psql "$DATABASE_URL" -v batch=42 -f sql/batch-report.sql     (one batch)
-- Reads only etl and landing bookkeeping; the rejection reasons may quote a value from a
-- document, so run it as a role allowed to see PHI.
\if :{?batch}
\else
  \set batch NULL
\endif

\echo '== batches: what the loader counted (received) must equal the landing rows and their outcomes'
SELECT s.batch_id, s.status, s.started_at::timestamp(0) AS started, s.loader_count AS received, s.received AS landed,
       s.staged, s.loaded, s.rejected, s.duplicate, s.superseded, s.balanced, s.files, s.failed_files
FROM etl.batch_summary s
WHERE :batch::bigint IS NULL OR batch_id = :batch::bigint
ORDER BY batch_id DESC
LIMIT 10;

\echo '== files that were not staged'
SELECT batch_id, source_file, status, error
FROM etl.batch_files
WHERE status IN ('unreadable', 'rejected', 'skipped') AND (:batch::bigint IS NULL OR batch_id = :batch::bigint)
ORDER BY batch_id DESC, source_file
LIMIT 50;

\echo '== rejects by field (most frequent first; documents counts every delivery)'
SELECT field, count(*) AS documents, min(source_file) AS example_file,
       min(coalesce('line ' || line, 'item ' || item, 'byte ' || byte_offset)) AS example_position
FROM etl.batch_rejects
WHERE :batch::bigint IS NULL OR batch_id = :batch::bigint
GROUP BY field
ORDER BY documents DESC, field
LIMIT 30;

\echo '== rejected contents that keep coming back (the source is still sending them)'
SELECT field, deliveries, batch_id AS first_batch, last_batch_id AS last_batch, source_file AS first_file,
       coalesce('line ' || line, 'item ' || item, 'byte ' || byte_offset) AS first_position
FROM etl.rejected_documents
WHERE deliveries > 1 AND (:batch::bigint IS NULL OR :batch::bigint BETWEEN batch_id AND last_batch_id)
ORDER BY deliveries DESC, last_batch_id DESC
LIMIT 20;

\echo '== problems (invalid optional values) by field'
SELECT regexp_replace(field, '\[\d+\]', '[]', 'g') AS field, problem, count(*) AS occurrences
FROM etl.document_problems
WHERE :batch::bigint IS NULL OR batch_id = :batch::bigint
GROUP BY 1, 2
ORDER BY occurrences DESC
LIMIT 30;
