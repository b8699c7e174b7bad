"""Exporter configuration: postgres_exporter's custom queries. Pure: settings + topology in, bytes out.

postgres_exporter 0.11 exports replication lag only in bytes and only on the primary
(`pg_stat_replication_pg_wal_lsn_diff`); the data-freshness SLI (lag < 1 s) needs seconds,
measured on each replica. The file lands at Paths.POSTGRES_EXPORTER_QUERIES and is passed with
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
}


def render_exporters(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    queries = yaml.safe_dump(POSTGRES_EXPORTER_QUERIES, sort_keys=False, width=140)
    return {"postgres_exporter/queries.yaml": queries.encode()}
