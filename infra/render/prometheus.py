"""Prometheus: prometheus.yml, the rule files (SLIs, SLO burn rates, the document's alerts, self-monitoring)
and the command-line flags. Pure: settings + topology in, bytes out.

Corrections to the requirements document's rules (each alert keeps its name, threshold, `for`,
severity and team):
- ratios of rates aggregate numerator and denominator with the same `sum by (...)`, so both sides
  carry the same labels; ratios of two metrics with different label sets match with `on (...)`;
- postgres_exporter 0.11 has no `pg_replication_lag_bytes`: ReplicationLagHigh uses its built-in
  `pg_stat_replication_pg_wal_lsn_diff` (bytes behind, per standby, measured on the primary), and
  the data-freshness SLI reads `pg_replication_lag_seconds` from our custom query (exporters.py);
- PostgreSQLDown covers every PostgreSQL node, not an instance named "postgres-primary": with
  Patroni the primary moves, and a down replica is also a lost failover target;
- availability counts 5xx as failures (the document counted every non-200, 201 and 404 included);
- ConnectionPoolNearLimit counts every backend, idle ones hold a slot too, and prints a percentage;
  with PgBouncer in front of PostgreSQL it also watches the pool itself (server connections busy in
  a transaction against `pool_size`, clients against `max_client_conn`), each clause naming its `limit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from infra import pki
from infra.render import managed_prometheus
from infra.render.webconfig import client_http_config, exporter_client_config, server_flags
from infra.settings import StackSettings
from infra.slo import BURN_RATE_ALERTS, BURN_RATE_WINDOWS, SLIS, SLO, SLOS
from infra.topology import Host, Paths, Ports, Topology
from infra.units import duration_seconds

# Where alerts link to: the runbooks live in this repository, one page per alert name.
RUNBOOK_BASE_URL = "https://github.com/betting-platform/infra/blob/main/docs/runbooks/"
RUNBOOK_DIR = "docs/runbooks"

# PostgreSQL and Patroni are scraped every 5 s and the liveness rule evaluated every 2 s: with the
# global 15 s, PostgreSQLDown reached the receiver 48-71 s after the fault (FIELD-NOTES), above the
# `for` (30 s) + 20 s this platform promises. The worst case is now scrape 5 + evaluation 2 + `for`
# 30 + group_wait 10 = 47 s; evaluating one cheap rule every 2 s costs nothing.
FAST_SCRAPE_INTERVAL = "5s"
FAST_EVALUATION_INTERVAL = "2s"
# 30-day and 3-day windows over raw counters are costly; once a minute is plenty for budgets.
BUDGET_EVALUATION_INTERVAL = "1m"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    team: str
    summary: str
    description: str
    extra_labels: dict[str, str] = field(default_factory=dict)

    def rule(self) -> dict:
        rule: dict = {"alert": self.name, "expr": self.expr}
        if self.for_ != "0s":
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity, "team": self.team, **self.extra_labels}
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": runbook_url(self.name),
        }
        return rule


def runbook_url(alert_name: str) -> str:
    return f"{RUNBOOK_BASE_URL}{alert_name}.md"


def _latency_alert_expr() -> str:
    """QueryLatencyHigh: each query against the threshold of its own SLO (5 ms for query 1, 10 ms for 2-4)."""
    parts = []
    for slo in SLOS:
        if slo.kind == "latency" and slo.total == "query_duration_seconds" and slo.tier <= 2:
            parts.append(f"sli:query_duration_seconds:p95_rate5m{{{slo.selector}}} > {slo.threshold:g}")
    return "\n  or\n".join(parts)


def _limit(expr: str, limit: str) -> str:
    """`expr` with a `limit` label naming what its ratio is measured against."""
    return f'label_replace({expr}, "limit", "{limit}", "", "")'


def _connection_pool_expr() -> str:
    """ConnectionPoolNearLimit: PostgreSQL's max_connections (every backend holds a slot, PgBouncer's
    idle server connections too), and PgBouncer's pool: server connections linked to a client (in a
    transaction) against the pool's `pool_size`, and client connections against `max_client_conn`."""
    return "\nor\n".join((
        _limit("sum by (instance) (pg_stat_activity_count)"
               " / on (instance) max by (instance) (pg_settings_max_connections)", "max_connections") + " > 0.8",
        _limit("max by (instance, database, user) (pgbouncer_pools_server_active_connections)"
               " / on (instance, database) group_left max by (instance, database) (pgbouncer_databases_pool_size > 0)",
               "pool_size") + " > 0.8",
        _limit("max by (instance) (pgbouncer_used_clients)"
               " / on (instance) max by (instance) (pgbouncer_config_max_client_connections > 0)", "max_client_conn") + " > 0.8",
    ))


# The document's 11 alerts, by rule group.
DOCUMENT_ALERTS: dict[str, tuple[Alert, ...]] = {
    "database-liveness": (
        Alert(
            "PostgreSQLDown",
            '(pg_up == 0) or (up{job="postgres"} == 0)',
            "30s", "critical", "dbre",
            "PostgreSQL on {{ $labels.instance }} is DOWN",
            "PostgreSQL on {{ $labels.instance }} is unreachable (pg_up or its exporter is 0); check that Patroni failed over.",
        ),
    ),
    "database": (
        Alert(
            "QueryLatencyHigh", _latency_alert_expr(), "5m", "critical", "dbre",
            "Query {{ $labels.query_name }} p95 latency above its SLO",
            "p95 latency of {{ $labels.query_name }} is {{ $value | humanizeDuration }} (SLO: 5ms for query1, 10ms for query2-4)",
        ),
        Alert(
            "ReplicationLagHigh",
            "max by (instance, application_name) (pg_stat_replication_pg_wal_lsn_diff) > 10485760",
            "2m", "warning", "dbre",
            "Replica {{ $labels.application_name }} is more than 10MB behind {{ $labels.instance }}",
            "Lag: {{ $value | humanize1024 }}B (SLO: under 1MB)",
        ),
        Alert(
            "BackupFailed",
            # The newest success on any node: after a failover the old primary's textfile keeps its stale value.
            "time() - max(backup_last_success_timestamp) > 90000",
            "1h", "critical", "dbre",
            "PostgreSQL backup has not succeeded in 25+ hours",
            "Last successful backup: {{ $value | humanizeDuration }} ago",
        ),
        Alert(
            "ConnectionPoolNearLimit", _connection_pool_expr(), "5m", "warning", "dbre",
            "Connections > 80% of {{ $labels.limit }} on {{ $labels.instance }}",
            "{{ $value | humanizePercentage }} of {{ $labels.limit }} in use"
            "{{ if $labels.database }} by the pool {{ $labels.database }}/{{ $labels.user }}{{ end }}",
        ),
        Alert(
            "DiskSpaceLow",
            'node_filesystem_avail_bytes{mountpoint="/var/lib/postgresql"}'
            ' / node_filesystem_size_bytes{mountpoint="/var/lib/postgresql"} < 0.15',
            "10m", "warning", "dbre",
            "Disk space < 15% on {{ $labels.instance }}",
            "Only {{ $value | humanizePercentage }} remaining on /var/lib/postgresql",
        ),
    ),
    "cache": (
        Alert(
            "CacheHitRateLow", "sli:cache_hit:ratio_rate5m < 0.8", "10m", "warning", "dbre",
            "Cache hit rate < 80% for {{ $labels.cache_name }}",
            "Hit rate: {{ $value | humanizePercentage }} (SLO: > 80%)",
        ),
        Alert(
            "RedisDown", "redis_up == 0", "1m", "critical", "dbre",
            "Redis {{ $labels.instance }} is DOWN",
            "Cache unavailable (seen by the exporter on {{ $labels.exporter }}), traffic failing over to PostgreSQL",
        ),
        Alert(
            "RedisMemoryHigh",
            # ElastiCache always sets maxmemory; a 0 (no limit) would divide to +Inf and fire.
            "redis_memory_used_bytes / (redis_memory_max_bytes > 0) > 0.9",
            "5m", "warning", "dbre",
            "Redis memory usage > 90%",
            "Memory: {{ $value | humanizePercentage }} of maxmemory (evictions may occur)",
        ),
    ),
    "application": (
        Alert(
            "ErrorRateHigh", "sli:http_errors:ratio_rate5m > 0.01", "2m", "critical", "backend",
            "Error rate > 1% on {{ $labels.endpoint }}",
            "Error rate: {{ $value | humanizePercentage }}",
        ),
        Alert(
            "AvailabilitySLOBreach",
            'sum(rate(http_requests_total{status!~"5.."}[1h])) / sum(rate(http_requests_total[1h])) < 0.999',
            "5m", "critical", "backend",
            "API availability < 99.9% (SLO breach)",
            "Availability over the last hour: {{ $value | humanizePercentage }}",
        ),
    ),
}

# The backup pipeline (pgBackRest's WAL archiving, the nightly backup and its verification,
# scripts/backup.py's textfile metrics). BackupFailed's document rule above cannot see a cluster
# that never had a backup: max() of no series is no series, so this group adds an absent() guard
# under the same name.
BACKUP_ALERTS: tuple[Alert, ...] = (
    Alert(
        "BackupFailed",
        "absent(backup_last_success_timestamp)",
        # A new cluster's first nightly backup comes within 24 h and may run for 2: the same 26 h a
        # stale backup gets from the document's rule (25 h + its `for` of 1 h).
        "26h", "critical", "dbre",
        "No PostgreSQL backup has succeeded on any node",
        "No node exports backup_last_success_timestamp, and none has for 26 hours: no backup has succeeded "
        "since the cluster (or its nodes' textfiles) began.",
    ),
    Alert(
        "WalArchivingFailing",
        # Failing: archive_command fails and nothing was archived in 10 minutes (a blip that recovers
        # archives too). Stalled: on the primary, rows change but no segment has been archived for
        # 5 minutes, although archive_timeout (60 s) closes one every minute while WAL is written.
        # A replica does not archive, and an idle primary writes no WAL to archive.
        "(sum by (instance) (increase(pg_stat_archiver_failed_count[10m])) > 0\n"
        "  unless on (instance) sum by (instance) (increase(pg_stat_archiver_archived_count[10m])) > 0)\n"
        "or\n"
        "(max by (instance) (pg_stat_archiver_last_archive_age) > 300\n"
        "  and on (instance) max by (instance) (pg_replication_is_replica) == 0\n"
        "  and on (instance) sum by (instance) (rate(pg_stat_database_tup_inserted[5m])"
        " + rate(pg_stat_database_tup_updated[5m]) + rate(pg_stat_database_tup_deleted[5m])) > 0)",
        "5m", "critical", "dbre",
        "WAL archiving is failing on {{ $labels.instance }}",
        "pg_stat_archiver on {{ $labels.instance }}: archive_command (pgbackrest archive-push) fails with nothing archived "
        "in 10 minutes, or the primary writes but has archived no segment for 5 minutes. WAL piles up in pg_wal and "
        "point-in-time recovery ends at the last archived segment.",
    ),
    Alert(
        "BackupNotVerified",
        # The newest backup, once 12 h old, must have a verification at or after it (the verify run
        # follows every backup; a restore of prod's 500 GiB takes well under 12 h).
        "(time() - max(backup_last_success_timestamp) > 43200)"
        " unless on () (max(backup_last_verified_timestamp) >= max(backup_last_success_timestamp))",
        "30m", "critical", "dbre",
        "The newest PostgreSQL backup has not been verified",
        "The newest backup finished {{ $value | humanizeDuration }} ago and no verification (scripts/backup.py verify) "
        "has succeeded since: a restore from it is unproven.",
    ),
)

# The cluster at pgmonitor's level (issue 10): what breaks a Patroni cluster slowly or silently.
# Wraparound and slots read our custom queries (infra/render/exporters.py), the rest Patroni's and
# etcd's own /metrics. "Only on the primary": a replica's pg_database mirrors the primary's, and a
# newer Patroni keeps inactive copies of permanent slots on replicas by design.
_ON_PRIMARY = "and on (instance) max by (instance) (pg_replication_is_replica) == 0"
# PostgreSQL refuses new transaction IDs shortly before 2^31 of them separate the oldest unfrozen one.
XID_WRAPAROUND_LIMIT = 2**31

CLUSTER_ALERTS: tuple[Alert, ...] = (
    Alert(
        "TransactionIdWraparoundApproaching",
        # Anti-wraparound autovacuum starts at autovacuum_freeze_max_age: a quarter beyond it, for
        # half an hour, it is not keeping up (a long transaction, a stale slot or prepared
        # transaction holds the horizon, or the cost limit is too low).
        "max by (instance, datname) (pg_database_datfrozenxid_age)\n"
        "  / on (instance) group_left max by (instance) (pg_settings_autovacuum_freeze_max_age) > 1.25\n"
        + _ON_PRIMARY,
        "30m", "warning", "dbre",
        "Autovacuum is not freezing {{ $labels.datname }} on {{ $labels.instance }}",
        "The oldest unfrozen transaction ID of {{ $labels.datname }} is {{ $value | humanizePercentage }} of "
        "autovacuum_freeze_max_age old: anti-wraparound vacuum is not keeping up.",
    ),
    Alert(
        "TransactionIdWraparoundApproaching",
        # Half-way to the hard stop: about a day left at 10,000 transaction IDs a second.
        f"max by (instance, datname) (pg_database_datfrozenxid_age) / {XID_WRAPAROUND_LIMIT} > 0.5\n" + _ON_PRIMARY,
        "5m", "critical", "dbre",
        "Transaction ID wraparound approaching in {{ $labels.datname }} on {{ $labels.instance }}",
        "{{ $labels.datname }} has used {{ $value | humanizePercentage }} of the 2^31 transaction IDs before "
        "wraparound: at 100 % PostgreSQL stops accepting writes until the database is vacuumed.",
    ),
    Alert(
        "ReplicationSlotInactive",
        # Patroni drops a member's slot once its member key expires, so an inactive slot means a member
        # that is registered but not streaming: rebuilding, crash-looping, or replaying from the archive.
        "max by (instance, slot_name) (pg_replication_slot_active) == 0\n" + _ON_PRIMARY,
        "15m", "warning", "dbre",
        "Replication slot {{ $labels.slot_name }} on {{ $labels.instance }} is inactive",
        "No standby has streamed through slot {{ $labels.slot_name }} for 15 minutes: that member is not a "
        "failover target, and the primary keeps its WAL (up to max_slot_wal_keep_size).",
    ),
    Alert(
        "ReplicationSlotRetainingWal",
        # At max_slot_wal_keep_size PostgreSQL invalidates the slot: its standby can no longer stream
        # and must fetch WAL from the archive, or be rebuilt. Any node: slots on replicas retain WAL too.
        "max by (instance, slot_name) (pg_replication_slot_retained_wal_bytes)\n"
        "  / on (instance) group_left max by (instance) (pg_settings_max_slot_wal_keep_size_bytes > 0) > 0.5",
        "5m", "warning", "dbre",
        "Replication slot {{ $labels.slot_name }} on {{ $labels.instance }} retains too much WAL",
        "Slot {{ $labels.slot_name }} retains {{ $value | humanizePercentage }} of max_slot_wal_keep_size in pg_wal: "
        "at 100 % PostgreSQL invalidates it and its standby stops streaming.",
    ),
    Alert(
        "PatroniPendingRestart",
        # A roll restarts members one at a time within minutes: half an hour means it stopped half-way.
        "max by (instance, scope) (patroni_pending_restart) > 0",
        "30m", "warning", "dbre",
        "PostgreSQL on {{ $labels.instance }} runs with settings pending a restart",
        "Patroni reports settings on {{ $labels.instance }} that take effect only after a restart: the running "
        "values differ from the configuration (and maybe from the other members).",
    ),
    Alert(
        "PatroniPaused",
        # Maintenance mode is deliberate; a failure while paused pages by itself (PostgreSQLDown,
        # PatroniNoLeader): this is the reminder that nothing fails over.
        "max by (scope) (patroni_is_paused) > 0",
        "30m", "warning", "dbre",
        "Patroni cluster {{ $labels.scope }} is paused",
        "Patroni's maintenance mode has been on for 30 minutes: no automatic failover happens until "
        "`patronictl resume`.",
    ),
    Alert(
        "EtcdDatabaseNearQuota",
        "max by (instance) (etcd_mvcc_db_total_size_in_bytes)\n"
        "  / on (instance) max by (instance) (etcd_server_quota_backend_bytes > 0) > 0.8",
        "10m", "warning", "dbre",
        "etcd on {{ $labels.instance }} is near its database quota",
        "The etcd database file is {{ $value | humanizePercentage }} of --quota-backend-bytes: at 100 % etcd raises "
        "NOSPACE and refuses writes, and Patroni cannot renew its leader key.",
    ),
    Alert(
        "EtcdDatabaseNearQuota",
        "max by (instance) (etcd_mvcc_db_total_size_in_bytes)\n"
        "  / on (instance) max by (instance) (etcd_server_quota_backend_bytes > 0) > 0.95",
        "2m", "critical", "dbre",
        "etcd on {{ $labels.instance }} is about to reach its database quota",
        "The etcd database file is {{ $value | humanizePercentage }} of --quota-backend-bytes: compact and defragment "
        "now, before etcd refuses writes.",
    ),
)


def synchronous_replication_alerts(settings: StackSettings) -> tuple[Alert, ...]:
    """Only for stacks in synchronous mode: Patroni 3.0.2 exports patroni_sync_standby 0 on every member
    when synchronous_mode is off, and no metric of the mode itself, so the rule cannot tell by itself."""
    if not settings.patroni.synchronous_mode:
        return ()
    return (
        Alert(
            "PatroniNoSynchronousStandby",
            # With a leader: without one PatroniNoLeader pages. Two minutes cover the sync standby's own
            # restart in a roll, after which Patroni picks it or another streaming replica again.
            "max by (scope) (patroni_sync_standby) < 1\n  and on (scope) max by (scope) (patroni_primary) == 1",
            "2m", "critical", "dbre",
            "Patroni cluster {{ $labels.scope }} has no synchronous standby",
            "synchronous_mode is on but no member is the synchronous standby: the primary acknowledges writes no "
            "standby has, which a failover now loses (with synchronous_mode_strict, writes wait instead).",
        ),
    )


# The client path (HAProxy and PgBouncer on every PostgreSQL node, issue 10).
CLIENT_PATH_ALERTS: tuple[Alert, ...] = (
    Alert(
        "PgBouncerDown",
        # The exporter answers (its target stays up) and says whether PgBouncer did. HAProxy checks
        # Patroni's /primary, not PgBouncer: with the leader's PgBouncer down, writes fail on every node.
        "pgbouncer_up == 0",
        "1m", "critical", "dbre",
        "PgBouncer on {{ $labels.instance }} is DOWN",
        "PgBouncer's admin console on {{ $labels.instance }} does not answer its exporter: clients that HAProxy sends "
        "to this node cannot connect.",
    ),
    Alert(
        "PgBouncerClientsWaiting",
        # A client waits only when every server connection of its pool is busy: the oldest has waited over
        # a second at every evaluation for 2 minutes, so transactions queue behind an exhausted pool.
        "max by (instance, database, user) (pgbouncer_pools_client_maxwait_seconds) > 1",
        "2m", "critical", "dbre",
        "PgBouncer pool {{ $labels.database }}/{{ $labels.user }} on {{ $labels.instance }} is exhausted",
        "Clients of {{ $labels.database }}/{{ $labels.user }} wait for a server connection, the oldest "
        "{{ $value | humanizeDuration }}: every connection of the pool is busy.",
    ),
    Alert(
        "HAProxyNoPrimary",
        # Only while Patroni has a leader: without one PatroniNoLeader pages, and every HAProxy is
        # right to have no primary. Then the writer port is broken between HAProxy and the leader.
        'max by (instance) (haproxy_backend_active_servers{proxy="primary"}) == 0\n'
        "  unless on () (max(patroni_primary) < 1)",
        "1m", "critical", "dbre",
        "HAProxy on {{ $labels.instance }} has no primary",
        "HAProxy's writer backend on {{ $labels.instance }} has no server up, although Patroni has a leader: "
        "writes through this node's writer port fail.",
    ),
)

# Time on every host: node_exporter's timex figures come from the kernel, which chrony updates.
HOST_ALERTS: tuple[Alert, ...] = (
    Alert(
        "ClockSkew",
        # The host's clock against the Prometheus server's at the scrape (both chrony-synced to the Amazon
        # Time Sync Service). Not node_timex_offset_seconds: chrony never uses the kernel's PLL offset,
        # so it stays 0 however far the clock is off.
        "abs(node_time_seconds - timestamp(node_time_seconds)) > 0.05",
        "10m", "warning", "platform",
        "The clock of {{ $labels.instance }} is off",
        "The clock of {{ $labels.instance }} differs from the Prometheus server's by {{ $value | humanizeDuration }} "
        "(every host's do: then Prometheus' own clock is off).",
    ),
    Alert(
        "ClockNotSynchronised",
        # The kernel caps its maximum-error estimate at 16 s once no time daemon has disciplined the clock;
        # sync_status alone is not enough: chrony clears the kernel's unsync flag only with `rtcsync`.
        "min_over_time(node_timex_sync_status[5m]) == 0 and node_timex_maxerror_seconds >= 16",
        "10m", "warning", "platform",
        "The clock of {{ $labels.instance }} is not synchronised",
        "No time daemon has synchronised the clock of {{ $labels.instance }} (chrony down or the time source "
        "unreachable): it drifts freely.",
    ),
)

PLATFORM_ALERTS: tuple[Alert, ...] = (
    Alert(
        "Watchdog", "vector(1)", "0s", "none", "platform",
        "Alerting pipeline heartbeat (always firing)",
        "Always firing: the dead-man receiver raises an incident when these heartbeats stop.",
    ),
    Alert(
        "PatroniNoLeader", "max by (scope) (patroni_primary) < 1", "1m", "critical", "dbre",
        "Patroni cluster {{ $labels.scope }} has no leader",
        "No Patroni member of {{ $labels.scope }} reports itself primary: writes are failing.",
    ),
    Alert(
        "PatroniTimelineSwitch",
        # The cluster's highest timeline is above the lowest any member reported in the last 15 minutes: a
        # failover or switchover happened. A window, not `offset 15m`, so it fires on a Prometheus younger
        # than 15 minutes too; a restarting member reports 0, which is not a timeline.
        "max by (scope) (patroni_postgres_timeline)\n"
        "  > min by (scope) (min_over_time((patroni_postgres_timeline > 0)[15m:]))",
        "0s", "warning", "dbre",
        "Patroni cluster {{ $labels.scope }} switched timeline",
        "The cluster is on timeline {{ $value }}: a failover or switchover happened in the last 15 minutes.",
    ),
    Alert(
        "EtcdNoLeader", "etcd_server_has_leader == 0", "1m", "critical", "dbre",
        "etcd member {{ $labels.instance }} has no leader",
        "etcd on {{ $labels.instance }} sees no leader: Patroni cannot renew its leader key.",
    ),
    Alert(
        "EtcdInsufficientMembers",
        'sum by (job) (up{job="etcd"}) < floor(count by (job) (up{job="etcd"}) / 2) + 1',
        "3m", "critical", "dbre",
        "etcd has lost quorum",
        "Only {{ $value }} etcd members are up, fewer than a quorum.",
    ),
    Alert(
        "ClickHouseDown", 'up{job="clickhouse"} == 0', "2m", "warning", "data",
        "ClickHouse {{ $labels.instance }} is DOWN",
        "Prometheus cannot scrape ClickHouse on {{ $labels.instance }}: analytics are unavailable.",
    ),
    Alert(
        "TargetDown", "up == 0", "5m", "warning", "platform",
        "{{ $labels.job }} target {{ $labels.instance }} is down",
        "Prometheus has not scraped {{ $labels.job }} on {{ $labels.instance }} for 5 minutes.",
    ),
    Alert(
        "PrometheusRuleEvaluationFailures",
        "sum by (instance) (increase(prometheus_rule_evaluation_failures_total[5m])) > 0",
        "5m", "critical", "platform",
        "Prometheus {{ $labels.instance }} fails to evaluate rules",
        "{{ $value }} rule evaluations failed in 5 minutes: alerts may be missing.",
    ),
    Alert(
        "PrometheusNotificationsFailing",
        "sum by (instance) (rate(prometheus_notifications_errors_total[5m])) "
        "/ sum by (instance) (rate(prometheus_notifications_sent_total[5m])) > 0.01",
        "5m", "critical", "platform",
        "Prometheus {{ $labels.instance }} fails to send alerts to Alertmanager",
        "{{ $value | humanizePercentage }} of alert notifications to Alertmanager fail.",
    ),
    Alert(
        "PrometheusNotConnectedToAlertmanagers",
        "max_over_time(prometheus_notifications_alertmanagers_discovered[5m]) < 1",
        "10m", "critical", "platform",
        "Prometheus {{ $labels.instance }} has no Alertmanager",
        "Prometheus discovers no Alertmanager: no alert leaves it.",
    ),
    Alert(
        "AlertmanagerNotificationsFailing",
        "sum by (instance, integration) (rate(alertmanager_notifications_failed_total[5m])) "
        "/ sum by (instance, integration) (rate(alertmanager_notifications_total[5m])) > 0.01",
        "5m", "critical", "platform",
        "Alertmanager {{ $labels.instance }} fails to deliver to {{ $labels.integration }}",
        "{{ $value | humanizePercentage }} of {{ $labels.integration }} notifications fail.",
    ),
    Alert(
        "PrometheusTSDBNearRetentionSize",
        # Size retention deletes whole blocks before the 30 days are up; 80 % leaves room for the WAL,
        # which counts against the limit but has no size metric in 2.42.
        "prometheus_tsdb_storage_blocks_bytes / (prometheus_tsdb_retention_limit_bytes > 0) > 0.8",
        "30m", "warning", "platform",
        "Prometheus {{ $labels.instance }} TSDB is close to its size retention",
        "Blocks use {{ $value | humanizePercentage }} of --storage.tsdb.retention.size: "
        "older data will be deleted before the time retention.",
    ),
)


def retention_alerts(settings: StackSettings) -> tuple[Alert, ...]:
    """The 30-day promise watched: the size cap deleted blocks (prometheus_tsdb_size_retentions_total rose) while the
    oldest sample left is younger than the time retention, so the size cap, not the time, now decides what is kept.
    Prometheus 2.42 exports no metric of its time retention: the stack's value is rendered into the rule."""
    retention = settings.monitoring.prometheus.retention_time
    seconds = _number(duration_seconds(retention))
    return (Alert(
        "PrometheusRetentionBelowPromise",
        f"(time() - prometheus_tsdb_lowest_timestamp_seconds) < {seconds}\n"
        "  and increase(prometheus_tsdb_size_retentions_total[1d]) > 0",
        "15m", "warning", "platform",
        f"Prometheus {{{{ $labels.instance }}}} keeps less than {retention} of metrics",
        f"The size retention deleted blocks and the oldest sample is {{{{ $value | humanizeDuration }}}} old, under the "
        f"time retention of {retention}: grow the TSDB volume or cut series before the promise is missed for longer.",
    ),)


def _number(value: float) -> str:
    return f"{round(value, 12):g}"


def burn_rate_alerts(slo: SLO) -> tuple[Alert, ...]:
    alerts = []
    for severity in ("critical", "warning"):
        pairs = [a for a in BURN_RATE_ALERTS if a.severity == severity]
        clauses = [
            f'(slo:error_ratio:rate{a.long_window}{{slo="{slo.id}"}} > {_number(a.factor * slo.budget)}'
            f' and slo:error_ratio:rate{a.short_window}{{slo="{slo.id}"}} > {_number(a.factor * slo.budget)})'
            for a in pairs
        ]
        windows = " and ".join(f"{a.factor:g}x over {a.long_window}/{a.short_window}" for a in pairs)
        alerts.append(
            Alert(
                slo.alert_name,
                "\n  or\n".join(clauses),
                "2m" if severity == "critical" else "15m",
                severity,
                slo.team,
                f"{slo.title}: error budget burning {'fast' if severity == 'critical' else 'steadily'}",
                f"Error ratio {{{{ $value | humanizePercentage }}}} over the long window ({windows}); "
                f"budget {_number(slo.budget * 100)}% over {slo.window}.",
                {"slo": slo.id},
            )
        )
    return tuple(alerts)


def _sli_rules() -> list[dict]:
    return [{"record": sli.record, "expr": sli.expr} for sli in SLIS]


def _slo_windows(slo: SLO) -> tuple[str, ...]:
    windows = BURN_RATE_WINDOWS if slo.burn_rate_alerts else ("1h",)
    return tuple(dict.fromkeys((*windows, slo.window)))


def _slo_rules() -> list[dict]:
    rules: list[dict] = []
    for slo in SLOS:
        labels = {"slo": slo.id, "tier": str(slo.tier)}
        for window in _slo_windows(slo):
            rules.append({"record": f"slo:error_ratio:rate{window}", "expr": slo.error_ratio(window), "labels": labels})
        rules.append({
            "record": "slo:error_budget_remaining:ratio",
            "expr": f'1 - slo:error_ratio:rate{slo.window}{{slo="{slo.id}"}} / {_number(slo.budget)}',
            "labels": labels,
        })
        rules.append({
            "record": "slo:burn_rate:rate1h",
            "expr": f'slo:error_ratio:rate1h{{slo="{slo.id}"}} / {_number(slo.budget)}',
            "labels": labels,
        })
    return rules


def rule_groups(settings: StackSettings) -> dict[str, dict]:
    """Rule groups by name; each is rendered into prometheus/rules/<name>.yml."""
    groups = {
        "sli": {"rules": _sli_rules()},
        "slo": {"interval": BUDGET_EVALUATION_INTERVAL, "rules": _slo_rules()},
        "slo-burn-rate": {"rules": [a.rule() for slo in SLOS if slo.burn_rate_alerts for a in burn_rate_alerts(slo)]},
    }
    for name, alerts in DOCUMENT_ALERTS.items():
        group: dict = {"rules": [a.rule() for a in alerts]}
        if name == "database-liveness":
            group = {"interval": FAST_EVALUATION_INTERVAL, **group}
        groups[name] = group
    groups["backups"] = {"rules": [a.rule() for a in BACKUP_ALERTS]}
    groups["cluster"] = {"rules": [a.rule() for a in CLUSTER_ALERTS]}
    # Its own file, rendered only in synchronous mode: its unit tests run where it exists.
    if synchronous := synchronous_replication_alerts(settings):
        groups["synchronous-replication"] = {"rules": [a.rule() for a in synchronous]}
    groups["client-path"] = {"rules": [a.rule() for a in CLIENT_PATH_ALERTS]}
    groups["hosts"] = {"rules": [a.rule() for a in HOST_ALERTS]}
    groups["platform"] = {"rules": [a.rule() for a in PLATFORM_ALERTS + retention_alerts(settings)]}
    return groups


def all_alerts(settings: StackSettings) -> tuple[Alert, ...]:
    burn = tuple(a for slo in SLOS if slo.burn_rate_alerts for a in burn_rate_alerts(slo))
    return (tuple(a for alerts in DOCUMENT_ALERTS.values() for a in alerts) + BACKUP_ALERTS + CLUSTER_ALERTS
            + synchronous_replication_alerts(settings) + CLIENT_PATH_ALERTS + HOST_ALERTS + burn + PLATFORM_ALERTS
            + retention_alerts(settings))


def _dump(document: dict) -> bytes:
    return yaml.safe_dump(document, sort_keys=False, width=140, allow_unicode=True).encode()


def cluster_name(settings: StackSettings) -> str:
    return f"betting-{settings.environment}"


def _short_name(address: str, dns_zone: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host.removesuffix("." + dns_zone)


def _static(hosts: tuple[Host, ...], port: int, **labels: str) -> list[dict]:
    return [{"targets": [f"{h.fqdn}:{port}"], "labels": {"instance": h.name, **labels}} for h in hosts]


# Patroni's REST API and etcd serve TLS with the stack's CA; etcd takes only clients with a certificate of it
# (this monitoring host's own pair).
PATRONI_TLS = {"scheme": "https", "tls_config": {"ca_file": pki.ca_path()}}
ETCD_TLS = {"scheme": "https",
            "tls_config": {"ca_file": pki.ca_path(), "cert_file": pki.cert_path(), "key_file": pki.key_path()}}


def scrape_configs(topology: Topology) -> list[dict]:
    fast = {"scrape_interval": FAST_SCRAPE_INTERVAL}
    jobs: list[dict] = [
        # The monitoring endpoints: https with the monitoring credential (Grafana's /metrics takes none).
        {"job_name": "prometheus", **client_http_config(), "static_configs": _static(topology.monitoring, Ports.PROMETHEUS)},
        {"job_name": "alertmanager", **client_http_config(),
         "static_configs": _static(topology.monitoring, Ports.ALERTMANAGER)},
        {"job_name": "grafana", "scheme": "https", "tls_config": {"ca_file": pki.ca_path()},
         "static_configs": _static(topology.grafana, Ports.GRAFANA)},
        # node_exporter, postgres_exporter and redis_exporter serve TLS with their host's identity (no login).
        {"job_name": "node", **exporter_client_config(), "static_configs": _static(topology.hosts, Ports.NODE_EXPORTER)},
        {"job_name": "postgres", **fast, **exporter_client_config(),
         "static_configs": _static(topology.postgres, Ports.POSTGRES_EXPORTER)},
        {"job_name": "patroni", **fast, **PATRONI_TLS, "static_configs": _static(topology.postgres, Ports.PATRONI_API)},
        # The client path on every PostgreSQL node: PgBouncer's exporter, HAProxy's built-in /metrics, plain http (the
        # stats port also answers the load balancer's health checks, which are plain HTTP; see README, Security).
        {"job_name": "pgbouncer", "static_configs": _static(topology.postgres, Ports.PGBOUNCER_EXPORTER)},
        {"job_name": "haproxy", "static_configs": _static(topology.postgres, Ports.HAPROXY_STATS)},
        {"job_name": "etcd", **ETCD_TLS, "static_configs": _static(topology.etcd, Ports.ETCD_CLIENT)},
        {"job_name": "clickhouse", "static_configs": _static(topology.clickhouse, Ports.CLICKHOUSE_METRICS)},
        {
            # Every monitoring host runs a redis_exporter against the same ElastiCache endpoint: the
            # series are told apart by `exporter`, and `instance` names the Redis they describe.
            "job_name": "redis",
            **exporter_client_config(),
            "static_configs": [
                {
                    "targets": [f"{h.fqdn}:{Ports.REDIS_EXPORTER}"],
                    "labels": {"instance": _short_name(topology.redis_endpoint, topology.dns_zone), "exporter": h.name},
                }
                for h in topology.monitoring
            ],
        },
    ]
    if topology.application_targets:
        jobs.append({
            "job_name": "app",
            "static_configs": [
                {"targets": [target], "labels": {"instance": _short_name(target, topology.dns_zone)}}
                for target in topology.application_targets
            ],
        })
    return jobs


def prometheus_config(settings: StackSettings, topology: Topology) -> dict:
    prom = settings.monitoring.prometheus
    return {
        "global": {
            "scrape_interval": prom.scrape_interval,
            "evaluation_interval": prom.evaluation_interval,
            # No replica label: the HA pair sends identical alerts and Alertmanager deduplicates them.
            "external_labels": {"cluster": cluster_name(settings), "environment": settings.environment,
                                **managed_prometheus.replica_label(settings)},
        },
        "rule_files": [f"{Paths.PROMETHEUS_RULES_DIR}/*.yml"],
        "alerting": {
            **({"alert_relabel_configs": relabel} if (relabel := managed_prometheus.alert_relabel_configs(settings)) else {}),
            "alertmanagers": [
                {**client_http_config(),
                 "static_configs": [{"targets": [f"{h.fqdn}:{Ports.ALERTMANAGER}" for h in topology.monitoring]}]}
            ]
        },
        "scrape_configs": scrape_configs(topology),
        # Last, so the sandbox can cut the whole section (infra/sandbox/mapping.py).
        **({"remote_write": remote} if (remote := managed_prometheus.remote_write(settings)) else {}),
    }


def render_prometheus(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    files = {"prometheus/prometheus.yml": _dump(prometheus_config(settings, topology))}
    for name, group in rule_groups(settings).items():
        files[f"prometheus/rules/{name}.yml"] = _dump({"groups": [{"name": name, **group}]})
    return files


def prometheus_args(settings: StackSettings) -> tuple[str, ...]:
    """Prometheus' flags: the only place retention is set (prometheus.yml cannot hold it in 2.42)."""
    prom = settings.monitoring.prometheus
    return (
        f"--config.file={Paths.PROMETHEUS_CONFIG}",
        f"--storage.tsdb.path={Paths.PROMETHEUS_DATA}/metrics2",
        f"--storage.tsdb.retention.time={prom.retention_time}",
        f"--storage.tsdb.retention.size={prom.retention_size}",
        f"--web.listen-address=0.0.0.0:{Ports.PROMETHEUS}",
        *server_flags(),
        *managed_prometheus.prometheus_flags(settings),
    )
