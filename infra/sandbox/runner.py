"""Run a stack's hosts as processes on 127.0.0.1: each etcd, PostgreSQL and monitoring host of
the topology is started by the host agent (infra/hostagent/agent.py) applying that host's
bundle, exactly as on EC2; only the platform differs (infra/sandbox/platform.py: the host's files
under its own root, Debian's units run as processes). Redis, which is ElastiCache on AWS, runs
as a plain redis-server. No Docker, no Pulumi CLI.

What the sandbox changes in a bundle is infra/sandbox/mapping.py (names, ports and paths) plus
the services it was asked to run (`services`). PostgreSQL refuses root: as root the units run as
their `User=` (postgres, etcd, prometheus), as Debian runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import requests

from infra.bundle import bundle_document
from infra.components.rollout import ROLE_ORDER
from infra.hostagent import agent
from infra.hosts import host_specs
from infra.render.patroni import RESTAPI_USERNAME, SUPERUSER
from infra.render.redis import render_redis
from infra.sandbox import mapping as m
from infra.sandbox.monitoring import PLACEHOLDER_SECRETS
from infra.sandbox.platform import SandboxHost, SecretStore, process_name
from infra.settings import StackSettings
from infra.topology import Host, SecretNames, Topology, build_topology

ALL_SERVICES = ("postgres", "redis", "exporters", "monitoring")
# Which group of `services` each unit belongs to; etcd always runs (Patroni's DCS).
UNIT_GROUPS = {
    "etcd": None,
    "patroni": "postgres",
    "pgbackrest": "postgres",  # the TLS server, only with an S3 endpoint (SandboxS3): it has no other use
    # The client path on every PostgreSQL node: what the writer and reader endpoints need.
    "pgbouncer": "postgres",
    "haproxy": "postgres",
    "prometheus-postgres-exporter": "exporters",
    "betting-pgbouncer-exporter": "exporters",
    "prometheus-node-exporter": "exporters",
    "prometheus-redis-exporter": "exporters",
    "prometheus": "monitoring",
    "prometheus-alertmanager": "monitoring",
}
STATE_FILE = "sandbox.json"
POSTGRES_USER = "postgres"
PATRONI_BIN = "/usr/bin/patroni"
# The sandbox's fixed values; every other secret it generates (SecretStore). The REST API's user name is the
# program's own (infra/components/patroni.py stores the same).
SANDBOX_PLACEHOLDERS = {**PLACEHOLDER_SECRETS, SecretNames.PATRONI_RESTAPI_USERNAME: RESTAPI_USERNAME}


class SandboxError(RuntimeError):
    pass


@dataclass(frozen=True)
class Proc:
    name: str
    pid: int
    exe: str


def _alive(pid: int, exe: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie is dead for our purposes; the exe check guards against a recycled pid.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and exe.encode() in cmdline


def port_open(port: int, host: str = m.LOOPBACK, timeout: float = 0.2) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def wait_for(what: str, check, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - any failure means "not yet"
            last_error = error
        time.sleep(interval)
    raise SandboxError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last_error})" if last_error else ""))


class Sandbox:
    def __init__(self, state_dir: Path | str, port_base: int = m.DEFAULT_PORT_BASE, settings: StackSettings | None = None,
                 s3: m.SandboxS3 | None = None):
        """`settings` only to inspect files before `up`; a running sandbox remembers its own.

        `s3`: an S3-compatible endpoint for pgBackRest and the backup job (else pgBackRest is /bin/false)."""
        self.layout = m.Layout(Path(state_dir).resolve(), port_base)
        self._settings: StackSettings | None = settings
        self._topology: Topology | None = build_topology(settings) if settings else None
        remembered = self._read_state().get("s3")
        self.s3 = s3 if s3 is not None or not remembered else m.SandboxS3(**remembered)

    # ---- state -------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.layout.state_dir / STATE_FILE

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def settings(self) -> StackSettings:
        if self._settings is None:
            state = self._read_state()
            if not state:
                raise SandboxError(f"no sandbox in {self.layout.state_dir}")
            self._settings = StackSettings.model_validate_json(state["settings"])
        return self._settings

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = build_topology(self.settings)
        return self._topology

    def processes(self) -> list[Proc]:
        procs = []
        for pid_file in sorted(self.layout.pid_dir.glob("*.pid")) if self.layout.pid_dir.exists() else []:
            pid, exe = pid_file.read_text().split("\n", 1)
            procs.append(Proc(pid_file.stem, int(pid), exe.strip()))
        return procs

    def running(self) -> dict[str, Proc]:
        return {p.name: p for p in self.processes() if _alive(p.pid, p.exe)}

    @property
    def services(self) -> set[str]:
        """The service groups this sandbox was asked to run (what it deploys)."""
        return set(self._read_state().get("services", []))

    def secret(self, name: str) -> str:
        return (self.layout.secrets_dir / name).read_text().strip()

    def monitoring_session(self) -> requests.Session:
        """A client of the sandbox's Prometheus and Alertmanager: https with the CA, the monitoring credential."""
        from scripts.monitoring_client import session

        return session(self.ca_file, self.secret(SecretNames.MONITORING_PASSWORD))

    # ---- endpoints used by tests, scripts and the bench --------------------------------
    def node(self, name: str) -> Host:
        return next(h for h in self.topology.postgres if h.name == name)

    def patroni_url(self, node: Host) -> str:
        return f"https://{m.LOOPBACK}:{self.layout.patroni(node)}"

    def etcd_url(self, member: Host) -> str:
        return f"https://{m.LOOPBACK}:{self.layout.etcd_client(member)}"

    @property
    def ca_file(self) -> str:
        """The sandbox's CA certificate: what a client on this machine verifies every host's TLS endpoint with
        (PostgreSQL, PgBouncer, Patroni, etcd, Prometheus, Alertmanager); the stack output ca_certificate on AWS."""
        return str(self.secret_store().ca_file())

    def patroni_auth(self) -> tuple[str, str]:
        """The REST API's login for its unsafe endpoints (POST /switchover, PATCH /config...)."""
        return (self.secret_store().get(SecretNames.PATRONI_RESTAPI_USERNAME),
                self.secret_store().get(SecretNames.PATRONI_RESTAPI_PASSWORD))

    def etcd_client_cert(self, host: Host | None = None) -> tuple[str, str]:
        """(certificate, key) a client presents to etcd: a monitoring or PostgreSQL host's pair as that host has it."""
        from infra import pki

        host = host or self.topology.postgres[0]
        self.secret_store().get(pki.identity(self.topology, host).cert_parameter)
        folder = self.layout.secrets_dir / "hosts" / host.name
        return str(folder / "tls_cert"), str(folder / "tls_key")

    def use_agent_clients(self) -> None:
        """The agent's modules, in this process, verifying with the sandbox's CA and logging in to Patroni."""
        agent.patroni.configure(self.ca_file, *self.patroni_auth())
        agent.etcd.configure(self.ca_file, *self.etcd_client_cert())

    def client_tls(self) -> dict[str, str]:
        """libpq's TLS settings for a client of the sandbox's PostgreSQL or PgBouncer: what a client on AWS uses,
        with the sandbox's CA (every host is 127.0.0.1, which its certificate names)."""
        return {"sslmode": "verify-full", "sslrootcert": self.ca_file}

    def dsn(self, node: Host, dbname: str = "postgres") -> str:
        password = self.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD)
        tls = " ".join(f"{key}={value}" for key, value in self.client_tls().items())
        return f"host={m.LOOPBACK} port={self.layout.postgres(node)} user={SUPERUSER} password={password} dbname={dbname} {tls}"

    def postmaster_pid(self, node: Host) -> int | None:
        try:
            pid = int((self.layout.data_dir(node) / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, "postgres") else None

    def patroni_pid(self, node: Host) -> int | None:
        proc = self.running().get(node.name)
        return proc.pid if proc else None

    def cluster(self) -> dict:
        """Patroni's /cluster from the first node that answers."""
        for node in self.topology.postgres:
            try:
                return requests.get(f"{self.patroni_url(node)}/cluster", timeout=1, verify=self.ca_file).json()
            except (requests.RequestException, ValueError):
                continue
        return {"members": []}

    def leader(self) -> Host | None:
        for member in self.cluster().get("members", []):
            if member.get("role") == "leader" and member.get("state") == "running":
                return self.node(member["name"])
        return None

    def client_path_running(self, running: dict[str, Proc] | None = None) -> bool:
        """HAProxy and PgBouncer run on every PostgreSQL host: the writer and reader endpoints work."""
        running = self.running() if running is None else running
        return all(process_name(n.name, unit) in running for n in self.topology.postgres for unit in ("haproxy", "pgbouncer"))

    def writer_url(self, user: str = "USER", dbname: str | None = None) -> str:
        """The writer endpoint as the load balancer would be: every node's HAProxy writer port (libpq tries each
        in turn), and any of them forwards to the leader's PgBouncer."""
        return self._client_url(self.layout.haproxy_primary, user, dbname)

    def reader_url(self, user: str = "USER", dbname: str | None = None) -> str:
        return self._client_url(self.layout.haproxy_replicas, user, dbname)

    def _client_url(self, port, user: str, dbname: str | None) -> str:
        hosts = ",".join(f"{m.LOOPBACK}:{port(node)}" for node in self.topology.postgres)
        return f"postgresql://{user}@{hosts}/{dbname or self.settings.client_path.databases[0]}"

    def endpoints(self) -> dict[str, str]:
        layout, topology = self.layout, self.topology
        points = {f"etcd {e.name}": self.etcd_url(e) for e in topology.etcd}
        for node in topology.postgres:
            points[f"postgres {node.name}"] = f"postgresql://{SUPERUSER}@{m.LOOPBACK}:{layout.postgres(node)}/postgres"
            points[f"patroni {node.name}"] = self.patroni_url(node)
        running = self.running()
        if self.client_path_running(running):
            points["writer"], points["reader"] = self.writer_url(), self.reader_url()
        optional = {"redis": ("redis", f"redis://{m.LOOPBACK}:{layout.redis}")}
        for node in topology.postgres:
            optional[process_name(node.name, "prometheus-postgres-exporter")] = (
                f"postgres_exporter {node.name}", f"https://{m.LOOPBACK}:{layout.postgres_exporter(node)}/metrics")
            optional[process_name(node.name, "haproxy")] = (
                f"haproxy {node.name}", f"http://{m.LOOPBACK}:{layout.haproxy_stats(node)}/metrics")
            optional[process_name(node.name, "betting-pgbouncer-exporter")] = (
                f"pgbouncer_exporter {node.name}", f"http://{m.LOOPBACK}:{layout.pgbouncer_exporter(node)}/metrics")
        for host in topology.monitoring:
            optional[process_name(host.name, "prometheus-redis-exporter")] = (
                f"redis_exporter {host.name}", f"https://{m.LOOPBACK}:{layout.redis_exporter(host)}/metrics")
            optional[process_name(host.name, "prometheus")] = (f"prometheus {host.name}",
                                                               f"https://{m.LOOPBACK}:{layout.prometheus(host)}")
            optional[process_name(host.name, "prometheus-alertmanager")] = (
                f"alertmanager {host.name}", f"https://{m.LOOPBACK}:{layout.alertmanager(host)}")
        for host in self.hosts():
            optional[process_name(host.name, "prometheus-node-exporter")] = (
                f"node_exporter {host.name}", f"https://{m.LOOPBACK}:{layout.node_exporter(host, topology)}/metrics")
        for proc, (label, url) in optional.items():
            if proc in running:
                points[label] = url
        return points

    # ---- hosts -------------------------------------------------------------------------
    def hosts(self) -> list[Host]:
        """The topology's hosts the sandbox runs, in rollout order."""
        return [h for role in ROLE_ORDER if role in m.SANDBOX_ROLES for h in self.topology.hosts if h.role == role]

    def host(self, name: str) -> Host:
        return next(h for h in self.topology.hosts if h.name == name)

    def _process_pid(self, name: str) -> int | None:
        proc = self.running().get(name)
        return proc.pid if proc else None

    def mapping(self, host: Host, topology: Topology | None = None, settings: StackSettings | None = None) -> dict[bytes, bytes]:
        settings = settings or self.settings
        return m.host_mapping(self.layout, topology or self.topology, host, self.s3, settings.region, settings)

    def secret_store(self) -> SecretStore:
        return SecretStore(self.layout.secrets_dir, SANDBOX_PLACEHOLDERS)

    def platform(self, host: Host) -> SandboxHost:
        store = self.secret_store()
        role = self.s3.environment() if self.s3 is not None and host.role == "postgres" else None
        return SandboxHost(self.layout, self.topology, host, store, self._spawn, self._process_pid, self.mapping(host),
                           role)

    def host_bundle(self, host: Host, services: Iterable[str] | None = None, settings: StackSettings | None = None) -> dict:
        """`host`'s bundle as EC2 gets it, with the mapping applied and only the units of `services`."""
        settings = settings or self.settings
        topology = build_topology(settings)
        spec = next(s for s in host_specs(settings, topology) if s.host.name == host.name)
        document = bundle_document(spec, settings, topology)
        groups = set(self.services if services is None else services)
        mapping, root = self.mapping(host, topology, settings), self.layout.host_root(host)
        keep_owners = os.geteuid() == 0  # only root can give files to postgres, etcd, prometheus

        def mapped(value):
            if isinstance(value, str):
                return m.map_bytes(value.encode(), mapping, root).decode()
            if isinstance(value, dict):
                return {k: mapped(v) for k, v in value.items()}
            if isinstance(value, list):
                return [mapped(v) for v in value]
            return value

        for file in document["files"]:
            file["content"] = m.map_file(self.layout, topology, host, file["path"], file["content"].encode(),
                                         self.s3, settings.region, settings).decode()
            file["owner"] = file["owner"] if keep_owners else None
        for secret in document["secret_files"] + document["secret_environments"] + document["directories"]:
            secret["owner"] = secret["owner"] if keep_owners else None
        document["services"] = [
            {"unit": s["unit"], "gate": mapped(s["gate"])} for s in document["services"]
            if s["unit"] in UNIT_GROUPS and s["unit"] not in m.SHARED_MACHINE_UNITS
            and (UNIT_GROUPS[s["unit"]] is None or UNIT_GROUPS[s["unit"]] in groups)
            and (s["unit"] != "pgbackrest" or self.s3 is not None)
        ]
        if "patroni" in document:
            document["patroni"]["api"] = mapped(document["patroni"]["api"])
        if "etcd" in document:  # the other members' client URLs; its env_file is a host path, read through path()
            etcd = document["etcd"]
            etcd["url"] = m.map_bytes(etcd["url"].encode(), mapping).decode()
            etcd["client_urls"] = {name: m.map_bytes(url.encode(), mapping).decode()
                                   for name, url in etcd["client_urls"].items()}
        return document

    def apply(self, host: Host, bundle: dict, gate_timeout: float | None = None) -> agent.Report:
        """What `betting-agent apply` does on `host`: the same function, this host's platform."""
        return agent.apply(bundle, self.platform(host), gate_timeout)

    def roll(self, settings: StackSettings, gate_timeout: float | None = None) -> list[agent.Report]:
        """Apply `settings`' bundles one host at a time in rollout order (what the SSM associations do).

        Stops at the first host whose apply fails (agent.ApplyError names it and the check); the
        hosts after it keep their old bundle. A host the new settings add (more Patroni nodes or
        etcd members) boots in its place in that order, after the members it joins."""
        if settings.stack != self.settings.stack:
            raise SandboxError(f"the sandbox runs stack {self.settings.stack!r}, not {settings.stack!r}")
        topology = build_topology(settings)
        removed = sorted({h.name for h in self.topology.hosts} - {h.name for h in topology.hosts})
        if removed:
            raise SandboxError(f"a roll cannot remove hosts ({', '.join(removed)}); run `infra sandbox down` and `up`")
        busy = [p for p in sorted(set(self.layout.ports(topology)) - set(self.layout.ports(self.topology))) if port_open(p)]
        if busy:
            raise SandboxError(f"ports of the added hosts already in use on {m.LOOPBACK}: {busy}")
        added = [h.name for h in topology.hosts if h not in self.topology.hosts]
        self._topology = topology
        # Added hosts are new instances: they boot by themselves as soon as they exist, while the
        # associations roll the others (whose agents wait for them to join before a restart).
        booting = {name: self.host_bundle(self.host(name), settings=settings) for name in added}
        reports = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            booted = pool.submit(self.boot, {n: b for n, b in booting.items() if b["services"]},
                                 gate_timeout or agent.GATE_TIMEOUT["patroni"])
            try:
                for host in self.hosts():
                    bundle = self.host_bundle(host, settings=settings) if host.name not in added else None
                    if bundle and bundle["services"]:
                        reports.append(self.apply(host, bundle, gate_timeout))
            except BaseException:
                if booted.exception() is not None:  # waits: say why the added hosts failed too
                    print(f"sandbox: the added hosts did not boot: {booted.exception()}", file=sys.stderr, flush=True)
                raise
            added_reports = booted.result()
        reports += [added_reports[name] for name in added if name in added_reports]
        self._settings = settings
        state = self._read_state()
        state["settings"] = settings.model_dump_json()
        self.state_file.write_text(json.dumps(state))
        return reports

    def boot(self, bundles: dict[str, dict], timeout: float) -> dict[str, agent.Report]:
        """Every host applies its bundle at once, as new EC2 instances do at their first boot."""
        failures: list[str] = []
        reports: dict[str, agent.Report] = {}

        def run(host: Host, bundle: dict) -> None:
            try:
                reports[host.name] = self.apply(host, bundle, timeout)
            except agent.ApplyError as error:
                failures.append(str(error))
            except Exception as error:  # noqa: BLE001 - reported with the host, like the agent's own errors
                failures.append(f"{host.name}: {error}")

        threads = [threading.Thread(target=run, args=(self.host(name), bundle), daemon=True)
                   for name, bundle in bundles.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise SandboxError("; ".join(sorted(failures)))
        return reports

    # ---- process control ---------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str], user: str = "", group: str = "",
               cwd: Path | None = None) -> int:
        self.layout.log_dir.mkdir(parents=True, exist_ok=True)
        self.layout.pid_dir.mkdir(parents=True, exist_ok=True)
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={group or user}", "--init-groups", "--", *argv]
        with open(self.layout.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=cwd or self.layout.state_dir, start_new_session=True,
            )
        # What /proc/PID/cmdline must name for the pid to still be ours (setpriv execs the daemon).
        exe = Path(argv[argv.index("--") + 1] if argv[0] == "setpriv" else argv[0]).name
        # Atomically: the hosts boot in parallel threads, each reading the others' pid files.
        pid_file = self.layout.pid_dir / f"{name}.pid"
        pid_file.with_suffix(".tmp").write_text(f"{process.pid}\n{exe}\n")
        pid_file.with_suffix(".tmp").replace(pid_file)
        return process.pid

    def signal_process(self, name: str, sig: int) -> None:
        proc = self.running().get(name)
        if proc:
            os.kill(proc.pid, sig)

    def start_patroni(self, node: Host) -> None:
        """(Re)start one node's Patroni unit, e.g. after a drill killed it."""
        self.platform(node).start("patroni")

    def start_patroni_everywhere(self) -> None:
        for node in self.topology.postgres:
            self.start_patroni(node)

    # ---- up / down ---------------------------------------------------------------------
    def up(self, settings: StackSettings, services: Iterable[str] = ALL_SERVICES, timeout: float = 90) -> dict[str, str]:
        """Boot the hosts (again: the agent starts only what is not running)."""
        services = tuple(services)
        running = self.running()
        state = self._read_state()
        if running and state.get("settings") != settings.model_dump_json():
            raise SandboxError(
                f"a sandbox of stack {state.get('stack')!r} with other settings is running in {self.layout.state_dir}; "
                "run `infra sandbox down` first, or `infra sandbox roll` to roll the new settings through it"
            )
        self._settings, self._topology = settings, build_topology(settings)
        if not running:
            busy = [p for p in self.layout.ports(self.topology) if port_open(p)]
            if busy:
                raise SandboxError(f"ports already in use on {m.LOOPBACK}: {busy}; pick another --port-base")
            self._fresh_state_dir()
        deployed = sorted(set(state.get("services", []) if running else []) | set(services))
        self.state_file.write_text(json.dumps({"stack": settings.stack, "settings": settings.model_dump_json(),
                                               "services": deployed,
                                               "s3": None if self.s3 is None else dataclasses.asdict(self.s3)}))
        if "redis" in services and "redis" not in running:
            self._spawn("redis", ["/usr/bin/redis-server", str(self.layout.config_dir / "redis" / "redis.conf")],
                        {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            wait_for("redis", lambda: port_open(self.layout.redis), timeout)
        # A host boots (applies its bundle) when one of its services is not running: all of them
        # at once on a fresh sandbox, as new instances do; after a drill, the host it stopped.
        booting = {}
        for host in self.hosts():
            bundle = self.host_bundle(host, services)
            platform = self.platform(host)
            if bundle["services"] and not all(platform.active(s["unit"]) for s in bundle["services"]):
                booting[host.name] = bundle
        self.boot(booting, timeout)
        if "postgres" in services:
            self.wait_healthy(timeout)
        return self.endpoints()

    def wait_healthy(self, timeout: float = 90) -> Host:
        """A leader that takes writes and every other member streaming from it."""
        want = len(self.topology.postgres) - 1

        def healthy():
            members = self.cluster().get("members", [])
            leader = self.leader()
            if leader is None or len(members) < len(self.topology.postgres):
                return None
            # Patroni lets only the standby named in its /sync key take over: until that key names
            # one, a leader failure leaves the cluster without a primary (safe, not available).
            if self.settings.patroni.synchronous_mode and want and not any(m["role"] == "sync_standby" for m in members):
                return None
            with psycopg.connect(self.dsn(leader), connect_timeout=2, autocommit=True) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return None
                streaming, sync = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE sync_state = 'sync') "
                    "FROM pg_stat_replication WHERE state = 'streaming'"
                ).fetchone()
            # In synchronous mode a switchover or a safe failover needs a synchronous standby in place.
            if self.settings.patroni.synchronous_mode and want and not sync:
                return None
            return leader if streaming >= want else None

        return wait_for("a Patroni leader with every replica streaming", healthy, timeout)

    def _fresh_state_dir(self) -> None:
        layout = self.layout
        if layout.state_dir.exists():
            shutil.rmtree(layout.state_dir)
        layout.state_dir.mkdir(parents=True)
        # The daemons' users (postgres, etcd, prometheus) must reach their hosts' files.
        layout.state_dir.chmod(0o755)
        for path in (layout.config_dir, layout.log_dir, layout.pid_dir, layout.state_dir / "hosts"):
            path.mkdir(mode=0o755)
        layout.secrets_dir.mkdir(mode=0o700)
        layout.socket_dir.mkdir(mode=0o755)
        if os.geteuid() == 0:
            shutil.chown(layout.socket_dir, POSTGRES_USER, POSTGRES_USER)
        (layout.state_dir / "redis").mkdir()
        for path, content in render_redis(self.settings, self.topology).items():
            target = layout.config_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(m.map_bytes(content, m.redis_mapping(layout)))

    def _strays(self) -> list[int]:
        """Live processes (not ours) that run on this sandbox's files: what a host's daemons left behind."""
        root = str(self.layout.state_dir).encode() + b"/"
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid() and root in _cmdline(int(entry.name)):
                if _alive(int(entry.name), ""):
                    pids.append(int(entry.name))
        return pids

    def down(self, timeout: float = 30) -> list[str]:
        """Stop everything; return the names that were running. Leaves logs, removes data."""
        procs = self.processes()
        postmasters = []
        try:
            topology = self.topology if self.state_file.exists() else None
        except ValueError:  # a state written by an older version: stop what runs all the same
            topology = None
        if topology is not None:
            postmasters = [pid for pid in (self.postmaster_pid(n) for n in topology.postgres) if pid]
        stopped = [p.name for p in procs if _alive(p.pid, p.exe)]
        # Patroni first, while etcd still answers, so it stops PostgreSQL cleanly and drops its keys.
        first = [p for p in procs if p.exe == Path(PATRONI_BIN).name]
        # The rest gets a short grace only: its data is removed below, and a lone etcd member's
        # leadership handover or Alertmanager's gossip leave would wait 8-10 s for peers already gone.
        for phase, grace in ((first, timeout), ([p for p in procs if p not in first], min(timeout, 2.0))):
            for proc in phase:
                if _alive(proc.pid, proc.exe):
                    os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p.pid, p.exe) for p in phase):
                time.sleep(0.1)
            killed = [proc for proc in phase if _alive(proc.pid, proc.exe)]
            for proc in killed:
                _kill_group(proc.pid)
            wait_for("killed processes to exit", lambda gone=killed: not any(_alive(p.pid, p.exe) for p in gone), timeout)
        # A postmaster whose Patroni died (a drill) has no parent to stop it.
        for pid in postmasters:
            if _alive(pid, "postgres"):
                os.kill(pid, signal.SIGQUIT)
        wait_for("the postmasters to exit", lambda: not any(_alive(pid, "postgres") for pid in postmasters), timeout)
        # pgBackRest's asynchronous archive-push and archive-get workers detach from the postmaster.
        for pid in self._strays():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid_file in self.layout.pid_dir.glob("*.pid") if self.layout.pid_dir.exists() else []:
            pid_file.unlink()
        if self.state_file.exists():
            busy = [p for p in self.layout.ports(topology) if port_open(p)] if topology is not None else []
            if busy:
                raise SandboxError(f"still listening after down: {busy}")
            for path in self.layout.state_dir.iterdir():
                if path.name not in ("logs", STATE_FILE):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        return stopped


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
