"""What the sandbox changes in a rendered file: hosts, ports and paths, nothing else.

Every rendered file is run as rendered except for the literal replacements that
`file_mapping` lists (DNS name:port -> 127.0.0.1:port, host paths -> paths under the state
dir). `map_bytes` applies them in one pass; the tests check that the bytes between the
replaced tokens are identical to the rendered file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from infra.render.patroni import PGPASS, UNIX_SOCKET_DIR
from infra.render.pgbackrest import PGBACKREST_BIN
from infra.render.redis import REDIS_DATA_DIR
from infra.topology import Host, Paths, Ports, Topology

LOOPBACK = "127.0.0.1"
DEFAULT_PORT_BASE = 25000

# The only replacements that are not a host, a port or a path, each with its reason.
# There is no S3 and no instance role on a laptop: the pgBackRest binary is mapped to
# /bin/false so WAL archiving and restores from the repository fail at once (never hang on the
# instance-metadata endpoint); Patroni then clones replicas with its basebackup fallback.
NO_S3_BIN = "/bin/false"
# No /dev/watchdog here: "required" would keep every node from taking the leader lock.
WATCHDOG_REQUIRED = b"  mode: required\n"
WATCHDOG_AUTOMATIC = b"  mode: automatic\n"


@dataclass(frozen=True)
class Layout:
    """Ports and paths of one sandbox: every port is port_base + a fixed offset, all on 127.0.0.1."""

    state_dir: Path
    port_base: int = DEFAULT_PORT_BASE

    def etcd_client(self, member: Host) -> int:
        return self.port_base + member.index

    def etcd_peer(self, member: Host) -> int:
        return self.port_base + 10 + member.index

    def postgres(self, node: Host) -> int:
        return self.port_base + 20 + node.index

    def patroni(self, node: Host) -> int:
        return self.port_base + 30 + node.index

    def postgres_exporter(self, node: Host) -> int:
        return self.port_base + 40 + node.index

    @property
    def redis(self) -> int:
        return self.port_base + 51

    @property
    def node_exporter(self) -> int:
        return self.port_base + 53

    # Each monitoring host runs Prometheus, Alertmanager (clustered) and a redis_exporter.
    def prometheus(self, host: Host) -> int:
        return self.port_base + 60 + host.index

    def alertmanager(self, host: Host) -> int:
        return self.port_base + 65 + host.index

    def alertmanager_cluster(self, host: Host) -> int:
        return self.port_base + 70 + host.index

    def redis_exporter(self, host: Host) -> int:
        return self.port_base + 75 + host.index

    def ports(self, topology: Topology) -> list[int]:
        etcd = [p for m in topology.etcd for p in (self.etcd_client(m), self.etcd_peer(m))]
        pg = [p for n in topology.postgres for p in (self.postgres(n), self.patroni(n), self.postgres_exporter(n))]
        monitoring = [
            p for h in topology.monitoring
            for p in (self.prometheus(h), self.alertmanager(h), self.alertmanager_cluster(h), self.redis_exporter(h))
        ]
        return etcd + pg + monitoring + [self.redis, self.node_exporter]

    # Paths under the state dir.
    @property
    def config_dir(self) -> Path:
        return self.state_dir / "config"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def socket_dir(self) -> Path:
        return self.state_dir / "run"

    def node_dir(self, node: Host) -> Path:
        return self.state_dir / node.name

    def data_dir(self, node: Host) -> Path:
        return self.node_dir(node) / "data"

    def pgbackrest_config(self, node: Host) -> Path:
        return self.config_dir / "pgbackrest" / f"{node.name}.conf"


def _etcd_clients(layout: Layout, topology: Topology) -> dict[str, str]:
    return {f"{m.fqdn}:{Ports.ETCD_CLIENT}": f"{LOOPBACK}:{layout.etcd_client(m)}" for m in topology.etcd}


def patroni_mapping(layout: Layout, topology: Topology, node: Host) -> dict[bytes, bytes]:
    pairs = {
        f"0.0.0.0:{Ports.PATRONI_API}": f"{LOOPBACK}:{layout.patroni(node)}",
        f"{node.fqdn}:{Ports.PATRONI_API}": f"{LOOPBACK}:{layout.patroni(node)}",
        f"0.0.0.0:{Ports.POSTGRES}": f"{LOOPBACK}:{layout.postgres(node)}",
        f"{node.fqdn}:{Ports.POSTGRES}": f"{LOOPBACK}:{layout.postgres(node)}",
        **_etcd_clients(layout, topology),
        Paths.POSTGRES_DATA: str(layout.data_dir(node)),
        PGPASS: str(layout.node_dir(node) / "pgpass"),
        UNIX_SOCKET_DIR: str(layout.socket_dir),
        Paths.PGBACKREST_CONFIG: str(layout.pgbackrest_config(node)),
        PGBACKREST_BIN: NO_S3_BIN,
    }
    mapping = {k.encode(): v.encode() for k, v in pairs.items()}
    mapping[WATCHDOG_REQUIRED] = WATCHDOG_AUTOMATIC
    return mapping


def pgbackrest_mapping(layout: Layout, node: Host) -> dict[bytes, bytes]:
    pairs = {
        Paths.POSTGRES_DATA: str(layout.data_dir(node)),
        f"pg1-port={Ports.POSTGRES}": f"pg1-port={layout.postgres(node)}",
        UNIX_SOCKET_DIR: str(layout.socket_dir),
        "/var/spool/pgbackrest": str(layout.node_dir(node) / "pgbackrest-spool"),
        "/var/log/pgbackrest": str(layout.log_dir),
        "/tmp/pgbackrest": str(layout.node_dir(node) / "pgbackrest-lock"),
    }
    return {k.encode(): v.encode() for k, v in pairs.items()}


def etcd_mapping(layout: Layout, topology: Topology, member: Host) -> dict[bytes, bytes]:
    pairs = {
        f"0.0.0.0:{Ports.ETCD_PEER}": f"{LOOPBACK}:{layout.etcd_peer(member)}",
        f"0.0.0.0:{Ports.ETCD_CLIENT}": f"{LOOPBACK}:{layout.etcd_client(member)}",
        **{f"{m.fqdn}:{Ports.ETCD_PEER}": f"{LOOPBACK}:{layout.etcd_peer(m)}" for m in topology.etcd},
        **_etcd_clients(layout, topology),
        Paths.ETCD_DATA: str(layout.state_dir / "etcd"),
    }
    return {k.encode(): v.encode() for k, v in pairs.items()}


def redis_mapping(layout: Layout) -> dict[bytes, bytes]:
    pairs = {
        "bind 0.0.0.0": f"bind {LOOPBACK}",
        f"port {Ports.REDIS}": f"port {layout.redis}",
        f"dir {REDIS_DATA_DIR}": f"dir {layout.state_dir / 'redis'}",
    }
    return {k.encode(): v.encode() for k, v in pairs.items()}


def monitoring_mapping(layout: Layout, topology: Topology, host: Host | None = None) -> dict[bytes, bytes]:
    """prometheus.yml, its rules, alertmanager.yml and their flags.

    Every host's node_exporter is the sandbox's one node_exporter (they all are this machine).
    Services the sandbox does not run (Grafana, ClickHouse, the application) keep their names.
    """
    pairs = {
        **{f"{h.fqdn}:{Ports.NODE_EXPORTER}": f"{LOOPBACK}:{layout.node_exporter}" for h in topology.hosts},
        **{f"{n.fqdn}:{Ports.POSTGRES_EXPORTER}": f"{LOOPBACK}:{layout.postgres_exporter(n)}" for n in topology.postgres},
        **{f"{n.fqdn}:{Ports.PATRONI_API}": f"{LOOPBACK}:{layout.patroni(n)}" for n in topology.postgres},
        **_etcd_clients(layout, topology),
        **{f"{h.fqdn}:{Ports.PROMETHEUS}": f"{LOOPBACK}:{layout.prometheus(h)}" for h in topology.monitoring},
        **{f"{h.fqdn}:{Ports.ALERTMANAGER}": f"{LOOPBACK}:{layout.alertmanager(h)}" for h in topology.monitoring},
        **{f"{h.fqdn}:{Ports.ALERTMANAGER_CLUSTER}": f"{LOOPBACK}:{layout.alertmanager_cluster(h)}" for h in topology.monitoring},
        **{f"{h.fqdn}:{Ports.REDIS_EXPORTER}": f"{LOOPBACK}:{layout.redis_exporter(h)}" for h in topology.monitoring},
        Paths.PROMETHEUS_CONFIG: str(layout.config_dir / "prometheus" / "prometheus.yml"),
        Paths.PROMETHEUS_RULES_DIR: str(layout.config_dir / "prometheus" / "rules"),
        Paths.ALERTMANAGER_CONFIG: str(layout.config_dir / "alertmanager" / "alertmanager.yml"),
        Paths.SECRETS_DIR: str(layout.secrets_dir),
    }
    if host is not None:
        # Flags of one monitoring host: its own listen addresses and data folders.
        pairs.update({
            f"0.0.0.0:{Ports.PROMETHEUS}": f"{LOOPBACK}:{layout.prometheus(host)}",
            f"0.0.0.0:{Ports.ALERTMANAGER}": f"{LOOPBACK}:{layout.alertmanager(host)}",
            f"0.0.0.0:{Ports.ALERTMANAGER_CLUSTER}": f"{LOOPBACK}:{layout.alertmanager_cluster(host)}",
            Paths.ALERTMANAGER_DATA: str(layout.state_dir / host.name / "alertmanager"),
            Paths.PROMETHEUS_DATA: str(layout.state_dir / host.name / "prometheus"),
        })
    return {k.encode(): v.encode() for k, v in pairs.items()}


def _pattern(keys) -> re.Pattern[bytes]:
    # Longest first, so a path never matches inside a longer one that is also mapped.
    return re.compile(b"|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True)))


def map_bytes(content: bytes, mapping: dict[bytes, bytes]) -> bytes:
    """Replace every mapped token in one pass; every other byte stays as rendered."""
    if not mapping:
        return content
    return _pattern(mapping).sub(lambda match: mapping[match.group(0)], content)


def unmapped_parts(content: bytes, tokens) -> list[bytes]:
    """The bytes between occurrences of `tokens` (what a mapping must leave untouched)."""
    return _pattern(tokens).split(content)
