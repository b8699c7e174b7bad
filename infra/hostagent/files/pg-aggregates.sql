-- The SLO aggregates' database and the role that writes them (scripts/aggregate_metrics.py, README "A year of
-- aggregates"). The host agent runs this file on the Patroni leader after every apply, in the postgres database
-- (psql -X -v ON_ERROR_STOP=1 -f), with the variables database (infra/settings.py aggregates.database), role and
-- password_file (the role's password, a secret file); it is idempotent. Replicas get all of it by replication.
--
-- The role logs in (SCRAM, through PgBouncer), may connect only to that database, and owns only the schema
-- aggregates there: it creates its table and partitions in it, and has no right anywhere else.

-- The password never reaches a log: neither the statement log nor pgaudit's role class sees this session's ALTER.
SET log_statement = 'none';
SET log_min_error_statement = 'panic';
SET pgaudit.log = 'none';

SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = :'role')
\gexec
\set password `cat :'password_file'`
ALTER ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'password';
\unset password

SELECT format('CREATE DATABASE %I', :'database')
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_database WHERE datname = :'database')
\gexec
-- Nobody connects by default (PUBLIC has CONNECT on a new database): the role does, and the superuser.
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"role";
-- Elsewhere the role has only what PUBLIC has (PostgreSQL 15: no CREATE on any public schema); PgBouncer admits it to
-- this database only (infra/render/pgbouncer.py).

\c :"database"
SET log_statement = 'none';
SET pgaudit.log = 'none';
REVOKE ALL ON SCHEMA public FROM PUBLIC;
CREATE SCHEMA IF NOT EXISTS aggregates AUTHORIZATION :"role";
ALTER SCHEMA aggregates OWNER TO :"role";
