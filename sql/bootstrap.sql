-- healthetl: server bootstrap, run once by a superuser with psql (re-running it is safe).
--
-- What it does, idempotently (what exists is kept; passwords and the settings below are set again):
-- * the four NOLOGIN group roles that migrations/0008 expects: healthetl_owner (owns every object),
--   healthetl_loader (stages and transforms), healthetl_analyst (reads schema analytics),
--   healthetl_researcher (reads schema deid);
-- * the database (default healthetl), UTF8, owned by healthetl_owner, that PUBLIC may not connect to;
-- * four logins, none of them superuser or able to create roles or databases:
--     healthetl_migrator  in healthetl_owner       runs migrate, erase, rotate-pseudonym-key, replay, purge
--     etl_loader          in healthetl_loader      runs load, transform, run, status, privacy-report
--     bi_reader           in healthetl_analyst     BI tools: the analytics views, read-only, time-limited
--     research_reader     in healthetl_researcher  researchers: the deid views, read-only, time-limited
--
-- How to run it (the passwords come from the environment, never from this file or the command line
-- of a shared machine, where `ps` shows every argument; generate each with `openssl rand -base64 24`):
--
--   export HEALTHETL_MIGRATOR_PASSWORD=... ETL_LOADER_PASSWORD=... BI_READER_PASSWORD=... RESEARCH_READER_PASSWORD=...
--   psql -X -h db.example.org -U postgres -d postgres -v dbname=healthetl -f sql/bootstrap.sql
--
-- psql 15 or newer reads those four environment variables itself (\getenv). With an older psql, give
-- them as psql variables instead (these win over the environment; `ps` shows them while psql runs,
-- so only on a machine no one else logs into):
--   psql -v ON_ERROR_STOP=1 -v dbname=healthetl -v migrator_password="$HEALTHETL_MIGRATOR_PASSWORD" \
--        -v loader_password="$ETL_LOADER_PASSWORD" -v bi_password="$BI_READER_PASSWORD" \
--        -v research_password="$RESEARCH_READER_PASSWORD" -f sql/bootstrap.sql
-- A missing password stops the script before it changes anything; each must be 16 characters or more.
-- Do not add psql's -L (a query log file): it would hold the passwords. -a and -e are turned off below.
--
-- Optional psql variables (-v name=value), with their defaults:
--   dbname=healthetl  migrator_login=healthetl_migrator  loader_login=etl_loader  bi_login=bi_reader
--   research_login=research_reader  reader_connection_limit=20  reader_statement_timeout=5min
--   reader_idle_in_transaction_timeout=2min
-- Names are lower-case letters, digits and underscores (no quoting needed in pg_hba.conf or .pgpass).
--
-- Next, as healthetl_migrator (not a superuser: every object then belongs to healthetl_owner):
--   DATABASE_URL=postgresql://healthetl_migrator@db.example.org/healthetl PGPASSWORD=... npx healthetl migrate up
-- then load as etl_loader (npx healthetl run ...), and add the pg_hba.conf lines of README.md,
-- "Setting up a server (DBA)".
--
-- The readers' settings (read-only, timeouts, search_path) are per-login defaults that a session
-- may change: what they may read is limited by their privileges (migrations 0008, 0009), not by these.

-- Stop at the first error (also when the caller forgot -v ON_ERROR_STOP=1): nothing runs on half-made roles.
\set ON_ERROR_STOP on
-- Never echo a statement (psql -a / -e would print the passwords on the terminal or into a log).
\set ECHO none
\set ECHO_HIDDEN off
-- The checks' errors are one message and a hint, without PL/pgSQL's context lines; SETs are not listed.
\set SHOW_CONTEXT never
\set bootstrap_quiet :QUIET
\set QUIET on

-- ---- the passwords: a psql variable, else the environment (psql 15+), else stop -------------------

-- \getenv exists from psql 15 on; older clients must use -v.
SELECT :VERSION_NUM >= 150000 AS bootstrap_has_getenv \gset

\if :{?migrator_password}
\elif :bootstrap_has_getenv
  -- psql 15+: read HEALTHETL_MIGRATOR_PASSWORD (the variable stays unset when it is not in the environment).
  \getenv migrator_password HEALTHETL_MIGRATOR_PASSWORD
\endif
\if :{?loader_password}
\elif :bootstrap_has_getenv
  -- psql 15+: read ETL_LOADER_PASSWORD.
  \getenv loader_password ETL_LOADER_PASSWORD
\endif
\if :{?bi_password}
\elif :bootstrap_has_getenv
  -- psql 15+: read BI_READER_PASSWORD.
  \getenv bi_password BI_READER_PASSWORD
\endif
\if :{?research_password}
\elif :bootstrap_has_getenv
  -- psql 15+: read RESEARCH_READER_PASSWORD.
  \getenv research_password RESEARCH_READER_PASSWORD
\endif

-- A missing password is an error with a message that names it, before anything is changed.
\if :{?migrator_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'sql/bootstrap.sql: no password for the migrator login: set HEALTHETL_MIGRATOR_PASSWORD or pass -v migrator_password=...'
    USING HINT = 'Generate one with: openssl rand -base64 24. Nothing was changed.'; END $$;
\endif
\if :{?loader_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'sql/bootstrap.sql: no password for the loader login: set ETL_LOADER_PASSWORD or pass -v loader_password=...'
    USING HINT = 'Generate one with: openssl rand -base64 24. Nothing was changed.'; END $$;
\endif
\if :{?bi_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'sql/bootstrap.sql: no password for the BI login: set BI_READER_PASSWORD or pass -v bi_password=...'
    USING HINT = 'Generate one with: openssl rand -base64 24. Nothing was changed.'; END $$;
\endif
\if :{?research_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'sql/bootstrap.sql: no password for the research login: set RESEARCH_READER_PASSWORD or pass -v research_password=...'
    USING HINT = 'Generate one with: openssl rand -base64 24. Nothing was changed.'; END $$;
\endif

-- ---- the optional variables' defaults ---------------------------------------------------------

\if :{?dbname}
\else
  \set dbname healthetl
\endif
\if :{?migrator_login}
\else
  \set migrator_login healthetl_migrator
\endif
\if :{?loader_login}
\else
  \set loader_login etl_loader
\endif
\if :{?bi_login}
\else
  \set bi_login bi_reader
\endif
\if :{?research_login}
\else
  \set research_login research_reader
\endif
\if :{?reader_connection_limit}
\else
  \set reader_connection_limit 20
\endif
\if :{?reader_statement_timeout}
\else
  \set reader_statement_timeout 5min
\endif
\if :{?reader_idle_in_transaction_timeout}
\else
  \set reader_idle_in_transaction_timeout 2min
\endif

-- ---- checks, before anything changes ------------------------------------------------------------

-- Only a superuser may create these roles and the database, and set the logging settings below.
DO $$
BEGIN
  IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
    RAISE EXCEPTION 'sql/bootstrap.sql must be run by a superuser; % is not one', current_user
      USING HINT = 'psql -U postgres ... -f sql/bootstrap.sql. Nothing was changed.';
  END IF;
END
$$;

-- From here on this session's statements carry passwords: keep them out of the server log
-- (statements, slow statements, sampled statements and transactions, statements that fail) ...
SET log_statement = 'none';
SET log_min_duration_statement = -1;
SET log_min_duration_sample = -1;
SET log_transaction_sample_rate = 0;
SET log_min_error_statement = 'panic';
-- ... out of pg_stat_activity, where monitoring roles see the running statement ...
SET track_activities = off;
-- ... and out of pg_stat_statements, which keeps utility statements' text (a harmless placeholder
-- setting when the module is not loaded).
SET pg_stat_statements.track_utility = off;
-- Passwords are stored as SCRAM-SHA-256 verifiers, never as MD5 (whatever the server's default).
SET password_encryption = 'scram-sha-256';

-- The inputs, for the checks below (a DO block cannot read psql variables); passwords only by length.
CREATE TEMP TABLE bootstrap_input AS
SELECT :'dbname'::text AS dbname, :'migrator_login'::text AS migrator_login, :'loader_login'::text AS loader_login,
       :'bi_login'::text AS bi_login, :'research_login'::text AS research_login,
       :'reader_connection_limit'::text AS reader_connection_limit,
       :'reader_statement_timeout'::text AS reader_statement_timeout,
       :'reader_idle_in_transaction_timeout'::text AS reader_idle_in_transaction_timeout,
       ARRAY_REMOVE(ARRAY[CASE WHEN length(:'migrator_password') < 16 THEN 'migrator_password' END,
                          CASE WHEN length(:'loader_password') < 16 THEN 'loader_password' END,
                          CASE WHEN length(:'bi_password') < 16 THEN 'bi_password' END,
                          CASE WHEN length(:'research_password') < 16 THEN 'research_password' END], NULL) AS short_passwords;

-- Names, limits, timeouts, passwords and existing roles are checked together: one message each, nothing changed yet.
DO $$
DECLARE
  i record;
  v_login text;
  v_logins text[];
  v_groups text[] := ARRAY['healthetl_owner', 'healthetl_loader', 'healthetl_analyst', 'healthetl_researcher'];
BEGIN
  SELECT * INTO i FROM bootstrap_input;
  v_logins := ARRAY[i.migrator_login, i.loader_login, i.bi_login, i.research_login];
  IF cardinality(i.short_passwords) > 0 THEN
    RAISE EXCEPTION 'sql/bootstrap.sql: % shorter than 16 characters', array_to_string(i.short_passwords, ', ')
      USING HINT = 'Generate each with: openssl rand -base64 24. Nothing was changed.';
  END IF;
  FOREACH v_login IN ARRAY v_logins || i.dbname LOOP
    IF v_login !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
      RAISE EXCEPTION 'sql/bootstrap.sql: "%" is not a name this script takes: lower-case letters, digits and underscores, at most 63', v_login
        USING HINT = 'Nothing was changed.';
    END IF;
  END LOOP;
  IF (SELECT count(DISTINCT l) FROM unnest(v_logins) l) < 4 THEN
    RAISE EXCEPTION 'sql/bootstrap.sql: the four logins need four names, not %', array_to_string(v_logins, ', ')
      USING HINT = 'Nothing was changed.';
  END IF;
  FOREACH v_login IN ARRAY v_logins LOOP
    IF v_login = ANY (v_groups) OR v_login = current_user OR left(v_login, 3) = 'pg_' THEN
      RAISE EXCEPTION 'sql/bootstrap.sql: % cannot be a login of healthetl (a group role, a reserved name or yourself)', v_login
        USING HINT = 'Choose another name. Nothing was changed.';
    END IF;
    -- An existing superuser is refused rather than demoted: someone may rely on it.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = v_login AND r.rolsuper) THEN
      RAISE EXCEPTION 'sql/bootstrap.sql: role % exists and is a superuser; healthetl''s logins must not be', v_login
        USING HINT = 'Choose another name, or ALTER ROLE ... NOSUPERUSER yourself. Nothing was changed.';
    END IF;
  END LOOP;
  IF i.reader_connection_limit !~ '^([0-9]{1,6}|-1)$' THEN
    RAISE EXCEPTION 'sql/bootstrap.sql: reader_connection_limit must be a whole number (-1: none), not "%"', i.reader_connection_limit
      USING HINT = 'Nothing was changed.';
  END IF;
  -- The timeouts are checked by setting them for this transaction only (PostgreSQL says what is wrong).
  PERFORM set_config('statement_timeout', i.reader_statement_timeout, true);
  PERFORM set_config('idle_in_transaction_session_timeout', i.reader_idle_in_transaction_timeout, true);
  -- An existing database must be UTF8 (the loader writes UTF-8 JSON into jsonb).
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_database d WHERE d.datname = i.dbname AND d.encoding <> pg_char_to_encoding('UTF8')) THEN
    RAISE EXCEPTION 'sql/bootstrap.sql: database % exists and is not UTF8', i.dbname
      USING HINT = 'Choose another -v dbname=..., or recreate it with ENCODING ''UTF8''. Nothing was changed.';
  END IF;
END
$$;

-- ---- the group roles (server-wide) ------------------------------------------------------------

-- From here on psql prints each change it makes (CREATE ROLE, ALTER ROLE, GRANT ...), never its text
-- (unless psql -q was given).
\set QUIET :bootstrap_quiet

-- What migrations/0008 expects; created here so that the migrator need not be able to create roles.
SELECT format('CREATE ROLE %I NOLOGIN', g) FROM unnest(ARRAY['healthetl_owner', 'healthetl_loader', 'healthetl_analyst', 'healthetl_researcher']) g
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = g) \gexec
-- A group role is never a login (only when one was given LOGIN by hand: an unchanged role is left alone).
SELECT format('ALTER ROLE %I NOLOGIN', r.rolname) FROM pg_catalog.pg_roles r
WHERE r.rolname IN ('healthetl_owner', 'healthetl_loader', 'healthetl_analyst', 'healthetl_researcher') AND r.rolcanlogin \gexec

-- ---- the logins -------------------------------------------------------------------------------

-- Each login is created when absent; its attributes and password are (re)set below.
SELECT format('CREATE ROLE %I LOGIN', l) FROM unnest(ARRAY[:'migrator_login', :'loader_login', :'bi_login', :'research_login']) l
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = l) \gexec

-- The migrator: no superuser or role/database creation; it acts through its membership in healthetl_owner.
ALTER ROLE :"migrator_login" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT PASSWORD :'migrator_password';
-- The loader: the same; it acts through healthetl_loader's grants (SECURITY DEFINER functions).
ALTER ROLE :"loader_login" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT PASSWORD :'loader_password';
-- The BI login, with a cap on its connections (a BI gateway's pool cannot starve the loader).
ALTER ROLE :"bi_login" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT
  CONNECTION LIMIT :reader_connection_limit PASSWORD :'bi_password';
-- The research login, likewise capped.
ALTER ROLE :"research_login" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT
  CONNECTION LIMIT :reader_connection_limit PASSWORD :'research_password';

-- Each login joins its one group (granted only when missing: no notice on a re-run).
SELECT format('GRANT %I TO %I', v.grp, v.login)
FROM (VALUES ('healthetl_owner', :'migrator_login'), ('healthetl_loader', :'loader_login'),
             ('healthetl_analyst', :'bi_login'), ('healthetl_researcher', :'research_login')) v(grp, login)
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                  JOIN pg_catalog.pg_roles g ON g.oid = m.roleid JOIN pg_catalog.pg_roles l ON l.oid = m.member
                  WHERE g.rolname = v.grp AND l.rolname = v.login) \gexec

-- The migrator's sessions act as healthetl_owner (session_user, which audit columns record, stays the
-- login): what it creates (the migrations table, the pgcrypto extension) then belongs to the owner
-- role, so another migrator login can take over and this one can be dropped without REASSIGN OWNED.
ALTER ROLE :"migrator_login" SET role = 'healthetl_owner';

-- Guardrails for the readers (defaults of every session they open; privileges do the enforcing):
-- no transaction writes unless it asks to (a BI tool's stray INSERT or temp table fails) ...
ALTER ROLE :"bi_login" SET default_transaction_read_only = on;
ALTER ROLE :"research_login" SET default_transaction_read_only = on;
-- ... a runaway query is cancelled instead of loading the server for hours ...
ALTER ROLE :"bi_login" SET statement_timeout = :'reader_statement_timeout';
ALTER ROLE :"research_login" SET statement_timeout = :'reader_statement_timeout';
-- ... a transaction left open (holding back vacuum and locks) ends its session ...
ALTER ROLE :"bi_login" SET idle_in_transaction_session_timeout = :'reader_idle_in_transaction_timeout';
ALTER ROLE :"research_login" SET idle_in_transaction_session_timeout = :'reader_idle_in_transaction_timeout';
-- ... and BI tools list and find their views without a schema name.
ALTER ROLE :"bi_login" SET search_path = analytics;
ALTER ROLE :"research_login" SET search_path = deid;

-- ---- the database -----------------------------------------------------------------------------

-- Created from template0 (nothing added to template1 comes along, such as an extension in public),
-- in UTF8, owned by healthetl_owner: the migrator, a member, may then create schemas and pgcrypto.
SELECT format('CREATE DATABASE %I OWNER healthetl_owner TEMPLATE template0 ENCODING %L', :'dbname', 'UTF8')
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database d WHERE d.datname = :'dbname') \gexec
-- A database that existed already is handed to healthetl_owner (its objects keep their owners).
SELECT format('ALTER DATABASE %I OWNER TO healthetl_owner', d.datname) FROM pg_catalog.pg_database d
WHERE d.datname = :'dbname' AND d.datdba <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'healthetl_owner') \gexec

-- Into the new database (the passwords are set: this new session needs no logging protection).
\connect :"dbname"

-- PUBLIC (every role on the server) may neither connect nor create temporary tables here.
REVOKE ALL ON DATABASE :"dbname" FROM PUBLIC;
-- Only healthetl's four groups connect (the owner's own rights stay with it).
GRANT CONNECT ON DATABASE :"dbname" TO healthetl_owner, healthetl_loader, healthetl_analyst, healthetl_researcher;
-- No one but the owner creates objects in schema public (PostgreSQL 15+ already has it so; older servers did not).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

\echo
\echo 'sql/bootstrap.sql: done. Next, as the migrator (not a superuser):'
\echo '  DATABASE_URL=postgresql://':migrator_login'@<host>/':dbname' npx healthetl migrate up'
