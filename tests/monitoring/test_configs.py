"""Rendered Alertmanager and Prometheus configs: amtool accepts them, routes go where the document says,
no secret is in them, and the flags carry retention and clustering."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from infra.render.alertmanager import alertmanager_args, render_alertmanager
from infra.render.exporters import render_exporters
from infra.render.grafana import dashboard_queries, render_grafana
from infra.render.prometheus import prometheus_args, render_prometheus
from infra.topology import Paths, Ports, SecretNames, secret_path
from tests.monitoring.conftest import binary

ROUTES = [
    # (labels, receivers in order)
    ({"alertname": "PostgreSQLDown", "severity": "critical", "instance": "pg-1"}, "pagerduty-critical,slack-critical"),
    ({"alertname": "ReplicationLagHigh", "severity": "warning", "instance": "pg-1"}, "slack-warnings"),
    ({"alertname": "SomethingInformational", "severity": "info"}, "default"),
    ({"alertname": "NoSeverityAtAll"}, "default"),
    ({"alertname": "Watchdog", "severity": "none"}, "deadman"),
    # Even mislabelled, the Watchdog never reaches PagerDuty: its route comes first and does not continue.
    ({"alertname": "Watchdog", "severity": "critical"}, "deadman"),
]


def test_amtool_check_config(rendered):
    result = subprocess.run(
        [binary("amtool"), "check-config", str(rendered / "alertmanager" / "alertmanager.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("labels", "receivers"), ROUTES, ids=[f"{r[0]['alertname']}-{r[0].get('severity')}" for r in ROUTES])
def test_amtool_routes(rendered, labels, receivers):
    config = str(rendered / "alertmanager" / "alertmanager.yml")
    command = [binary("amtool"), "config", "routes", "test", f"--config.file={config}", f"--verify.receivers={receivers}"]
    result = subprocess.run(command + [f"{k}={v}" for k, v in labels.items()], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_routes_detects_a_wrong_receiver(rendered):
    """The check above can fail: a warning does not page."""
    config = str(rendered / "alertmanager" / "alertmanager.yml")
    command = [binary("amtool"), "config", "routes", "test", f"--config.file={config}", "--verify.receivers=pagerduty-critical"]
    assert subprocess.run(command + ["severity=warning"], capture_output=True, text=True).returncode != 0


def test_alertmanager_reads_secrets_from_files(settings, topology):
    text = render_alertmanager(settings, topology)["alertmanager/alertmanager.yml"].decode()
    config = yaml.safe_load(text)
    receivers = {r["name"]: r for r in config["receivers"]}
    pagerduty = receivers["pagerduty-critical"]["pagerduty_configs"][0]
    assert pagerduty["routing_key_file"] == secret_path(SecretNames.PAGERDUTY_ROUTING_KEY)
    assert receivers["slack-critical"]["slack_configs"][0]["api_url_file"] == secret_path(SecretNames.SLACK_CRITICAL_WEBHOOK)
    assert receivers["slack-warnings"]["slack_configs"][0]["api_url_file"] == secret_path(SecretNames.SLACK_WARNINGS_WEBHOOK)
    assert receivers["slack-critical"]["slack_configs"][0]["channel"] == "#alerts-critical"
    assert receivers["slack-warnings"]["slack_configs"][0]["channel"] == "#alerts-warnings"
    assert receivers["default"]["email_configs"][0]["to"] == settings.alerting.email_to
    for key in ("routing_key:", "service_key:", "api_url:", "auth_password:", "credentials:"):
        assert key not in text, f"{key} would put a secret in the file"
    inhibit = config["inhibit_rules"][0]
    assert inhibit["equal"] == ["alertname", "instance"]
    assert config["route"]["group_by"] == ["alertname", "cluster"]


def test_alertmanager_cluster_flags(settings, topology):
    for host in topology.monitoring:
        args = alertmanager_args(settings, topology, host)
        peers = [a for a in args if a.startswith("--cluster.peer=")]
        others = [h for h in topology.monitoring if h is not host]
        assert peers == [f"--cluster.peer={h.fqdn}:{Ports.ALERTMANAGER_CLUSTER}" for h in others]
        if not others:
            assert "--cluster.listen-address=" in args


def test_prometheus_args_carry_retention(settings):
    args = prometheus_args(settings)
    prom = settings.monitoring.prometheus
    assert f"--storage.tsdb.retention.time={prom.retention_time}" in args
    assert f"--storage.tsdb.retention.size={prom.retention_size}" in args
    assert f"--config.file={Paths.PROMETHEUS_CONFIG}" in args
    assert any(a.startswith(f"--storage.tsdb.path={Paths.PROMETHEUS_DATA}/") for a in args)


def test_prometheus_args_accepted_by_prometheus(settings, tmp_path):
    """The real binary parses the flags (it stops at --version after parsing them)."""
    result = subprocess.run([binary("prometheus"), *prometheus_args(settings), "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_prometheus_config_scrapes_the_topology(settings, topology):
    config = yaml.safe_load(render_prometheus(settings, topology)["prometheus/prometheus.yml"])
    expected_labels = {"cluster": f"betting-{settings.environment}", "environment": settings.environment}
    if settings.monitoring.managed_prometheus.enabled:  # AMP's HA deduplication (tests/monitoring/test_managed_prometheus.py)
        expected_labels["__replica__"] = "${PROMETHEUS_REPLICA}"
    assert config["global"]["external_labels"] == expected_labels
    assert config["rule_files"] == [f"{Paths.PROMETHEUS_RULES_DIR}/*.yml"]
    alertmanagers = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanagers == [f"{h.fqdn}:{Ports.ALERTMANAGER}" for h in topology.monitoring]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= {"prometheus", "alertmanager", "grafana", "node", "postgres", "patroni", "etcd", "clickhouse", "redis"}

    def instances(job):
        return [group["labels"]["instance"] for group in jobs[job]["static_configs"]]

    assert instances("node") == [h.name for h in topology.hosts]
    assert instances("postgres") == [h.name for h in topology.postgres]
    assert instances("etcd") == [h.name for h in topology.etcd]
    targets = [t for group in jobs["patroni"]["static_configs"] for t in group["targets"]]
    assert targets == [f"{h.fqdn}:{Ports.PATRONI_API}" for h in topology.postgres]
    # The client path runs on every PostgreSQL node: PgBouncer's exporter and HAProxy's /metrics.
    for job, port in (("pgbouncer", Ports.PGBOUNCER_EXPORTER), ("haproxy", Ports.HAPROXY_STATS)):
        assert instances(job) == [h.name for h in topology.postgres], job
        assert [t for g in jobs[job]["static_configs"] for t in g["targets"]] == [f"{h.fqdn}:{port}" for h in topology.postgres]
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    if topology.application_targets:
        assert [t for g in jobs["app"]["static_configs"] for t in g["targets"]] == list(topology.application_targets)


def test_renderers_are_deterministic(settings, topology):
    for render in (render_prometheus, render_alertmanager, render_grafana, render_exporters):
        assert render(settings, topology) == render(settings, topology)


def test_postgres_exporter_queries_export_lag_in_seconds(settings, topology):
    queries = yaml.safe_load(render_exporters(settings, topology)["postgres_exporter/queries.yaml"])
    metrics = [name for metric in queries["pg_replication"]["metrics"] for name in metric]
    assert "lag_seconds" in metrics  # -> pg_replication_lag_seconds, read by the data-freshness SLI


def test_cluster_alert_queries_run_once_per_server_and_on_replicas(settings, topology):
    """The wraparound and slot queries read shared catalogs (once per server, not per database), and the slot
    query must not call pg_current_wal_lsn() unguarded: it fails during recovery, as the exporter's own does."""
    queries = yaml.safe_load(render_exporters(settings, topology)["postgres_exporter/queries.yaml"])
    for name in ("pg_database_datfrozenxid", "pg_replication_slot"):
        assert queries[name]["master"] is True, name
    slot = queries["pg_replication_slot"]["query"]
    assert "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END" in slot


def test_grafana_provisioning(settings, topology):
    files = render_grafana(settings, topology)
    datasources = yaml.safe_load(files["grafana/provisioning/datasources/datasources.yml"])["datasources"]
    assert {d["type"] for d in datasources} == {"prometheus", "alertmanager"}
    providers = yaml.safe_load(files["grafana/provisioning/dashboards/dashboards.yml"])["providers"]
    assert providers[0]["options"]["path"] == Paths.GRAFANA_DASHBOARDS
    # Secrets only as references Grafana expands at start (tests/monitoring/test_tls_config.py checks them).
    for source in datasources:
        assert all(value.startswith("$__file{") for value in source.get("secureJsonData", {}).values())
    panels = {}
    for path, content in files.items():
        if path.endswith(".json"):
            document = json.loads(content)
            panels[document["title"]] = [p["title"] for p in document["panels"] if p["type"] != "row"]
            assert dashboard_queries(document)
    assert len(panels["Database Overview"]) == 6
    assert len(panels["Application Overview"]) == 4
    assert panels["SLOs & Error Budget"].count("Error budget remaining") >= 10
