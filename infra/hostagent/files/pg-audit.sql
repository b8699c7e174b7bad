-- pgaudit's object audit role and its grants: pgaudit logs an INSERT, UPDATE or DELETE on a table
-- when the role named by pgaudit.role holds that privilege on it. Which tables: the setting
-- betting.audit_tables (Patroni's DCS parameters, from the stack's audit.tables), read here at run
-- time, so the list has one source.
--
-- The host agent runs this file on the Patroni leader after every apply, in the database of
-- audit.database (psql -X -v ON_ERROR_STOP=1 -f); it is idempotent. Tables created later (the
-- application's migrations) are granted by the event trigger at the end, without another apply.
-- Grants are catalog rows: they reach the replicas by streaming replication.

SELECT 'CREATE ROLE betting_auditor NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'betting_auditor')
\gexec

CREATE SCHEMA IF NOT EXISTS betting_audit;
REVOKE ALL ON SCHEMA betting_audit FROM PUBLIC;

-- Grant INSERT, UPDATE, DELETE on every named table that exists; revoke everything from the tables
-- no longer named. Only what differs is changed: each GRANT and REVOKE is itself audited.
CREATE OR REPLACE FUNCTION betting_audit.sync_grants() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  auditor oid := 'betting_auditor'::regrole;
  wanted oid[];
  rel oid;
BEGIN
  SELECT coalesce(array_agg(to_regclass(trim(name))::oid) FILTER (WHERE to_regclass(trim(name)) IS NOT NULL), '{}')
    INTO wanted
    FROM unnest(string_to_array(nullif(current_setting('betting.audit_tables', true), ''), ',')) AS name;
  FOR rel IN
    SELECT w FROM unnest(wanted) AS w
     WHERE (SELECT count(DISTINCT a.privilege_type) FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = w AND a.grantee = auditor AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE')) < 3
  LOOP
    EXECUTE format('GRANT INSERT, UPDATE, DELETE ON TABLE %s TO betting_auditor', rel::regclass);
  END LOOP;
  FOR rel IN
    SELECT DISTINCT c.oid FROM pg_class c, aclexplode(c.relacl) a
     WHERE a.grantee = auditor AND c.oid <> ALL (wanted)
  LOOP
    EXECUTE format('REVOKE ALL ON TABLE %s FROM betting_auditor', rel::regclass);
  END LOOP;
END
$$;
REVOKE ALL ON FUNCTION betting_audit.sync_grants() FROM PUBLIC;

CREATE OR REPLACE FUNCTION betting_audit.grant_on_create() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
  PERFORM betting_audit.sync_grants();
END
$$;

-- A table that appears (created, or renamed to a named one) is audited from its first write.
SELECT 'CREATE EVENT TRIGGER betting_audit_grants ON ddl_command_end'
       ' WHEN TAG IN (''CREATE TABLE'', ''CREATE TABLE AS'', ''SELECT INTO'', ''ALTER TABLE'')'
       ' EXECUTE FUNCTION betting_audit.grant_on_create()'
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = 'betting_audit_grants')
\gexec

SELECT betting_audit.sync_grants();
