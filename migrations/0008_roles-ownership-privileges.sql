-- Up Migration
-- Least privilege. Four group roles (NOLOGIN; sql/bootstrap.sql makes the logins that belong to them):
-- * healthetl_owner owns every schema, table, view and function; migrations, erase and key rotation
--   run as a member of it;
-- * healthetl_loader stages and transforms through the loader's API: SECURITY DEFINER functions,
--   owned by healthetl_owner, with a pinned search_path; it may COPY into the landing table and read
--   the bookkeeping (batches, files, rejects, problems), and nothing in clinical or landing;
-- * healthetl_analyst reads the analytics schema, healthetl_researcher the deid schema (0009).
-- Nothing is granted to PUBLIC on our schemas, functions or the database; every later migration ends
-- with SELECT etl.adopt_objects(), which hands what it created to healthetl_owner and takes back
-- what PostgreSQL grants to PUBLIC by default (EXECUTE on functions).
SET LOCAL search_path = pg_catalog, pg_temp;
-- It changes the owner of everything the transform uses: no transform runs meanwhile.
SELECT etl.lock_out_transforms();

-- Roles belong to the server: created here only when absent (a superuser's quick start, the tests);
-- never dropped by a Down, which revokes.
DO $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['healthetl_owner', 'healthetl_loader', 'healthetl_analyst', 'healthetl_researcher'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', r);
      EXCEPTION WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'role % does not exist and % may not create it', r, current_user
          USING HINT = 'Run sql/bootstrap.sql once as a superuser (psql -f sql/bootstrap.sql ...), then migrate again.';
      END;
    END IF;
  END LOOP;
END
$$;

-- pgcrypto (a trusted extension: the database's owner may create it) gives hmac() for keyed
-- pseudonyms and gen_random_bytes() for keys. It lives in a schema of its own that only the owner
-- may use: a trusted extension's functions belong to the bootstrap superuser, so a migrator that is
-- not one cannot take PUBLIC's EXECUTE away from them; without USAGE on their schema nobody else
-- can call them.
CREATE SCHEMA crypto;
COMMENT ON SCHEMA crypto IS 'pgcrypto, for the owner only (keyed pseudonyms, keys).';
DO $$
DECLARE
  v_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pgcrypto');
BEGIN
  IF v_schema IS NULL THEN
    CREATE EXTENSION pgcrypto WITH SCHEMA crypto;
  ELSE
    RAISE EXCEPTION 'pgcrypto is already installed in schema % of this database; healthetl keeps it in schema crypto, out of everyone else''s reach', v_schema
      USING HINT = 'As its owner or a superuser: CREATE SCHEMA IF NOT EXISTS crypto; ALTER EXTENSION pgcrypto SET SCHEMA crypto; then migrate again.';
  END IF;
END
$$;

-- Hands every object in our schemas to healthetl_owner and revokes PUBLIC's default EXECUTE.
-- Run by the migration's own user (it owns what it just created), at the end of each migration.
CREATE FUNCTION etl.adopt_objects() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  o record;
  v_schemas text[] := ARRAY['landing', 'etl', 'clinical', 'analytics', 'dq', 'deid', 'crypto'];
BEGIN
  FOR o IN SELECT n.nspname FROM pg_namespace n
           WHERE n.nspname = ANY (v_schemas) AND n.nspowner <> 'healthetl_owner'::regrole LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO healthetl_owner', o.nspname);
  END LOOP;
  -- Tables, views, composite types and free-standing sequences (an identity sequence follows its table).
  FOR o IN SELECT c.oid::regclass AS rel, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = ANY (v_schemas) AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S', 'c')
             AND c.relowner <> 'healthetl_owner'::regrole
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                             AND d.deptype IN ('i', 'a') AND c.relkind = 'S')
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') LOOP
    EXECUTE format('ALTER %s %s OWNER TO healthetl_owner',
                   CASE o.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                                  WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END, o.rel);
  END LOOP;
  FOR o IN SELECT p.oid::regprocedure AS fn, p.prokind FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = ANY (v_schemas) AND p.proowner <> 'healthetl_owner'::regrole
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') LOOP
    EXECUTE format('ALTER %s %s OWNER TO healthetl_owner', CASE o.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, o.fn);
  END LOOP;
  FOR o IN SELECT n.nspname FROM pg_namespace n WHERE n.nspname = ANY (v_schemas) LOOP
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', o.nspname);
    CONTINUE WHEN o.nspname = 'crypto'; -- pgcrypto's own functions: not ours to change (the schema is closed)
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', o.nspname);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', o.nspname);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM PUBLIC', o.nspname);
  END LOOP;
END
$$;

-- Takes PUBLIC's default rights on this database away (CONNECT, TEMP) and gives CONNECT to the four
-- roles, TEMP to the owner only (the transform's temporary tables are made inside its SECURITY DEFINER
-- functions): no analyst can create even a temporary object. Database rights are not copied by
-- CREATE DATABASE ... TEMPLATE, so a database cloned from a migrated one needs this call again.
CREATE FUNCTION etl.restrict_database() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO healthetl_owner, healthetl_loader, healthetl_analyst, healthetl_researcher',
                 current_database());
  EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO healthetl_owner', current_database());
  -- PostgreSQL 15 and later already take CREATE on public from PUBLIC; older servers did not.
  REVOKE CREATE ON SCHEMA public FROM PUBLIC;
END
$$;

-- Objects created later by the owner role or by this migration's user grant nothing to PUBLIC, so a
-- function added later is not callable by analysts by accident (tables never were).
ALTER DEFAULT PRIVILEGES FOR ROLE healthetl_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- The secret keys: one for pseudonyms (rotated on purpose by etl.rotate_pseudonym_key, 0009), one for
-- erasure receipts (never rotated, so that a rotation cannot lift an erasure). Owner only.
CREATE TABLE etl.secret_keys (
  purpose     text PRIMARY KEY CHECK (purpose IN ('pseudonym', 'erasure')),
  key         bytea NOT NULL CHECK (octet_length(key) >= 32),
  created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO etl.secret_keys (purpose, key) VALUES ('pseudonym', crypto.gen_random_bytes(32)), ('erasure', crypto.gen_random_bytes(32));
COMMENT ON TABLE etl.secret_keys IS 'Secret HMAC keys (pseudonym, erasure). Readable by healthetl_owner only; never exported.';

-- The keyed hash of a patient's identity: HMAC-SHA256 over the length-prefixed source system and id
-- (so that no two pairs share an input), hex.
CREATE FUNCTION etl.keyed_hash(p_key bytea, p_source_system text, p_patient_id text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN encode(crypto.hmac(convert_to(length(p_source_system) || ':' || p_source_system || p_patient_id, 'UTF8'), p_key, 'sha256'), 'hex');

-- ---- the loader's API runs as the owner -------------------------------------------------------
ALTER FUNCTION etl.start_batch(text) SECURITY DEFINER;
ALTER FUNCTION etl.stage_known_file(bigint, text, bigint, bytea) SECURITY DEFINER;
ALTER FUNCTION etl.record_file(bigint, text, bigint, bytea, bigint, text, text) SECURITY DEFINER;
ALTER FUNCTION etl.stage_rejects(bigint, jsonb) SECURITY DEFINER;
ALTER FUNCTION etl.finish_staging(bigint) SECURITY DEFINER;
ALTER FUNCTION etl.pending_batches() SECURITY DEFINER;
ALTER FUNCTION etl.begin_transform(bigint, boolean) SECURITY DEFINER;
ALTER FUNCTION etl.lock_out_transforms() SECURITY DEFINER;
ALTER FUNCTION etl.transform_batch(bigint, int, int, int) SECURITY DEFINER;
ALTER FUNCTION etl.ensure_batch_partitions(bigint, int, int) SECURITY DEFINER;
ALTER FUNCTION etl.ensure_visit_partitions(int[]) SECURITY DEFINER;
ALTER FUNCTION etl.record_batch_failure(bigint, text, text) SECURITY DEFINER;

SELECT etl.adopt_objects();
SELECT etl.restrict_database();
GRANT USAGE ON SCHEMA etl, landing TO healthetl_loader;
GRANT EXECUTE ON FUNCTION
  etl.start_batch(text), etl.stage_known_file(bigint, text, bigint, bytea),
  etl.record_file(bigint, text, bigint, bytea, bigint, text, text), etl.stage_rejects(bigint, jsonb),
  etl.finish_staging(bigint), etl.pending_batches(), etl.begin_transform(bigint, boolean), etl.lock_out_transforms(),
  etl.transform_batch(bigint, int, int, int), etl.ensure_batch_partitions(bigint, int, int),
  etl.record_batch_failure(bigint, text, text),
  etl.loader_lock_key(bigint), etl.transform_lock_key(), etl.shard_lock_key(), etl.batch_finish_lock_key()
TO healthetl_loader;
-- COPY needs INSERT only: the loader writes raw documents and cannot read them back.
GRANT INSERT ON landing.raw_documents TO healthetl_loader;
-- The bookkeeping status and the operator read (file names, reasons, counts; rejects' reasons may
-- quote values, so these stay with the loader and the owner).
GRANT SELECT ON etl.batches, etl.batch_files, etl.batch_summary, etl.batch_rejects, etl.batch_deletes,
  etl.rejected_documents, etl.document_problems TO healthetl_loader;

-- Down Migration
SET LOCAL search_path = pg_catalog, pg_temp;
REVOKE ALL ON ALL TABLES IN SCHEMA etl, landing FROM healthetl_loader;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA etl FROM healthetl_loader;
REVOKE ALL ON SCHEMA etl, landing FROM healthetl_loader;
ALTER FUNCTION etl.start_batch(text) SECURITY INVOKER;
ALTER FUNCTION etl.stage_known_file(bigint, text, bigint, bytea) SECURITY INVOKER;
ALTER FUNCTION etl.record_file(bigint, text, bigint, bytea, bigint, text, text) SECURITY INVOKER;
ALTER FUNCTION etl.stage_rejects(bigint, jsonb) SECURITY INVOKER;
ALTER FUNCTION etl.finish_staging(bigint) SECURITY INVOKER;
ALTER FUNCTION etl.pending_batches() SECURITY INVOKER;
ALTER FUNCTION etl.begin_transform(bigint, boolean) SECURITY INVOKER;
ALTER FUNCTION etl.lock_out_transforms() SECURITY INVOKER;
ALTER FUNCTION etl.transform_batch(bigint, int, int, int) SECURITY INVOKER;
ALTER FUNCTION etl.ensure_batch_partitions(bigint, int, int) SECURITY INVOKER;
ALTER FUNCTION etl.ensure_visit_partitions(int[]) SECURITY INVOKER;
ALTER FUNCTION etl.record_batch_failure(bigint, text, text) SECURITY INVOKER;
DROP FUNCTION etl.keyed_hash(bytea, text, text);
DROP TABLE etl.secret_keys;
ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE healthetl_owner GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
-- PUBLIC's rights go back as 0007 left them. Ownership stays with healthetl_owner (harmless under
-- 0007, and the Up would hand it over again).
DO $$
DECLARE
  o record;
BEGIN
  FOR o IN SELECT n.nspname FROM pg_namespace n WHERE n.nspname IN ('landing', 'etl', 'clinical', 'analytics', 'dq') LOOP
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA %I TO PUBLIC', o.nspname);
  END LOOP;
  EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
  EXECUTE format('REVOKE ALL ON DATABASE %I FROM healthetl_owner, healthetl_loader, healthetl_analyst, healthetl_researcher',
                 current_database());
END
$$;
DROP FUNCTION etl.restrict_database();
DROP FUNCTION etl.adopt_objects();
DROP EXTENSION pgcrypto;
DROP SCHEMA crypto;
