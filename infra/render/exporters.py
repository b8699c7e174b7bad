"""Exporter configuration: postgres_exporter's custom queries. Pure: settings + topology in, bytes out.

The top statements of pg_stat_statements (`pg_stat_statements_top_*`, see TOP_STATEMENTS) come from the
extension the post_bootstrap script and the agent create in the postgres database.

postgres_exporter 0.11 exports replication lag only in bytes and only on the primary
(`pg_stat_replication_pg_wal_lsn_diff`); the data-freshness SLI (lag < 1 s) needs seconds,
measured on each replica. It has no transaction-ID age, and its replication-slot query fails on
replicas: the cluster alerts read the queries below instead. The file lands at Paths.POSTGRES_EXPORTER_QUERIES and is passed with
`--extend.query-path`.
"""

from __future__ import annotations

import yaml

from infra.settings import StackSettings
from infra.topology import Topology

# On a replica: seconds since the last replayed transaction, but 0 while it has replayed all it
# received: otherwise an idle primary (no new transactions) would look like a growing lag.
REPLICATION_LAG_QUERY = """\
SELECT
  CASE
    WHEN NOT pg_is_in_recovery() THEN 0
    WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
    ELSE GREATEST(0, EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()))
  END AS lag_seconds,
  CASE WHEN pg_is_in_recovery() THEN 1 ELSE 0 END AS is_replica
"""

# Transaction-ID age per database (pg_database is shared: one query per server). postgres_exporter
# 0.11 has no such metric; TransactionIdWraparoundApproaching compares it with autovacuum_freeze_max_age
# and with 2^31.
DATFROZENXID_AGE_QUERY = """\
SELECT datname, age(datfrozenxid) AS age FROM pg_database WHERE datallowconn
"""

# Every replication slot, on a replica too: the exporter's own pg_replication_slots query calls
# pg_current_wal_lsn(), which fails during recovery. Retained WAL is measured from the position the
# server has reached (written on a primary, replayed on a replica); a slot that never reserved WAL
# retains none.
REPLICATION_SLOT_QUERY = """\
SELECT
  slot_name,
  slot_type,
  active::int AS active,
  COALESCE(pg_wal_lsn_diff(
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END,
    restart_lsn), 0) AS retained_wal_bytes
FROM pg_replication_slots
"""

# pg_stat_statements' heaviest statements by total execution time: at most TOP_STATEMENTS series per metric
# and server, labelled by queryid alone (no query text, user or database: bounded cardinality, nothing
# sensitive). A statement's rows for several users or databases are summed under its queryid. The set changes
# as statements climb in and out of the top: read them as counters with rate(), per queryid.
TOP_STATEMENTS = 20
TOP_STATEMENTS_QUERY = f"""\
SELECT queryid::text AS queryid, sum(calls) AS calls, sum(total_exec_time) / 1000 AS exec_seconds,
  sum(rows) AS rows, sum(shared_blks_read) AS shared_blks_read, sum(temp_blks_written) AS temp_blks_written
FROM pg_stat_statements WHERE queryid IS NOT NULL
GROUP BY queryid ORDER BY sum(total_exec_time) DESC LIMIT {TOP_STATEMENTS}
"""

POSTGRES_EXPORTER_QUERIES = {
    "pg_replication": {
        "query": REPLICATION_LAG_QUERY,
        # Once per server, not once per database.
        "master": True,
        "metrics": [
            {"lag_seconds": {"usage": "GAUGE", "description": "Replication lag behind the primary in seconds (0 on a primary)"}},
            {"is_replica": {"usage": "GAUGE", "description": "1 when this server is a replica (in recovery)"}},
        ],
    },
    "pg_database_datfrozenxid": {
        "query": DATFROZENXID_AGE_QUERY,
        "master": True,
        "metrics": [
            {"datname": {"usage": "LABEL", "description": "Database"}},
            {"age": {"usage": "GAUGE", "description": "Transaction IDs since the oldest unfrozen one (age(datfrozenxid))"}},
        ],
    },
    "pg_replication_slot": {
        "query": REPLICATION_SLOT_QUERY,
        "master": True,
        "metrics": [
            {"slot_name": {"usage": "LABEL", "description": "Replication slot"}},
            {"slot_type": {"usage": "LABEL", "description": "physical or logical"}},
            {"active": {"usage": "GAUGE", "description": "1 while a receiver streams through the slot"}},
            {"retained_wal_bytes": {"usage": "GAUGE", "description": "WAL the slot keeps in pg_wal, in bytes"}},
        ],
    },
    "pg_stat_statements_top": {
        "query": TOP_STATEMENTS_QUERY,
        "master": True,
        # Read every 30 s, not at each 5 s scrape: the view sorts up to pg_stat_statements.max entries.
        "cache_seconds": 30,
        "metrics": [
            {"queryid": {"usage": "LABEL", "description": "pg_stat_statements' queryid"}},
            {"calls": {"usage": "COUNTER", "description": "Times the statement ran"}},
            {"exec_seconds": {"usage": "COUNTER", "description": "Time spent executing the statement, in seconds"}},
            {"rows": {"usage": "COUNTER", "description": "Rows the statement returned or affected"}},
            {"shared_blks_read": {"usage": "COUNTER", "description": "Blocks read from outside shared_buffers"}},
            {"temp_blks_written": {"usage": "COUNTER", "description": "Temporary blocks written (work_mem too small)"}},
        ],
    },
}


def render_exporters(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    queries = yaml.safe_dump(POSTGRES_EXPORTER_QUERIES, sort_keys=False, width=140)
    return {"postgres_exporter/queries.yaml": queries.encode()}
