"""What the sandbox changes in a host's bundle: names, ports and paths, nothing else.

Each sandbox host has its own root folder: the host's /etc, /var, /run and /tmp live under it,
while /usr, /lib and /bin are this machine's (the daemons are Debian's own binaries). A file's
bytes change only in the literal tokens of `host_mapping` (DNS name:port and listen addresses ->
127.0.0.1:port, the few declared exceptions below) and in host paths, which move under the
host's root. `map_bytes` does both in one pass; the tests check that every byte between the
replaced tokens is the rendered byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from infra.hosts.system import CHRONY_UNIT, POSTGRES_HOST_UNITS
from infra.render import haproxy, pgbouncer
from infra.render.patroni import UNIX_SOCKET_DIR
from infra.render.pgbackrest import PGBACKREST_BIN, TLS_SERVER_ADDRESS, members
from infra.render.tuning import stack_tuning
from infra.settings import StackSettings
from infra.topology import Host, Paths, Ports, Topology

LOOPBACK = "127.0.0.1"
DEFAULT_PORT_BASE = 25000
# The roles whose hosts the sandbox runs (ClickHouse and Grafana have no Debian package here).
SANDBOX_ROLES = ("etcd", "postgres", "monitoring")

# The only replacements that are not a host, a port or a path, each with its reason.
# There is no S3 and no instance role on a laptop: unless the sandbox is given an S3 endpoint
# (SandboxS3), the pgBackRest binary is mapped to /bin/false so WAL archiving and restores from the
# repository fail at once (never hang on the instance-metadata endpoint); Patroni then clones replicas
# with its basebackup fallback, and the post_bootstrap script only warns that it made no stanza.
NO_S3_BIN = "/bin/false"
# No /dev/watchdog here: "required" would keep every node from taking the leader lock.
WATCHDOG_REQUIRED = b"  mode: required\n"
WATCHDOG_AUTOMATIC = b"  mode: automatic\n"
# The sandbox's Redis is a plain local redis-server: no TLS and no AUTH (ElastiCache has both).
PLAIN_REDIS_SCHEME = "redis://"
# Every sandbox host shares this machine's kernel and clock: their units never start here (no sysctl applied to
# this machine, no transparent-huge-page switch, no chronyd setting its clock); their files are still written.
SHARED_MACHINE_UNITS = (CHRONY_UNIT, *POSTGRES_HOST_UNITS)
# ... and its memory: each PostgreSQL keeps PostgreSQL's default shared_buffers (a quarter of a prod host's
# memory, three times over, may be more than this machine has), and takes huge pages only if there are any
# (`try`: no sysctl reserves them here).
SANDBOX_SHARED_BUFFERS = "128MB"
SANDBOX_HUGE_PAGES = "try"

# Where a path starts (not inside a longer path or a URL), these folders are the host's own.
HOST_FOLDERS = ("/etc/", "/var/", "/run/", "/tmp/")
_HOST_PATH = re.compile(rb"(?<![\w.~/])(?:" + b"|".join(re.escape(f.encode()) for f in HOST_FOLDERS) + rb")")
# Rule files name the hosts' mount points as label values of queries, not as paths of this host.
UNROOTED_FILES = (Paths.PROMETHEUS_RULES_DIR + "/",)


@dataclass(frozen=True)
class SandboxS3:
    """An S3-compatible endpoint on loopback (tests and the bench: moto over TLS, see infra/sandbox/s3.py).

    With it, pgBackRest and the backup script run for real against it. What differs from AWS is declared
    here and nowhere else: the endpoint's address and certificate authority, path-style URIs (no bucket
    DNS names on loopback), and credentials from the environment (AWS_*, PGBACKREST_REPO1_S3_KEY*) where
    a host has its instance role."""

    port: int
    ca_file: str
    access_key_id: str
    secret_access_key: str
    host: str = LOOPBACK

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        """What every process of a PostgreSQL host gets in place of the instance role's credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_CA_BUNDLE": self.ca_file,  # boto3: the endpoint's test certificate
            "PGBACKREST_REPO1_S3_KEY": self.access_key_id, "PGBACKREST_REPO1_S3_KEY_SECRET": self.secret_access_key,
        }


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

    def pgbackrest_server(self, node: Host) -> int:
        return self.port_base + 51 + node.index  # 52-60: redis is 51, prometheus from 61

    @property
    def redis(self) -> int:
        return self.port_base + 51

    # Each monitoring host runs Prometheus, Alertmanager (clustered) and a redis_exporter.
    def prometheus(self, host: Host) -> int:
        return self.port_base + 60 + host.index

    def alertmanager(self, host: Host) -> int:
        return self.port_base + 65 + host.index

    def alertmanager_cluster(self, host: Host) -> int:
        return self.port_base + 70 + host.index

    def redis_exporter(self, host: Host) -> int:
        return self.port_base + 75 + host.index

    def node_exporter(self, host: Host, topology: Topology) -> int:
        """Every host runs its own: etcd 81-85, PostgreSQL 86-94, monitoring 95-97 (adding a host moves no other)."""
        return self.port_base + {"etcd": 80, "postgres": 85, "monitoring": 94}[host.role] + host.index

    # The client path on every PostgreSQL node: 100-149, past the node_exporters.
    def haproxy_stats(self, node: Host) -> int:
        return self.port_base + 100 + node.index

    def pgbouncer_exporter(self, node: Host) -> int:
        return self.port_base + 110 + node.index

    def pgbouncer(self, node: Host) -> int:
        return self.port_base + 120 + node.index

    def haproxy_primary(self, node: Host) -> int:
        """A node's writer port: every node's forwards to the leader (the load balancer's targets)."""
        return self.port_base + 130 + node.index

    def haproxy_replicas(self, node: Host) -> int:
        return self.port_base + 140 + node.index

    def host_ports(self, host: Host, topology: Topology) -> dict[int, int]:
        """{port on the host: port in the sandbox} of the daemons a host runs."""
        ports = {Ports.NODE_EXPORTER: self.node_exporter(host, topology)}
        if host.role == "etcd":
            ports.update({Ports.ETCD_CLIENT: self.etcd_client(host), Ports.ETCD_PEER: self.etcd_peer(host)})
        elif host.role == "postgres":
            ports.update({Ports.POSTGRES: self.postgres(host), Ports.PATRONI_API: self.patroni(host),
                          Ports.POSTGRES_EXPORTER: self.postgres_exporter(host),
                          Ports.PGBACKREST_TLS: self.pgbackrest_server(host),
                          Ports.HAPROXY_STATS: self.haproxy_stats(host), Ports.PGBOUNCER_EXPORTER: self.pgbouncer_exporter(host),
                          Ports.PGBOUNCER: self.pgbouncer(host), Ports.HAPROXY_PRIMARY: self.haproxy_primary(host),
                          Ports.HAPROXY_REPLICAS: self.haproxy_replicas(host)})
        elif host.role == "monitoring":
            ports.update({Ports.PROMETHEUS: self.prometheus(host), Ports.ALERTMANAGER: self.alertmanager(host),
                          Ports.ALERTMANAGER_CLUSTER: self.alertmanager_cluster(host),
                          Ports.REDIS_EXPORTER: self.redis_exporter(host)})
        return ports

    def ports(self, topology: Topology) -> list[int]:
        hosts = [h for h in topology.hosts if h.role in SANDBOX_ROLES]
        return sorted({p for h in hosts for p in self.host_ports(h, topology).values()} | {self.redis})

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
        # Shared and short: a Unix socket path is limited to 107 bytes.
        return self.state_dir / "run"

    def host_root(self, host: Host) -> Path:
        return self.state_dir / "hosts" / host.name

    def host_path(self, host: Host, path: str) -> Path:
        return self.host_root(host) / path.lstrip("/")

    def data_dir(self, node: Host) -> Path:
        return self.host_path(node, Paths.POSTGRES_DATA)


def _pgbackrest_pairs(layout: Layout, topology: Topology, host: Host, region: str, s3: SandboxS3 | None) -> dict[str, str]:
    """pgbackrest.conf names its members by option (pgN-host=, pgN-port=, pgN-path=), not as name:port."""
    pairs = {}
    for index, member in members(topology, host):
        pg = f"pg{index}"
        pairs[f"{pg}-port={Ports.POSTGRES}"] = f"{pg}-port={layout.postgres(member)}"
        # A member's data directory is under that member's root: its TLS server opens the files pgN-path names.
        pairs[f"{pg}-path={Paths.POSTGRES_DATA}"] = f"{pg}-path={layout.data_dir(member)}"
        if member.name != host.name:
            pairs[f"{pg}-host={member.fqdn}"] = f"{pg}-host={LOOPBACK}"
            pairs[f"{pg}-host-port={Ports.PGBACKREST_TLS}"] = f"{pg}-host-port={layout.pgbackrest_server(member)}"
    pairs[f"tls-server-address={TLS_SERVER_ADDRESS}"] = f"tls-server-address={LOOPBACK}"
    pairs[f"tls-server-port={Ports.PGBACKREST_TLS}"] = f"tls-server-port={layout.pgbackrest_server(host)}"
    # The host's own programs that its daemons run by absolute path (Patroni's post_bootstrap, the backup
    # unit's ExecStart, the PgBouncer exporter's) are its copies, under its root.
    for program in (Paths.POST_BOOTSTRAP, Paths.BACKUP_LIB, Paths.PGBOUNCER_EXPORTER):
        pairs[program] = str(layout.host_path(host, program))
    if s3 is None:
        pairs[PGBACKREST_BIN] = NO_S3_BIN
    else:
        if not region:
            raise ValueError("an S3 endpoint in the sandbox needs the stack's region (the endpoint it stands for)")
        endpoint = f"s3.{region}.amazonaws.com"
        pairs[f"repo1-s3-endpoint={endpoint}\n"] = (
            f"repo1-s3-endpoint={endpoint}\nrepo1-storage-host={s3.host}\nrepo1-storage-port={s3.port}\n"
            f"repo1-storage-ca-file={s3.ca_file}\nrepo1-s3-uri-style=path\n")
        pairs["repo1-s3-key-type=auto"] = "repo1-s3-key-type=shared"
        pairs[f"https://{endpoint}"] = s3.url  # the backup script's boto3 endpoint
    return pairs


def _memory_pairs(settings: StackSettings) -> dict[str, str]:
    """The host-memory parameters of patroni.yml, as rendered -> the sandbox's (see SANDBOX_SHARED_BUFFERS)."""
    local = stack_tuning(settings).local

    def line(key: str, value) -> str:  # the line exactly as patroni.yml renders it
        return yaml.safe_dump({key: value})

    pairs = {line("shared_buffers", local["shared_buffers"]): line("shared_buffers", SANDBOX_SHARED_BUFFERS)}
    if local["huge_pages"] != "off":
        pairs[line("huge_pages", local["huge_pages"])] = line("huge_pages", SANDBOX_HUGE_PAGES)
    return pairs


def _client_path_pairs(layout: Layout, topology: Topology, host: Host) -> dict[str, str]:
    """HAProxy, PgBouncer and its exporter name some addresses apart from `name:port`."""
    pairs = {
        # HAProxy: each server's health-check port follows its address (`NAME:6432 check port 8008`), and the
        # name its check verifies Patroni's certificate by is apart too (`verifyhost NAME`).
        **{haproxy.server_address(node): f"{LOOPBACK}:{layout.pgbouncer(node)} check port {layout.patroni(node)}"
           for node in topology.postgres},
        **{haproxy.check_name(node): f"verifyhost {LOOPBACK}" for node in topology.postgres},
        # pgbouncer.ini: its listen address and port are two settings.
        f"listen_addr = {pgbouncer.LISTEN_ADDRESS}": f"listen_addr = {LOOPBACK}",
        f"listen_port = {Ports.PGBOUNCER}": f"listen_port = {layout.pgbouncer(host)}",
    }
    # A server on the local socket (PgBouncer's PostgreSQL, the exporter's PgBouncer): the socket folder is shared
    # here, so the port tells the hosts' servers apart.
    for port, mapped in layout.host_ports(host, topology).items():
        pairs[pgbouncer.socket_address(port)] = f"host={layout.socket_dir} port={mapped}"
        pairs[pgbouncer.socket_query(port)] = f"host={layout.socket_dir}&port={mapped}"  # postgres_exporter's URI
    return pairs


def _unrun_scrape_targets(topology: Topology) -> dict[str, str]:
    """prometheus.yml's scrape entries whose targets the sandbox does not run (ClickHouse, Grafana, the application):
    each entry's text, exactly as rendered, -> nothing. Nothing is then scraped for them, so no `up` series exists
    and no rule fires for a service that is not there (a job left with no entry scrapes nothing)."""
    from infra.render.prometheus import _dump, scrape_configs

    run = {h.fqdn for h in topology.hosts if h.role in SANDBOX_ROLES}
    pairs = {}
    for job in scrape_configs(topology):
        for entry in job.get("static_configs", []):
            if any(target.rsplit(":", 1)[0] in run for target in entry["targets"]):
                continue
            # The entry as it sits in the file: the lines after `scrape_configs:`, `- job_name:`, `static_configs:`.
            text = _dump({"scrape_configs": [{"job_name": job["job_name"], "static_configs": [entry]}]}).decode()
            pairs["\n".join(text.split("\n")[3:])] = ""
    return pairs


def _allowlist_pairs(topology: Topology) -> dict[str, str]:
    """patroni.yml's restapi.allowlist names hosts alone (no port), one YAML list entry each."""
    return {f"- {h.fqdn}\n": f"- {LOOPBACK}\n" for h in (*topology.postgres, *topology.monitoring)}


def _unsent_remote_write(settings: StackSettings) -> dict[str, str]:
    """The sandbox has no AMP workspace (and no AWS credentials to sign for one): prometheus.yml's remote_write
    section, the file's last, exactly as rendered -> nothing. tests/monitoring/test_managed_prometheus_live.py runs
    the section against a local receiver instead."""
    from infra.render.managed_prometheus import remote_write
    from infra.render.prometheus import _dump

    remote = remote_write(settings)
    return {_dump({"remote_write": remote}).decode(): ""} if remote else {}


def host_mapping(layout: Layout, topology: Topology, host: Host, s3: SandboxS3 | None = None,
                 region: str = "", settings: StackSettings | None = None) -> dict[bytes, bytes]:
    """The literal tokens of `host`'s files: every host's DNS name:port, this host's listen addresses
    (and with `settings`, a PostgreSQL host's memory parameters)."""
    pairs: dict[str, str] = {}
    for other in topology.hosts:
        if other.role in SANDBOX_ROLES:
            for port, mapped in layout.host_ports(other, topology).items():
                pairs[f"{other.fqdn}:{port}"] = f"{LOOPBACK}:{mapped}"
    for port, mapped in layout.host_ports(host, topology).items():
        for listen in (f"0.0.0.0:{port}", f"{LOOPBACK}:{port}"):
            pairs[listen] = f"{LOOPBACK}:{mapped}"
        pairs[f"-address=:{port}"] = f"-address={LOOPBACK}:{mapped}"  # exporters' --web.listen-address=:PORT
    if host.role == "postgres":
        pairs.update(_pgbackrest_pairs(layout, topology, host, region, s3))
        if settings is not None:
            pairs.update(_memory_pairs(settings))
        pairs.update(_client_path_pairs(layout, topology, host))
        pairs.update(_allowlist_pairs(topology))
    else:
        pairs[PGBACKREST_BIN] = NO_S3_BIN
    if host.role == "monitoring":
        pairs.update(_unrun_scrape_targets(topology))
        if settings is not None:
            pairs.update(_unsent_remote_write(settings))
        # The aggregates job's writer endpoint (the load balancer's name, which the sandbox has not): the first node's
        # HAProxy writer port, which forwards to the leader's PgBouncer as the load balancer's target would.
        pairs[f"host={topology.postgres_primary_endpoint} port={Ports.HAPROXY_PRIMARY}"] = (
            f"host={LOOPBACK} port={layout.haproxy_primary(topology.postgres[0])}")
    pairs[f"rediss://{topology.redis_endpoint}:{Ports.REDIS}"] = f"{PLAIN_REDIS_SCHEME}{LOOPBACK}:{layout.redis}"
    pairs[UNIX_SOCKET_DIR] = str(layout.socket_dir)
    mapping = {k.encode(): v.encode() for k, v in pairs.items()}
    mapping[WATCHDOG_REQUIRED] = WATCHDOG_AUTOMATIC
    return mapping


def redis_mapping(layout: Layout) -> dict[bytes, bytes]:
    """redis.conf (no host of ours runs Redis: on AWS it is ElastiCache)."""
    from infra.render.redis import REDIS_DATA_DIR

    pairs = {
        "bind 0.0.0.0": f"bind {LOOPBACK}",
        f"port {Ports.REDIS}": f"port {layout.redis}",
        f"dir {REDIS_DATA_DIR}": f"dir {layout.state_dir / 'redis'}",
    }
    return {k.encode(): v.encode() for k, v in pairs.items()}


def _pattern(keys) -> re.Pattern[bytes]:
    # Longest first, so a token never matches inside a longer one that is also mapped; host
    # folders last, so an explicit path (the socket dir) wins over its folder.
    literal = b"|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
    return re.compile(literal + (b"|" if literal else b"") + _HOST_PATH.pattern)


def map_bytes(content: bytes, mapping: dict[bytes, bytes], root: Path | None = None) -> bytes:
    """Replace every mapped token in one pass, and put host paths under `root`; every other byte stays."""
    if not mapping and root is None:
        return content
    prefix = str(root).encode() if root is not None else None

    def replace(match: re.Match[bytes]) -> bytes:
        token = match.group(0)
        if token in mapping:
            return mapping[token]
        # A path already under the root (a file mapped before) stays as it is: mapping twice changes nothing.
        if prefix is None or content.startswith(prefix, match.start()):
            return token
        return prefix + token

    return _pattern(mapping).sub(replace, content)


def map_file(layout: Layout, topology: Topology, host: Host, path: str, content: bytes,
             s3: SandboxS3 | None = None, region: str = "", settings: StackSettings | None = None) -> bytes:
    root = None if path.startswith(UNROOTED_FILES) else layout.host_root(host)
    return map_bytes(content, host_mapping(layout, topology, host, s3, region, settings), root)


def unmapped_parts(content: bytes, tokens, with_paths: bool = False) -> list[bytes]:
    """The bytes between occurrences of `tokens` (and of host folders): what a mapping must leave untouched."""
    if with_paths:
        return _pattern(tokens).split(content)
    if not tokens:
        return [content]
    return re.compile(b"|".join(re.escape(k) for k in sorted(tokens, key=len, reverse=True))).split(content)
