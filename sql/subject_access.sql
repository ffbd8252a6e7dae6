-- Everything healthetl holds about one patient, as one JSON document: what a data subject access
-- request (GDPR article 15, HIPAA 45 CFR 164.524) needs from this database. Run as the migrator
-- (a member of healthetl_owner: it reads the clinical tables), with the patient's source system
-- and id as psql variables:
--
--   psql "$HEALTHETL_OWNER_URL" -v source_system=default -v patient_id=P-1001 -f sql/subject_access.sql
--
-- It prints PHI: send the output to the requester over the organisation's secure channel, not
-- into a ticket or a log. The landing table's raw documents (as received) are included, so the
-- answer holds what was sent even where the clinical model did not map it.
\set ON_ERROR_STOP on
\set QUIET on
\if :{?source_system}
\else
  \echo 'set the patient''s source system: -v source_system=... (patient documents without one use "default")'
  \quit
\endif
\if :{?patient_id}
\else
  \echo 'set the patient''s id: -v patient_id=...'
  \quit
\endif
\pset tuples_only on
\pset format unaligned

WITH k AS (
  SELECT k.patient_key FROM etl.patient_keys k
  WHERE k.source_system = :'source_system'
    AND k.source_patient_id = etl.patient_id_from_text(:'patient_id')
)
SELECT jsonb_pretty(jsonb_build_object(
  'source_system', :'source_system',
  'patient_id', :'patient_id',
  'found', EXISTS (SELECT 1 FROM k),
  'patient', (SELECT to_jsonb(p) - 'pseudonym' FROM clinical.patients p WHERE p.patient_key IN (SELECT patient_key FROM k)),
  'visits', (SELECT coalesce(jsonb_agg(to_jsonb(v) ORDER BY v.visit_date, v.position), '[]') FROM clinical.visits v
             WHERE v.patient_key IN (SELECT patient_key FROM k)),
  'diagnoses', (SELECT coalesce(jsonb_agg(to_jsonb(d) ORDER BY d.visit_date, d.position), '[]') FROM clinical.diagnoses d
                WHERE d.patient_key IN (SELECT patient_key FROM k)),
  'treatments', (SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY t.visit_date, t.position), '[]') FROM clinical.treatments t
                 WHERE t.patient_key IN (SELECT patient_key FROM k)),
  'provider_notes', (SELECT coalesce(jsonb_agg(to_jsonb(n) - 'note_text_redacted' ORDER BY n.visit_date, n.position), '[]')
                     FROM clinical.provider_notes n WHERE n.patient_key IN (SELECT patient_key FROM k)),
  'documents_received', (
    SELECT coalesce(jsonb_agg(jsonb_build_object('received_at', d.received_at, 'status', d.status, 'document', d.payload)
                              ORDER BY d.document_id), '[]')
    FROM landing.raw_documents d
    WHERE d.payload IS NOT NULL AND jsonb_typeof(d.payload) = 'object'
      AND etl.source_system_of(d.payload -> 'source_system') = :'source_system'
      AND etl.patient_id_of(d.payload -> 'patient_id')
          = etl.patient_id_from_text(:'patient_id'))
));
