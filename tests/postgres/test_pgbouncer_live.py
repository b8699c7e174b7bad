"""PgBouncer 1.18 from its rendered files in front of a real PostgreSQL 15 with the rendered pg_hba and pg_ident:
it starts, listens and answers its console; clients log in with their own PostgreSQL password through the auth
function the agent's step creates (pgbouncer-auth.sql), and nothing else comes through; a full pool still takes
logins; the PgBouncer exporter reads the console with the rendered login.

What differs from a host (the sandbox's kind of mapping, declared here): ports 27951 (PostgreSQL), 27952 (PgBouncer)
and 27953 (the exporter) on 127.0.0.1, the socket folder and host paths under a temporary root. What it cannot see:
HAProxy in front and Patroni behind (tests/postgres/test_cluster_live.py runs the whole path in the sandbox).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest
import requests
import yaml

from infra.bundle import bundle_document
from infra.hostagent import agent, patroni
from infra.hostagent.envfile import read_environment_file
from infra.hosts import host_specs
from infra.hosts.postgres import PGBOUNCER_EXPORTER_ENV
from infra.render.patroni import REPLICATION_USER, SUPERUSER, UNIX_SOCKET_DIR, render_patroni
from infra.render.pgbouncer import AUTH_ROLE, CONSOLE_DATABASE, LISTEN_ADDRESS, STATS_USER, socket_address
from infra.sandbox import mapping as m
from infra.sandbox.runner import wait_for
from infra.settings import AGGREGATES_POOL_SIZE, load_settings
from infra.topology import Paths, Ports, build_topology
from tests.conftest import stack_config
from tests.peer_psql import PeerPsql, run_as
from tests.ports import port
from tests.tls import write_identity

pytestmark = pytest.mark.live

PG_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRES_PORT, PGBOUNCER_PORT, EXPORTER_PORT = port(27951), port(27952), port(27953)
APP_PASSWORD = "app-password-for-this-test"


_as = run_as


@pytest.fixture(scope="module")
def pooled():
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    node = topology.postgres[0]
    spec = next(s for s in host_specs(settings, topology) if s.host == node)
    bundle = bundle_document(spec, settings, topology)
    root = Path(tempfile.mkdtemp(prefix="pgbouncer-live-", dir="/tmp"))  # the postgres user cannot enter pytest's tmp
    socket_dir = root / "run"
    mapping = {k.encode(): v.encode() for k, v in {
        socket_address(Ports.POSTGRES): f"host={socket_dir} port={POSTGRES_PORT}",
        socket_address(Ports.PGBOUNCER): f"host={socket_dir} port={PGBOUNCER_PORT}",
        f"listen_addr = {LISTEN_ADDRESS}": f"listen_addr = {m.LOOPBACK}",
        f"listen_port = {Ports.PGBOUNCER}": f"listen_port = {PGBOUNCER_PORT}",
        f"0.0.0.0:{Ports.PGBOUNCER_EXPORTER}": f"{m.LOOPBACK}:{EXPORTER_PORT}",
        UNIX_SOCKET_DIR: str(socket_dir),
    }.items()}
    wanted = {Paths.PGBOUNCER_CONFIG, Paths.PGBOUNCER_HBA, Paths.PGBOUNCER_USERS, Paths.PGBOUNCER_AUTH_SQL,
              Paths.PGBOUNCER_EXPORTER, PGBOUNCER_EXPORTER_ENV}
    for file in bundle["files"]:
        if file["path"] in wanted:
            target = root / file["path"].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(m.map_bytes(file["content"].encode(), mapping, root))
            target.chmod(int(file["mode"], 8))
            shutil.chown(target, *file["owner"].split(":"))
    for folder in (root, socket_dir):  # PgBouncer and PostgreSQL write here; other users may reach the sockets
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)
        shutil.chown(folder, "postgres", "postgres")
    # The host's TLS identity where pgbouncer.ini names it (under the root); PostgreSQL serves the same one.
    tls = write_identity(root)
    _CA[:] = [tls["ca"]]

    # PostgreSQL with the rendered pg_hba and pg_ident (Patroni writes them from patroni.yml).
    config = yaml.safe_load(render_patroni(settings, topology, node)[f"patroni/{node.name}.yml"])["postgresql"]
    data = root / "data"
    _as("postgres", str(PG_BIN / "initdb"), "-D", str(data), "-U", SUPERUSER, check=True)
    _as("postgres", "sh", "-c", f"cat > {data}/pg_hba.conf", input="\n".join(config["pg_hba"]) + "\n", check=True)
    _as("postgres", "sh", "-c", f"cat > {data}/pg_ident.conf", input="\n".join(config["pg_ident"]) + "\n", check=True)
    _as("postgres", str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-o",
        f"-p {POSTGRES_PORT} -c listen_addresses={m.LOOPBACK} -c unix_socket_directories={socket_dir} -c ssl=on "
        f"-c ssl_cert_file={tls['cert']} -c ssl_key_file={tls['key']}", "start", check=True)
    server = PeerPsql(root, socket_dir, POSTGRES_PORT)
    processes = []
    try:
        for database in settings.client_path.databases:
            server.sql("postgres", f"CREATE DATABASE {database}")
        server.sql("postgres", f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'; "
                               f"CREATE ROLE other_app LOGIN PASSWORD '{APP_PASSWORD}'; "
                               f"ALTER ROLE {SUPERUSER} PASSWORD '{APP_PASSWORD}'; "
                               f"CREATE ROLE {REPLICATION_USER} LOGIN REPLICATION PASSWORD '{APP_PASSWORD}'")
        # The agent's step on the leader (this server is the only one), from the bundle's file.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(patroni, "member", lambda api: {"role": "master", "state": "running"})
            agent.converge_pgbouncer_auth("pg-1", bundle["patroni"], server, agent.Report("pg-1"))
        # Debian's pgbouncer.service: User=postgres, ExecStart=/usr/sbin/pgbouncer /etc/pgbouncer/pgbouncer.ini.
        log = open(root / "pgbouncer.log", "w")
        processes.append(subprocess.Popen(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                                           "/usr/sbin/pgbouncer", str(root / Paths.PGBOUNCER_CONFIG.lstrip("/"))],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for("PgBouncer to listen", lambda: _connects(m.LOOPBACK, PGBOUNCER_PORT), 10, 0.1)
        yield settings, bundle, server, root, processes, tls
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(10)
        _as("postgres", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _connects(host: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


def _console(root: Path, command: str, user: str = STATS_USER) -> list[dict]:
    """A SHOW command on PgBouncer's console, over the socket as `user` (peer authentication)."""
    result = _as(user, "psql", "-X", "-w", "-A", "-F", "\t", "-P", "footer=off", "-h", str(root / "run"),
                 "-p", str(PGBOUNCER_PORT), "-U", user, "-d", CONSOLE_DATABASE, "-c", command, timeout=10)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"), strict=True)) for row in rows]


def _client(user: str = "app", password: str = APP_PASSWORD, timeout: float = 3, **tls):
    """A client as on AWS: TLS, PgBouncer's certificate checked against the CA (the fixture's) and its name."""
    tls = tls or {"sslmode": "verify-full", "sslrootcert": str(_CA[0])}
    return psycopg.connect(host=m.LOOPBACK, port=PGBOUNCER_PORT, user=user, password=password,
                           dbname="betting", connect_timeout=timeout, autocommit=True, prepare_threshold=None, **tls)


_CA: list[Path] = []  # the fixture's CA certificate, for _client


def test_pgbouncer_runs_its_rendered_files_and_answers_on_its_console(pooled):
    settings, _, _, root, _, _ = pooled
    config = {row["key"]: row["value"] for row in _console(root, "SHOW CONFIG")}
    pool = settings.client_path
    assert config["pool_mode"] == "transaction"
    assert (config["default_pool_size"], config["max_client_conn"]) == (str(pool.pool_size), str(pool.max_client_connections))
    assert (config["auth_type"], config["auth_user"]) == ("hba", AUTH_ROLE)
    assert config["listen_port"] == str(PGBOUNCER_PORT) and config["stats_users"] == STATS_USER
    assert config["server_login_retry"] == "1"
    databases = {row["name"]: row for row in _console(root, "SHOW DATABASES")}
    assert set(databases) == {*pool.databases, settings.aggregates.database, CONSOLE_DATABASE}
    # The SLO aggregates' database: its own small pool (pool_size per database, which PgBouncer 1.18 takes).
    aggregates_pool = databases[settings.aggregates.database]
    assert (aggregates_pool["pool_size"], aggregates_pool["max_connections"]) == (
        str(AGGREGATES_POOL_SIZE), str(AGGREGATES_POOL_SIZE + 1))
    for name in pool.databases:
        assert databases[name]["port"] == str(POSTGRES_PORT) and databases[name]["host"] == str(root / "run")
        assert databases[name]["max_connections"] == str(pool.pool_size + 1)
    # The console is read-only: the stats user cannot pause or reload PgBouncer.
    denied = _as(STATS_USER, "psql", "-X", "-w", "-h", str(root / "run"), "-p", str(PGBOUNCER_PORT), "-U", STATS_USER,
                 "-d", CONSOLE_DATABASE, "-c", "PAUSE", timeout=10)
    assert denied.returncode != 0 and "admin access needed" in denied.stderr


def test_clients_log_in_with_their_own_password_and_no_one_else_comes_through(pooled):
    _, _, server, root, _, _ = pooled
    with _client() as conn:
        user, address, in_recovery = conn.execute("SELECT current_user, inet_server_addr(), pg_is_in_recovery()").fetchone()
    assert (user, address, in_recovery) == ("app", None, False)  # PgBouncer's server login came over the socket
    refused = {
        "a wrong password": ("app", "wrong"),
        "the superuser, with its own password": (SUPERUSER, APP_PASSWORD),
        "a replication role": (REPLICATION_USER, APP_PASSWORD),
        "the auth role (it has no password)": (AUTH_ROLE, ""),
    }
    for what, (name, password) in refused.items():
        try:
            _client(name, password or "x").close()
        except psycopg.OperationalError:
            continue
        pytest.fail(f"{what} logged in through PgBouncer")
    # Straight at PostgreSQL the auth role has no way in either: no password over TCP, and over the socket only from
    # the OS user PgBouncer runs as.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=m.LOOPBACK, port=POSTGRES_PORT, user=AUTH_ROLE, password="x", dbname="betting", connect_timeout=3)
    other = _as("prometheus", "psql", "-X", "-w", "-h", str(root / "run"), "-p", str(POSTGRES_PORT), "-U", AUTH_ROLE,
                "-d", "betting", "-c", "SELECT 1", timeout=10)
    assert other.returncode != 0 and "Peer authentication failed" in other.stderr
    # And the function is the auth role's alone.
    with _client() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM pgbouncer.get_auth('app')")
    assert server.sql("betting", "SELECT r.rolsuper FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner "
                                 "WHERE p.oid = 'pgbouncer.get_auth(text)'::regprocedure") == "t"


def test_clients_come_in_over_tls_only_and_verify_pgbouncer_by_name(pooled):
    """PgBouncer serves the host's certificate (TLS 1.2 or newer), which a verify-full client accepts for the
    address it dialled; a client without TLS is refused, as one that trusts another CA refuses PgBouncer; straight
    at PostgreSQL the rendered pg_hba refuses a login without TLS."""
    *_, root, _, tls = pooled
    with _client() as conn:
        assert conn.pgconn.ssl_in_use
        (client,) = [row for row in _console(root, "SHOW CLIENTS") if row["user"] == "app"]
        assert client["tls"].split("/")[0] in ("TLSv1.2", "TLSv1.3"), client
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        _client(sslmode="disable").close()
    stranger = write_identity(root / "stranger", ca_name="another CA")["ca"]
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        _client(sslmode="verify-full", sslrootcert=str(stranger)).close()
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(host=m.LOOPBACK, port=POSTGRES_PORT, user="app", password=APP_PASSWORD, dbname="betting",
                        sslmode="disable", connect_timeout=3)
    with psycopg.connect(host=m.LOOPBACK, port=POSTGRES_PORT, user="app", password=APP_PASSWORD, dbname="betting",
                         sslmode="verify-full", sslrootcert=str(tls["ca"]), connect_timeout=3) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_a_full_pool_still_takes_logins(pooled):
    """Every server connection of the database busy: a new client (of another role) still logs in, since the
    database keeps one connection beyond its pool for PgBouncer's auth_query."""
    settings, _, _, root, _, _ = pooled
    pool_size = settings.client_path.pool_size
    busy = threading.Barrier(pool_size + 1)

    def hold():
        with _client() as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
            busy.wait(30)
            conn.execute("SELECT pg_sleep(5)")  # longer than the new login's connect timeout
            conn.execute("COMMIT")

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(pool_size)]
    for thread in threads:
        thread.start()
    busy.wait(30)
    pools = {row["user"]: row for row in _console(root, "SHOW POOLS") if row["database"] == "betting"}
    assert int(pools["app"]["sv_active"]) == pool_size
    with _client("other_app", timeout=2):  # logged in: the auth query had its connection
        pools = {row["user"]: row for row in _console(root, "SHOW POOLS") if row["database"] == "betting"}
        servers = sum(int(row["sv_active"]) + int(row["sv_idle"]) + int(row["sv_used"]) + int(row["sv_login"])
                      for row in pools.values())
        assert servers <= pool_size + 1
    for thread in threads:
        thread.join(30)


def test_the_agents_step_covers_every_database_and_changes_nothing_twice(pooled):
    _, bundle, server, _, _, _ = pooled
    server.sql("postgres", "CREATE DATABASE reports TEMPLATE template0")  # copies nothing from template1
    assert server.sql("reports", "SELECT to_regprocedure('pgbouncer.get_auth(text)') IS NULL") == "t"
    function = "SELECT xmin FROM pg_proc WHERE oid = 'pgbouncer.get_auth(text)'::regprocedure"
    before = {db: server.sql(db, function) for db in ("postgres", "template1", "betting")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(patroni, "member", lambda api: {"role": "master", "state": "running"})
        agent.converge_pgbouncer_auth("pg-1", bundle["patroni"], server, agent.Report("pg-1"))
        patch.setattr(patroni, "member", lambda api: {"role": "replica", "state": "running"})
        server.sql("postgres", "DROP DATABASE reports")
        server.sql("postgres", "CREATE DATABASE reports TEMPLATE template0")
        agent.converge_pgbouncer_auth("pg-1", bundle["patroni"], server, agent.Report("pg-1"))  # a replica does nothing
        assert server.sql("reports", "SELECT to_regprocedure('pgbouncer.get_auth(text)') IS NULL") == "t"
        patch.setattr(patroni, "member", lambda api: {"role": "master", "state": "running"})
        agent.converge_pgbouncer_auth("pg-1", bundle["patroni"], server, agent.Report("pg-1"))
    assert server.sql("reports", "SELECT has_function_privilege('pgbouncer_auth', 'pgbouncer.get_auth(text)', 'EXECUTE')"
                                 " AND NOT has_function_privilege('public', 'pgbouncer.get_auth(text)', 'EXECUTE')") == "t"
    # The function was left alone where it was as written: no new row version.
    assert {db: server.sql(db, function) for db in before} == before
    server.sql("postgres", "DROP DATABASE reports")


def test_the_exporter_reads_the_console_with_the_rendered_login(pooled):
    _, _, _, root, processes, _ = pooled
    environment = read_environment_file((root / PGBOUNCER_EXPORTER_ENV.lstrip("/")).read_text())
    assert environment["PGBOUNCER_DSN"] == f"host={root / 'run'} port={PGBOUNCER_PORT} dbname=pgbouncer user={STATS_USER}"
    # betting-pgbouncer-exporter.service: User=postgres, its EnvironmentFile, ExecStart the installed script.
    log = open(root / "exporter.log", "w")
    processes.append(subprocess.Popen(
        ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", str(root / Paths.PGBOUNCER_EXPORTER.lstrip("/"))],
        env={"PATH": "/usr/bin:/bin", **environment}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    with _client() as conn:
        conn.execute("SELECT 1")
        text = wait_for("the exporter's metrics", lambda: requests.get(f"http://{m.LOOPBACK}:{EXPORTER_PORT}/metrics",
                                                                         timeout=2).text, 15, 0.2)
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert samples["pgbouncer_up"] == 1
    assert samples['pgbouncer_databases_max_connections{database="betting"}'] == 41
    assert 'pgbouncer_pools_server_active_connections{database="betting",user="app"}' in samples
