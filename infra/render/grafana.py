"""Grafana provisioning: data sources, the dashboard provider, and the dashboards as code.

Dashboards are built with grafana-foundation-sdk (typed builders, no hand-written JSON):
"Database Overview" and "Application Overview" with the requirements document's panels (queries
corrected like the alert rules: aggregated ratios, metrics that exist), and "SLOs & Error Budget"
built from the SLO catalog. Pure: settings + topology in, bytes out. Grafana's admin password is
not here: the service reads it from GF_SECURITY_ADMIN_PASSWORD at run time (its EnvironmentFile, from SSM).

grafana.ini serves HTTPS with the host's identity (infra/pki.py). The data sources reach Prometheus and
Alertmanager over https, verifying them against the stack's CA, with the monitoring credential
(infra/render/webconfig.py); both secrets are `$__file{...}` references that Grafana expands when it reads the
provisioning file, so the rendered file holds neither.
"""

from __future__ import annotations

import json

import yaml
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import heatmap, stat, timeseries
from grafana_foundation_sdk.builders import prometheus as prometheus_query
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from infra import pki
from infra.render import managed_prometheus
from infra.render.prometheus import cluster_name
from infra.render.webconfig import MONITORING_USER, password_path
from infra.settings import StackSettings
from infra.slo import ERROR_BUDGET_POLICY, SLO, SLOS
from infra.topology import Paths, Ports, Topology

PROMETHEUS_UID = "prometheus"
ALERTMANAGER_UID = "alertmanager"
_PROMETHEUS = dashboard_models.DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID)
_POLICY_COLORS = {"healthy": "green", "caution": "yellow", "freeze": "orange", "exhausted": "red"}


def _query(expr: str, legend: str = "", ref: str = "A") -> prometheus_query.Dataquery:
    query = prometheus_query.Dataquery().expr(expr).ref_id(ref)
    return query.legend_format(legend) if legend else query


def _timeseries(title: str, unit: str, *queries: tuple[str, str], width: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).datasource(_PROMETHEUS).unit(unit).height(8).span(width)
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + index)))
    return panel


def database_overview() -> dashboard_builders.Dashboard:
    return (
        dashboard_builders.Dashboard("Database Overview")
        .uid("database-overview")
        .tags(["betting", "postgresql", "generated"])
        .refresh("30s")
        .time("now-6h", "now")
        .with_panel(_timeseries(
            "Query Latency (p50, p95, p99)", "s",
            *[(f"histogram_quantile({q}, sum by (query_name, le) (rate(query_duration_seconds_bucket[5m])))",
               f"{{{{query_name}}}} p{int(q * 100)}") for q in (0.5, 0.95, 0.99)],
        ))
        .with_panel(_timeseries("Queries per Second", "ops", ("sum(rate(pg_stat_database_xact_commit[1m]))", "commits/s")))
        .with_panel(_timeseries(
            "Active Connections", "short",
            ('sum by (instance) (pg_stat_activity_count{state="active"})', "{{instance}} active"),
            ("max by (instance) (pg_settings_max_connections)", "{{instance}} max_connections"),
        ))
        .with_panel(_timeseries(
            "Replication Lag", "bytes",
            ("max by (instance, application_name) (pg_stat_replication_pg_wal_lsn_diff)",
             "{{application_name}} behind {{instance}}"),
        ))
        .with_panel(_timeseries(
            "Cache Hit Ratio", "percentunit",
            ("sum by (instance) (rate(pg_stat_database_blks_hit[5m])) / (sum by (instance) (rate(pg_stat_database_blks_hit[5m]))"
             " + sum by (instance) (rate(pg_stat_database_blks_read[5m])))", "{{instance}}"),
        ))
        .with_panel(_timeseries(
            "Transaction Rate (Commit vs Rollback)", "ops",
            ("sum by (instance) (rate(pg_stat_database_xact_commit[5m]))", "{{instance}} commit"),
            ("sum by (instance) (rate(pg_stat_database_xact_rollback[5m]))", "{{instance}} rollback"),
        ))
    )


def application_overview() -> dashboard_builders.Dashboard:
    latency_heatmap = (
        heatmap.Panel()
        .title("Latency Heatmap")
        .datasource(_PROMETHEUS)
        .height(8)
        .span(12)
        .calculate(False)
        .with_target(
            _query("sum by (le) (rate(http_request_duration_seconds_bucket[5m]))", "{{le}}")
            .format(PromQueryFormat.HEATMAP)
        )
    )
    return (
        dashboard_builders.Dashboard("Application Overview")
        .uid("application-overview")
        .tags(["betting", "application", "generated"])
        .refresh("30s")
        .time("now-6h", "now")
        .with_panel(_timeseries("Request Rate", "reqps", ("sum by (endpoint) (rate(http_requests_total[1m]))", "{{endpoint}}")))
        .with_panel(_timeseries(
            "Error Rate", "percentunit",
            ('sum(rate(http_requests_total{status=~"5.."}[5m])) / sum(rate(http_requests_total[5m]))', "5xx share"),
        ))
        .with_panel(latency_heatmap)
        .with_panel(_timeseries(
            "Cache Hit Rate", "percentunit",
            ('sum(rate(cache_requests_total{result="hit"}[5m])) / sum(rate(cache_requests_total[5m]))', "hit rate"),
        ))
    )


def _policy_mappings() -> list[dashboard_models.ValueMapping]:
    """Budget remaining -> the error-budget policy tier's name, as the stat panel's text."""
    mappings = []
    upper: float | None = None
    for tier in ERROR_BUDGET_POLICY:
        lower = None if tier.min_remaining == float("-inf") else tier.min_remaining
        result = dashboard_models.ValueMappingResult(text=f"{tier.name}: {tier.action}", color=_POLICY_COLORS[tier.name])
        options = dashboard_models.DashboardRangeMapOptions(from_val=lower, to=upper, result=result)
        mappings.append(dashboard_models.RangeMap(options))
        upper = lower
    return mappings


def _policy_thresholds() -> dashboard_builders.ThresholdsConfig:
    steps = [dashboard_models.Threshold(value=None, color="red")]
    for tier in reversed(ERROR_BUDGET_POLICY[:-1]):
        steps.append(dashboard_models.Threshold(value=tier.min_remaining, color=_POLICY_COLORS[tier.name]))
    return dashboard_builders.ThresholdsConfig().mode(dashboard_models.ThresholdsMode.ABSOLUTE).steps(steps)


def _slo_row(slo: SLO) -> list:
    selector = f'{{slo="{slo.id}"}}'
    sli_unit = "s" if slo.kind == "latency" else ("percentunit" if slo.kind == "ratio" else "short")
    reduce_last = common_builders.ReduceDataOptions().calcs(["lastNotNull"])
    return [
        _timeseries(f"{slo.title}: SLI ({slo.window} window)", sli_unit, (slo.sli_value("5m"), slo.id), width=9),
        stat.Panel()
        .title("Error budget remaining")
        .datasource(_PROMETHEUS)
        .unit("percentunit")
        .height(6)
        .span(5)
        .reduce_options(reduce_last)
        .thresholds(_policy_thresholds())
        .with_target(_query(f"slo:error_budget_remaining:ratio{selector}")),
        stat.Panel()
        .title("Burn rate (1h)")
        .datasource(_PROMETHEUS)
        .unit("x")
        .decimals(2)
        .height(6)
        .span(4)
        .reduce_options(reduce_last)
        .with_target(_query(f"slo:burn_rate:rate1h{selector}")),
        stat.Panel()
        .title("Policy tier")
        .datasource(_PROMETHEUS)
        .height(6)
        .span(6)
        .reduce_options(reduce_last)
        .mappings(_policy_mappings())
        .thresholds(_policy_thresholds())
        .with_target(_query(f"slo:error_budget_remaining:ratio{selector}")),
    ]


def slo_dashboard() -> dashboard_builders.Dashboard:
    board = (
        dashboard_builders.Dashboard("SLOs & Error Budget")
        .uid("slos-error-budget")
        .tags(["betting", "slo", "generated"])
        .refresh("1m")
        .time("now-24h", "now")
    )
    for tier in (1, 2, 3):
        board = board.with_row(dashboard_builders.Row(f"Tier {tier}"))
        for slo in (s for s in SLOS if s.tier == tier):
            for panel in _slo_row(slo):
                board = board.with_panel(panel)
    return board


DASHBOARDS = {
    "database-overview": database_overview,
    "application-overview": application_overview,
    "slos-error-budget": slo_dashboard,
}


def dashboard_json(builder: dashboard_builders.Dashboard) -> bytes:
    return (json.dumps(builder.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n").encode()


def dashboard_queries(document: dict) -> list[str]:
    """Every PromQL expression of a dashboard JSON (rows included)."""
    panels = list(document.get("panels", []))
    for row in document.get("panels", []):
        panels.extend(row.get("panels", []))
    return [target["expr"] for panel in panels for target in panel.get("targets", []) if target.get("expr")]


# Grafana expands `$__file{PATH}` in provisioning files to the file's content at start (provisioning docs).
def _file_reference(path: str) -> str:
    return f"$__file{{{path}}}"


def _monitoring_client() -> tuple[dict, dict]:
    """(jsonData, secureJsonData) of a data source on the monitoring API: basic auth, the stack's CA."""
    json_data = {"tlsAuthWithCACert": True, "tlsAuth": False, "tlsSkipVerify": False}
    secure = {"basicAuthPassword": _file_reference(password_path()), "tlsCACert": _file_reference(pki.ca_path())}
    return json_data, secure


def grafana_ini() -> bytes:
    """Only what differs from Grafana's defaults.ini: HTTPS with the host's key and certificate, secure cookies."""
    lines = [
        "[server]",
        "protocol = https",
        f"http_port = {Ports.GRAFANA}",
        f"cert_file = {pki.cert_path()}",
        f"cert_key = {pki.key_path()}",
        "min_tls_version = TLS1.2",
        "",
        "[security]",
        "admin_user = admin",
        "; admin_password: GF_SECURITY_ADMIN_PASSWORD, from its EnvironmentFile (SSM)",
        "cookie_secure = true",
        "",
    ]
    return "\n".join(lines).encode()


def render_grafana(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    prometheus_hosts = topology.monitoring
    client_json, client_secure = _monitoring_client()
    datasources = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "type": "prometheus",
                "uid": PROMETHEUS_UID,
                "access": "proxy",
                # The first replica; both hold the same data (same config, same targets).
                "url": f"https://{prometheus_hosts[0].fqdn}:{Ports.PROMETHEUS}",
                "isDefault": True,
                "editable": False,
                "basicAuth": True,
                "basicAuthUser": MONITORING_USER,
                "jsonData": {"timeInterval": settings.monitoring.prometheus.scrape_interval, **client_json},
                "secureJsonData": client_secure,
            },
            {
                "name": "Alertmanager",
                "type": "alertmanager",
                "uid": ALERTMANAGER_UID,
                "access": "proxy",
                "url": f"https://{prometheus_hosts[0].fqdn}:{Ports.ALERTMANAGER}",
                "editable": False,
                "basicAuth": True,
                "basicAuthUser": MONITORING_USER,
                "jsonData": {"implementation": "prometheus", "handleGrafanaManagedAlerts": False, **client_json},
                "secureJsonData": client_secure,
            },
            *managed_prometheus.grafana_datasource(settings),
        ],
    }
    providers = {
        "apiVersion": 1,
        "providers": [
            {
                "name": cluster_name(settings),
                "folder": "Betting platform",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "options": {"path": Paths.GRAFANA_DASHBOARDS},
            }
        ],
    }
    files = {
        "grafana/grafana.ini": grafana_ini() + "\n".join(managed_prometheus.grafana_ini_lines(settings)).encode(),
        "grafana/provisioning/datasources/datasources.yml": yaml.safe_dump(datasources, sort_keys=False).encode(),
        "grafana/provisioning/dashboards/dashboards.yml": yaml.safe_dump(providers, sort_keys=False).encode(),
    }
    for name, build in DASHBOARDS.items():
        files[f"grafana/dashboards/{name}.json"] = dashboard_json(build())
    return files
