"""What runs where, as pure data: the HostSpec a platform (infra/platforms/aws.py) turns into an
instance, its data volume, its boot configuration and its IAM scope, and the security-group rules.

The role modules beside this one (etcd, postgres, clickhouse, monitoring, grafana) build one
HostSpec each from settings, topology and the renderers. Nothing here imports Pulumi.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

from infra import pki
from infra.render.webconfig import exporter_server_flags, exporter_web_config
from infra.settings import StackSettings, VolumeSettings
from infra.topology import Host, Paths, Ports, Topology

SecurityRole = Literal["etcd", "postgres", "postgres-lb", "redis", "clickhouse", "monitoring", "grafana", "clients"]


@dataclass(frozen=True)
class File:
    path: str
    content: bytes
    mode: str = "0644"
    owner: str = "root:root"
    # (token, secret name): the agent writes the file with each token replaced by that SSM parameter's value, for a
    # value known only once a resource exists (the AMP workspace id) in a daemon that cannot read it from a file.
    parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Directory:
    """A folder whose owner and mode the host must have, e.g. a package's folder another user writes into."""

    path: str
    mode: str
    owner: str = "root:root"


@dataclass(frozen=True)
class SecretFile:
    """A secret written at boot from its SSM SecureString parameter to secret_path(name)."""

    name: str  # its file under Paths.SECRETS_DIR
    owner: str
    mode: str = "0400"
    parameter: str = ""  # its SSM name under /betting/<env>/ when not `name` (a host's own: hosts/<host>/...)
    # What a change to it needs, as (unit, action): a renewed certificate must reach the daemons serving it.
    reloads: tuple[tuple[str, str], ...] = ()

    @property
    def parameter_name(self) -> str:
        return self.parameter or self.name


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
    """S3 object actions on `prefix*` of `bucket`, and (`list`) listing keys under that prefix only."""

    bucket: str
    prefix: str
    actions: tuple[str, ...]
    list: bool = False

    @property
    def put_only(self) -> bool:
        """Adds objects and never reads them: its key only encrypts (GenerateDataKey), never decrypts."""
        return set(self.actions) == {"s3:PutObject"}


READ_WRITE_DELETE = ("s3:GetObject", "s3:PutObject", "s3:DeleteObject")
WRITE_ONLY = ("s3:PutObject",)


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
    # Amazon Managed Prometheus actions on the stack's workspace only (infra/platforms/aws.py `_access_policy`).
    workspace_actions: tuple[str, ...] = ()
    boot_commands: tuple[str, ...] = ()  # run after packages and secrets, before the services start
    directories: tuple[Directory, ...] = ()  # converged after the packages that create them

    @property
    def secret_names(self) -> tuple[str, ...]:
        """The SSM names (under /betting/<env>/) this host reads: its IAM grant, exactly."""
        names = {s.parameter_name for s in self.secret_files}
        names.update(name for env in self.secret_environments for _, name in env.variables)
        names.update(name for file in self.files for _, name in file.parameters)
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
        Ingress("etcd", Ports.ETCD_CLIENT, ("etcd",), "etcd clients: a new member's agent asking and joining the cluster"),
        Ingress("etcd", Ports.ETCD_PEER, ("etcd",), "etcd peers"),
        Ingress("postgres", Ports.POSTGRES, ("postgres", "clients"), "PostgreSQL: replication, clients"),
        Ingress("postgres", Ports.PATRONI_API, ("postgres", "monitoring"),
                "Patroni REST API: members, HAProxy's health checks (/primary, /replica), /metrics"),
        Ingress("postgres", Ports.POSTGRES_EXPORTER, scrape, "postgres_exporter"),
        # The client path: the load balancer keeps the client's address, so the clients' group is a source too.
        Ingress("postgres", Ports.HAPROXY_PRIMARY, ("postgres-lb", "clients"), "HAProxy writer port, to the leader"),
        Ingress("postgres", Ports.HAPROXY_REPLICAS, ("postgres-lb", "clients"), "HAProxy reader port, to the replicas"),
        Ingress("postgres", Ports.HAPROXY_STATS, ("postgres-lb", "monitoring"),
                "HAProxy: the load balancer's health checks (/health/writer, /health/reader), /metrics"),
        Ingress("postgres", Ports.PGBOUNCER, ("postgres",), "PgBouncer: every node's HAProxy"),
        Ingress("postgres", Ports.PGBOUNCER_EXPORTER, scrape, "PgBouncer's exporter"),
        Ingress("postgres-lb", Ports.HAPROXY_PRIMARY, ("clients",), "writes, routed to the leader"),
        Ingress("postgres-lb", Ports.HAPROXY_REPLICAS, ("clients",), "reads, routed to the replicas"),
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
    if settings.patroni.nodes > 1:
        rules.append(Ingress("postgres", Ports.PGBACKREST_TLS, ("postgres",),
                             "pgBackRest TLS server: a backup taken on a standby starts and stops on the primary"))
    rules += [
        Ingress(role, Ports.NODE_EXPORTER, scrape, "node_exporter")
        for role in ("etcd", "postgres", "clickhouse", "monitoring", "grafana")
    ]
    return tuple(rules)


def tls_files(topology: Topology, host: Host, reloads: tuple[tuple[str, str], ...] = ()) -> tuple[SecretFile, ...]:
    """The host's TLS identity (infra/pki.py): the CA certificate, readable by every user (HAProxy, clients on the
    host), the host's key and certificate, its role's daemons' alone (`reloads`: the units that serve them), and the
    exporters' copy of that pair, prometheus' alone. The copy reloads nothing: node_exporter, postgres_exporter and
    redis_exporter load the pair at every TLS handshake. A ClickHouse host's pair is the exporters' only."""
    ident = pki.identity(topology, host)
    files = [SecretFile(pki.CA_CERT, "root:root", "0444", parameter=pki.CA_CERT_PARAMETER, reloads=reloads)]
    if owner := pki.KEY_OWNERS.get(host.role):
        files += [SecretFile(pki.HOST_KEY, owner, "0400", parameter=ident.key_parameter, reloads=reloads),
                  SecretFile(pki.HOST_CERT, owner, "0444", parameter=ident.cert_parameter, reloads=reloads)]
    files += [SecretFile(pki.EXPORTER_KEY, pki.EXPORTER_OWNER, "0400", parameter=ident.key_parameter),
              SecretFile(pki.EXPORTER_CERT, pki.EXPORTER_OWNER, "0444", parameter=ident.cert_parameter)]
    return tuple(files)


def env_file(variables: dict[str, str]) -> bytes:
    """A systemd EnvironmentFile; values double-quoted with systemd's escapes."""
    lines = []
    for key, value in variables.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{escaped}"')
    return ("\n".join(lines) + "\n").encode()


def shell_args(args: tuple[str, ...] | list[str]) -> str:
    """Command-line arguments as one shell-quoted string (an ARGS= value in /etc/default)."""
    return " ".join(shlex.quote(a) for a in args)


def node_exporter_files() -> tuple[File, ...]:
    """node_exporter's flags, serving TLS with the exporters' web config (also postgres_exporter's), and that file."""
    return (
        File(
            "/etc/default/prometheus-node-exporter",
            # The listen address is Debian's default, said explicitly so the sandbox can map it.
            env_file({"ARGS": f"--collector.textfile.directory={Paths.NODE_EXPORTER_TEXTFILE_DIR} --collector.systemd "
                              f"--web.listen-address=:{Ports.NODE_EXPORTER} {shell_args(exporter_server_flags())}"}),
        ),
        File(Paths.EXPORTER_WEB_CONFIG, exporter_web_config().encode()),
    )


def place(rendered: dict[str, bytes], locations: dict[str, str], owner: str = "root:root", mode: str = "0644") -> list[File]:
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


BASE_PACKAGES = ("awscli", "chrony", "prometheus-node-exporter", "xfsprogs")
