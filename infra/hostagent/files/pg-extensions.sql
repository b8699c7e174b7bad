-- Extensions of the postgres database (where postgres_exporter connects), created by Patroni's
-- post_bootstrap on a new cluster and by the host agent on the leader after every apply
-- (psql -X -v ON_ERROR_STOP=1 -f); idempotent. Replicas get them by replication.
-- pg_stat_statements is preloaded on every member (shared_preload_libraries); the view is per database,
-- its statistics cover every database. pg_monitor (the exporter's role) may read all of it.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
