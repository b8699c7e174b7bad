"""The operations dashboards (backups and WAL archiving, the client path, rollouts): each renders with its
panels under a uid that does not change (links and bookmarks use it), its thresholds are the alerts', and
the queries that combine series are evaluated by promtool's PromQL engine on series shaped as the exporters
export them. That their metric names exist on the real exporters, and that every panel shows data from
them, is tests/monitoring/test_exporter_metrics.py's (live)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from infra.render import grafana
from infra.render.prometheus import BACKUP_ALERTS, CLIENT_PATH_ALERTS, DOCUMENT_ALERTS
from tests.monitoring.conftest import binary

# uid -> the panels a user finds there (rows not counted).
OPERATIONS_PANELS = {
    "backups-wal-archiving": [
        "Newest successful backup (any node)", "Newest verified restore (any node)", "Newest backup verified",
        "Last backup size", "Backup and verification age per node", "Backup duration per node", "Backup size per node",
        "Archive failures (1 h, all nodes)", "Last archive on the primary", "Segments archived and failed (10 min)",
        "Age of the last archived segment",
    ],
    "client-path": [
        "PgBouncer up", "Clients waiting now (all pools)", "Longest wait now", "Clients per pool (active, waiting)",
        "Server connections per pool (active, idle) and pool_size", "Oldest waiting client (maxwait)",
        "Client connections and max_client_conn", "Servers up per backend", "Sessions per backend",
        "Health check: server UP (1) or not (0)", "Failed health checks (5 min)",
    ],
    "rollouts": [
        "Bundle each host runs", "Hosts whose rollout differs from most of their role", "Roles running more than one rollout",
        "Time since each host's last healthy apply", "Files changed by each host's last apply",
    ],
}


def _document(uid: str) -> dict:
    return json.loads(grafana.dashboard_json(grafana.DASHBOARDS[uid]()))


@pytest.mark.parametrize("uid", sorted(OPERATIONS_PANELS))
def test_an_operations_dashboard_renders_with_its_panels_under_a_stable_uid(uid):
    document = _document(uid)
    assert document["uid"] == uid  # the file name and the uid Grafana keeps: renaming one breaks saved links
    titles = [p["title"] for p in document["panels"] if p["type"] != "row"]
    assert titles == OPERATIONS_PANELS[uid]
    for panel in (p for p in document["panels"] if p["type"] != "row"):
        assert panel["datasource"]["uid"] == grafana.PROMETHEUS_UID, panel["title"]
        assert [t["expr"] for t in panel["targets"]], panel["title"]
    assert grafana.dashboard_json(grafana.DASHBOARDS[uid]()) == grafana.dashboard_json(grafana.DASHBOARDS[uid]())


def test_the_panels_turn_red_where_their_alerts_fire():
    # BackupFailed twice: the document's (a stale backup) last, over the absent() guard of the same name.
    alerts = {a.name: a.expr for a in (*BACKUP_ALERTS, *DOCUMENT_ALERTS["database"], *CLIENT_PATH_ALERTS)}
    assert f"> {grafana.BACKUP_STALE_SECONDS}" in alerts["BackupFailed"]
    assert f"> {grafana.BACKUP_UNVERIFIED_SECONDS}" in alerts["BackupNotVerified"]
    assert f"(pg_stat_archiver_last_archive_age) > {grafana.ARCHIVE_STALLED_SECONDS}" in alerts["WalArchivingFailing"]
    assert f"(pgbouncer_pools_client_maxwait_seconds) > {grafana.PGBOUNCER_MAXWAIT_SECONDS}" in alerts["PgBouncerClientsWaiting"]
    panels = _document("backups-wal-archiving")["panels"]
    defaults = {p["title"]: p["fieldConfig"]["defaults"] for p in panels if p["type"] == "stat"}
    steps = {title: [s["value"] for s in d["thresholds"]["steps"]] for title, d in defaults.items() if "thresholds" in d}
    assert steps["Newest successful backup (any node)"] == [None, grafana.BACKUP_STALE_SECONDS]
    assert steps["Last archive on the primary"] == [None, grafana.ARCHIVE_STALLED_SECONDS]


def _panel_expr(uid: str, title: str) -> str:
    (panel,) = [p for p in _document(uid)["panels"] if p["title"] == title]
    return panel["targets"][0]["expr"]


def _bundle_info(instance: str, role: str, rollout: str) -> dict:
    return {"series": f'betting_agent_bundle_info{{instance="{instance}",job="node",role="{role}",rollout="{rollout}",'
                      f'digest="d-{instance}"}}', "values": "1x10"}


def test_promtool_evaluates_the_rollout_and_backup_queries(tmp_path):
    """A role mid-rollout (pg-1 done, pg-2 and pg-3 not), a role in step, a host applied by hand (no rollout
    label): the hosts off their role's majority are exactly pg-1; the newest backup's size is the node's that took
    it, not the largest figure of a former designated node."""
    stragglers = _panel_expr("rollouts", "Hosts whose rollout differs from most of their role")
    roles_split = _panel_expr("rollouts", "Roles running more than one rollout")
    size = _panel_expr("backups-wal-archiving", "Last backup size")
    series = [
        _bundle_info("pg-1", "postgres", "new"), _bundle_info("pg-2", "postgres", "old"),
        _bundle_info("pg-3", "postgres", "old"), _bundle_info("etcd-1", "etcd", "r1"),
        _bundle_info("etcd-2", "etcd", "r1"), _bundle_info("etcd-3", "etcd", "r1"),
        {"series": 'backup_last_success_timestamp{instance="pg-1",job="node",cluster="c"}', "values": "1000x10"},
        {"series": 'backup_last_size_bytes{instance="pg-1",job="node",cluster="c"}', "values": "900x10"},
        {"series": 'backup_last_success_timestamp{instance="pg-2",job="node",cluster="c"}', "values": "2000x10"},
        {"series": 'backup_last_size_bytes{instance="pg-2",job="node",cluster="c"}', "values": "500x10"},
    ]
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [
            {"expr": stragglers, "eval_time": "5m", "exp_samples": [
                {"labels": '{instance="pg-1",role="postgres",rollout="new",digest="d-pg-1"}', "value": 1}]},
            {"expr": roles_split, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": size, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 500}]},
        ],
    }]}
    (tmp_path / "dashboards_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([binary("promtool"), "test", "rules", "dashboards_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
