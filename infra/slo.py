"""The SLO catalog, as data: SLIs with their PromQL, SLOs of tiers 1 to 3, the error-budget policy.

One source for the recording rules and burn-rate alerts (infra/render/prometheus.py), the
"SLOs & Error Budget" dashboard (infra/render/grafana.py) and the monthly report
(scripts/slo_report.py). Pure data: no Pulumi, no I/O.

Metric names are the ones the exporters in use really export (postgres_exporter 0.11,
redis_exporter 1.45, node_exporter 1.5, Patroni 3.0) plus the application's prometheus_client
metrics of the requirements document; `pg_replication_lag_seconds` comes from the custom query
in infra/render/exporters.py, `backup_last_success_timestamp` and `etl_last_success_timestamp`
from the tooling's node_exporter textfiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from infra.units import duration_seconds

# Windows of the multi-window multi-burn-rate alerts (Google SRE workbook, chapter 5).
BURN_RATE_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


@dataclass(frozen=True)
class BurnRateAlert:
    severity: Literal["critical", "warning"]  # critical pages, warning is a ticket (Alertmanager routing)
    long_window: str
    short_window: str
    factor: float  # budget consumed this many times faster than the SLO window allows


# Page at 14.4x over 1h and 5m (2 % of a 30-day budget in 1 h) and 6x over 6h and 30m (5 % in 6 h);
# ticket at 3x over 1d and 2h (10 % in a day) and 1x over 3d and 6h.
BURN_RATE_ALERTS = (
    BurnRateAlert("critical", "1h", "5m", 14.4),
    BurnRateAlert("critical", "6h", "30m", 6),
    BurnRateAlert("warning", "1d", "2h", 3),
    BurnRateAlert("warning", "3d", "6h", 1),
)


@dataclass(frozen=True)
class SLI:
    name: str
    title: str
    record: str  # the recording rule's series name
    expr: str  # PromQL of the recorded series
    unit: Literal["ratio", "seconds", "bytes"]
    source: str


SLIS: tuple[SLI, ...] = (
    SLI(
        "query_latency",
        "Query latency (p95 per query)",
        "sli:query_duration_seconds:p95_rate5m",
        "histogram_quantile(0.95, sum by (query_name, le) (rate(query_duration_seconds_bucket[5m])))",
        "seconds",
        "application histogram query_duration_seconds",
    ),
    SLI(
        "request_latency",
        "Request latency (p95 per endpoint)",
        "sli:http_request_duration_seconds:p95_rate5m",
        "histogram_quantile(0.95, sum by (endpoint, le) (rate(http_request_duration_seconds_bucket[5m])))",
        "seconds",
        "application histogram http_request_duration_seconds",
    ),
    SLI(
        "availability",
        "Availability (share of requests not answered 5xx)",
        "sli:availability:ratio_rate5m",
        # A 4xx is the client's error, not downtime: only 5xx count against availability.
        'sum(rate(http_requests_total{status!~"5.."}[5m])) / sum(rate(http_requests_total[5m]))',
        "ratio",
        "application counter http_requests_total",
    ),
    SLI(
        "data_freshness",
        "Data freshness (replication lag, seconds, per replica)",
        "sli:pg_replication_lag_seconds:max",
        "max by (instance) (pg_replication_lag_seconds)",
        "seconds",
        "postgres_exporter custom query pg_replication (infra/render/exporters.py)",
    ),
    SLI(
        "replication_lag_bytes",
        "Replication lag (bytes behind the primary, per standby)",
        "sli:pg_replication_lag_bytes:max",
        "max by (instance, application_name) (pg_stat_replication_pg_wal_lsn_diff)",
        "bytes",
        "postgres_exporter built-in pg_stat_replication (on the primary)",
    ),
    SLI(
        "cache_hit_rate",
        "Cache hit rate (per cache)",
        "sli:cache_hit:ratio_rate5m",
        'sum by (cache_name) (rate(cache_requests_total{result="hit"}[5m]))'
        " / sum by (cache_name) (rate(cache_requests_total[5m]))",
        "ratio",
        "application counter cache_requests_total",
    ),
    SLI(
        "redis_hit_rate",
        "Redis keyspace hit rate",
        "sli:redis_keyspace_hit:ratio_rate5m",
        "sum by (instance) (rate(redis_keyspace_hits_total[5m])) / "
        "(sum by (instance) (rate(redis_keyspace_hits_total[5m])) + sum by (instance) (rate(redis_keyspace_misses_total[5m])))",
        "ratio",
        "redis_exporter",
    ),
    SLI(
        "error_rate",
        "Error rate (share of requests answered 5xx, per endpoint)",
        "sli:http_errors:ratio_rate5m",
        'sum by (endpoint) (rate(http_requests_total{status=~"5.."}[5m])) / sum by (endpoint) (rate(http_requests_total[5m]))',
        "ratio",
        "application counter http_requests_total",
    ),
    SLI(
        "transaction_success",
        "Transaction success rate (commits among commits + rollbacks)",
        "sli:pg_transaction_success:ratio_rate5m",
        "sum(rate(pg_stat_database_xact_commit[5m])) / "
        "(sum(rate(pg_stat_database_xact_commit[5m])) + sum(rate(pg_stat_database_xact_rollback[5m])))",
        "ratio",
        "postgres_exporter pg_stat_database",
    ),
)


@dataclass(frozen=True)
class SLO:
    """One objective. `kind` says how its error budget is counted:

    - ratio: bad events / all events (`bad` and `total` are counter selectors);
    - latency: events slower than `threshold` seconds / all events of a histogram; the objective is
      the share that must be fast (p95 < threshold  <=>  at least 95 % of events under threshold);
    - threshold: a gauge that must stay below (or above) `threshold`; budget = share of time out of bounds.
    """

    id: str
    title: str
    tier: Literal[1, 2, 3]
    sli: str
    kind: Literal["ratio", "latency", "threshold"]
    objective: float  # share of good events (or of good time) the SLO promises
    window: str  # the SLO's measurement window
    team: str
    consequence: str
    threshold: float | None = None
    comparison: Literal["<", ">"] = "<"
    bad: str = ""  # ratio: counter selector of bad events
    total: str = ""  # ratio: counter selectors of all events, joined by " + "; latency: the histogram's name
    selector: str = ""  # latency: label matchers of the histogram series
    gauge: str = ""  # threshold: PromQL of the gauge
    burn_rate_alerts: bool = False

    @property
    def budget(self) -> float:
        """The error budget as a share of events (or of time)."""
        return 1 - self.objective

    @property
    def alert_name(self) -> str:
        return "".join(part.capitalize() for part in self.id.split("-")) + "ErrorBudgetBurn"

    @property
    def window_seconds(self) -> float:
        return duration_seconds(self.window)

    @property
    def good(self) -> str:
        """threshold: PromQL that is 1 while the gauge is in bounds, 0 while it is not."""
        return f"({self.gauge}) {self.comparison} bool {self.threshold:g}"

    def error_ratio(self, window: str) -> str:
        """PromQL: share of bad events (or bad time) over `window`."""
        if self.kind == "ratio":
            total = " + ".join(f"sum(rate({selector}[{window}]))" for selector in self.total.split(" + "))
            return f"sum(rate({self.bad}[{window}])) / ({total})"
        if self.kind == "latency":
            le = _le(self.threshold)
            fast = f"sum(rate({self.total}_bucket{{{self.selector}{', ' if self.selector else ''}le=\"{le}\"}}[{window}]))"
            return f"1 - ({fast} / sum(rate({self.total}_count{{{self.selector}}}[{window}])))"
        return f"1 - avg_over_time(({self.good})[{window}:1m])"

    def sli_value(self, window: str) -> str:
        """PromQL: the SLI itself over `window` (what the report prints)."""
        if self.kind == "ratio":
            return f"1 - ({self.error_ratio(window)})"
        if self.kind == "latency":
            return f"histogram_quantile({self.objective:g}, sum by (le) (rate({self.total}_bucket{{{self.selector}}}[{window}])))"
        worst = "max_over_time" if self.comparison == "<" else "min_over_time"
        return f"{worst}(({self.gauge})[{window}:1m])"

    def met(self, value: float) -> bool:
        """Whether `sli_value` meets the objective."""
        if self.kind == "ratio":
            return value >= self.objective
        assert self.threshold is not None
        return value < self.threshold if self.comparison == "<" else value > self.threshold


def _le(threshold: float | None) -> str:
    """The `le` label of the bucket at `threshold`: prometheus_client writes it like Python's repr of a float."""
    assert threshold is not None
    return repr(float(threshold))


_QUERY = "query_duration_seconds"
_HTTP = "http_request_duration_seconds"

SLOS: tuple[SLO, ...] = (
    # Tier 1: critical, user-facing.
    SLO("query1-latency", "Query 1 (active bets) p95 < 5 ms", 1, "query_latency", "latency", 0.95, "1h", "dbre",
        "Dashboard lag, user complaints", threshold=0.005, total=_QUERY, selector='query_name="query1"', burn_rate_alerts=True),
    SLO("bet-placement-latency", "Bet placement p95 < 50 ms", 1, "request_latency", "latency", 0.95, "1h", "backend",
        "Lost revenue", threshold=0.05, total=_HTTP, selector='endpoint="/api/bets"', burn_rate_alerts=True),
    SLO("api-availability", "API availability 99.9 %", 1, "availability", "ratio", 0.999, "30d", "backend",
        "SLA breach", bad='http_requests_total{status=~"5.."}', total="http_requests_total", burn_rate_alerts=True),
    SLO("transaction-success", "Transaction success > 99.99 %", 1, "transaction_success", "ratio", 0.9999, "1d", "dbre",
        "Financial loss", bad="pg_stat_database_xact_rollback",
        total="pg_stat_database_xact_commit + pg_stat_database_xact_rollback", burn_rate_alerts=True),
    # Tier 2: important, operational.
    SLO("query2-4-latency", "Queries 2-4 p95 < 10 ms", 2, "query_latency", "latency", 0.95, "1h", "dbre",
        "Slow reports", threshold=0.01, total=_QUERY, selector='query_name=~"query2|query3|query4"'),
    SLO("replication-lag", "Replication lag < 1 s", 2, "data_freshness", "threshold", 0.99, "1h", "dbre",
        "Stale reads", threshold=1, gauge="max(pg_replication_lag_seconds)"),
    SLO("cache-hit-rate", "Cache hit rate > 80 %", 2, "cache_hit_rate", "threshold", 0.99, "1h", "dbre",
        "Increased DB load", threshold=0.8, comparison=">",
        gauge='sum(rate(cache_requests_total{result="hit"}[5m])) / sum(rate(cache_requests_total[5m]))'),
    SLO("backup-success", "Daily backup succeeds (last one < 25 h old)", 2, "data_freshness", "threshold", 0.999, "1d", "dbre",
        "RPO at risk", threshold=90000, gauge="time() - max(backup_last_success_timestamp)"),
    # Tier 3: nice to have, analytics.
    SLO("clickhouse-query-latency", "ClickHouse queries p95 < 500 ms", 3, "query_latency", "latency", 0.95, "1h", "data",
        "Slow BI dashboards", threshold=0.5, total=_QUERY, selector='query_name=~"clickhouse_.*"'),
    SLO("etl-lag", "ETL pipeline lag < 1 h", 3, "data_freshness", "threshold", 0.99, "1d", "data",
        "Stale analytics", threshold=3600, gauge="time() - max(etl_last_success_timestamp)"),
)

SLO_BY_ID = {slo.id: slo for slo in SLOS}


@dataclass(frozen=True)
class BudgetPolicyTier:
    name: str
    min_remaining: float  # applies when the remaining budget share is above this (exclusive), up to the tier above
    action: str


# The requirements document's error-budget policy, from the most to the least budget left.
ERROR_BUDGET_POLICY: tuple[BudgetPolicyTier, ...] = (
    BudgetPolicyTier("healthy", 0.50, "Ship new features, aggressive changes"),
    BudgetPolicyTier("caution", 0.25, "Slow down releases, increase testing"),
    BudgetPolicyTier("freeze", 0.0, "Feature freeze, focus on reliability"),
    BudgetPolicyTier("exhausted", float("-inf"), "Emergency: stop all changes, incident response"),
)


def policy_tier(remaining: float) -> BudgetPolicyTier:
    """The policy tier for a remaining budget share (1.0 = untouched, 0 or less = exhausted)."""
    for tier in ERROR_BUDGET_POLICY:
        if remaining > tier.min_remaining:
            return tier
    return ERROR_BUDGET_POLICY[-1]
