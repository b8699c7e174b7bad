"""A Patroni/PostgreSQL node: Patroni, pgBackRest (and its TLS server), postgres_exporter, the backup job, and
the client path: PgBouncer, its exporter and HAProxy.

The backup job is scripts/backup.py, installed verbatim under Paths.BACKUP_LIB and run by
/usr/bin/python3 from the unit betting-pg-backup@.service, which two timers fire (full weekly, a
differential on the other days). Every per-host value the script and the post_bootstrap script read
is in Paths.BACKUP_ENV.
"""

from __future__ import annotations

from pathlib import Path

from infra import pki
from infra.hosts.spec import (
    BASE_PACKAGES,
    READ_WRITE_DELETE,
    WRITE_ONLY,
    BucketGrant,
    DataVolume,
    Directory,
    File,
    HostSpec,
    SecretEnvironment,
    SecretFile,
    env_file,
    node_exporter_files,
    place,
    shell_args,
    tls_files,
)
from infra.hosts.system import POSTGRES_HOST_UNITS, postgres_host_files
from infra.render.backup import SERVICE_TEMPLATE, TIMERS, render_backup_timers
from infra.render.exporters import render_exporters
from infra.render.haproxy import render_haproxy
from infra.render.patroni import (
    EXTENSIONS_SQL,
    LOG_DIRECTORY,
    RESTAPI_CREDENTIALS_ENV,
    UNIX_SOCKET_DIR,
    render_patroni,
    restapi_url,
)
from infra.render.pgbackrest import PGBACKREST_BIN, render_pgbackrest, uses_tls_server
from infra.render.pgbouncer import CONSOLE_DATABASE, STATS_USER, render_pgbouncer, socket_address, socket_query
from infra.render.webconfig import exporter_server_flags
from infra.settings import StackSettings
from infra.topology import (
    BackupLayout,
    Host,
    Paths,
    Ports,
    SecretNames,
    Topology,
    audit_log_prefix,
    backup_key_alias,
    secret_path,
)

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "infra" / "hostagent" / "files"
PATRONI_ENVIRONMENT = (
    ("PATRONI_SUPERUSER_PASSWORD", SecretNames.POSTGRES_SUPERUSER_PASSWORD),
    ("PATRONI_REPLICATION_PASSWORD", SecretNames.POSTGRES_REPLICATION_PASSWORD),
    ("PATRONI_REWIND_PASSWORD", SecretNames.POSTGRES_REWIND_PASSWORD),
    ("POSTGRES_EXPORTER_PASSWORD", SecretNames.POSTGRES_EXPORTER_PASSWORD),
    *RESTAPI_CREDENTIALS_ENV.items(),
)
BACKUP_SCRIPT_SOURCE = ROOT / "scripts" / "backup.py"
BACKUP_SCRIPT = f"{Paths.BACKUP_LIB}/backup.py"
BACKUP_ENV = Paths.BACKUP_ENV
SYSTEMD_DIR = "/etc/systemd/system"
BACKUP_SERVICE = f"{SYSTEMD_DIR}/{SERVICE_TEMPLATE}"
PGBACKREST_DROP_IN = f"{SYSTEMD_DIR}/pgbackrest.service.d/betting-config.conf"
PGBACKREST_SERVER_UNIT = "pgbackrest"  # Debian's unit for `pgbackrest server`
# What the backup job needs from Debian beyond PostgreSQL: boto3 writes the verification records.
BACKUP_PACKAGES = ("python3-boto3",)
# pgaudit's grants, run by the agent on the leader (infra/hostagent/agent.py converge_audit).
AUDIT_SQL = "/etc/betting/pg-audit.sql"
_AUDIT_SQL_BYTES = (Path(__file__).resolve().parents[1] / "hostagent" / "files" / "pg-audit.sql").read_bytes()
# The SLO aggregates' database and writer role, converged by the agent on the leader (converge_aggregates).
AGGREGATES_SQL = "/etc/betting/pg-aggregates.sql"
# The audit-log shipper (infra/hostagent/files/betting-ship-audit-logs) and its systemd units.
AUDIT_SHIPPER = "/usr/local/sbin/betting-ship-audit-logs"
AUDIT_SHIP_ENV = "/etc/betting/audit-ship.env"
AUDIT_SHIP_UNIT = "betting-audit-ship"
AUDIT_SHIP_STATE = "/var/lib/postgresql/audit-shipped.json"  # on the data volume: a replaced host ships nothing twice
_FILES = Path(__file__).resolve().parents[1] / "hostagent" / "files"


# The client path. betting-pgbouncer-exporter (infra/hostagent/files/) replaces Debian's
# prometheus-pgbouncer-exporter 1.7, which exits at start against PgBouncer 1.18 (it reads a SHOW STATS
# column PgBouncer 1.8 removed); Debian's python3-psycopg2 runs it.
CLIENT_PATH_PACKAGES = ("pgbouncer", "haproxy", "python3-psycopg2")
PGBOUNCER_EXPORTER_UNIT = "betting-pgbouncer-exporter"
PGBOUNCER_EXPORTER_ENV = f"/etc/default/{PGBOUNCER_EXPORTER_UNIT}"
PGBOUNCER_LIMITS_DROP_IN = f"{SYSTEMD_DIR}/pgbouncer.service.d/betting-limits.conf"
_PGBOUNCER_AUTH_SQL_BYTES = (FILES / "pgbouncer-auth.sql").read_bytes()
# PgBouncer's file limit: systemd's default soft limit (1024) is below max_client_conn on larger stacks. One
# figure above the most the settings allow (50000 clients, 10000 PostgreSQL connections, listeners, DNS): a
# limit that followed the pool would restart PgBouncer, and cut its clients, at every change of the pool size.
PGBOUNCER_FILE_LIMIT = 65536


def client_path_files(settings: StackSettings, topology: Topology) -> list[File]:
    """PgBouncer's three files, its auth function's SQL, its file limit; the exporter; HAProxy's config."""
    return [
        *place(render_pgbouncer(settings), {
            "pgbouncer/pgbouncer.ini": Paths.PGBOUNCER_CONFIG,
            "pgbouncer/pgbouncer_hba.conf": Paths.PGBOUNCER_HBA,
            "pgbouncer/userlist.txt": Paths.PGBOUNCER_USERS,
        }, owner="postgres:postgres", mode="0640"),
        File(Paths.PGBOUNCER_AUTH_SQL, _PGBOUNCER_AUTH_SQL_BYTES),
        File(PGBOUNCER_LIMITS_DROP_IN, f"[Service]\nLimitNOFILE={PGBOUNCER_FILE_LIMIT}\n".encode()),
        File(Paths.PGBOUNCER_EXPORTER, (FILES / PGBOUNCER_EXPORTER_UNIT).read_bytes(), mode="0755"),
        File(f"{SYSTEMD_DIR}/{PGBOUNCER_EXPORTER_UNIT}.service", (FILES / f"{PGBOUNCER_EXPORTER_UNIT}.service").read_bytes()),
        # The admin console over the socket, as the OS user the exporter runs as (peer): no password.
        File(PGBOUNCER_EXPORTER_ENV, env_file({
            "PGBOUNCER_DSN": f"{socket_address(Ports.PGBOUNCER)} dbname={CONSOLE_DATABASE} user={STATS_USER}",
            "LISTEN_ADDRESS": f"0.0.0.0:{Ports.PGBOUNCER_EXPORTER}",
        })),
        *place(render_haproxy(settings, topology), {"haproxy/haproxy.cfg": Paths.HAPROXY_CONFIG}),
    ]


def backup_environment(settings: StackSettings, topology: Topology, host: Host) -> dict[str, str]:
    """What scripts/backup.py and the post_bootstrap script read from BACKUP_ENV on `host`."""
    return {
        "STANZA": topology.patroni_scope,
        "NODE_NAME": host.name,
        # By the host's name, which its certificate has (not 127.0.0.1), verified with the stack's CA.
        "PATRONI_URL": restapi_url(host),
        "PATRONI_CA_FILE": pki.ca_path(),
        "PGBACKREST": PGBACKREST_BIN,
        "PGBACKREST_CONFIG": Paths.PGBACKREST_CONFIG,
        "PGBACKREST_LOCK_PATH": Paths.PGBACKREST_LOCKS,
        "POSTGRES_BIN": Paths.POSTGRES_BIN,
        "PGDATA": Paths.POSTGRES_DATA,
        "PGHOST": UNIX_SOCKET_DIR,
        "PGPORT": str(Ports.POSTGRES),
        "SUPERUSER_PASSWORD_FILE": secret_path(SecretNames.POSTGRES_SUPERUSER_PASSWORD),
        # The canary on another node's leader goes over TCP: verify-full against the stack's CA.
        "SSL_ROOT_CERT": pki.ca_path(),
        "SCRATCH_DIR": Paths.BACKUP_SCRATCH,
        "TEXTFILE_DIR": Paths.NODE_EXPORTER_TEXTFILE_DIR,
        "BUCKET": topology.backup_bucket,
        "REGION": settings.region,
        # The regional endpoint, said explicitly (boto3's own default) so the sandbox can map it.
        "S3_ENDPOINT": f"https://s3.{settings.region}.amazonaws.com",
        "REPOSITORY_PREFIX": BackupLayout.REPOSITORY,
        "VERIFICATION_PREFIX": BackupLayout.VERIFICATION,
        "KMS_KEY": topology.backup_key_alias,
    }


def _sourced_env_file(variables: dict[str, str]) -> bytes:
    """env_file's KEY="value" lines, read by `sh .`: a shell would expand $ and ` inside the quotes."""
    for key, value in variables.items():
        if any(c in value for c in "$`\n\\\""):
            raise ValueError(f"{key}: a value sourced by sh must not contain $, `, \\, \" or a newline: {value!r}")
    return env_file(variables)


def backup_files(settings: StackSettings, topology: Topology, host: Host) -> list[File]:
    """The backup job: script, environment, unit and timers; the post_bootstrap script; the TLS server's drop-in."""
    timers = render_backup_timers(settings)
    files = [
        File(BACKUP_SCRIPT, BACKUP_SCRIPT_SOURCE.read_bytes(), mode="0644"),  # run by /usr/bin/python3, not executed
        File(BACKUP_ENV, _sourced_env_file(backup_environment(settings, topology, host))),
        File(Paths.POST_BOOTSTRAP, (FILES / "betting-pg-post-bootstrap").read_bytes(), mode="0755"),
        File(BACKUP_SERVICE, (FILES / SERVICE_TEMPLATE).read_bytes()),
        *place(timers, {f"backup/{name}": f"{SYSTEMD_DIR}/{name}" for name in TIMERS.values()}),
    ]
    if uses_tls_server(topology):
        files.append(File(PGBACKREST_DROP_IN, (FILES / "pgbackrest-config.conf").read_bytes()))
    return files


def audit_ship_environment(settings: StackSettings, topology: Topology, host: Host) -> dict[str, str]:
    """What the shipper reads from AUDIT_SHIP_ENV."""
    return {
        "AUDIT_BUCKET": topology.audit_bucket,
        "AUDIT_PREFIX": audit_log_prefix(host.name),
        "AUDIT_KMS_KEY": backup_key_alias(settings.environment),
        "AWS_DEFAULT_REGION": settings.region,
        "LOG_DIRECTORY": LOG_DIRECTORY,
        "CURRENT_LOGFILES": f"{Paths.POSTGRES_DATA}/current_logfiles",
        "STATE_FILE": AUDIT_SHIP_STATE,
    }


def spec(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    patroni = render_patroni(settings, topology, host)
    exporters = render_exporters(settings, topology)
    tls = uses_tls_server(topology)
    volume = DataVolume("postgres-data", "/var/lib/postgresql", "postgres:postgres", settings.patroni.data_volume)
    files = [
        *place(patroni, {f"patroni/{host.name}.yml": Paths.PATRONI_CONFIG}, owner="postgres:postgres", mode="0600"),
        *place(render_pgbackrest(settings, topology, host), {f"pgbackrest/{host.name}.conf": Paths.PGBACKREST_CONFIG},
               owner="postgres:postgres", mode="0640"),
        *place({k: v for k, v in exporters.items() if k.startswith("postgres_exporter/")},
               {"postgres_exporter/queries.yaml": Paths.POSTGRES_EXPORTER_QUERIES}),
        # Patroni owns the data directory: Debian must not create its own 15/main cluster on install.
        File("/etc/postgresql-common/createcluster.conf", b"create_main_cluster = false\n"),
        File("/etc/default/prometheus-postgres-exporter", env_file({
            # The local socket (no address: the query names it): nothing crosses the network, and PostgreSQL has no
            # TLS on a socket to ask for.
            "DATA_SOURCE_URI": f"/postgres?{socket_query(Ports.POSTGRES)}&sslmode=disable",
            "DATA_SOURCE_USER": "postgres_exporter",
            "DATA_SOURCE_PASS_FILE": secret_path(SecretNames.POSTGRES_EXPORTER_PASSWORD),
            "ARGS": shell_args([f"--extend.query-path={Paths.POSTGRES_EXPORTER_QUERIES}",
                                f"--web.listen-address=:{Ports.POSTGRES_EXPORTER}", *exporter_server_flags()]),
        })),
        *backup_files(settings, topology, host),
        File(AUDIT_SQL, _AUDIT_SQL_BYTES),
        File(EXTENSIONS_SQL, (_FILES / "pg-extensions.sql").read_bytes()),
        File(AGGREGATES_SQL, (_FILES / "pg-aggregates.sql").read_bytes()),
        *postgres_host_files(settings, volume),
        File(AUDIT_SHIPPER, (_FILES / "betting-ship-audit-logs").read_bytes(), mode="0755"),
        File(AUDIT_SHIP_ENV, env_file(audit_ship_environment(settings, topology, host))),
        *(File(f"/etc/systemd/system/{AUDIT_SHIP_UNIT}.{kind}", (_FILES / f"{AUDIT_SHIP_UNIT}.{kind}").read_bytes())
          for kind in ("service", "timer")),
        *node_exporter_files(),
        *client_path_files(settings, topology),
    ]
    boot = []
    if settings.patroni.watchdog != "off":
        # EC2 has no hardware watchdog: softdog reboots a node whose Patroni stops feeding it,
        # so a leader that lost its lock cannot keep accepting writes.
        files.append(File("/etc/modules-load.d/softdog.conf", b"softdog\n"))
        files.append(File("/etc/udev/rules.d/61-watchdog.rules", b'KERNEL=="watchdog", OWNER="postgres", GROUP="postgres"\n'))
        boot += ["modprobe softdog", "udevadm trigger --subsystem-match=misc --action=change"]
    secret_files = [
        SecretFile(SecretNames.POSTGRES_EXPORTER_PASSWORD, "prometheus:prometheus"),
        # The backup job writes its canary row on the leader, which it may reach only over TCP.
        SecretFile(SecretNames.POSTGRES_SUPERUSER_PASSWORD, "postgres:postgres"),
        # The agent sets the aggregator role's password from it (psql as postgres reads it).
        SecretFile(SecretNames.METRICS_AGGREGATOR_PASSWORD, "postgres:postgres"),
    ]
    # A renewed certificate: Patroni's reload reloads PostgreSQL (SIGHUP, every ssl_* setting) and swaps its REST API's
    # certificate (when the serial changed); PgBouncer rereads its client_tls_* files and HAProxy its checks' CA file on
    # their own reloads; none drops a connection.
    secret_files += tls_files(topology, host, reloads=(("patroni", "reload"), ("pgbouncer", "reload"), ("haproxy", "reload")))
    if tls:
        secret_files += [SecretFile(SecretNames.PGBACKREST_TLS_KEY, "postgres:postgres"),
                         SecretFile(SecretNames.PGBACKREST_TLS_CERT, "postgres:postgres")]
    return HostSpec(
        host=host,
        instance_type=settings.patroni.instance_type,
        packages=BASE_PACKAGES + (f"postgresql-{settings.patroni.postgres_version}",
                                  f"postgresql-{settings.patroni.postgres_version}-pgaudit", "patroni", "python3-etcd",
                                  "pgbackrest", "prometheus-postgres-exporter", *BACKUP_PACKAGES, *CLIENT_PATH_PACKAGES),
        files=tuple(files),
        # The TLS server first: the member that bootstraps the cluster creates the stanza through the others.
        services=POSTGRES_HOST_UNITS + ((PGBACKREST_SERVER_UNIT,) if tls else ()) + (
            "patroni", "pgbouncer", "haproxy", "prometheus-postgres-exporter", PGBOUNCER_EXPORTER_UNIT,
            "prometheus-node-exporter", *TIMERS.values(),
            f"{AUDIT_SHIP_UNIT}.timer"),
        volume=volume,
        secret_files=tuple(secret_files),
        secret_environments=(SecretEnvironment("patroni", PATRONI_ENVIRONMENT, "postgres:postgres"),),
        bucket_grants=(
            BucketGrant(topology.backup_bucket, BackupLayout.REPOSITORY, READ_WRITE_DELETE, list=True),
            # Verification records are written once and never read or deleted by the host.
            BucketGrant(topology.backup_bucket, BackupLayout.VERIFICATION, WRITE_ONLY),
            # The audit logs: add objects under its own prefix; never read, list or delete them.
            BucketGrant(topology.audit_bucket, audit_log_prefix(host.name), WRITE_ONLY),
        ),
        boot_commands=tuple(boot),
        # node_exporter's textfile folder is root's (Debian's package): the backup job, run as postgres, writes
        # its metrics there too. Sticky, so neither can remove or replace the other's files.
        directories=(Directory(Paths.NODE_EXPORTER_TEXTFILE_DIR, "1775", "root:postgres"),),
    )
