"""A Patroni/PostgreSQL node: Patroni, pgBackRest, postgres_exporter and the nightly base backup."""

from __future__ import annotations

from pathlib import Path

from infra.hosts.spec import (
    BASE_PACKAGES,
    BucketGrant,
    DataVolume,
    File,
    HostSpec,
    SecretEnvironment,
    SecretFile,
    env_file,
    node_exporter_file,
    place,
    shell_args,
)
from infra.render.exporters import render_exporters
from infra.render.patroni import LOG_DIRECTORY, render_patroni
from infra.render.pgbackrest import render_pgbackrest
from infra.settings import StackSettings
from infra.topology import Host, Paths, Ports, SecretNames, Topology, audit_log_prefix, backup_key_alias, secret_path

PATRONI_ENVIRONMENT = (
    ("PATRONI_SUPERUSER_PASSWORD", SecretNames.POSTGRES_SUPERUSER_PASSWORD),
    ("PATRONI_REPLICATION_PASSWORD", SecretNames.POSTGRES_REPLICATION_PASSWORD),
    ("PATRONI_REWIND_PASSWORD", SecretNames.POSTGRES_REWIND_PASSWORD),
    ("POSTGRES_EXPORTER_PASSWORD", SecretNames.POSTGRES_EXPORTER_PASSWORD),
)
BACKUP_SCRIPT = "/usr/local/sbin/betting-pg-backup"
BACKUP_ENV = "/etc/betting/pg-backup.env"
BACKUP_CRON = "/etc/cron.d/betting-pg-backup"
# The job's script has no per-stack value; it sources BACKUP_ENV (see its header).
_BACKUP_SCRIPT_BYTES = (Path(__file__).resolve().parents[1] / "hostagent" / "files" / "betting-pg-backup").read_bytes()
# pgaudit's grants, run by the agent on the leader (infra/hostagent/agent.py converge_audit).
AUDIT_SQL = "/etc/betting/pg-audit.sql"
_AUDIT_SQL_BYTES = (Path(__file__).resolve().parents[1] / "hostagent" / "files" / "pg-audit.sql").read_bytes()
# The audit-log shipper (infra/hostagent/files/betting-ship-audit-logs) and its systemd units.
AUDIT_SHIPPER = "/usr/local/sbin/betting-ship-audit-logs"
AUDIT_SHIP_ENV = "/etc/betting/audit-ship.env"
AUDIT_SHIP_UNIT = "betting-audit-ship"
AUDIT_SHIP_STATE = "/var/lib/postgresql/audit-shipped.json"  # on the data volume: a replaced host ships nothing twice
_FILES = Path(__file__).resolve().parents[1] / "hostagent" / "files"
# cron runs a job with PATH=/usr/bin:/bin and SHELL=/bin/sh unless its file says otherwise.
CRON_ENVIRONMENT = (("SHELL", "/bin/sh"), ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))


def backup_environment(topology: Topology) -> dict[str, str]:
    """What the backup script reads from BACKUP_ENV."""
    return {
        "STANZA": topology.patroni_scope,
        "PATRONI_URL": f"http://127.0.0.1:{Ports.PATRONI_API}",
        "TEXTFILE_DIR": Paths.NODE_EXPORTER_TEXTFILE_DIR,
        "PGBACKREST": "/usr/bin/pgbackrest",
    }


def _sourced_env_file(variables: dict[str, str]) -> bytes:
    """env_file's KEY="value" lines, read by `sh .`: a shell would expand $ and ` inside the quotes."""
    for key, value in variables.items():
        if any(c in value for c in "$`\n"):
            raise ValueError(f"{key}: a value sourced by sh must not contain $, ` or a newline: {value!r}")
    return env_file(variables)


def _backup_cron(settings: StackSettings) -> bytes:
    lines = [f"{name}={value}" for name, value in CRON_ENVIRONMENT]
    lines.append(f"{settings.backups.full_backup_schedule} root {BACKUP_SCRIPT} full")
    return ("\n".join(lines) + "\n").encode()


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
    files = [
        *place(patroni, {f"patroni/{host.name}.yml": Paths.PATRONI_CONFIG}, owner="postgres:postgres", mode="0600"),
        *place(render_pgbackrest(settings, topology), {"pgbackrest/pgbackrest.conf": Paths.PGBACKREST_CONFIG},
               owner="postgres:postgres", mode="0640"),
        *place({k: v for k, v in exporters.items() if k.startswith("postgres_exporter/")},
               {"postgres_exporter/queries.yaml": Paths.POSTGRES_EXPORTER_QUERIES}),
        # Patroni owns the data directory: Debian must not create its own 15/main cluster on install.
        File("/etc/postgresql-common/createcluster.conf", b"create_main_cluster = false\n"),
        File("/etc/default/prometheus-postgres-exporter", env_file({
            "DATA_SOURCE_URI": f"127.0.0.1:{Ports.POSTGRES}/postgres?sslmode=disable",
            "DATA_SOURCE_USER": "postgres_exporter",
            "DATA_SOURCE_PASS_FILE": secret_path(SecretNames.POSTGRES_EXPORTER_PASSWORD),
            "ARGS": shell_args([f"--extend.query-path={Paths.POSTGRES_EXPORTER_QUERIES}",
                                f"--web.listen-address=:{Ports.POSTGRES_EXPORTER}"]),
        })),
        File(BACKUP_SCRIPT, _BACKUP_SCRIPT_BYTES, mode="0755"),
        File(BACKUP_ENV, _sourced_env_file(backup_environment(topology))),
        File(BACKUP_CRON, _backup_cron(settings)),
        File(AUDIT_SQL, _AUDIT_SQL_BYTES),
        File(AUDIT_SHIPPER, (_FILES / "betting-ship-audit-logs").read_bytes(), mode="0755"),
        File(AUDIT_SHIP_ENV, env_file(audit_ship_environment(settings, topology, host))),
        *(File(f"/etc/systemd/system/{AUDIT_SHIP_UNIT}.{kind}", (_FILES / f"{AUDIT_SHIP_UNIT}.{kind}").read_bytes())
          for kind in ("service", "timer")),
        node_exporter_file(),
    ]
    boot = []
    if settings.patroni.watchdog != "off":
        # EC2 has no hardware watchdog: softdog reboots a node whose Patroni stops feeding it,
        # so a leader that lost its lock cannot keep accepting writes.
        files.append(File("/etc/modules-load.d/softdog.conf", b"softdog\n"))
        files.append(File("/etc/udev/rules.d/61-watchdog.rules", b'KERNEL=="watchdog", OWNER="postgres", GROUP="postgres"\n'))
        boot += ["modprobe softdog", "udevadm trigger --subsystem-match=misc --action=change"]
    return HostSpec(
        host=host,
        instance_type=settings.patroni.instance_type,
        packages=BASE_PACKAGES + (f"postgresql-{settings.patroni.postgres_version}",
                                  f"postgresql-{settings.patroni.postgres_version}-pgaudit", "patroni", "python3-etcd",
                                  "pgbackrest", "prometheus-postgres-exporter", "curl", "python3-boto3"),
        files=tuple(files),
        services=("patroni", "prometheus-postgres-exporter", "prometheus-node-exporter", "cron", f"{AUDIT_SHIP_UNIT}.timer"),
        volume=DataVolume("postgres-data", "/var/lib/postgresql", "postgres:postgres", settings.patroni.data_volume),
        secret_files=(SecretFile(SecretNames.POSTGRES_EXPORTER_PASSWORD, "prometheus:prometheus"),),
        secret_environments=(SecretEnvironment("patroni", PATRONI_ENVIRONMENT, "postgres:postgres"),),
        bucket_grants=(BucketGrant(topology.backup_bucket, "pgbackrest/", write=True),
                       BucketGrant(topology.audit_bucket, audit_log_prefix(host.name), write=True, put_only=True)),
        boot_commands=tuple(boot),
    )
