"""TPS of the rendered PostgreSQL configuration against PostgreSQL's defaults on this machine, straight and
through PgBouncer, printed side by side.

    .venv/bin/python -m bench.pgbench                        # prod's files, pgbench scale 20, 64 clients, 30 s a run
    .venv/bin/python -m bench.pgbench --stack staging --clients 32 --seconds 60 --scale 50

One PostgreSQL 15 (Patroni's initdb: data checksums, UTF8, C.UTF-8), started once with PostgreSQL's own
defaults and once with the stack's rendered parameters (Patroni's cluster-wide and pg-1's local ones),
each measured straight at PostgreSQL and through PgBouncer run from its rendered files, with clients that
keep their connection and with clients that open one for every transaction (pgbench -C, as short-lived
application processes do: there the pooler saves a backend's start each time). Before every run
pgbench's tables are created afresh (the same data) and a checkpoint is taken; every run has the same
clients, threads, duration and protocol (-M simple: PgBouncer 1.18 in transaction mode keeps no prepared
statements). pgbench logs in as an application role (PgBouncer lets no superuser through), with the
rendered pg_hba and pg_ident in both configurations: what differs between them is postgresql.conf.

What is changed from the rendered files is the sandbox's mapping (pg-1 of a sandbox at --port-base:
PostgreSQL base+21, PgBouncer base+121, folders under a temporary state dir), and WAL archiving is off
(no repository here). Memory-sized parameters are scaled by --memory-scale (this machine's memory over
the instance type's, if the rendered ones are sized for a larger host). Runs as root, like the sandbox:
PostgreSQL and PgBouncer run as postgres.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from infra.render.patroni import SUPERUSER
from infra.sandbox import mapping as m
from infra.sandbox.cli import stack_settings
from infra.sandbox.runner import Sandbox, port_open, wait_for
from infra.topology import Paths

PG_BIN = Path("/usr/lib/postgresql/15/bin")
APP_ROLE, APP_PASSWORD = "bench_app", "bench-app-password"
# Rendered parameters that name what only a host has: the repository (archiving) and its folders (the run's own).
HOST_ONLY = ("archive_mode", "archive_command", "archive_timeout", "log_directory")
MEMORY_UNITS = ("kB", "8kB", "MB")
CLIENTS = {False: "one connection each", True: "a connection per transaction"}


def _as_postgres(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *command],
                          capture_output=True, text=True, **kwargs)


class Bench:
    def __init__(self, settings, port_base: int, state: Path):
        self.sandbox = Sandbox(state, port_base, settings=settings)
        self.layout, self.node = self.sandbox.layout, self.sandbox.topology.postgres[0]
        self.database = settings.client_path.databases[0]
        files = {f["path"]: f for f in self.sandbox.host_bundle(self.node, ["postgres"])["files"]}
        self.files = files
        self.patroni = yaml.safe_load(files[Paths.PATRONI_CONFIG]["content"])
        self.data = self.layout.data_dir(self.node)
        self.port, self.pgbouncer_port = self.layout.postgres(self.node), self.layout.pgbouncer(self.node)
        self.pgbouncer: subprocess.Popen | None = None

    # ---- PostgreSQL ------------------------------------------------------------------------------
    def rendered_parameters(self, memory_scale: float, units: dict[str, str]) -> dict[str, object]:
        dcs = self.patroni["bootstrap"]["dcs"]["postgresql"]["parameters"]
        parameters = {k: v for k, v in {**dcs, **self.patroni["postgresql"]["parameters"]}.items() if k not in HOST_ONLY}
        parameters["log_directory"] = str(self.layout.state_dir / "log")
        for name, value in list(parameters.items()):
            if units.get(name) in MEMORY_UNITS and memory_scale != 1:
                parameters[name] = _scaled(str(value), units[name], memory_scale)
        return parameters

    def _conninfo(self) -> list[str]:
        return [f"-c port={self.port}", f"-c listen_addresses={m.LOOPBACK}",
                f"-c unix_socket_directories={self.layout.socket_dir}"]

    def init(self) -> None:
        for folder in (self.layout.state_dir, self.layout.socket_dir, self.data.parent, self.layout.state_dir / "log"):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "postgres", "postgres")
        for path in (Paths.PGBOUNCER_CONFIG, Paths.PGBOUNCER_HBA, Paths.PGBOUNCER_USERS, Paths.PGBOUNCER_AUTH_SQL):
            file = self.files[path]
            target = Path(self.sandbox.platform(self.node).path(path))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file["content"])
            target.chmod(int(file["mode"], 8))
            shutil.chown(target, *file["owner"].split(":"))
        # The postgres user must reach every folder on the way (mkdtemp makes the state dir root's, 0700).
        for folder in [self.layout.state_dir, *(p for p in self.layout.state_dir.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--data-checksums",
                     "--encoding=UTF8", "--locale=C.UTF-8", check=True)
        config = self.patroni["postgresql"]
        _as_postgres("sh", "-c", f"cat > {self.data}/pg_hba.conf", input="\n".join(config["pg_hba"]) + "\n", check=True)
        _as_postgres("sh", "-c", f"cat > {self.data}/pg_ident.conf", input="\n".join(config["pg_ident"]) + "\n", check=True)

    def start(self, parameters: dict[str, object]) -> None:
        options = " ".join(self._conninfo() + [f"-c {k}={_quote(v)}" for k, v in parameters.items()])
        result = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.layout.state_dir / "postgres.log"),
                              "-w", "-t", "120", "-o", options, "start")
        if result.returncode:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()} (see {self.layout.state_dir}/postgres.log)")

    def stop(self) -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def psql(self, database: str, sql: str) -> str:
        result = _as_postgres("psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.layout.socket_dir),
                              "-p", str(self.port), "-d", database, "-c", sql)
        if result.returncode:
            raise RuntimeError(f"psql: {result.stderr.strip()}")
        return result.stdout.strip()

    def units(self) -> dict[str, str]:
        return dict(line.split("|") for line in self.psql("postgres", "SELECT name, coalesce(unit, '') FROM pg_settings")
                    .splitlines())

    def prepare_roles(self) -> None:
        self.psql("postgres", f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}'")
        self.psql("postgres", f"CREATE DATABASE {self.database} OWNER {APP_ROLE}")
        # The auth function the agent installs (pgbouncer-auth.sql), for PgBouncer's auth_query.
        sql = self.sandbox.platform(self.node).path(Paths.PGBOUNCER_AUTH_SQL)
        result = _as_postgres("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.layout.socket_dir),
                              "-p", str(self.port), "-d", self.database, "-f", sql)
        if result.returncode:
            raise RuntimeError(f"pgbouncer-auth.sql: {result.stderr.strip()}")

    # ---- PgBouncer -----------------------------------------------------------------------------
    def start_pgbouncer(self) -> None:
        config = self.sandbox.platform(self.node).path(Paths.PGBOUNCER_CONFIG)
        log = open(self.layout.state_dir / "pgbouncer.log", "a")
        self.pgbouncer = subprocess.Popen(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                                           "/usr/sbin/pgbouncer", config], stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        wait_for("PgBouncer to listen", lambda: port_open(self.pgbouncer_port), 10, 0.1)

    def stop_pgbouncer(self) -> None:
        if self.pgbouncer is not None:
            os.killpg(self.pgbouncer.pid, signal.SIGTERM)
            self.pgbouncer.wait(10)
            self.pgbouncer = None

    # ---- pgbench -------------------------------------------------------------------------------
    def pgbench(self, port: int, clients: int, seconds: int, scale: int, reconnect: bool) -> tuple[float, float]:
        env = {**os.environ, "PGPASSWORD": APP_PASSWORD}
        common = ["-h", m.LOOPBACK, "-U", APP_ROLE]
        subprocess.run([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), *common, "-p", str(self.port), self.database],
                       env=env, check=True, capture_output=True)
        self.psql("postgres", "CHECKPOINT")
        run = subprocess.run([str(PG_BIN / "pgbench"), "-M", "simple", "-n", *(["-C"] if reconnect else []),
                              "-c", str(clients), "-j", "2", "-T", str(seconds), *common, "-p", str(port), self.database],
                             env=env, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"pgbench failed: {run.stderr.strip()[-400:]}")
        # With -C, connecting is part of every transaction: pgbench 15 reports that rate as "including".
        tps = float(re.search(r"tps = ([\d.]+) \((?:without initial connection time|including reconnection times)\)",
                              run.stdout).group(1))
        latency = float(re.search(r"latency average = ([\d.]+) ms", run.stdout).group(1))
        return tps, latency


def _quote(value: object) -> str:
    text = str(value)
    return "'" + text.replace("'", "''") + "'" if re.search(r"[\s,'\"]", text) else text


def _scaled(value: str, unit: str, factor: float) -> str:
    """A memory setting times `factor`, in kB; a bare number is in the setting's own unit (pg_settings.unit)."""
    match = re.fullmatch(r"(\d+)\s*(kB|MB|GB|TB)?", value)
    if not match:
        return value
    base = {"kB": 1, "8kB": 8, "MB": 1024}[unit]
    kilobytes = int(match.group(1)) * ({"kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}[match.group(2)]
                                       if match.group(2) else base)
    return f"{max(64, int(kilobytes * factor))}kB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.pgbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", default="prod")
    parser.add_argument("--clients", type=int, default=64, help="clients that keep their connection")
    parser.add_argument("--reconnecting-clients", type=int, default=16,
                        help="clients that connect for every transaction (more than about 20 exhaust PostgreSQL's "
                             "default 100 slots: exiting backends hold theirs for a moment)")
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--scale", type=int, default=20)
    parser.add_argument("--memory-scale", type=float, default=1.0)
    parser.add_argument("--port-base", type=int, default=26000)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.pgbench: run as root (PostgreSQL and PgBouncer run as postgres, as on the hosts)", file=sys.stderr)
        return 2
    settings = stack_settings(args.stack)
    state = Path(tempfile.mkdtemp(prefix="bench-pgbench-"))
    bench = Bench(settings, args.port_base, state)
    busy = [p for p in (bench.port, bench.pgbouncer_port) if port_open(p)]
    if busy:
        print(f"bench.pgbench: ports in use on {m.LOOPBACK}: {busy}; pick another --port-base", file=sys.stderr)
        return 2
    pool = settings.client_path
    print(f"pgbench -s {args.scale}, {args.clients} clients ({args.reconnecting_clients} reconnecting), 2 threads, "
          f"{args.seconds} s a run, -M simple; "
          f"PgBouncer pool {pool.pool_size} per database (transaction pooling); {os.cpu_count()} cores", flush=True)
    results: dict[tuple[str, str, bool], tuple[float, float]] = {}
    try:
        bench.init()
        bench.start({})
        units = bench.units()
        bench.prepare_roles()
        configurations = (("PostgreSQL defaults", {}),
                          (f"rendered ({args.stack})", bench.rendered_parameters(args.memory_scale, units)))
        for index, (label, parameters) in enumerate(configurations):
            if index:
                bench.stop()
                bench.start(parameters)
                print(f"  {label}: {', '.join(f'{k}={v}' for k, v in sorted(parameters.items()))}", flush=True)
            bench.start_pgbouncer()
            try:
                for reconnect in (False, True):
                    for path, port in (("direct", bench.port), ("through PgBouncer", bench.pgbouncer_port)):
                        started = time.monotonic()
                        clients = args.reconnecting_clients if reconnect else args.clients
                        try:
                            results[(label, path, reconnect)] = bench.pgbench(port, clients, args.seconds, args.scale,
                                                                              reconnect)
                        except RuntimeError as error:
                            print(f"  {label}, {CLIENTS[reconnect]}, {path}: {error}", flush=True)
                            continue
                        tps, latency = results[(label, path, reconnect)]
                        print(f"  {label}, {clients} clients, {CLIENTS[reconnect]}, {path}: {tps:.0f} tps, latency "
                              f"{latency:.1f} ms ({time.monotonic() - started:.0f} s including the data load)", flush=True)
            finally:
                bench.stop_pgbouncer()
    finally:
        bench.stop_pgbouncer()
        bench.stop()
    print("\n| configuration | clients | direct: TPS | latency | through PgBouncer: TPS | latency |")
    print("|---|---|---|---|---|---|")
    def cells(key) -> str:
        return f"{results[key][0]:.0f} | {results[key][1]:.1f} ms" if key in results else "failed | -"

    for reconnect in (False, True):
        clients = args.reconnecting_clients if reconnect else args.clients
        for label, _ in configurations:
            print(f"| {label} | {clients}, {CLIENTS[reconnect]} | {cells((label, 'direct', reconnect))} | "
                  f"{cells((label, 'through PgBouncer', reconnect))} |")
    shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
