"""What runs where: pure data describing every host, built from settings, topology and renderers.

A platform (infra/platforms/aws.py) turns a HostSpec into an instance, its data volume, its
boot configuration and its IAM scope; the security-group rules come from `ingress_rules`.
Nothing here imports Pulumi.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Literal

from infra.render.alertmanager import alertmanager_args, render_alertmanager
from infra.render.clickhouse import render_clickhouse
from infra.render.etcd import render_etcd
from infra.render.exporters import render_exporters
from infra.render.grafana import render_grafana
from infra.render.patroni import render_patroni
from infra.render.pgbackrest import render_pgbackrest
from infra.render.prometheus import prometheus_args, render_prometheus
from infra.settings import StackSettings, VolumeSettings
from infra.topology import Host, Paths, Ports, SecretNames, Topology, secret_path, ssm_parameter_name

SecurityRole = Literal["etcd", "postgres", "postgres-lb", "redis", "clickhouse", "monitoring", "grafana", "clients"]


@dataclass(frozen=True)
class File:
    path: str
    content: bytes
    mode: str = "0644"
    owner: str = "root:root"


@dataclass(frozen=True)
class SecretFile:
    """A secret written at boot from its SSM SecureString parameter to secret_path(name)."""

    name: str
    owner: str
    mode: str = "0400"


@dataclass(frozen=True)
class SecretEnvironment:
    """An EnvironmentFile for a systemd unit, assembled at boot from SSM parameters."""

    unit: str
    variables: tuple[tuple[str, str], ...]  # (environment variable, secret name)
    owner: str = "root:root"

    @property
    def path(self) -> str:
        return f"{Paths.SECRETS_DIR}/{self.unit}.env"


@dataclass(frozen=True)
class DataVolume:
    purpose: str  # tag Role on the volume: postgres-data, etcd-data, clickhouse-data, prometheus-tsdb
    mount: str
    owner: str
    settings: VolumeSettings


@dataclass(frozen=True)
class BucketGrant:
    bucket: str
    prefix: str
    write: bool


@dataclass(frozen=True)
class HostSpec:
    host: Host
    instance_type: str
    packages: tuple[str, ...]
    files: tuple[File, ...]
    services: tuple[str, ...]  # systemd units enabled and started once everything is in place, in order
    volume: DataVolume | None = None
    secret_files: tuple[SecretFile, ...] = ()
    secret_environments: tuple[SecretEnvironment, ...] = ()
    bucket_grants: tuple[BucketGrant, ...] = ()
    boot_commands: tuple[str, ...] = ()  # run after packages and secrets, before the services start

    @property
    def secret_names(self) -> tuple[str, ...]:
        names = {s.name for s in self.secret_files}
        names.update(name for env in self.secret_environments for _, name in env.variables)
        return tuple(sorted(names))


@dataclass(frozen=True)
class Ingress:
    role: SecurityRole  # the security group the rule belongs to
    port: int
    sources: tuple[SecurityRole, ...]
    description: str
    protocol: Literal["tcp", "udp"] = "tcp"


def ingress_rules(settings: StackSettings) -> tuple[Ingress, ...]:
    """Every open port and who may reach it; nothing is open to a CIDR."""
    scrape = ("monitoring",)
    rules = [
        Ingress("etcd", Ports.ETCD_CLIENT, ("postgres", "monitoring"), "etcd clients: Patroni, and Prometheus scraping /metrics"),
        Ingress("etcd", Ports.ETCD_PEER, ("etcd",), "etcd peers"),
        Ingress("postgres", Ports.POSTGRES, ("postgres", "postgres-lb", "clients"),
                "PostgreSQL: replication, load balancer, clients"),
        Ingress("postgres", Ports.PATRONI_API, ("postgres", "postgres-lb", "monitoring"),
                "Patroni REST API: members, load-balancer health checks (/primary, /replica), /metrics"),
        Ingress("postgres", Ports.POSTGRES_EXPORTER, scrape, "postgres_exporter"),
        Ingress("postgres-lb", Ports.POSTGRES, ("clients",), "writes, routed to the leader"),
        Ingress("postgres-lb", Ports.POSTGRES + 1, ("clients",), "reads, routed to the replicas"),
        Ingress("redis", Ports.REDIS, ("clients", "monitoring"), "Redis: clients and redis_exporter"),
        Ingress("clickhouse", Ports.CLICKHOUSE_HTTP, ("clients", "grafana"), "ClickHouse HTTP"),
        Ingress("clickhouse", Ports.CLICKHOUSE_NATIVE, ("clients",), "ClickHouse native protocol"),
        Ingress("clickhouse", Ports.CLICKHOUSE_METRICS, scrape, "ClickHouse Prometheus endpoint"),
        Ingress("monitoring", Ports.PROMETHEUS, ("monitoring", "grafana"), "Prometheus: self-scrape and Grafana"),
        Ingress("monitoring", Ports.ALERTMANAGER, ("monitoring", "grafana"), "Alertmanager: Prometheus, peers, Grafana"),
        Ingress("monitoring", Ports.ALERTMANAGER_CLUSTER, ("monitoring",), "Alertmanager gossip", "tcp"),
        Ingress("monitoring", Ports.ALERTMANAGER_CLUSTER, ("monitoring",), "Alertmanager gossip", "udp"),
        Ingress("monitoring", Ports.REDIS_EXPORTER, scrape, "redis_exporter"),
        Ingress("grafana", Ports.GRAFANA, ("clients", "monitoring"), "Grafana UI and its /metrics"),
    ]
    rules += [
        Ingress(role, Ports.NODE_EXPORTER, scrape, "node_exporter")
        for role in ("etcd", "postgres", "clickhouse", "monitoring", "grafana")
    ]
    return tuple(rules)


def env_file(variables: dict[str, str]) -> bytes:
    """A systemd EnvironmentFile; values double-quoted with systemd's escapes."""
    lines = []
    for key, value in variables.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{escaped}"')
    return ("\n".join(lines) + "\n").encode()


def _args(args: tuple[str, ...] | list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _node_exporter() -> File:
    return File(
        "/etc/default/prometheus-node-exporter",
        env_file({"ARGS": f"--collector.textfile.directory={Paths.NODE_EXPORTER_TEXTFILE_DIR} --collector.systemd"}),
    )


def _mapped(rendered: dict[str, bytes], locations: dict[str, str], owner: str = "root:root", mode: str = "0644") -> list[File]:
    """Place rendered files on a host: `locations` maps a rendered path (or a folder ending in /) to a host path."""
    files = []
    for rel, content in sorted(rendered.items()):
        if rel in locations:
            files.append(File(locations[rel], content, mode, owner))
            continue
        folder = next((f for f in locations if f.endswith("/") and rel.startswith(f)), None)
        if folder is None:
            raise ValueError(f"no host location for rendered file {rel}")
        files.append(File(locations[folder] + rel[len(folder):], content, mode, owner))
    return files


BASE_PACKAGES = ("awscli", "prometheus-node-exporter", "xfsprogs")


def _etcd(settings: StackSettings, topology: Topology, member: Host) -> HostSpec:
    rendered = render_etcd(settings, topology, member)
    return HostSpec(
        host=member,
        instance_type=settings.etcd.instance_type,
        packages=BASE_PACKAGES + ("etcd-server",),
        files=(*_mapped(rendered, {f"etcd/{member.name}.env": Paths.ETCD_CONFIG}), _node_exporter()),
        services=("etcd", "prometheus-node-exporter"),
        volume=DataVolume("etcd-data", Paths.ETCD_DATA, "etcd:etcd", settings.etcd.data_volume),
    )


PATRONI_ENVIRONMENT = (
    ("PATRONI_SUPERUSER_PASSWORD", SecretNames.POSTGRES_SUPERUSER_PASSWORD),
    ("PATRONI_REPLICATION_PASSWORD", SecretNames.POSTGRES_REPLICATION_PASSWORD),
    ("PATRONI_REWIND_PASSWORD", SecretNames.POSTGRES_REWIND_PASSWORD),
    ("POSTGRES_EXPORTER_PASSWORD", SecretNames.POSTGRES_EXPORTER_PASSWORD),
)
BACKUP_SCRIPT = "/usr/local/sbin/betting-pg-backup"


def _backup_script(topology: Topology) -> bytes:
    """Full base backup from the current leader only; records success for BackupFailed."""
    metric = f"{Paths.NODE_EXPORTER_TEXTFILE_DIR}/pg_backup.prom"
    return f"""#!/bin/sh
# Runs on every node from cron; only the Patroni leader backs up, so a failover moves the job with it.
set -eu
curl -fsS -o /dev/null http://127.0.0.1:{Ports.PATRONI_API}/primary || exit 0
runuser -u postgres -- pgbackrest --stanza={topology.patroni_scope} stanza-create
runuser -u postgres -- pgbackrest --stanza={topology.patroni_scope} --type="${{1:-full}}" backup
tmp=$(mktemp {Paths.NODE_EXPORTER_TEXTFILE_DIR}/.pg_backup.XXXXXX)
printf '# HELP backup_last_success_timestamp Unix time of the last successful base backup.\\n' > "$tmp"
printf '# TYPE backup_last_success_timestamp gauge\\n' >> "$tmp"
printf 'backup_last_success_timestamp{{cluster="{topology.patroni_scope}"}} %s\\n' "$(date +%s)" >> "$tmp"
chmod 0644 "$tmp" && mv "$tmp" {metric}
""".encode()


def _postgres(settings: StackSettings, topology: Topology, node: Host) -> HostSpec:
    patroni = render_patroni(settings, topology, node)
    exporters = render_exporters(settings, topology)
    files = [
        *_mapped(patroni, {f"patroni/{node.name}.yml": Paths.PATRONI_CONFIG}, owner="postgres:postgres", mode="0600"),
        *_mapped(render_pgbackrest(settings, topology), {"pgbackrest/pgbackrest.conf": Paths.PGBACKREST_CONFIG},
                 owner="postgres:postgres", mode="0640"),
        *_mapped({k: v for k, v in exporters.items() if k.startswith("postgres_exporter/")},
                 {"postgres_exporter/queries.yaml": Paths.POSTGRES_EXPORTER_QUERIES}),
        # Patroni owns the data directory: Debian must not create its own 15/main cluster on install.
        File("/etc/postgresql-common/createcluster.conf", b"create_main_cluster = false\n"),
        File("/etc/default/prometheus-postgres-exporter", env_file({
            "DATA_SOURCE_URI": f"127.0.0.1:{Ports.POSTGRES}/postgres?sslmode=disable",
            "DATA_SOURCE_USER": "postgres_exporter",
            "DATA_SOURCE_PASS_FILE": secret_path(SecretNames.POSTGRES_EXPORTER_PASSWORD),
            "ARGS": _args([f"--extend.query-path={Paths.POSTGRES_EXPORTER_QUERIES}",
                           f"--web.listen-address=:{Ports.POSTGRES_EXPORTER}"]),
        })),
        File(BACKUP_SCRIPT, _backup_script(topology), mode="0755"),
        File("/etc/cron.d/betting-pg-backup",
             f"{settings.backups.full_backup_schedule} root {BACKUP_SCRIPT} full\n".encode()),
        _node_exporter(),
    ]
    boot = []
    if settings.patroni.watchdog != "off":
        # EC2 has no hardware watchdog: softdog reboots a node whose Patroni stops feeding it,
        # so a leader that lost its lock cannot keep accepting writes.
        files.append(File("/etc/modules-load.d/softdog.conf", b"softdog\n"))
        files.append(File("/etc/udev/rules.d/61-watchdog.rules", b'KERNEL=="watchdog", OWNER="postgres", GROUP="postgres"\n'))
        boot += ["modprobe softdog", "udevadm trigger --subsystem-match=misc --action=change"]
    return HostSpec(
        host=node,
        instance_type=settings.patroni.instance_type,
        packages=BASE_PACKAGES + (f"postgresql-{settings.patroni.postgres_version}", "patroni", "python3-etcd",
                                  "pgbackrest", "prometheus-postgres-exporter", "curl"),
        files=tuple(files),
        services=("patroni", "prometheus-postgres-exporter", "prometheus-node-exporter", "cron"),
        volume=DataVolume("postgres-data", "/var/lib/postgresql", "postgres:postgres", settings.patroni.data_volume),
        secret_files=(SecretFile(SecretNames.POSTGRES_EXPORTER_PASSWORD, "prometheus:prometheus"),),
        secret_environments=(SecretEnvironment("patroni", PATRONI_ENVIRONMENT, "postgres:postgres"),),
        bucket_grants=(BucketGrant(topology.backup_bucket, "pgbackrest/", write=True),),
        boot_commands=tuple(boot),
    )


def _clickhouse(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    return HostSpec(
        host=host,
        instance_type=settings.clickhouse.instance_type,
        packages=BASE_PACKAGES + ("clickhouse-server",),
        files=(*_mapped(render_clickhouse(settings, topology), {"clickhouse/config.d/": Paths.CLICKHOUSE_CONFIG_D + "/"}),
               _node_exporter()),
        services=("clickhouse-server", "prometheus-node-exporter"),
        volume=DataVolume("clickhouse-data", Paths.CLICKHOUSE_DATA, "clickhouse:clickhouse", settings.clickhouse.data_volume),
    )


MONITORING_SECRETS = (
    SecretNames.PAGERDUTY_ROUTING_KEY,
    SecretNames.SLACK_CRITICAL_WEBHOOK,
    SecretNames.SLACK_WARNINGS_WEBHOOK,
    SecretNames.DEADMAN_HEARTBEAT_KEY,
)


def _monitoring(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    prometheus = render_prometheus(settings, topology)
    alertmanager = render_alertmanager(settings, topology)
    redis_exporter_args = [
        f"--redis.addr=rediss://{topology.redis_endpoint}:{Ports.REDIS}",
        f"--web.listen-address=:{Ports.REDIS_EXPORTER}",
    ]
    files = [
        *_mapped(prometheus, {"prometheus/prometheus.yml": Paths.PROMETHEUS_CONFIG,
                              "prometheus/rules/": Paths.PROMETHEUS_RULES_DIR + "/"}),
        *_mapped(alertmanager, {"alertmanager/alertmanager.yml": Paths.ALERTMANAGER_CONFIG,
                                "alertmanager/": "/etc/prometheus/alertmanager/"}),
        # The flags Prometheus really runs with (retention included); the policy pack reads them from here.
        File("/etc/default/prometheus", env_file({"ARGS": _args(prometheus_args(settings))})),
        File("/etc/default/prometheus-alertmanager", env_file({"ARGS": _args(alertmanager_args(settings, topology, host))})),
        File("/etc/default/prometheus-redis-exporter", env_file({"ARGS": _args(redis_exporter_args)})),
        _node_exporter(),
    ]
    prometheus_settings = settings.monitoring.prometheus
    return HostSpec(
        host=host,
        instance_type=prometheus_settings.instance_type,
        packages=BASE_PACKAGES + ("prometheus", "prometheus-alertmanager", "prometheus-redis-exporter"),
        files=tuple(files),
        services=("prometheus", "prometheus-alertmanager", "prometheus-redis-exporter", "prometheus-node-exporter"),
        volume=DataVolume("prometheus-tsdb", Paths.PROMETHEUS_DATA, "prometheus:prometheus", prometheus_settings.volume),
        secret_files=tuple(SecretFile(name, "prometheus:prometheus") for name in MONITORING_SECRETS + (
            (SecretNames.SMTP_AUTH_PASSWORD,) if settings.alerting.smtp_auth_username else ())),
        secret_environments=(
            SecretEnvironment("prometheus-redis-exporter", (("REDIS_PASSWORD", SecretNames.REDIS_AUTH_TOKEN),),
                              "prometheus:prometheus"),
        ),
    )


def _grafana(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    return HostSpec(
        host=host,
        instance_type=settings.monitoring.grafana.instance_type,
        packages=BASE_PACKAGES + ("grafana",),
        files=(*_mapped(render_grafana(settings, topology), {
            "grafana/provisioning/": Paths.GRAFANA_PROVISIONING + "/",
            "grafana/dashboards/": Paths.GRAFANA_DASHBOARDS + "/",
        }, owner="root:grafana", mode="0640"), _node_exporter()),
        services=("grafana-server", "prometheus-node-exporter"),
        secret_environments=(
            # Grafana reads any setting from a GF_<SECTION>_<KEY> environment variable.
            SecretEnvironment("grafana-server", (("GF_SECURITY_ADMIN_PASSWORD", SecretNames.GRAFANA_ADMIN_PASSWORD),),
                              "grafana:grafana"),
        ),
    )


def host_specs(settings: StackSettings, topology: Topology) -> tuple[HostSpec, ...]:
    return (
        *(_etcd(settings, topology, h) for h in topology.etcd),
        *(_postgres(settings, topology, h) for h in topology.postgres),
        *(_clickhouse(settings, topology, h) for h in topology.clickhouse),
        *(_monitoring(settings, topology, h) for h in topology.monitoring),
        *(_grafana(settings, topology, h) for h in topology.grafana),
    )


def bootstrap_manifest(spec: HostSpec, environment: str, region: str) -> bytes:
    """What the boot script does on this host, as data (read by infra/hostagent/bootstrap.py)."""
    manifest = {
        "host": spec.host.name,
        "region": region,
        "packages": list(spec.packages),
        "volume": None if spec.volume is None else {"mount": spec.volume.mount, "owner": spec.volume.owner},
        "secret_files": [
            {"path": secret_path(s.name), "parameter": ssm_parameter_name(environment, s.name), "owner": s.owner, "mode": s.mode}
            for s in spec.secret_files
        ],
        "secret_environments": [
            {"path": e.path, "unit": e.unit, "owner": e.owner,
             "variables": {var: ssm_parameter_name(environment, name) for var, name in e.variables}}
            for e in spec.secret_environments
        ],
        # cloud-init writes files as root before the packages create their users; ownership follows later.
        "ownership": [{"path": f.path, "owner": f.owner, "mode": f.mode} for f in spec.files if f.owner != "root:root"],
        "boot_commands": list(spec.boot_commands),
        "services": list(spec.services),
    }
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()

