"""The client path's rendered files: the real HAProxy 2.6 accepts haproxy.cfg (`haproxy -c`), and what the
files say is what the writer and reader endpoints rely on: proxies, checks, limits derived from the settings,
authentication without a password anywhere. That PgBouncer 1.18 runs its files is tests/postgres/test_pgbouncer_live.py;
that the whole path follows the leader is tests/postgres/test_cluster_live.py."""

from __future__ import annotations

import configparser
import re
import subprocess

import yaml

from infra import pki
from infra.bundle import bundle_document
from infra.hosts import host_specs
from infra.render.haproxy import READER_PROXY, WRITER_PROXY, render_haproxy
from infra.render.patroni import SUPERUSER, UNIX_SOCKET_DIR, render_patroni
from infra.render.pgbouncer import AUTH_ROLE, AUTH_SCHEMA, IDENT_MAP, OS_USER, render_pgbouncer
from infra.sandbox.platform import ca_identity
from infra.sandbox.runner import ALL_SERVICES, Sandbox
from infra.settings import AGGREGATES_POOL_SIZE, load_settings
from infra.topology import Paths, Ports, build_topology
from tests.conftest import stack_config
from tests.monitoring.conftest import binary


def _haproxy_check(tmp_path, text: str, *flags: str) -> subprocess.CompletedProcess:
    """`haproxy -c` on `text`, with a CA file where it names one (HAProxy loads the checks' ca-file at parse)."""
    for ca_file in set(re.findall(r"ca-file (\S+)", text)):
        local = tmp_path / "ca" / ca_file.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(ca_identity("test CA")[0])
        text = text.replace(f"ca-file {ca_file}", f"ca-file {local}")
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return subprocess.run([binary("haproxy"), "-c", *flags, "-f", str(path)], capture_output=True, text=True)


def _proxies(text: str) -> dict[str, list[str]]:
    """Each section (`listen primary`, `frontend stats`, ...) and its lines, comments dropped."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        if not line.startswith(" "):
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    return sections


def test_haproxy_accepts_the_rendered_file(settings, topology, tmp_path):
    (text,) = render_haproxy(settings, topology).values()
    result = _haproxy_check(tmp_path, text.decode())
    assert result.returncode == 0, result.stdout + result.stderr
    # The nodes' names resolve only in the VPC: HAProxy starts without them and resolves them at run time.
    assert "ALERT" not in result.stderr
    assert {line for line in result.stderr.splitlines() if "WARNING" in line} == {
        line for line in result.stderr.splitlines() if "could not resolve address" in line}


def test_the_sandboxs_haproxy_file_has_no_warning_at_all(settings, tmp_path):
    """With the nodes at 127.0.0.1 (the sandbox's mapping), haproxy -dW (warnings are errors) accepts it."""
    sandbox = Sandbox(tmp_path / "state", 25000, settings=settings)
    files = {f["path"]: f["content"] for f in sandbox.host_bundle(sandbox.topology.postgres[0], ALL_SERVICES)["files"]}
    result = _haproxy_check(tmp_path, files[Paths.HAPROXY_CONFIG], "-dW")
    assert result.returncode == 0, result.stdout + result.stderr


def test_writer_and_reader_proxies_follow_patroni_on_every_node(settings, topology):
    (text,) = render_haproxy(settings, topology).values()
    sections = _proxies(text.decode())
    lag = settings.client_path.reader_max_lag_bytes
    for name, port, check in ((WRITER_PROXY, Ports.HAPROXY_PRIMARY, "/primary"),
                              (READER_PROXY, Ports.HAPROXY_REPLICAS, f"/replica?lag={lag}")):
        lines = sections[f"listen {name}"]
        assert f"bind 0.0.0.0:{port}" in lines
        assert f"http-check send meth GET uri {check}" in lines and "http-check expect status 200" in lines
        (default,) = [line for line in lines if line.startswith("default-server ")]
        # A demoted primary's (a promoted replica's) clients are cut at once; checks see a change within about 1.25 s.
        assert "on-marked-down shutdown-sessions" in default
        timing = dict(re.findall(r"\b(inter|fastinter|downinter|fall|rise) (\S+)", default))
        assert timing == {"inter": "1s", "fastinter": "250ms", "downinter": "500ms", "fall": "2", "rise": "2"}
        servers = [line for line in lines if line.startswith("server ")]
        assert servers == [f"server {n.name} {n.fqdn}:{Ports.PGBOUNCER} check port {Ports.PATRONI_API} verifyhost {n.fqdn}"
                           for n in topology.postgres]
        # The checks speak TLS to Patroni and verify its certificate by the node's name (the line above).
        assert default.endswith(f"check-ssl verify required ca-file {pki.ca_path()}")
        # Every node's share of what a PgBouncer accepts: all of them send writers to the leader's.
        assert f"maxconn {settings.client_path.max_client_connections // len(topology.postgres)}" in lines
    stats = sections["frontend stats"]
    assert f"bind 0.0.0.0:{Ports.HAPROXY_STATS}" in stats
    assert "http-request use-service prometheus-exporter if { path /metrics }" in stats
    assert f"acl writer_up nbsrv({WRITER_PROXY}) ge 1" in stats and f"acl reader_up nbsrv({READER_PROXY}) ge 1" in stats


def test_pgbouncer_pools_transactions_within_postgres_max_connections(settings):
    files = render_pgbouncer(settings)
    ini = configparser.ConfigParser(delimiters=("=",), inline_comment_prefixes=None)
    ini.read_string(files["pgbouncer/pgbouncer.ini"].decode())
    main, pool = ini["pgbouncer"], settings.client_path
    assert main["pool_mode"] == "transaction"
    assert int(main["default_pool_size"]) == pool.pool_size
    assert int(main["max_client_conn"]) == pool.max_client_connections
    assert main["listen_port"] == str(Ports.PGBOUNCER) and main["unix_socket_dir"] == Paths.POSTGRES_SOCKET_DIR
    assert (main["auth_type"], main["auth_hba_file"], main["auth_file"]) == ("hba", Paths.PGBOUNCER_HBA, Paths.PGBOUNCER_USERS)
    assert main["auth_user"] == AUTH_ROLE and main["auth_query"] == f"SELECT username, password FROM {AUTH_SCHEMA}.get_auth($1)"
    assert "admin_users" not in main  # the console is read-only (stats_users); reload with systemctl
    databases = {name: dict(re.findall(r"(\w+)=(\S+)", entry)) for name, entry in ini["databases"].items()}
    # No `*`: only the named databases are pooled, and the SLO aggregates' own, with a small pool of its own.
    assert set(databases) == {*pool.databases, settings.aggregates.database}
    aggregates_entry = databases.pop(settings.aggregates.database)
    assert aggregates_entry == {"host": Paths.POSTGRES_SOCKET_DIR, "port": str(Ports.POSTGRES),
                                "dbname": settings.aggregates.database, "pool_size": str(AGGREGATES_POOL_SIZE),
                                "max_db_connections": str(AGGREGATES_POOL_SIZE + 1)}
    limits = int(aggregates_entry["max_db_connections"])
    for name, entry in databases.items():
        # Over the local socket, to this node's PostgreSQL; the pool plus one connection for logins (auth_query).
        assert entry == {"host": Paths.POSTGRES_SOCKET_DIR, "port": str(Ports.POSTGRES), "dbname": name,
                         "max_db_connections": str(pool.pool_size + 1)}
        limits += int(entry["max_db_connections"])
    assert limits == pool.server_connections <= settings.patroni.max_connections - pool.reserved_connections


def test_no_password_in_any_client_path_file(settings, topology):
    files = {**render_pgbouncer(settings), **render_haproxy(settings, topology)}
    users = files["pgbouncer/userlist.txt"].decode().splitlines()
    assert users == ['"postgres" ""']  # a name PgBouncer must know for the exporter's console login; no password
    hba = [line.split() for line in files["pgbouncer/pgbouncer_hba.conf"].decode().splitlines() if line and line[0] != "#"]
    # The console only over the socket by peer; the console user and the login role refused over the network.
    assert hba[0] == ["local", "pgbouncer", "postgres", "peer"]
    assert [line for line in hba if "postgres" in line[2].split(",") and line[0] == "host"] == [
        ["host", "all", f"postgres,{AUTH_ROLE}", address, "reject"] for address in ("127.0.0.1/32", settings.vpc_cidr)]
    assert {line[-1] for line in hba if line[2] == "all"} == {"scram-sha-256"}
    for name, content in files.items():
        assert not re.search(rb"password\s*=|SCRAM-SHA-256\$|md5[0-9a-f]{32}", content), name


def test_pgbouncer_serves_tls_to_clients_and_admits_network_logins_over_tls_only(settings):
    files = render_pgbouncer(settings)
    ini = dict(line.split(" = ", 1) for line in files["pgbouncer/pgbouncer.ini"].decode().splitlines() if " = " in line)
    assert (ini["client_tls_sslmode"], ini["client_tls_protocols"]) == ("require", "secure")  # secure: TLS 1.2 and 1.3
    assert (ini["client_tls_key_file"], ini["client_tls_cert_file"], ini["client_tls_ca_file"]) == (
        pki.key_path(), pki.cert_path(), pki.ca_path())
    # Towards PostgreSQL, the socket only: no server_tls_* is needed, and no database is reached over TCP.
    databases = [value for key, value in ini.items() if key in settings.client_path.databases]
    assert databases and all(value.startswith(f"host={UNIX_SOCKET_DIR} ") for value in databases)
    hba = [line.split() for line in files["pgbouncer/pgbouncer_hba.conf"].decode().splitlines() if line and line[0] != "#"]
    assert {line[0] for line in hba if line[-1] != "reject"} == {"local", "hostssl"}


def test_postgres_admits_the_auth_role_only_by_peer_from_pgbouncers_os_user(settings, topology):
    node = topology.postgres[0]
    config = yaml.safe_load(render_patroni(settings, topology, node)[f"patroni/{node.name}.yml"])["postgresql"]
    hba = [line.split() for line in config["pg_hba"]]
    assert hba[:3] == [["local", "all", SUPERUSER, "peer"],
                       ["local", "all", AUTH_ROLE, "peer", f"map={IDENT_MAP}"],
                       ["local", "all", "all", "scram-sha-256"]]  # PgBouncer's server logins, with each client's keys
    assert not [line for line in hba if AUTH_ROLE in line[2] and line[0] != "local"]
    assert config["pg_ident"] == [f"{IDENT_MAP} {OS_USER} {AUTH_ROLE}"]


def test_a_change_of_the_client_path_settings_reloads_pgbouncer_and_haproxy_and_restarts_nothing():
    """A reload keeps every client connected (PgBouncer re-reads its files on SIGHUP, HAProxy's master starts new
    workers); a restart would cut them. What the agent does with a changed file is its change rule."""
    base = load_settings(stack_config("prod"), "prod")

    def actions(settings) -> dict[str, str]:
        topology = build_topology(settings)
        spec = next(s for s in host_specs(settings, topology) if s.host.role == "postgres")
        return {f["path"]: (f["content"], f["unit"], f["on_change"]) for f in bundle_document(spec, settings, topology)["files"]}

    before = actions(base)
    for change in ({"pool_size": 30}, {"max_client_connections": 3000}, {"reader_max_lag_bytes": 1048576},
                   {"databases": ("betting", "reports")}):
        after = actions(base.model_copy(update={"client_path": base.client_path.model_copy(update=change)}))
        changed = {path: after[path][1:] for path in after if after[path] != before.get(path)}
        assert changed, change
        assert set(changed.values()) <= {("pgbouncer", "reload"), ("haproxy", "reload")}, (change, changed)


def test_a_renewed_certificate_reloads_patroni_and_pgbouncer(settings, topology):
    """Patroni's reload sends PostgreSQL a SIGHUP (every ssl_* setting is context sighup), PgBouncer's rereads its
    client_tls_* files: the agent's `need(unit, action)` for each changed TLS secret file."""
    spec = next(s for s in host_specs(settings, topology) if s.host.role == "postgres")
    tls = {f["path"]: f["reloads"] for f in bundle_document(spec, settings, topology)["secret_files"]
           if f["path"] in (pki.ca_path(), pki.key_path(), pki.cert_path())}
    assert len(tls) == 3 and all(reloads == [["patroni", "reload"], ["pgbouncer", "reload"], ["haproxy", "reload"]]
                                 for reloads in tls.values())
