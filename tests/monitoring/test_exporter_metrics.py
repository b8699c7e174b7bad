"""Every exporter metric the rules and dashboards read is one the installed exporters really export.

Starts, on loopback: a PostgreSQL 15 primary with a streaming replica and a postgres_exporter
(with the rendered custom queries) on each, redis-server with redis_exporter, node_exporter with
the textfiles of the backup job and the host agent (written by their own code), a one-member etcd,
and Prometheus + Alertmanager from the rendered files. The metric names are taken from the rendered
rules and dashboards, so a new expression is checked too. Prometheus scrapes the PostgreSQL, node,
PgBouncer and HAProxy exporters (every 1 s), so every panel of the operations dashboards is shown
to answer with data from them.
Patroni's names are checked against the installed Patroni's REST API source (running it needs a
whole cluster; tests/postgres does that).

The client path: the real PgBouncer 1.18 (a minimal pgbouncer.ini of this test's, in front of the
primary) with our exporter (infra/hostagent/files/betting-pgbouncer-exporter, run by /usr/bin/python3
as on a host), and the real HAProxy 2.6 (a minimal haproxy.cfg of this test's) whose writer backend
`primary` checks a stand-in for Patroni's /primary. The rendered pgbouncer.ini and haproxy.cfg are
not what runs here: names exported do not depend on them, but a rendered file that renames the
backend `primary` would not be seen.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from infra.bundle import render_bundle
from infra.hostagent import agent
from infra.hosts import host_specs
from infra.render.grafana import ROLLOUT_STRAGGLERS, dashboard_queries
from infra.settings import load_settings
from infra.slo import SLOS
from infra.topology import build_topology
from scripts import backup as backup_job
from tests.conftest import stack_config
from tests.monitoring.conftest import binary, render_all
from tests.monitoring.harness import Webhook, free_port, query, start_stack

pytestmark = pytest.mark.live

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PATRONI_API_SOURCE = Path("/usr/lib/python3/dist-packages/patroni/api.py")
# A name not followed by a label matcher (`name="..."` is a label, `name == 0` a metric).
EXPORTER_METRIC = re.compile(
    r"\b((?:pg|redis|node|etcd|prometheus|alertmanager|patroni|pgbouncer|haproxy|backup|betting_agent)_[a-zA-Z0-9_]+)\b"
    r'(?!\s*(?:=~|!~|!=|=)\s*")'
)
PGBOUNCER_EXPORTER = Path(__file__).resolve().parents[2] / "infra" / "hostagent" / "files" / "betting-pgbouncer-exporter"
# The dashboards whose every panel must show data from the exporters started here.
OPERATIONS_DASHBOARDS = ("backups-wal-archiving", "client-path", "rollouts")
# The pool of this test's pgbouncer.ini: small, so three sleeping clients leave one waiting.
POOL_SIZE = 2


def referenced_metrics(files: dict[str, bytes]) -> set[str]:
    """Exporter metric names in every rendered rule, dashboard query and SLO expression."""
    expressions = [slo.error_ratio("5m") + slo.sli_value("5m") for slo in SLOS]
    for path, content in files.items():
        if path.startswith("prometheus/rules/"):
            expressions += [rule["expr"] for group in yaml.safe_load(content)["groups"] for rule in group["rules"]]
        elif path.startswith("grafana/dashboards/"):
            document = json.loads(content)
            panels = document["panels"] + [p for row in document["panels"] for p in row.get("panels", [])]
            expressions += [t["expr"] for p in panels for t in p.get("targets", [])]
    return {match for expr in expressions for match in EXPORTER_METRIC.findall(expr)}


def _as_postgres(*command: str, **kwargs) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root."""
    wrapped = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *command]
    return subprocess.run(wrapped, capture_output=True, text=True, check=True, **kwargs)


def _scrape(url: str, timeout: float = 20, must_have: str = "", client: requests.Session | None = None) -> set[str]:
    deadline = time.monotonic() + timeout
    names: set[str] = set()
    while time.monotonic() < deadline:
        try:
            text = (client or requests).get(url, timeout=5).text
            names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
            if not must_have or must_have in names:
                return names
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    return names


def _metrics(url: str) -> dict[str, float]:
    """{sample (name and labels as exposed): value} of one scrape."""
    text = requests.get(url, timeout=5).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


def _wait_for(url: str, sample: str, predicate, timeout: float = 15) -> float:
    """The value of `sample` once `predicate` holds for it (a daemon's state takes a check or two to change)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        try:
            value = _metrics(url).get(sample)
        except requests.ConnectionError:
            value = None
        if value is not None and predicate(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"{sample} is {value} after {timeout}s at {url}")


class PatroniStandIn:
    """Answers /primary as Patroni's REST API does: 200 on the leader, 503 elsewhere; `leader` flips it."""

    def __init__(self) -> None:
        self.leader = True
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200 if stand_in.leader and self.path == "/primary" else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _pgbouncer_ini(root: Path, port: int, primary_port: int) -> str:
    return f"""\
[databases]
postgres = host=127.0.0.1 port={primary_port} dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/userlist.txt
admin_users = pgbouncer
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 50
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
"""


def _haproxy_cfg(stats_port: int, writer_port: int, backend_port: int, patroni_port: int) -> str:
    # Only what the metrics depend on: a writer backend named `primary` checked on Patroni's /primary,
    # a reader backend, and the built-in exporter on the stats frontend.
    return f"""\
defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m
    timeout check 1s
frontend stats
    mode http
    bind 127.0.0.1:{stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
listen primary
    bind 127.0.0.1:{writer_port}
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 200ms fall 1 rise 1 on-marked-down shutdown-sessions
    server pg-1 127.0.0.1:{backend_port} check port {patroni_port}
listen replicas
    bind 127.0.0.1:{free_port()}
    option httpchk GET /replica
    default-server inter 200ms fall 1 rise 1
    server pg-1 127.0.0.1:{backend_port} check port {patroni_port}
"""


class Processes:
    def __init__(self) -> None:
        self.running: list[subprocess.Popen] = []

    def start(self, command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        self.running.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.running):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Metric names exported by the real daemons: {source: names}."""
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    files = render_all(settings, topology)
    logs = tmp_path_factory.mktemp("exporter-logs")
    # The postgres user cannot enter pytest's root-only temporary folder.
    pg_root = Path(tempfile.mkdtemp(prefix="monitoring-pg-", dir="/tmp"))
    shutil.chown(pg_root, "postgres", "postgres")
    processes = Processes()
    stand_ins: list[PatroniStandIn] = []
    webhook = Webhook()
    stack = None
    pg_ctl = [str(PG_BIN / "pg_ctl")]
    primary, replica = pg_root / "primary", pg_root / "replica"
    primary_port, replica_port = free_port(), free_port()
    try:
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(primary), "-U", "postgres", "--auth=trust")
        # Archiving on (to nowhere): pg_stat_archiver's last_archive_age is NULL, exported as NaN, until a
        # segment is archived. A standby with archive_mode on does not archive.
        options = (f"-c listen_addresses=127.0.0.1 -c unix_socket_directories={pg_root} -c archive_mode=on "
                   "-c archive_command=/bin/true -c port=")
        for data, port in ((primary, primary_port), (replica, replica_port)):
            if data == replica:
                _as_postgres(str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres",
                             "-D", str(replica), "-R")
            _as_postgres(*pg_ctl, "-D", str(data), "-o", options + str(port),
                         "-l", str(pg_root / f"{data.name}.log"), "-w", "start")

        # An inactive slot on the primary, as Patroni keeps for a member that does not stream, and one on the
        # replica: the custom slot query must work during recovery, where the exporter's own fails.
        for port, slot in ((primary_port, "pg_2"), (replica_port, "pg_3")):
            _as_postgres(str(PG_BIN / "psql"), "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                         f"SELECT pg_create_physical_replication_slot('{slot}', true)")
        _as_postgres(str(PG_BIN / "psql"), "-X", "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres", "-c",
                     "CREATE TABLE archived (id int); SELECT pg_switch_wal()")

        queries = logs / "queries.yaml"
        queries.write_bytes(files["postgres_exporter/queries.yaml"])
        exporter_ports = {}
        for name, port in (("primary", primary_port), ("replica", replica_port)):
            exporter_ports[name] = free_port()
            env = {**os.environ, "DATA_SOURCE_NAME": f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable"}
            processes.start([binary("prometheus-postgres-exporter"), f"--web.listen-address=127.0.0.1:{exporter_ports[name]}",
                             f"--extend.query-path={queries}"], logs / f"postgres_exporter-{name}.log", env)

        redis_port, redis_exporter_port = free_port(), free_port()
        processes.start([binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--maxmemory", "64mb"], logs / "redis.log")
        processes.start([binary("prometheus-redis-exporter"), f"-redis.addr=redis://127.0.0.1:{redis_port}",
                         f"-web.listen-address=127.0.0.1:{redis_exporter_port}"], logs / "redis_exporter.log")

        textfiles = logs / "textfile"
        textfiles.mkdir()
        # What the backup job writes after a backup it took and verified, and the host agent after a healthy apply:
        # their own serialisers (scripts/backup.py metrics_text, infra/hostagent/agent.py metrics_text).
        now = time.time()
        (textfiles / backup_job.METRICS_FILE).write_text(backup_job.metrics_text(
            "betting-prod", {"backup_last_success_timestamp": f"{now:.3f}", "backup_last_verified_timestamp": f"{now:.3f}",
                             "backup_last_duration_seconds": "61.5", "backup_last_size_bytes": "123456789"}))
        (spec,) = [s for s in host_specs(settings, topology) if s.host.name == "pg-1"]
        bundle = json.loads(render_bundle(spec, settings, topology))
        (textfiles / agent.METRICS_FILE).write_text(
            agent.metrics_text(bundle, 3, now, agent.rollout_digest('{"pg-1": "' + "0" * 64 + '"}')))
        node_port = free_port()
        processes.start([binary("prometheus-node-exporter"), f"--web.listen-address=127.0.0.1:{node_port}",
                         f"--collector.textfile.directory={textfiles}"], logs / "node_exporter.log")

        etcd_client, etcd_peer = free_port(), free_port()
        processes.start([binary("etcd"), "--data-dir", str(logs / "etcd"), "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
                         "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
                         "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                         "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                         "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}"], logs / "etcd.log")

        # The client path: PgBouncer (it refuses to run as root) with our exporter, HAProxy with a Patroni stand-in.
        pgbouncer_port, pgbouncer_exporter_port = free_port(), free_port()
        (pg_root / "userlist.txt").write_text('"pgbouncer" ""\n"postgres" ""\n')
        (pg_root / "pgbouncer.ini").write_text(_pgbouncer_ini(pg_root, pgbouncer_port, primary_port))
        for path in (pg_root / "userlist.txt", pg_root / "pgbouncer.ini"):
            shutil.chown(path, "postgres", "postgres")
        processes.start(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", binary("pgbouncer"),
                         str(pg_root / "pgbouncer.ini")], logs / "pgbouncer.out")
        processes.start(["/usr/bin/python3", str(PGBOUNCER_EXPORTER)], logs / "pgbouncer_exporter.log", {
            **os.environ, "LISTEN_ADDRESS": f"127.0.0.1:{pgbouncer_exporter_port}",
            "PGBOUNCER_DSN": f"host=127.0.0.1 port={pgbouncer_port} user=pgbouncer dbname=pgbouncer"})
        patroni = PatroniStandIn()
        stand_ins.append(patroni)
        haproxy_stats = free_port()
        (logs / "haproxy.cfg").write_text(_haproxy_cfg(haproxy_stats, free_port(), pgbouncer_port, patroni.port))
        processes.start([binary("haproxy"), "-f", str(logs / "haproxy.cfg")], logs / "haproxy.log")

        targets = {"postgres": [(f"127.0.0.1:{exporter_ports['primary']}", "pg-1"),
                                (f"127.0.0.1:{exporter_ports['replica']}", "pg-2")],
                   "node": [(f"127.0.0.1:{node_port}", "pg-1")],
                   "pgbouncer": [(f"127.0.0.1:{pgbouncer_exporter_port}", "pg-1")],
                   "haproxy": [(f"127.0.0.1:{haproxy_stats}", "pg-1")]}
        # These exporters serve plain HTTP: this module is about their metric names.
        stack = start_stack(logs / "stack", files, targets, webhook, {"scrape_interval": "1s", "evaluation_interval": "1s"},
                            prometheus_bin=binary("prometheus"), alertmanager_bin=binary("prometheus-alertmanager"),
                            plain_jobs=("postgres", "node"))

        # The primary's exporter lists the replica in pg_stat_replication once it streams.
        yield {
            "postgres primary": _scrape(f"http://127.0.0.1:{exporter_ports['primary']}/metrics", 30,
                                        "pg_stat_replication_pg_wal_lsn_diff"),
            "postgres replica": _scrape(f"http://127.0.0.1:{exporter_ports['replica']}/metrics", 30,
                                        "pg_replication_lag_seconds"),
            "redis": _scrape(f"http://127.0.0.1:{redis_exporter_port}/metrics", 20, "redis_up"),
            "node": _scrape(f"http://127.0.0.1:{node_port}/metrics", 20, "backup_last_success_timestamp"),
            "etcd": _scrape(f"http://127.0.0.1:{etcd_client}/metrics", 20, "etcd_server_has_leader"),
            "prometheus": _scrape(f"{stack.prometheus_url}/metrics", 20, "prometheus_notifications_sent_total", stack.client),
            "alertmanager": _scrape(f"{stack.alertmanager_url}/metrics", 20, client=stack.client),
            "patroni": set(re.findall(r'"(patroni_[a-z_]+)', PATRONI_API_SOURCE.read_text())),
            "pgbouncer": _scrape(f"http://127.0.0.1:{pgbouncer_exporter_port}/metrics", 20,
                                 "pgbouncer_pools_client_maxwait_seconds"),
            "haproxy": _scrape(f"http://127.0.0.1:{haproxy_stats}/metrics", 20, "haproxy_backend_active_servers"),
            "files": files,
            "stack": stack,
            "live": {"postgres_primary": f"http://127.0.0.1:{exporter_ports['primary']}/metrics",
                     "postgres_replica": f"http://127.0.0.1:{exporter_ports['replica']}/metrics",
                     "pgbouncer_port": pgbouncer_port, "pgbouncer_exporter": f"http://127.0.0.1:{pgbouncer_exporter_port}/metrics",
                     "haproxy": f"http://127.0.0.1:{haproxy_stats}/metrics", "patroni": patroni},
        }
    finally:
        if stack is not None:
            stack.stop()
        processes.stop()
        for stand_in in stand_ins:
            stand_in.close()
        webhook.close()
        for data in (replica, primary):
            if data.exists():
                subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                                *pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(pg_root, ignore_errors=True)


def test_every_referenced_exporter_metric_is_exported(exported):
    referenced = referenced_metrics(exported["files"])
    assert {"pg_up", "pg_stat_replication_pg_wal_lsn_diff", "redis_memory_max_bytes", "etcd_server_has_leader"} <= referenced
    available = set().union(*(names for source, names in exported.items() if source not in ("files", "live", "stack")))
    assert "patroni_primary" in exported["patroni"], "Patroni's metrics source not found"
    missing = sorted(referenced - available)
    assert not missing, f"not exported by the installed exporters: {missing}"


def test_fixed_names_of_the_document(exported):
    """The document's pg_replication_lag_bytes does not exist; what the rules use instead does."""
    primary, replica = exported["postgres primary"], exported["postgres replica"]
    assert "pg_replication_lag_bytes" not in primary | replica
    assert "pg_stat_replication_pg_wal_lsn_diff" in primary  # bytes behind, per standby, on the primary
    assert "pg_replication_lag_seconds" in replica  # the custom query (infra/render/exporters.py)
    assert "pg_replication_is_replica" in replica
    assert "backup_last_success_timestamp" in exported["node"]  # through the textfile collector


def test_wal_archiving_metrics_the_backup_alerts_read(exported):
    """WalArchivingFailing reads pg_stat_archiver as postgres_exporter 0.11 exports it (counters and an age)."""
    primary, replica = exported["postgres primary"], exported["postgres replica"]
    for name in ("pg_stat_archiver_archived_count", "pg_stat_archiver_failed_count", "pg_stat_archiver_last_archive_age"):
        assert name in primary and name in replica, name
    assert "pg_replication_is_replica" in primary  # 0 there: the primary archives, a replica does not
    assert {"pg_stat_database_tup_inserted", "pg_stat_database_tup_updated", "pg_stat_database_tup_deleted"} <= primary
    assert "backup_last_verified_timestamp" in exported["node"]


def test_cluster_alert_metrics(exported):
    """The cluster alerts' names, from the exporters that must export them (a name exported elsewhere would not do)."""
    primary, replica = exported["postgres primary"], exported["postgres replica"]
    for name in ("pg_database_datfrozenxid_age", "pg_replication_slot_active", "pg_replication_slot_retained_wal_bytes"):
        assert name in primary and name in replica, name  # our custom queries, on a replica too
    assert {"pg_settings_autovacuum_freeze_max_age", "pg_settings_max_slot_wal_keep_size_bytes"} <= primary
    # The exporter's own slot metrics exist on the primary only: its query fails during recovery.
    assert "pg_replication_slots_active" in primary and "pg_replication_slots_active" not in replica
    assert {"patroni_pending_restart", "patroni_is_paused", "patroni_sync_standby", "patroni_primary"} <= exported["patroni"]
    assert {"etcd_mvcc_db_total_size_in_bytes", "etcd_server_quota_backend_bytes"} <= exported["etcd"]
    assert {"node_time_seconds", "node_timex_sync_status", "node_timex_maxerror_seconds"} <= exported["node"]


def test_the_slot_and_wraparound_queries_measure_on_primary_and_replica(exported):
    """The primary's slot pg_2 and the replica's pg_3 have no receiver: active 0, each holding the WAL its server
    has written or replayed since the slot reserved it; every database's datfrozenxid age, on both servers."""
    for url, slot in ((exported["live"]["postgres_primary"], "pg_2"), (exported["live"]["postgres_replica"], "pg_3")):
        metrics = _metrics(url)
        slots = {k: v for k, v in metrics.items() if f'slot_name="{slot}"' in k}
        active = [v for k, v in slots.items() if k.startswith("pg_replication_slot_active{")]
        retained = [v for k, v in slots.items() if k.startswith("pg_replication_slot_retained_wal_bytes{")]
        assert active == [0] and len(retained) == 1 and retained[0] >= 0, (url, slots)
        ages = {k: v for k, v in metrics.items() if k.startswith("pg_database_datfrozenxid_age{")}
        assert any('datname="postgres"' in k for k in ages) and all(v > 0 for v in ages.values()), ages
        assert not any('datname="template0"' in k for k in ages)  # datallowconn false: autovacuum freezes it itself


def test_pgbouncer_exporter_sees_clients_wait_for_an_exhausted_pool(exported):
    """One client more than pool_size, each in a transaction: the real PgBouncer 1.18 queues it, and the exporter
    reports the waiting client, its wait, and every server connection of the pool busy (the alerts' inputs)."""
    live = exported["live"]
    url, pool = live["pgbouncer_exporter"], '{database="postgres",user="postgres"}'
    assert _metrics(url)["pgbouncer_up"] == 1
    assert _metrics(url)['pgbouncer_databases_pool_size{database="postgres"}'] == POOL_SIZE
    clients = [subprocess.Popen([str(PG_BIN / "psql"), "-X", "-h", "127.0.0.1", "-p", str(live["pgbouncer_port"]),
                                 "-U", "postgres", "-d", "postgres", "-c", "SELECT pg_sleep(1.5)"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(POOL_SIZE + 1)]
    try:
        assert _wait_for(url, f"pgbouncer_pools_client_waiting_connections{pool}", lambda v: v == 1) == 1
        _wait_for(url, f"pgbouncer_pools_client_maxwait_seconds{pool}", lambda v: v > 0.2)
        metrics = _metrics(url)
        assert metrics[f"pgbouncer_pools_server_active_connections{pool}"] == POOL_SIZE
        assert metrics["pgbouncer_config_max_client_connections"] == 50
        assert metrics["pgbouncer_used_clients"] >= POOL_SIZE + 1
    finally:
        for client in clients:
            client.wait(timeout=30)
    assert all(c.returncode == 0 for c in clients), [c.stderr.read() for c in clients]
    check = subprocess.run([binary("promtool"), "check", "metrics"], input=requests.get(url, timeout=5).text,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_haproxy_writer_backend_follows_patronis_primary_answer(exported):
    """HAProxy 2.6's own exporter: the writer backend `primary` has one active server while Patroni's /primary
    answers 200, none once it answers 503 (what HAProxyNoPrimary reads), and one again after."""
    live = exported["live"]
    active = 'haproxy_backend_active_servers{proxy="primary"}'
    assert _wait_for(live["haproxy"], active, lambda v: v == 1) == 1
    live["patroni"].leader = False
    try:
        assert _wait_for(live["haproxy"], active, lambda v: v == 0) == 0
    finally:
        live["patroni"].leader = True
    assert _wait_for(live["haproxy"], active, lambda v: v == 1) == 1


def test_debians_pgbouncer_exporter_cannot_read_pgbouncer_118(exported, tmp_path):
    """Why betting-pgbouncer-exporter exists: Debian 12's prometheus-pgbouncer-exporter 1.7 reads SHOW STATS'
    total_requests, gone since PgBouncer 1.8, and exits before serving. When this fails, Debian's may do."""
    live = exported["live"]
    result = subprocess.run([binary("prometheus-pgbouncer-exporter"), "--host", "127.0.0.1", "--port", str(free_port()),
                             "--pgbouncer-host", "127.0.0.1", "--pgbouncer-port", str(live["pgbouncer_port"]),
                             "--pgbouncer-user", "pgbouncer"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "KeyError: 'total_requests'" in result.stderr


def _answer(stack, expr: str, timeout: float = 30) -> list:
    """The query's series once it has some and none is NaN (a rate needs two scrapes; pg_stat_archiver's age is NaN
    until the first archived segment), else the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = query(stack.prometheus_url, expr, stack.client)
        assert answer.get("status") == "success", f"{expr}: {answer}"
        result = answer["data"]["result"]
        if (result and all(r["value"][1] != "NaN" for r in result)) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_every_operations_dashboard_panel_shows_data_from_the_real_exporters(exported):
    """Each query of the backups, client-path and rollouts dashboards, on the Prometheus scraping the real
    exporters, returns series with numbers (no NaN): the names, labels and joins (pg_replication_is_replica by
    instance, the rendered proxies primary and replicas) are the exporters'. Except the rollout stragglers: one host
    never differs (tests/monitoring/test_dashboards.py has promtool find them among several)."""
    stack, files = exported["stack"], exported["files"]
    empty = []
    for uid in OPERATIONS_DASHBOARDS:
        for expr in dashboard_queries(json.loads(files[f"grafana/dashboards/{uid}.json"])):
            if expr == ROLLOUT_STRAGGLERS:
                assert _answer(stack, expr, timeout=0) == [], expr
            else:
                result = _answer(stack, expr)
                if not result or any(r["value"][1] == "NaN" for r in result):
                    empty.append(f"{uid}: {expr}: {result}")
    assert not empty, "\n".join(empty)
    (bundle,) = _answer(stack, "betting_agent_bundle_info")
    assert bundle["metric"]["role"] == "postgres" and len(bundle["metric"]["digest"]) == 64
    proxies = {r["metric"]["proxy"] for r in _answer(stack, "haproxy_backend_active_servers")}
    assert {"primary", "replicas"} <= proxies
