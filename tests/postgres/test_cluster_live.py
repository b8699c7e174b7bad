"""The rendered prod configs as a live 3-node cluster: bootstrap, REST API, streaming, failover
without losing an acknowledged write (split brain included), health checks, sandbox up/down.

The client path runs in it as on the hosts (HAProxy and PgBouncer from the rendered files, the
agent's units): a client of the writer endpoint goes through each node's HAProxy in turn, as the
load balancer spreads connections. What the sandbox cannot show is the load balancer itself (its
health checks of /health/writer and its fail-open): there are no AWS load balancers here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psycopg
import pytest
import requests

from infra.render.haproxy import HEALTH_READER, HEALTH_WRITER
from infra.sandbox import cli
from infra.sandbox.runner import port_open, wait_for
from infra.topology import SecretNames
from scripts import health_checks
from scripts.failover_drill import CLIENT_ROLE, client_connect, prepare_client, run_drill

pytestmark = pytest.mark.live


def _members(sandbox) -> dict[str, dict]:
    return {m["name"]: m for m in sandbox.cluster()["members"]}


def _status(sandbox, node, path: str) -> int:
    return requests.get(f"{sandbox.patroni_url(node)}/{path}", timeout=3, verify=sandbox.ca_file).status_code


def test_unsafe_rest_api_calls_need_the_login_and_the_health_endpoints_stay_open_over_tls(cluster):
    """Patroni's unsafe endpoints refuse a caller without the login (the drill's switchover below is the
    authenticated one that works); the GETs HAProxy and Prometheus read answer without one, over TLS only.
    What it cannot see: the allowlist, since every sandbox host is 127.0.0.1 (allowed)."""
    leader = cluster.leader()
    url = cluster.patroni_url(leader)
    for method, path, body in (("POST", "switchover", {"leader": leader.name}), ("POST", "restart", {}),
                               ("POST", "reinitialize", {}), ("PATCH", "config", {"ttl": 99})):
        response = requests.request(method, f"{url}/{path}", json=body, timeout=5, verify=cluster.ca_file)
        assert (response.status_code, response.text) == (401, "no auth header received"), path
    wrong = requests.post(f"{url}/switchover", json={"leader": leader.name}, timeout=5, verify=cluster.ca_file,
                          auth=(cluster.patroni_auth()[0], "not-the-password"))
    assert wrong.status_code == 401
    assert _status(cluster, leader, "primary") == 200 and cluster.leader() == leader  # nothing moved
    with pytest.raises(requests.exceptions.SSLError):  # a certificate of the stack's CA, not the system's
        requests.get(f"{url}/health", timeout=3)
    with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP beside it
        requests.get(url.replace("https://", "http://") + "/health", timeout=3)


def test_etcd_takes_only_clients_with_a_certificate_of_the_stacks_ca(cluster, tmp_path):
    """Client-certificate authentication on etcd's client port (the v3 gateway Patroni and the agent use)."""
    from infra.sandbox.platform import ca_identity, signed_identity

    url = f"{cluster.etcd_url(cluster.topology.etcd[0])}/health"
    assert requests.get(url, timeout=3, verify=cluster.ca_file, cert=cluster.etcd_client_cert()).json()["health"] == "true"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, timeout=3, verify=cluster.ca_file)  # no certificate
    other_cert, other_key = signed_identity(*ca_identity("another CA"), common_name="intruder")
    (tmp_path / "c.pem").write_text(other_cert)
    (tmp_path / "k.pem").write_text(other_key)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, timeout=3, verify=cluster.ca_file, cert=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")))


def _query(sandbox, node, sql: str, *params):
    with psycopg.connect(sandbox.dsn(node), autocommit=True, connect_timeout=3) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def test_bootstraps_with_exactly_one_leader(cluster):
    members = _members(cluster)
    assert sorted(members) == [n.name for n in cluster.topology.postgres]
    assert [name for name, m in members.items() if m["role"] == "leader"] == [cluster.leader().name]
    writable = [n.name for n in cluster.topology.postgres if not _query(cluster, n, "SELECT pg_is_in_recovery()")[0][0]]
    assert writable == [cluster.leader().name]


def test_rest_api_answers_as_patroni_documents(cluster):
    leader = cluster.leader()
    for node in cluster.topology.postgres:
        is_leader = node == leader
        assert _status(cluster, node, "primary") == (200 if is_leader else 503), node.name
        assert _status(cluster, node, "replica") == (503 if is_leader else 200), node.name
        assert _status(cluster, node, "health") == 200, node.name
        metrics = requests.get(f"{cluster.patroni_url(node)}/metrics", timeout=3, verify=cluster.ca_file).text
        assert f'patroni_primary{{scope="{cluster.topology.patroni_scope}"}} {int(is_leader)}' in metrics


def test_replicas_stream_synchronously_and_see_committed_rows(cluster):
    leader = cluster.leader()
    rows = _query(cluster, leader, "SELECT application_name, state, sync_state FROM pg_stat_replication")
    replicas = sorted(n.name for n in cluster.topology.postgres if n != leader)
    assert sorted(r[0] for r in rows) == replicas
    assert {r[1] for r in rows} == {"streaming"}
    assert [r[2] for r in rows].count("sync") == 1  # synchronous_mode: Patroni names one sync standby
    marker = f"stream-{time.time_ns()}"
    _query(cluster, leader, "CREATE TABLE IF NOT EXISTS stream_check (marker text)")
    _query(cluster, leader, "INSERT INTO stream_check VALUES (%s)", marker)
    for node in cluster.topology.postgres:
        if node != leader:
            wait_for(f"the row on {node.name}",
                     lambda node=node: _query(cluster, node, "SELECT count(*) FROM stream_check WHERE marker = %s", marker)[0][0],
                     10)
    assert "pg_stat_statements" in _query(cluster, leader, "SHOW shared_preload_libraries")[0][0]


def test_replication_runs_over_tls_verified_and_psql_without_tls_is_refused(cluster):
    """Every walsender's session is TLS (pg_stat_ssl); each replica's primary_conninfo, written by Patroni from
    postgresql.authentication.replication, verifies the leader (verify-full, the sandbox's CA): since pg_hba names
    no `host` line, pg_basebackup and pg_rewind in the drills come in the same way. Over TCP without TLS, psql is
    refused by pg_hba."""
    leader = cluster.leader()
    sessions = _query(cluster, leader, "SELECT r.application_name, s.ssl, s.version FROM pg_stat_replication r "
                                       "LEFT JOIN pg_stat_ssl s ON s.pid = r.pid")
    assert sorted(name for name, *_ in sessions) == sorted(n.name for n in cluster.topology.postgres if n != leader)
    assert all(ssl and version in ("TLSv1.2", "TLSv1.3") for _, ssl, version in sessions), sessions
    for node in cluster.topology.postgres:
        if node != leader:
            conninfo = _query(cluster, node, "SHOW primary_conninfo")[0][0]
            assert "sslmode=verify-full" in conninfo and f"sslrootcert={cluster.layout.host_root(node)}/" in conninfo
    password = cluster.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD)
    refused = subprocess.run(["psql", "-X", "-w", "-c", "SELECT 1",
                              f"host=127.0.0.1 port={cluster.layout.postgres(leader)} user=postgres dbname=postgres "
                              "sslmode=disable"], env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True)
    assert refused.returncode != 0 and "no encryption" in refused.stderr, refused.stderr


def test_exporters_log_in_with_the_role_patroni_created_at_bootstrap(cluster):
    for node in cluster.topology.postgres:
        metrics = requests.get(f"https://127.0.0.1:{cluster.layout.postgres_exporter(node)}/metrics", timeout=5,
                               verify=cluster.ca_file).text  # TLS with the host's identity, as Prometheus scrapes it
        assert "\npg_up 1\n" in metrics, node.name
    roles = _query(cluster, cluster.leader(), "SELECT rolname FROM pg_roles WHERE pg_has_role(rolname, 'pg_monitor', 'member')")
    assert ("postgres_exporter",) in roles


def _health(sandbox, node, path: str) -> int:
    return requests.get(f"http://127.0.0.1:{sandbox.layout.haproxy_stats(node)}{path}", timeout=3).status_code


def test_every_nodes_haproxy_sends_writes_to_the_leader_and_reads_to_a_replica(cluster):
    login = prepare_client(cluster)
    leader, port_of = cluster.leader(), {cluster.layout.postgres(n): n.name for n in cluster.topology.postgres}
    for node in cluster.topology.postgres:
        with client_connect(login, cluster.layout.haproxy_primary(node)) as conn:  # verify-full, the sandbox's CA
            assert conn.pgconn.ssl_in_use
            port, in_recovery, user = conn.execute(
                "SELECT current_setting('port')::int, pg_is_in_recovery(), current_user").fetchone()
        assert (port_of[port], in_recovery, user) == (leader.name, False, CLIENT_ROLE), node.name
        with client_connect(login, cluster.layout.haproxy_replicas(node)) as conn:
            port, in_recovery = conn.execute("SELECT current_setting('port')::int, pg_is_in_recovery()").fetchone()
        assert port_of[port] != leader.name and in_recovery, node.name
        # What the load balancer's health checks ask: this HAProxy has a primary, and a replica.
        assert (_health(cluster, node, HEALTH_WRITER), _health(cluster, node, HEALTH_READER)) == (200, 200)
        metrics = requests.get(f"http://127.0.0.1:{cluster.layout.haproxy_stats(node)}/metrics", timeout=3).text
        assert 'haproxy_backend_active_servers{proxy="primary"} 1\n' in metrics
        assert f'haproxy_backend_active_servers{{proxy="replicas"}} {len(cluster.topology.postgres) - 1}\n' in metrics
        pools = requests.get(f"http://127.0.0.1:{cluster.layout.pgbouncer_exporter(node)}/metrics", timeout=5).text
        assert "\npgbouncer_up 1.0\n" in pools, node.name
    # HAProxy passes TCP through: TLS ends at PgBouncer, which refuses a client without it.
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(host="127.0.0.1", port=cluster.layout.haproxy_primary(leader), user=login.user,
                        password=login.password, dbname=login.database, connect_timeout=3, sslmode="disable")
    # The superuser is no client of the pooler, with its own password or any.
    password = cluster.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=cluster.layout.haproxy_primary(leader), user="postgres", password=password,
                        dbname=login.database, connect_timeout=3)


def _assert_the_client_path_followed(result, sandbox):
    """Through the writer endpoint: writes before and after, the new leader took them through every node's HAProxy
    (the lost node's too), none lost, none acknowledged by a replica or by the old leader once the new one took
    writes; the reader endpoint answered while no primary took writes."""
    assert result.endpoint_rto_s is not None
    assert result.endpoint_acks_before_fault > 0 and result.endpoint_acks_after_fault > 0
    assert result.new_leader in result.endpoint_members_after_fault
    assert set(result.endpoint_ports_after_fault) == {sandbox.layout.haproxy_primary(n) for n in sandbox.topology.postgres}
    assert result.endpoint_lost == 0
    assert result.endpoint_misrouted == 0
    assert result.reads_without_primary > 0


def test_node_loss_fails_over_without_losing_an_acknowledged_write_and_the_old_leader_rejoins(cluster):
    old = cluster.leader()
    log = cluster.layout.log_dir / f"{old.name}.log"
    log_offset = log.stat().st_size
    result = run_drill(cluster, "node-loss", progress=print)
    assert result.new_leader not in (None, old.name)
    assert result.acks_before_fault > 0 and result.acks_after_fault > 0
    assert result.lost == 0
    _assert_the_client_path_followed(result, cluster)
    leader = cluster.leader()
    # A member publishes its timeline in the DCS at its next HA loop, which may come after it streams already.
    def published():
        members = _members(cluster)
        return members if "timeline" in members[old.name] else None

    members = wait_for(f"{old.name} to publish its timeline", published, 30, 0.5)
    assert members[old.name]["role"] in ("replica", "sync_standby")
    assert members[old.name]["timeline"] == members[leader.name]["timeline"]
    assert _query(cluster, old, "SELECT status FROM pg_stat_wal_receiver")[0][0] == "streaming"
    # The killed primary had WAL its successor never saw: Patroni rewinds it rather than re-cloning it.
    rejoin_log = log.read_bytes()[log_offset:].decode(errors="replace")
    assert "pg_rewind" in rejoin_log
    assert "replica has been created" not in rejoin_log


def test_split_brain_only_patroni_dies_no_acknowledged_write_lost(cluster):
    old = cluster.leader()
    result = run_drill(cluster, "split-brain", progress=print)
    assert result.new_leader not in (None, old.name)
    # The orphan primary really lived on next to the new one, and the writer kept going through it all.
    assert result.old_postmaster_alive_at_new_primary
    assert result.acks_before_fault > 0 and result.acks_after_fault > 0
    assert result.lost == 0
    assert _members(cluster)[old.name]["role"] in ("replica", "sync_standby")
    # HAProxy cut the orphan's clients once its Patroni stopped answering: none of its writes came after the new leader's.
    _assert_the_client_path_followed(result, cluster)


def test_switchover_through_the_writer_endpoint_loses_and_misroutes_nothing(cluster):
    old = cluster.leader()
    result = run_drill(cluster, "switchover", progress=print)
    assert result.new_leader not in (None, old.name) and result.lost == 0
    _assert_the_client_path_followed(result, cluster)
    assert _members(cluster)[old.name]["role"] in ("replica", "sync_standby")


def _run_health(sandbox, capsys) -> tuple[int, dict]:
    code = health_checks.main(["--sandbox", "--state-dir", str(sandbox.layout.state_dir),
                               "--port-base", str(sandbox.layout.port_base), "--json", "--timeout", "2"])
    report = json.loads(capsys.readouterr().out)
    return code, {c["check"]: c for c in report["checks"]} | {"overall": report["status"]}


def test_health_checks_all_healthy(cluster, capsys):
    # Prometheus needs one scrape of every target before it can call them up.
    targets = health_checks.sandbox_targets(cluster.layout.state_dir, cluster.layout.port_base)
    wait_for("every check healthy", lambda: health_checks.overall(health_checks.run_checks(targets, 2)) == "healthy", 60, 1)
    code, checks = _run_health(cluster, capsys)
    assert code == 0 and checks["overall"] == "healthy"
    for name in ("patroni", "postgres", "redis", "prometheus", "alertmanager"):
        assert checks[name]["status"] == "healthy", checks[name]
    # The sandbox runs no ClickHouse and no Grafana: reported as such, never as healthy.
    assert checks["clickhouse"]["status"] == "not deployed"
    assert checks["grafana"]["status"] == "not deployed"


def test_health_checks_degraded_when_a_replica_stops(cluster, capsys):
    replica = next(n for n in cluster.topology.postgres if n != cluster.leader())
    cluster.signal_process(replica.name, signal.SIGTERM)
    wait_for(f"{replica.name} to stop", lambda: replica.name not in cluster.running() and not cluster.postmaster_pid(replica), 30)
    code, checks = _run_health(cluster, capsys)
    assert code == 1 and checks["overall"] == "degraded"
    assert checks["patroni"]["status"] == "degraded"
    assert checks["postgres"]["status"] == "healthy"


def test_health_checks_down_without_a_leader(cluster, capsys):
    for node in cluster.topology.postgres:
        cluster.signal_process(node.name, signal.SIGTERM)
    wait_for("every Patroni to stop", lambda: not any(n.name in cluster.running() for n in cluster.topology.postgres), 60)
    code, checks = _run_health(cluster, capsys)
    assert code == 2 and checks["overall"] == "down"
    assert checks["patroni"]["status"] == "down"
    assert checks["postgres"]["status"] == "down"
    # No node's HAProxy has a primary: the load balancer's writer targets are all unhealthy (it then sends
    # connections to every target, and each has no server to send them to).
    for node in cluster.topology.postgres:
        wait_for(f"{node.name}'s HAProxy to see no primary", lambda node=node: _health(cluster, node, HEALTH_WRITER) == 503, 10)


def test_up_twice_changes_nothing(cluster, capsys):
    before = {name: proc.pid for name, proc in cluster.running().items()}
    args = ["--state-dir", str(cluster.layout.state_dir), "--port-base", str(cluster.layout.port_base)]
    assert cli.main([*args, "up", "prod"]) == 0
    out = capsys.readouterr().out
    assert "already running" in out and f"127.0.0.1:{cluster.layout.patroni(cluster.leader())}" in out
    assert {name: proc.pid for name, proc in cluster.running().items()} == before


def test_down_leaves_nothing_running_and_nothing_listening(cluster):
    pids = [p.pid for p in cluster.running().values()] + [cluster.postmaster_pid(n) for n in cluster.topology.postgres]
    assert len(pids) > 10
    cluster.down()
    assert not cluster.running()
    for pid in pids:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        assert state == "Z", f"pid {pid} still running"
    assert not [port for port in cluster.layout.ports(cluster.topology) if port_open(port)]
    state_dir = str(cluster.layout.state_dir).encode()
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmdline = open(f"/proc/{proc}/cmdline", "rb").read()
            except OSError:
                continue
            assert state_dir not in cmdline or open(f"/proc/{proc}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
