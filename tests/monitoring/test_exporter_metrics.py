"""Every exporter metric the rules and dashboards read is one the installed exporters really export.

Starts, on loopback: a PostgreSQL 15 primary with a streaming replica and a postgres_exporter
(with the rendered custom queries) on each, redis-server with redis_exporter, node_exporter with
a backup textfile, a one-member etcd, and Prometheus + Alertmanager from the rendered files. The
metric names are taken from the rendered rules and dashboards, so a new expression is checked too.
Patroni's names are checked against the installed Patroni's REST API source (running it needs a
whole cluster; tests/postgres does that).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from infra.settings import load_settings
from infra.slo import SLOS
from infra.topology import build_topology
from tests.conftest import stack_config
from tests.monitoring.conftest import binary, render_all
from tests.monitoring.harness import Webhook, free_port, start_stack

pytestmark = pytest.mark.live

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PATRONI_API_SOURCE = Path("/usr/lib/python3/dist-packages/patroni/api.py")
# A name not followed by a label matcher (`name="..."` is a label, `name == 0` a metric).
EXPORTER_METRIC = re.compile(
    r"\b((?:pg|redis|node|etcd|prometheus|alertmanager|patroni)_[a-zA-Z0-9_]+)\b" r'(?!\s*(?:=~|!~|!=|=)\s*")'
)


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


def _scrape(url: str, timeout: float = 20, must_have: str = "") -> set[str]:
    deadline = time.monotonic() + timeout
    names: set[str] = set()
    while time.monotonic() < deadline:
        try:
            text = requests.get(url, timeout=5).text
            names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
            if not must_have or must_have in names:
                return names
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    return names


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
    files = render_all(settings, build_topology(settings))
    logs = tmp_path_factory.mktemp("exporter-logs")
    # The postgres user cannot enter pytest's root-only temporary folder.
    pg_root = Path(tempfile.mkdtemp(prefix="monitoring-pg-", dir="/tmp"))
    shutil.chown(pg_root, "postgres", "postgres")
    processes = Processes()
    webhook = Webhook()
    stack = None
    pg_ctl = [str(PG_BIN / "pg_ctl")]
    primary, replica = pg_root / "primary", pg_root / "replica"
    primary_port, replica_port = free_port(), free_port()
    try:
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(primary), "-U", "postgres", "--auth=trust")
        options = f"-c listen_addresses=127.0.0.1 -c unix_socket_directories={pg_root} -c port="
        for data, port in ((primary, primary_port), (replica, replica_port)):
            if data == replica:
                _as_postgres(str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres",
                             "-D", str(replica), "-R")
            _as_postgres(*pg_ctl, "-D", str(data), "-o", options + str(port),
                         "-l", str(pg_root / f"{data.name}.log"), "-w", "start")

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
        # What the backup job writes after a successful pgBackRest run.
        (textfiles / "backup.prom").write_text(f"backup_last_success_timestamp {int(time.time())}\n"
                                               f"backup_last_verified_timestamp {int(time.time())}\n")
        node_port = free_port()
        processes.start([binary("prometheus-node-exporter"), f"--web.listen-address=127.0.0.1:{node_port}",
                         f"--collector.textfile.directory={textfiles}"], logs / "node_exporter.log")

        etcd_client, etcd_peer = free_port(), free_port()
        processes.start([binary("etcd"), "--data-dir", str(logs / "etcd"), "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
                         "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
                         "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                         "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                         "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}"], logs / "etcd.log")

        stack = start_stack(logs / "stack", files, {}, webhook,
                            prometheus_bin=binary("prometheus"), alertmanager_bin=binary("prometheus-alertmanager"))

        # The primary's exporter lists the replica in pg_stat_replication once it streams.
        yield {
            "postgres primary": _scrape(f"http://127.0.0.1:{exporter_ports['primary']}/metrics", 30,
                                        "pg_stat_replication_pg_wal_lsn_diff"),
            "postgres replica": _scrape(f"http://127.0.0.1:{exporter_ports['replica']}/metrics", 30,
                                        "pg_replication_lag_seconds"),
            "redis": _scrape(f"http://127.0.0.1:{redis_exporter_port}/metrics", 20, "redis_up"),
            "node": _scrape(f"http://127.0.0.1:{node_port}/metrics", 20, "backup_last_success_timestamp"),
            "etcd": _scrape(f"http://127.0.0.1:{etcd_client}/metrics", 20, "etcd_server_has_leader"),
            "prometheus": _scrape(f"{stack.prometheus_url}/metrics", 20, "prometheus_notifications_sent_total"),
            "alertmanager": _scrape(f"{stack.alertmanager_url}/metrics", 20),
            "patroni": set(re.findall(r'"(patroni_[a-z_]+)', PATRONI_API_SOURCE.read_text())),
            "files": files,
        }
    finally:
        if stack is not None:
            stack.stop()
        processes.stop()
        webhook.close()
        for data in (replica, primary):
            if data.exists():
                subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                                *pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(pg_root, ignore_errors=True)


def test_every_referenced_exporter_metric_is_exported(exported):
    referenced = referenced_metrics(exported["files"])
    assert {"pg_up", "pg_stat_replication_pg_wal_lsn_diff", "redis_memory_max_bytes", "etcd_server_has_leader"} <= referenced
    available = set().union(*(names for source, names in exported.items() if source != "files"))
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
