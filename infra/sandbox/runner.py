"""Run a stack's rendered configs as processes on 127.0.0.1: etcd, Patroni/PostgreSQL, Redis,
the exporters, and Prometheus/Alertmanager when their renderers exist.

No Docker, no Pulumi CLI. Each daemon gets the rendered file with only `mapping` applied.
PostgreSQL refuses root, so when run as root Patroni runs as the postgres user (setpriv).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import requests

from infra.render.etcd import render_etcd
from infra.render.patroni import EXPORTER_PASSWORD_ENV, EXPORTER_ROLE, PASSWORD_ENV, SUPERUSER, render_patroni
from infra.render.pgbackrest import render_pgbackrest
from infra.render.redis import render_redis
from infra.sandbox import mapping as m
from infra.settings import StackSettings
from infra.topology import Host, SecretNames, Topology, build_topology

ALL_SERVICES = ("postgres", "redis", "exporters", "monitoring")
EXPORTER_USER = EXPORTER_ROLE
STATE_FILE = "sandbox.json"
POSTGRES_USER = "postgres"
PATRONI_BIN = "/usr/bin/patroni"


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
    def __init__(self, state_dir: Path | str, port_base: int = m.DEFAULT_PORT_BASE, settings: StackSettings | None = None):
        """`settings` only to inspect files before `up`; a running sandbox remembers its own."""
        self.layout = m.Layout(Path(state_dir).resolve(), port_base)
        self._settings: StackSettings | None = settings
        self._topology: Topology | None = build_topology(settings) if settings else None

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

    # ---- endpoints used by tests, scripts and the bench --------------------------------
    def node(self, name: str) -> Host:
        return next(h for h in self.topology.postgres if h.name == name)

    def patroni_url(self, node: Host) -> str:
        return f"http://{m.LOOPBACK}:{self.layout.patroni(node)}"

    def dsn(self, node: Host, dbname: str = "postgres") -> str:
        password = self.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD)
        return f"host={m.LOOPBACK} port={self.layout.postgres(node)} user={SUPERUSER} password={password} dbname={dbname}"

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
                return requests.get(f"{self.patroni_url(node)}/cluster", timeout=1).json()
            except (requests.RequestException, ValueError):
                continue
        return {"members": []}

    def leader(self) -> Host | None:
        for member in self.cluster().get("members", []):
            if member.get("role") == "leader" and member.get("state") == "running":
                return self.node(member["name"])
        return None

    def endpoints(self) -> dict[str, str]:
        layout, topology = self.layout, self.topology
        points = {f"etcd {e.name}": f"http://{m.LOOPBACK}:{layout.etcd_client(e)}" for e in topology.etcd}
        for node in topology.postgres:
            points[f"postgres {node.name}"] = f"postgresql://{SUPERUSER}@{m.LOOPBACK}:{layout.postgres(node)}/postgres"
            points[f"patroni {node.name}"] = self.patroni_url(node)
        running = self.running()
        for node in topology.postgres:
            if f"postgres-exporter-{node.name}" in running:
                points[f"postgres_exporter {node.name}"] = f"http://{m.LOOPBACK}:{layout.postgres_exporter(node)}/metrics"
        optional = {
            "redis": ("redis", f"redis://{m.LOOPBACK}:{layout.redis}"),
            "node-exporter": ("node_exporter", f"http://{m.LOOPBACK}:{layout.node_exporter}/metrics"),
        }
        for host in topology.monitoring:
            optional[f"redis-exporter-{host.name}"] = (f"redis_exporter {host.name}",
                                                       f"http://{m.LOOPBACK}:{layout.redis_exporter(host)}/metrics")
            optional[f"prometheus-{host.name}"] = (f"prometheus {host.name}", f"http://{m.LOOPBACK}:{layout.prometheus(host)}")
            optional[f"alertmanager-{host.name}"] = (f"alertmanager {host.name}", f"http://{m.LOOPBACK}:{layout.alertmanager(host)}")
        for proc, (label, url) in optional.items():
            if proc in running:
                points[label] = url
        return points

    # ---- process control ---------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, as_postgres: bool = False) -> Proc:
        self.layout.log_dir.mkdir(parents=True, exist_ok=True)
        self.layout.pid_dir.mkdir(parents=True, exist_ok=True)
        if as_postgres and os.geteuid() == 0:
            argv = ["setpriv", f"--reuid={POSTGRES_USER}", f"--regid={POSTGRES_USER}", "--init-groups", "--", *argv]
        base_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.layout.state_dir)}
        with open(self.layout.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**base_env, **(env or {})}, cwd=self.layout.state_dir, start_new_session=True,
            )
        # What /proc/PID/cmdline must name for the pid to still be ours (setpriv execs the daemon).
        exe = Path(argv[argv.index("--") + 1] if argv[0] == "setpriv" else argv[0]).name
        (self.layout.pid_dir / f"{name}.pid").write_text(f"{process.pid}\n{exe}\n")
        return Proc(name, process.pid, exe)

    def signal_process(self, name: str, sig: int) -> None:
        proc = self.running().get(name)
        if proc:
            os.kill(proc.pid, sig)

    def start_patroni(self, node: Host) -> None:
        """(Re)start one node's Patroni, e.g. after a drill killed it."""
        if node.name in self.running():
            return
        env = {var: self.secret(secret) for var, secret in PASSWORD_ENV.items()}
        env[EXPORTER_PASSWORD_ENV] = self.secret(SecretNames.POSTGRES_EXPORTER_PASSWORD)
        config = self.layout.config_dir / "patroni" / f"{node.name}.yml"
        self._spawn(node.name, [PATRONI_BIN, str(config)], env=env, as_postgres=True)

    def start_patroni_everywhere(self) -> None:
        for node in self.topology.postgres:
            self.start_patroni(node)

    # ---- up / down ---------------------------------------------------------------------
    def up(self, settings: StackSettings, services: Iterable[str] = ALL_SERVICES, timeout: float = 90) -> dict[str, str]:
        from infra.sandbox import monitoring

        # Prometheus/Alertmanager join once their renderers are in the tree.
        services = tuple(s for s in services if s != "monitoring" or monitoring.available())
        running = self.running()
        state = self._read_state()
        if running and state.get("settings") != settings.model_dump_json():
            raise SandboxError(
                f"a sandbox of stack {state.get('stack')!r} with other settings is running in {self.layout.state_dir}; "
                "run `infra sandbox down` first"
            )
        self._settings, self._topology = settings, build_topology(settings)
        if not running:
            self._fresh_state_dir()
            self._write_files()
        deployed = sorted(set(state.get("services", []) if running else []) | set(services))
        self.state_file.write_text(json.dumps({"stack": settings.stack, "settings": settings.model_dump_json(),
                                               "services": deployed}))
        busy = [p for p in self.layout.ports(self.topology) if port_open(p)] if not running else []
        if busy:
            raise SandboxError(f"ports already in use on {m.LOOPBACK}: {busy}; pick another --port-base")
        running = self.running()
        for member in self.topology.etcd:
            if member.name not in running:
                env = self._env_file(self.layout.config_dir / "etcd" / f"{member.name}.env")
                self._spawn(member.name, ["/usr/bin/etcd"], env=env)
        for member in self.topology.etcd:
            url = f"http://{m.LOOPBACK}:{self.layout.etcd_client(member)}/health"
            wait_for(f"etcd {member.name}", lambda url=url: requests.get(url, timeout=1).json().get("health") == "true", timeout)
        if "postgres" in services:
            for node in self.topology.postgres:
                self.start_patroni(node)
            self.wait_healthy(timeout)
        if "redis" in services and "redis" not in running:
            self._spawn("redis", ["/usr/bin/redis-server", str(self.layout.config_dir / "redis" / "redis.conf")])
            wait_for("redis", lambda: port_open(self.layout.redis), timeout)
        if "exporters" in services:
            self._start_exporters(running)
        if "monitoring" in services:
            self._start_monitoring(running)
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
        # The postgres user must reach its files under the state dir.
        layout.state_dir.chmod(0o755)
        for path in (layout.config_dir, layout.log_dir, layout.pid_dir):
            path.mkdir(mode=0o755)
        layout.secrets_dir.mkdir(mode=0o700)
        for name in (
            SecretNames.POSTGRES_SUPERUSER_PASSWORD, SecretNames.POSTGRES_REPLICATION_PASSWORD,
            SecretNames.POSTGRES_REWIND_PASSWORD, SecretNames.POSTGRES_EXPORTER_PASSWORD,
        ):
            secret_file = layout.secrets_dir / name
            secret_file.write_text(secrets.token_urlsafe(24) + "\n")
            secret_file.chmod(0o400)
        postgres_dirs = [layout.socket_dir] + [layout.node_dir(n) for n in build_topology(self.settings).postgres]
        for path in postgres_dirs:
            path.mkdir(mode=0o700)
            if os.geteuid() == 0:
                shutil.chown(path, POSTGRES_USER, POSTGRES_USER)
        (layout.state_dir / "redis").mkdir()

    def rendered_files(self) -> dict[str, tuple[bytes, dict[bytes, bytes]]]:
        """Every file the sandbox runs: {relative path: (rendered bytes, mapping)}."""
        settings, topology, layout = self.settings, self.topology, self.layout
        files: dict[str, tuple[bytes, dict[bytes, bytes]]] = {}
        for member in topology.etcd:
            for path, content in render_etcd(settings, topology, member).items():
                files[path] = (content, m.etcd_mapping(layout, topology, member))
        (conf,) = render_pgbackrest(settings, topology).values()
        for node in topology.postgres:
            for path, content in render_patroni(settings, topology, node).items():
                files[path] = (content, m.patroni_mapping(layout, topology, node))
            files[f"pgbackrest/{node.name}.conf"] = (conf, m.pgbackrest_mapping(layout, node))
        for path, content in render_redis(settings, topology).items():
            files[path] = (content, m.redis_mapping(layout))
        from infra.sandbox import monitoring

        files.update(monitoring.rendered_files(self))
        return files

    def _write_files(self) -> None:
        for path, (content, mapping) in self.rendered_files().items():
            target = self.layout.config_dir / path
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            target.write_bytes(m.map_bytes(content, mapping))
            target.chmod(0o644)

    @staticmethod
    def _env_file(path: Path) -> dict[str, str]:
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
        return {key: value for key, value in pairs}

    def _start_exporters(self, running: dict[str, Proc]) -> None:
        layout = self.layout
        # The exporter's role comes from Patroni's post_bootstrap, as on AWS.
        password = self.secret(SecretNames.POSTGRES_EXPORTER_PASSWORD)
        queries = self._exporter_queries()
        for node in self.topology.postgres:
            name = f"postgres-exporter-{node.name}"
            if name in running:
                continue
            listen = f"{m.LOOPBACK}:{layout.postgres_exporter(node)}"
            argv = ["/usr/bin/prometheus-postgres-exporter", f"--web.listen-address={listen}"]
            if queries:
                argv.append(f"--extend.query-path={queries}")
            dsn = f"postgresql://{EXPORTER_USER}:{password}@{m.LOOPBACK}:{layout.postgres(node)}/postgres?sslmode=disable"
            self._spawn(name, argv, env={"DATA_SOURCE_NAME": dsn})
        for host in self.topology.monitoring if "redis" in self.running() else ():
            if f"redis-exporter-{host.name}" not in running:
                self._spawn(f"redis-exporter-{host.name}", [
                    "/usr/bin/prometheus-redis-exporter", f"-redis.addr=redis://{m.LOOPBACK}:{layout.redis}",
                    f"-web.listen-address={m.LOOPBACK}:{layout.redis_exporter(host)}",
                ])
        if "node-exporter" not in running:
            textfile = layout.state_dir / "node-exporter"
            textfile.mkdir(exist_ok=True)
            self._spawn("node-exporter", [
                "/usr/bin/prometheus-node-exporter", f"--web.listen-address={m.LOOPBACK}:{layout.node_exporter}",
                f"--collector.textfile.directory={textfile}",
            ])
        ports = [layout.postgres_exporter(n) for n in self.topology.postgres] + [layout.node_exporter]
        wait_for("the exporters", lambda: all(port_open(p) for p in ports), 30)

    def _exporter_queries(self) -> Path | None:
        """postgres_exporter's custom queries from the monitoring renderers, when they exist."""
        try:
            exporters = importlib.import_module("infra.render.exporters")
        except ImportError:
            return None
        files = exporters.render_exporters(self.settings, self.topology)
        for path, content in files.items():
            if "postgres" in path:
                target = self.layout.config_dir / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                return target
        return None

    def _start_monitoring(self, running: dict[str, Proc]) -> None:
        from infra.sandbox import monitoring

        monitoring.start(self, running)

    def down(self, timeout: float = 30) -> list[str]:
        """Stop everything; return the names that were running. Leaves logs, removes data."""
        procs = self.processes()
        postmasters = []
        if self.state_file.exists():
            postmasters = [pid for pid in (self.postmaster_pid(n) for n in self.topology.postgres) if pid]
        stopped = [p.name for p in procs if _alive(p.pid, p.exe)]
        # Patroni first, while etcd still answers, so it stops PostgreSQL cleanly and drops its keys.
        first = [p for p in procs if p.exe == Path(PATRONI_BIN).name]
        for phase in (first, [p for p in procs if p not in first]):
            for proc in phase:
                if _alive(proc.pid, proc.exe):
                    os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(_alive(p.pid, p.exe) for p in phase):
                time.sleep(0.1)
            for proc in phase:
                if _alive(proc.pid, proc.exe):
                    _kill_group(proc.pid)
        # A postmaster whose Patroni died (a drill) has no parent to stop it.
        for pid in postmasters:
            if _alive(pid, "postgres"):
                os.kill(pid, signal.SIGQUIT)
        wait_for("the postmasters to exit", lambda: not any(_alive(pid, "postgres") for pid in postmasters), timeout)
        for pid_file in self.layout.pid_dir.glob("*.pid") if self.layout.pid_dir.exists() else []:
            pid_file.unlink()
        if self.state_file.exists():
            busy = [p for p in self.layout.ports(self.topology) if port_open(p)]
            if busy:
                raise SandboxError(f"still listening after down: {busy}")
            for path in self.layout.state_dir.iterdir():
                if path.name not in ("logs", STATE_FILE):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        return stopped


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
