-- PgBouncer's auth_query: pgbouncer.get_auth(name) returns a login role's SCRAM verifier, so clients log in
-- to PgBouncer with PostgreSQL's own passwords and no password is kept anywhere else.
--
-- It reads pg_authid, which only a superuser may: the function is SECURITY DEFINER, owned by the superuser
-- that runs this file, in its own schema, and only pgbouncer_auth may call it. pgbouncer_auth has no
-- password: pg_hba admits it only over the local socket, from the OS user PgBouncer runs as (peer, map
-- pgbouncer). Superusers, replication roles, roles that cannot log in and expired ones are never returned:
-- they cannot come in through the pooler (PgBouncer then refuses the login).
--
-- PgBouncer runs auth_query in the database the client asks for, so the function lives in every database:
-- Patroni's post_bootstrap runs this file in postgres and template1 (databases created later copy it), and
-- the host agent runs it on the leader in every database after each apply (psql -X -v ON_ERROR_STOP=1 -f).
-- It changes nothing that is already as written here, so it adds no DDL to the audit log on a second run.

DO $setup$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pgbouncer_auth') THEN
    CREATE ROLE pgbouncer_auth LOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'pgbouncer') THEN
    CREATE SCHEMA pgbouncer;
    REVOKE ALL ON SCHEMA pgbouncer FROM PUBLIC;
  END IF;
  -- Whoever owns the schema could replace the function: it must be a superuser's.
  IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
           WHERE n.nspname = 'pgbouncer') THEN
    RAISE EXCEPTION 'schema pgbouncer is not owned by a superuser: PgBouncer''s auth function must not be replaceable';
  END IF;
  IF NOT pg_catalog.has_schema_privilege('pgbouncer_auth', 'pgbouncer', 'USAGE') THEN
    GRANT USAGE ON SCHEMA pgbouncer TO pgbouncer_auth;
  END IF;
  -- The comment names the definition's version: a new one replaces the function.
  IF pg_catalog.to_regprocedure('pgbouncer.get_auth(text)') IS NULL
     OR pg_catalog.obj_description(pg_catalog.to_regprocedure('pgbouncer.get_auth(text)'), 'pg_proc')
        IS DISTINCT FROM 'betting: auth_query v1' THEN
    CREATE OR REPLACE FUNCTION pgbouncer.get_auth(p_username text, OUT username text, OUT password text)
    RETURNS record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $get_auth$
      SELECT rolname::text, rolpassword
        FROM pg_catalog.pg_authid
       WHERE rolname = p_username AND rolcanlogin AND NOT rolsuper AND NOT rolreplication
         AND (rolvaliduntil IS NULL OR rolvaliduntil > now())
    $get_auth$;
    COMMENT ON FUNCTION pgbouncer.get_auth(text) IS 'betting: auth_query v1';
  END IF;
  -- A new function may be executed by PUBLIC (PostgreSQL's default): only pgbouncer_auth may.
  IF pg_catalog.has_function_privilege('public', 'pgbouncer.get_auth(text)', 'EXECUTE') THEN
    REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;
  END IF;
  IF NOT pg_catalog.has_function_privilege('pgbouncer_auth', 'pgbouncer.get_auth(text)', 'EXECUTE') THEN
    GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer_auth;
  END IF;
END
$setup$;
