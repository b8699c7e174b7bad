"""A year of SLO aggregates in PostgreSQL: what the daily job (scripts/aggregate_metrics.py) stores and how a month's
figures are read back (scripts/slo_report.py --from-postgres, scripts/sql/monthly_slo_report.sql). Pure: no Pulumi, no
I/O; standard library and infra.slo only, so the job runs on a monitoring host's Debian python3.

Each SLO of infra/slo.py is stored as additive daily components, read from Prometheus at the day's end (UTC midnight),
chosen so that a month summed from them is what scripts/slo_report.py computes from Prometheus for that month:

- ratio: `bad` and `total`, the day's increase of the counters. A ratio of rates over a month is a ratio of increases,
  and increases over consecutive days add up to the month's (the sample at midnight ends one day and starts the next).
- latency: `bucket`, one row per `le`: the day's increase of each histogram bucket. Summed over the month they are the
  month's buckets; histogram_quantile's result does not change when every bucket is scaled (rate = increase / window),
  so `histogram_quantile` below, Prometheus' own interpolation, gives the month's p95; the error ratio is
  1 - bucket[le=threshold] / bucket[+Inf].
- threshold: `bad_minutes` and `minutes`, the 1-minute steps of the SLO's `good` expression that were out of bounds and
  all of them, and `worst`, the day's worst gauge value. The month is Σbad/Σminutes and the worst of the days.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from infra.slo import SLO, _le

ROLE = "metrics_aggregator"  # the only role that writes them (infra/hostagent/files/pg-aggregates.sql)
SCHEMA = "aggregates"
TABLE = "slo_daily"
DAY_SECONDS = 86400
# A subquery's steps include both ends of its range (Prometheus 2.x): [1d:1m] at midnight would count the midnight step
# in two days. 1439m starts one step later, so each day owns the steps (00:00, 24:00].
DAY_STEPS = "1439m:1m"
MONTHS_KEPT_MINIMUM = 12  # the requirements: aggregated metrics for 1 year


@dataclass(frozen=True)
class Component:
    name: str
    expr: str  # PromQL evaluated at the day's end
    by_le: bool = False  # one row per `le` label of the result (histogram buckets)


def components(slo: SLO) -> tuple[Component, ...]:
    """The daily components stored for `slo`."""
    if slo.kind == "ratio":
        total = " + ".join(f"sum(increase({selector}[1d]))" for selector in slo.total.split(" + "))
        return (Component("bad", f"sum(increase({slo.bad}[1d]))"), Component("total", total))
    if slo.kind == "latency":
        return (Component("bucket", f"sum by (le) (increase({slo.total}_bucket{{{slo.selector}}}[1d]))", by_le=True),)
    worst = "max_over_time" if slo.comparison == "<" else "min_over_time"
    return (
        Component("bad_minutes", f"count_over_time(({slo.good})[{DAY_STEPS}]) - sum_over_time(({slo.good})[{DAY_STEPS}])"),
        Component("minutes", f"count_over_time(({slo.good})[{DAY_STEPS}])"),
        Component("worst", f"{worst}(({slo.gauge})[{DAY_STEPS}])"),
    )


def day_end(day: date) -> float:
    """Unix seconds of the UTC midnight that ends `day`."""
    return (day - date(1970, 1, 1)).days * DAY_SECONDS + DAY_SECONDS


def _upper(le: str) -> float:
    return float(le.replace("Inf", "inf"))


def histogram_quantile(q: float, buckets: dict[str, float]) -> float:
    """Prometheus' histogram_quantile (promql/quantile.go bucketQuantile, 2.42) over cumulative buckets by `le`."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for le, count in buckets.items():  # coalesceBuckets: equal upper bounds add up
        upper = _upper(le)
        merged[upper] = merged.get(upper, 0.0) + count
    ordered = sorted(merged.items())
    if not ordered or not math.isinf(ordered[-1][0]):
        return math.nan
    highest, monotonic = -math.inf, []
    for upper, count in ordered:  # ensureMonotonic: a bucket never holds fewer than the one below
        highest = max(highest, count)
        monotonic.append((upper, highest))
    if len(monotonic) < 2:
        return math.nan
    observations = monotonic[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(monotonic) - 1) if monotonic[i][1] >= rank), len(monotonic) - 1)
    if b == len(monotonic) - 1:
        return monotonic[-2][0]
    if b == 0 and monotonic[0][0] <= 0:
        return monotonic[0][0]
    start, end, count = 0.0, monotonic[b][0], monotonic[b][1]
    if b > 0:
        start = monotonic[b - 1][0]
        count -= monotonic[b - 1][1]
        rank -= monotonic[b - 1][1]
    return start + (end - start) * (rank / count)


def month_figures(slo: SLO, rows: Iterable[tuple[str, str, float]]) -> tuple[float | None, float | None]:
    """(error ratio, SLI) of a month from its daily rows (component, le, value); None where Prometheus would return no
    sample (no row, or nothing counted)."""
    sums: dict[str, float] = {}
    buckets: dict[str, float] = {}
    worst: list[float] = []
    for component, le, value in rows:
        if component == "bucket":
            buckets[le] = buckets.get(le, 0.0) + value
        elif component == "worst":
            worst.append(value)
        else:
            sums[component] = sums.get(component, 0.0) + value
    if slo.kind == "ratio":
        bad, total = sums.get("bad"), sums.get("total")
        if bad is None or not total:
            return None, None
        return bad / total, 1 - bad / total
    if slo.kind == "latency":
        fast, observations = buckets.get(_le(slo.threshold)), buckets.get("+Inf")
        if fast is None or not observations:
            return None, None
        p = histogram_quantile(slo.objective, buckets)
        return 1 - fast / observations, None if math.isnan(p) else p
    bad, minutes = sums.get("bad_minutes"), sums.get("minutes")
    if bad is None or not minutes or not worst:
        return None, None
    return bad / minutes, max(worst) if slo.comparison == "<" else min(worst)


# ---- partitions -----------------------------------------------------------------------------
def month_start(day: date) -> date:
    return day.replace(day=1)


def add_months(month: date, months: int) -> date:
    index = month.year * 12 + month.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"{TABLE}_{month:%Y_%m}"


def partition_month(name: str) -> date | None:
    """The month of a partition this module named, None for any other table."""
    prefix = f"{TABLE}_"
    if not name.startswith(prefix):
        return None
    try:
        year, month = (int(part) for part in name[len(prefix):].split("_"))
        return date(year, month, 1)
    except ValueError:
        return None


def oldest_kept_month(today: date, months_kept: int) -> date:
    """The first month kept: `months_kept` whole months stay before the current one (12: a year of complete months,
    beside the month in progress)."""
    return add_months(month_start(today), -months_kept)


def expired(partitions: Iterable[str], today: date, months_kept: int) -> list[str]:
    """The partitions whose whole month is older than what is kept."""
    oldest = oldest_kept_month(today, months_kept)
    return sorted(name for name in partitions if (month := partition_month(name)) is not None and month < oldest)


def days(last: date, count: int) -> list[date]:
    """`count` days ending with `last`, oldest first."""
    return [last - timedelta(days=offset) for offset in range(count - 1, -1, -1)]
