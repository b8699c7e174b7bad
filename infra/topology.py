"""Where every service lives, by stable name: pure data derived from the settings.

Renderers address peers only through these names (a private Route 53 zone on AWS), never
through Pulumi Outputs, so every config file is known before anything is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from infra.settings import StackSettings

Role = Literal["etcd", "postgres", "clickhouse", "monitoring", "grafana"]


class Ports:
    POSTGRES = 5432
    PATRONI_API = 8008
    POSTGRES_EXPORTER = 9187
    NODE_EXPORTER = 9100
    PGBACKREST_TLS = 8432  # pgBackRest's TLS server: a backup from a standby reaches the other members through it
    ETCD_CLIENT = 2379
    ETCD_PEER = 2380
    REDIS = 6379
    REDIS_EXPORTER = 9121
    CLICKHOUSE_HTTP = 8123
    CLICKHOUSE_NATIVE = 9000
    CLICKHOUSE_METRICS = 9363
    PROMETHEUS = 9090
    ALERTMANAGER = 9093
    ALERTMANAGER_CLUSTER = 9094
    GRAFANA = 3000
    # The client path on every PostgreSQL node (autobase's layout): HAProxy's writer and reader ports
    # in front of PgBouncer, which pools in front of PostgreSQL; HAProxy's stats page serves /metrics.
    HAPROXY_PRIMARY = 5000
    HAPROXY_REPLICAS = 5001
    HAPROXY_STATS = 7000
    PGBOUNCER = 6432
    PGBOUNCER_EXPORTER = 9127


@dataclass(frozen=True)
class Host:
    name: str  # "pg-1": also the Pulumi resource name stem and the Patroni member name
    role: Role
    index: int  # 1-based within its role
    availability_zone: str
    fqdn: str  # "pg-1.prod.betting.internal"


@dataclass(frozen=True)
class Topology:
    environment: str
    dns_zone: str
    etcd: tuple[Host, ...]
    postgres: tuple[Host, ...]
    clickhouse: tuple[Host, ...]
    monitoring: tuple[Host, ...]  # each runs Prometheus, Alertmanager (clustered) and redis_exporter
    grafana: tuple[Host, ...]
    # Aliases in the private zone, pointing at things that are not one of our hosts.
    redis_endpoint: str  # CNAME to the ElastiCache primary endpoint
    postgres_primary_endpoint: str  # internal NLB, healthy target = Patroni /primary
    postgres_replica_endpoint: str  # internal NLB, healthy targets = Patroni /replica
    backup_bucket: str  # laid out as BackupLayout says
    backup_key_alias: str  # the backups' KMS key, by alias: rendered files cannot know its ARN
    audit_bucket: str
    bundle_bucket: str  # every host's bundles (infra/bundle.py)
    data_access_log_bucket: str  # CloudTrail's record of every object read and write in the two buckets above
    patroni_scope: str  # Patroni cluster name (the DCS namespace key)
    application_targets: tuple[str, ...]

    @property
    def hosts(self) -> tuple[Host, ...]:
        return self.etcd + self.postgres + self.clickhouse + self.monitoring + self.grafana


def _hosts(settings: StackSettings, role: Role, stem: str, count: int) -> tuple[Host, ...]:
    zones = settings.availability_zones
    return tuple(
        Host(
            name=f"{stem}-{i}",
            role=role,
            index=i,
            availability_zone=zones[(i - 1) % len(zones)],
            fqdn=f"{stem}-{i}.{settings.dns_zone}",
        )
        for i in range(1, count + 1)
    )


def build_topology(settings: StackSettings) -> Topology:
    zone = settings.dns_zone
    return Topology(
        environment=settings.environment,
        dns_zone=zone,
        etcd=_hosts(settings, "etcd", "etcd", settings.etcd.members),
        postgres=_hosts(settings, "postgres", "pg", settings.patroni.nodes),
        clickhouse=_hosts(settings, "clickhouse", "clickhouse", 1),
        monitoring=_hosts(settings, "monitoring", "monitoring", settings.monitoring.prometheus.replicas),
        grafana=_hosts(settings, "grafana", "grafana", 1),
        redis_endpoint=f"redis.{zone}",
        postgres_primary_endpoint=f"pg-primary.{zone}",
        postgres_replica_endpoint=f"pg-replicas.{zone}",
        # Bucket names are global: environment and region keep them apart and predictable.
        backup_bucket=f"betting-{settings.environment}-pg-backups-{settings.region}",
        backup_key_alias=f"alias/betting-{settings.environment}-backups",
        audit_bucket=f"betting-{settings.environment}-audit-logs-{settings.region}",
        bundle_bucket=f"betting-{settings.environment}-host-bundles-{settings.region}",
        data_access_log_bucket=f"betting-{settings.environment}-data-access-logs-{settings.region}",
        patroni_scope=f"betting-{settings.environment}",
        application_targets=settings.application.metrics_targets,
    )


class BackupLayout:
    """Where things live in the backup bucket: the one source for pgBackRest's repo1-path, the PostgreSQL
    hosts' IAM grants, the bucket's lifecycle rules and what the runbooks and README say."""

    REPOSITORY = "pgbackrest/"  # pgBackRest's repository (repo1-path=/pgbackrest): WAL archive and base backups
    VERIFICATION = "verification/"  # one JSON record per verified backup (scripts/backup.py), kept 90 days
    ARCHIVE = "archive/"  # long-term copies, moved to Glacier; never the repository (a restore cannot wait for a thaw)

    @classmethod
    def repository_path(cls) -> str:
        """pgBackRest's repo1-path for the repository prefix (pgBackRest adds archive/ and backup/ under it)."""
        return "/" + cls.REPOSITORY.rstrip("/")


class Paths:
    """Where files live on a host. Rendered configs reference these; the sandbox maps them."""

    SECRETS_DIR = "/etc/betting/secrets"  # written at boot from SSM SecureString, mode 0400
    PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
    PROMETHEUS_RULES_DIR = "/etc/prometheus/rules"
    PROMETHEUS_DATA = "/var/lib/prometheus"  # the dedicated TSDB volume is mounted here
    ALERTMANAGER_CONFIG = "/etc/prometheus/alertmanager.yml"
    ALERTMANAGER_DATA = "/var/lib/prometheus/alertmanager"
    NODE_EXPORTER_TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # backup_last_success_timestamp lands here
    EXPORTER_WEB_CONFIG = "/etc/prometheus/exporter-web.yml"  # node_exporter's and postgres_exporter's TLS
    GRAFANA_CONFIG = "/etc/grafana/grafana.ini"
    GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
    GRAFANA_DASHBOARDS = "/var/lib/grafana/dashboards"
    PATRONI_CONFIG = "/etc/patroni/config.yml"
    POSTGRES_DATA = "/var/lib/postgresql/15/main"  # the data volume is mounted at /var/lib/postgresql
    POSTGRES_BIN = "/usr/lib/postgresql/15/bin"
    POSTGRES_SOCKET_DIR = "/var/run/postgresql"  # PostgreSQL's and PgBouncer's Unix sockets (Debian's folder)
    POSTGRES_EXPORTER_QUERIES = "/etc/prometheus/postgres_exporter_queries.yaml"
    PGBACKREST_CONFIG = "/etc/pgbackrest/pgbackrest.conf"
    PGBACKREST_SPOOL = "/var/spool/pgbackrest"  # archive-async: status files and prefetched WAL (archive-get)
    PGBACKREST_LOCKS = "/tmp/pgbackrest"
    BACKUP_ENV = "/etc/betting/pg-backup.env"  # per-host values of the backup job and the post_bootstrap script
    BACKUP_LIB = "/usr/local/lib/betting-pg-backup"  # scripts/backup.py, run by /usr/bin/python3
    POST_BOOTSTRAP = "/usr/local/sbin/betting-pg-post-bootstrap"
    BACKUP_SCRATCH = "/var/lib/postgresql/backup-verify"  # on the data volume: a verification restores the whole cluster
    # The client path: PgBouncer (Debian's unit reads /etc/pgbouncer/pgbouncer.ini), its auth function's SQL
    # (run by post_bootstrap and the agent), the exporter of its SHOW commands, HAProxy (Debian's unit).
    PGBOUNCER_CONFIG = "/etc/pgbouncer/pgbouncer.ini"
    PGBOUNCER_HBA = "/etc/pgbouncer/pgbouncer_hba.conf"
    PGBOUNCER_USERS = "/etc/pgbouncer/userlist.txt"
    PGBOUNCER_AUTH_SQL = "/etc/betting/pgbouncer-auth.sql"
    PGBOUNCER_EXPORTER = "/usr/local/sbin/betting-pgbouncer-exporter"
    HAPROXY_CONFIG = "/etc/haproxy/haproxy.cfg"
    ETCD_CONFIG = "/etc/default/etcd"
    ETCD_DATA = "/var/lib/etcd"
    CLICKHOUSE_CONFIG_D = "/etc/clickhouse-server/config.d"
    CLICKHOUSE_USERS_D = "/etc/clickhouse-server/users.d"
    CLICKHOUSE_DATA = "/var/lib/clickhouse"


class SecretNames:
    """File names under Paths.SECRETS_DIR (and SSM parameter /betting/<env>/<name>)."""

    PAGERDUTY_ROUTING_KEY = "pagerduty_routing_key"
    SLACK_CRITICAL_WEBHOOK = "slack_critical_webhook"
    SLACK_WARNINGS_WEBHOOK = "slack_warnings_webhook"
    GRAFANA_ADMIN_PASSWORD = "grafana_admin_password"
    POSTGRES_SUPERUSER_PASSWORD = "postgres_superuser_password"
    POSTGRES_REPLICATION_PASSWORD = "postgres_replication_password"
    POSTGRES_REWIND_PASSWORD = "postgres_rewind_password"
    POSTGRES_EXPORTER_PASSWORD = "postgres_exporter_password"
    # The SLO aggregates' writer (infra/aggregates.py ROLE): set by the agent on the leader, read by the daily job.
    METRICS_AGGREGATOR_PASSWORD = "metrics_aggregator_password"
    REDIS_AUTH_TOKEN = "redis_auth_token"
    DEADMAN_HEARTBEAT_KEY = "deadman_heartbeat_key"  # Alertmanager Watchdog -> dead-man heartbeat API key
    SMTP_AUTH_PASSWORD = "smtp_auth_password"
    # pgBackRest's TLS identity, shared by the PostgreSQL hosts: server and client certificate in one, its own CA.
    PGBACKREST_TLS_KEY = "pgbackrest_tls_key"
    PGBACKREST_TLS_CERT = "pgbackrest_tls_cert"
    # The monitoring API's basic-auth password (infra/render/webconfig.py), and the web config holding its bcrypt hash.
    MONITORING_PASSWORD = "monitoring_password"
    MONITORING_WEB_CONFIG = "monitoring_web_config"
    # ClickHouse's `default` user (infra/render/clickhouse.py).
    CLICKHOUSE_DEFAULT_PASSWORD = "clickhouse_default_password"
    # Patroni's REST API: the login its unsafe endpoints (switchover, restart, PATCH /config...) ask for.
    PATRONI_RESTAPI_USERNAME = "patroni_restapi_username"
    PATRONI_RESTAPI_PASSWORD = "patroni_restapi_password"
    # The stack's Amazon Managed Prometheus workspace id: no secret, but known only once the workspace exists, so it
    # reaches the hosts like one (a SecureString; Prometheus and Grafana get it substituted at apply time).
    AMP_WORKSPACE_ID = "amp_workspace_id"


def secret_path(name: str) -> str:
    return f"{Paths.SECRETS_DIR}/{name}"


def backup_key_alias(environment: str) -> str:
    """The KMS alias of the backup and audit-log buckets' key (BackupStorage creates it)."""
    return f"alias/betting-{environment}-backups"


def audit_log_prefix(host: str) -> str:
    """Where a PostgreSQL host ships its log files in the audit-log bucket: its role may put objects only there."""
    return f"postgres/{host}/"


def ssm_parameter_name(environment: str, name: str) -> str:
    return f"/betting/{environment}/{name}"
