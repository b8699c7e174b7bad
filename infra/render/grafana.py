"""Grafana provisioning: data sources, the dashboard provider, and the dashboards as code.

Dashboards are built with grafana-foundation-sdk (typed builders, no hand-written JSON):
"Database Overview" and "Application Overview" with the requirements document's panels (queries
corrected like the alert rules: aggregated ratios, metrics that exist), "SLOs & Error Budget"
built from the SLO catalog, and the operations boards: "Backups & WAL Archiving" (scripts/backup.py's
textfile, pg_stat_archiver), "Client Path" (betting-pgbouncer-exporter, HAProxy's own exporter) and
"Rollouts" (the host agent's textfile, infra/hostagent/agent.py). Pure: settings + topology in, bytes
out. Grafana's admin password is not here: the service reads it from GF_SECURITY_ADMIN_PASSWORD at run
time (its EnvironmentFile, from SSM).

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
from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders import prometheus as prometheus_query
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from infra import pki
from infra.render import managed_prometheus
from infra.render.haproxy import READER_PROXY, WRITER_PROXY
from infra.render.prometheus import cluster_name
from infra.render.webconfig import MONITORING_USER, password_path
from infra.settings import StackSettings
from infra.slo import ERROR_BUDGET_POLICY, SLO, SLOS
from infra.topology import Paths, Ports, Topology

PROMETHEUS_UID = "prometheus"
ALERTMANAGER_UID = "alertmanager"
_PROMETHEUS = dashboard_models.DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID)
_POLICY_COLORS = {"healthy": "green", "caution": "yellow", "freeze": "orange", "exhausted": "red"}
# The alert rules' thresholds (infra/render/prometheus.py), so a panel turns red when its alert would fire.
BACKUP_STALE_SECONDS = 90000  # BackupFailed: no backup for 25 h
BACKUP_UNVERIFIED_SECONDS = 43200  # BackupNotVerified: the newest backup 12 h old and unverified
ARCHIVE_STALLED_SECONDS = 300  # WalArchivingFailing: the primary writes but archived nothing for 5 min
PGBOUNCER_MAXWAIT_SECONDS = 1  # PgBouncerClientsWaiting
# No node exports the figure: no backup has succeeded since the textfiles began (BackupFailed's absent() rule).
_NO_BACKUP = "none on any node"
_PRIMARY_ONLY = "and on (instance) max by (instance) (pg_replication_is_replica) == 0"
_CLIENT_PROXIES = f'proxy=~"{WRITER_PROXY}|{READER_PROXY}"'


def _query(expr: str, legend: str = "", ref: str = "A") -> prometheus_query.Dataquery:
    query = prometheus_query.Dataquery().expr(expr).ref_id(ref)
    return query.legend_format(legend) if legend else query


def _timeseries(title: str, unit: str, *queries: tuple[str, str], width: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).datasource(_PROMETHEUS).unit(unit).height(8).span(width)
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + index)))
    return panel


def _thresholds(*steps: tuple[float | None, str]) -> dashboard_builders.ThresholdsConfig:
    return (dashboard_builders.ThresholdsConfig().mode(dashboard_models.ThresholdsMode.ABSOLUTE)
            .steps([dashboard_models.Threshold(value=value, color=color) for value, color in steps]))


def _stat(title: str, unit: str, expr: str, legend: str = "", width: int = 6,
          thresholds: dashboard_builders.ThresholdsConfig | None = None,
          mappings: list[dashboard_models.ValueMapping] | None = None, description: str = "",
          no_value: str = "") -> stat.Panel:
    panel = (stat.Panel().title(title).datasource(_PROMETHEUS).unit(unit).height(6).span(width)
             .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
             .with_target(_query(expr, legend)))
    if description:
        panel = panel.description(description)
    if no_value:
        panel = panel.no_value(no_value)
    if thresholds is not None:
        panel = panel.thresholds(thresholds)
    return panel.mappings(mappings) if mappings else panel


def _value_texts(texts: dict[str, tuple[str, str]]) -> list[dashboard_models.ValueMapping]:
    """A stat's value shown as words: {value: (text, color)}."""
    return [dashboard_models.ValueMap({value: dashboard_models.ValueMappingResult(text=text, color=color, index=index)})
            for index, (value, (text, color)) in enumerate(texts.items())]


def _board(title: str, uid: str, tags: list[str]) -> dashboard_builders.Dashboard:
    return (dashboard_builders.Dashboard(title).uid(uid).tags(["betting", *tags, "generated"])
            .refresh("1m").time("now-24h", "now"))


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


def backups_dashboard() -> dashboard_builders.Dashboard:
    """scripts/backup.py's textfile (one per PostgreSQL node: the node that took the backup has the newest
    figures, a former designated node keeps its older ones) and postgres_exporter 0.11's pg_stat_archiver."""
    stale = _thresholds((None, "green"), (BACKUP_STALE_SECONDS, "red"))
    unverified = _thresholds((None, "green"), (BACKUP_UNVERIFIED_SECONDS, "red"))
    verified_texts = _value_texts({"1": ("verified after the newest backup", "green"),
                                   "0": ("newest backup not verified", "red")})
    return (
        _board("Backups & WAL Archiving", "backups-wal-archiving", ["postgresql", "backup"])
        .with_row(dashboard_builders.Row("Base backups and restore verification"))
        .with_panel(_stat("Newest successful backup (any node)", "s", "time() - max(backup_last_success_timestamp)",
                          thresholds=stale, no_value=_NO_BACKUP, description="Taken and proven by a restore "
                          "(scripts/backup.py run). Red where BackupFailed fires (25 h)."))
        .with_panel(_stat("Newest verified restore (any node)", "s", "time() - max(backup_last_verified_timestamp)",
                          thresholds=unverified, no_value=_NO_BACKUP, description="The last restore that passed "
                          "pg_amcheck, the canary comparison and pg_checksums (run or verify)."))
        .with_panel(_stat("Newest backup verified", "none",
                          "max(backup_last_verified_timestamp) >= bool max(backup_last_success_timestamp)",
                          mappings=verified_texts, thresholds=_thresholds((None, "red"), (1, "green")),
                          description="What BackupNotVerified reads. A failed verification writes no metric: "
                          "it leaves the last success in place, and its record in the bucket says why."))
        .with_panel(_stat("Last backup size", "bytes",
                          "max(backup_last_size_bytes and on (instance) backup_last_success_timestamp"
                          " == on () group_left max(backup_last_success_timestamp))"))
        .with_panel(_timeseries(
            "Backup and verification age per node", "s",
            ("time() - max by (instance) (backup_last_success_timestamp)", "{{instance}} backup"),
            ("time() - max by (instance) (backup_last_verified_timestamp)", "{{instance}} verified"),
            width=24,
        ))
        .with_panel(_timeseries("Backup duration per node", "s",
                                ("max by (instance) (backup_last_duration_seconds)", "{{instance}}")))
        .with_panel(_timeseries("Backup size per node", "bytes",
                                ("max by (instance) (backup_last_size_bytes)", "{{instance}}")))
        .with_row(dashboard_builders.Row("WAL archiving (pg_stat_archiver)"))
        .with_panel(_stat("Archive failures (1 h, all nodes)", "short",
                          "sum(increase(pg_stat_archiver_failed_count[1h]))",
                          thresholds=_thresholds((None, "green"), (1, "red"))))
        .with_panel(_stat("Last archive on the primary", "s", f"max(pg_stat_archiver_last_archive_age {_PRIMARY_ONLY})",
                          thresholds=_thresholds((None, "green"), (ARCHIVE_STALLED_SECONDS, "orange")),
                          description="archive_timeout closes a segment every minute while WAL is written; an idle "
                          "primary archives nothing (WalArchivingFailing pages only while rows change).", width=6))
        .with_panel(_timeseries(
            "Segments archived and failed (10 min)", "short",
            ("sum by (instance) (increase(pg_stat_archiver_archived_count[10m]))", "{{instance}} archived"),
            ("sum by (instance) (increase(pg_stat_archiver_failed_count[10m]))", "{{instance}} failed"),
        ))
        .with_panel(_timeseries(
            "Age of the last archived segment", "s",
            (f"max by (instance) (pg_stat_archiver_last_archive_age) {_PRIMARY_ONLY}", "{{instance}} (primary)"),
        ))
    )


def client_path_dashboard() -> dashboard_builders.Dashboard:
    """Every PostgreSQL node's PgBouncer (betting-pgbouncer-exporter) and HAProxy (its built-in exporter)."""
    up_texts = _value_texts({"1": ("up", "green"), "0": ("down", "red")})
    pool = "instance, database, user"
    return (
        _board("Client Path: PgBouncer & HAProxy", "client-path", ["pgbouncer", "haproxy"])
        .with_row(dashboard_builders.Row("PgBouncer pools"))
        .with_panel(_stat("PgBouncer up", "none", "min by (instance) (pgbouncer_up)", "{{instance}}", width=8,
                          mappings=up_texts, thresholds=_thresholds((None, "red"), (1, "green"))))
        .with_panel(_stat("Clients waiting now (all pools)", "short",
                          "sum(pgbouncer_pools_client_waiting_connections)", width=8,
                          thresholds=_thresholds((None, "green"), (1, "orange"))))
        .with_panel(_stat("Longest wait now", "s", "max(pgbouncer_pools_client_maxwait_seconds)", width=8,
                          thresholds=_thresholds((None, "green"), (PGBOUNCER_MAXWAIT_SECONDS, "red"))))
        .with_panel(_timeseries(
            "Clients per pool (active, waiting)", "short",
            (f"sum by ({pool}) (pgbouncer_pools_client_active_connections)", "{{instance}} {{database}}/{{user}} active"),
            (f"sum by ({pool}) (pgbouncer_pools_client_waiting_connections)", "{{instance}} {{database}}/{{user}} waiting"),
        ))
        .with_panel(_timeseries(
            "Server connections per pool (active, idle) and pool_size", "short",
            (f"sum by ({pool}) (pgbouncer_pools_server_active_connections)", "{{instance}} {{database}}/{{user}} active"),
            (f"sum by ({pool}) (pgbouncer_pools_server_idle_connections)", "{{instance}} {{database}}/{{user}} idle"),
            ("max by (instance, database) (pgbouncer_databases_pool_size)", "{{instance}} {{database}} pool_size"),
        ))
        .with_panel(_timeseries(
            "Oldest waiting client (maxwait)", "s",
            (f"max by ({pool}) (pgbouncer_pools_client_maxwait_seconds)", "{{instance}} {{database}}/{{user}}"),
        ))
        .with_panel(_timeseries(
            "Client connections and max_client_conn", "short",
            ("max by (instance) (pgbouncer_used_clients)", "{{instance}} used"),
            ("max by (instance) (pgbouncer_config_max_client_connections)", "{{instance}} max_client_conn"),
        ))
        .with_row(dashboard_builders.Row("HAProxy (writer: primary, readers: replicas)"))
        .with_panel(_timeseries(
            "Servers up per backend", "short",
            (f"max by (instance, proxy) (haproxy_backend_active_servers{{{_CLIENT_PROXIES}}})", "{{instance}} {{proxy}}"),
        ))
        .with_panel(_timeseries(
            "Sessions per backend", "short",
            (f"sum by (instance, proxy) (haproxy_backend_current_sessions{{{_CLIENT_PROXIES}}})", "{{instance}} {{proxy}}"),
        ))
        .with_panel(_timeseries(
            "Health check: server UP (1) or not (0)", "short",
            (f'max by (instance, proxy, server) (haproxy_server_status{{{_CLIENT_PROXIES},state="UP"}})',
             "{{instance}} {{proxy}}/{{server}}"),
        ))
        .with_panel(_timeseries(
            "Failed health checks (5 min)", "short",
            (f"sum by (instance, proxy, server) (increase(haproxy_server_check_failures_total{{{_CLIENT_PROXIES}}}[5m]))",
             "{{instance}} {{proxy}}/{{server}}"),
        ))
    )


# Hosts whose rollout (the sha256 of their role's digests parameter, infra/hostagent/agent.py) is not the one most
# of their role last applied: mid-rollout the hosts already done, after a stopped one those it did not reach.
_ROLLOUT_COUNTS = "count by (role, rollout) (betting_agent_bundle_info)"
ROLLOUT_STRAGGLERS = (
    f"max by (instance, role, rollout, digest) (betting_agent_bundle_info)\n"
    f"  unless on (role, rollout) ({_ROLLOUT_COUNTS} == on (role) group_left max by (role) ({_ROLLOUT_COUNTS}))"
)


def rollouts_dashboard() -> dashboard_builders.Dashboard:
    """The host agent's textfile: written after every apply that ended healthy (a failed one leaves the last)."""
    bundles = (
        table.Panel().title("Bundle each host runs").datasource(_PROMETHEUS).height(9).span(24).show_header(True)
        .description("digest: the sha256 of the host's bundle (its S3 key, bundles/<host>/<digest>.json); rollout: "
                     "the sha256 of the role's digests parameter that applied it (none: by hand or at boot).")
        .with_target(_query("max by (instance, role, digest, rollout) (betting_agent_bundle_info)")
                     .instant().format(PromQueryFormat.TABLE))
        .with_transformation(dashboard_models.DataTransformerConfig(
            id_val="organize", options={"excludeByName": {"Time": True, "Value": True}}))
    )
    stragglers = (
        table.Panel().title("Hosts whose rollout differs from most of their role").datasource(_PROMETHEUS).show_header(True)
        .height(7).span(12).no_value("none: every host of each role applied the same rollout")
        .with_target(_query(ROLLOUT_STRAGGLERS).instant().format(PromQueryFormat.TABLE))
        .with_transformation(dashboard_models.DataTransformerConfig(
            id_val="organize", options={"excludeByName": {"Time": True, "Value": True}}))
    )
    return (
        _board("Rollouts", "rollouts", ["rollout", "host-agent"])
        .with_panel(bundles)
        .with_panel(stragglers)
        .with_panel(_stat("Roles running more than one rollout", "short",
                          f"count(count by (role) ({_ROLLOUT_COUNTS}) > 1) or vector(0)", width=12,
                          thresholds=_thresholds((None, "green"), (1, "orange"))))
        .with_panel(_timeseries("Time since each host's last healthy apply", "s",
                                ("time() - max by (instance, role) (betting_agent_last_apply_timestamp_seconds)",
                                 "{{instance}} ({{role}})")))
        .with_panel(_timeseries("Files changed by each host's last apply", "short",
                                ("max by (instance) (betting_agent_apply_changed_files)", "{{instance}}")))
    )


DASHBOARDS = {
    "database-overview": database_overview,
    "application-overview": application_overview,
    "slos-error-budget": slo_dashboard,
    "backups-wal-archiving": backups_dashboard,
    "client-path": client_path_dashboard,
    "rollouts": rollouts_dashboard,
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
