"""Monthly SLO report from Prometheus: availability, p95 per query SLO, downtime minutes, error budget
consumed, PASS/FAIL and the error-budget policy tier, for every SLO of the catalog (infra/slo.py).

    python -m scripts.slo_report --prometheus https://monitoring-1.prod.betting.internal:9090
    python -m scripts.slo_report --prometheus URL --month 2026-10          # a calendar month
    python -m scripts.slo_report --prometheus URL --window 1d --slo api-availability --json
    python -m scripts.slo_report --from-postgres 'host=... dbname=metrics' --month 2026-10  # the daily aggregates

Every figure is one instant query over the report window (`/api/v1/query` with `time` at the
window's end), so the report needs the raw data of the whole window (Prometheus keeps 30 days).
Prometheus serves https with basic auth: --ca-file and --password-file (scripts/monitoring_client.py).
"""

from __future__ import annotations

import argparse
import calendar
import json
import math
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime

import requests

from infra import aggregates
from infra.slo import SLO, SLO_BY_ID, SLOS, policy_tier
from infra.units import duration_seconds
from scripts import monitoring_client


class PrometheusError(RuntimeError):
    pass


@dataclass
class Row:
    slo: str
    title: str
    tier: int
    kind: str
    objective: float
    threshold: float | None
    sli: float | None  # ratio: good share; latency: p95 seconds; threshold: worst value
    error_ratio: float | None  # bad share of events (or of time)
    downtime_minutes: float | None  # ratio and threshold SLOs: bad share x window
    budget_consumed_pct: float | None
    status: str  # PASS, FAIL, NO DATA
    policy: str
    action: str


def instant(prometheus: str, expr: str, at: float, client: requests.Session | None = None) -> float | None:
    """The single value of an instant query, None when it returns no sample (no data in the window)."""
    response = (client or requests).get(f"{prometheus}/api/v1/query", params={"query": expr, "time": f"{at:.3f}"}, timeout=60)
    body = response.json()
    if body.get("status") != "success":
        raise PrometheusError(f"{expr}: {body.get('error', response.text)}")
    result = body["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) else value


def evaluate(prometheus: str, slo: SLO, window: str, at: float, client: requests.Session | None = None) -> Row:
    error_ratio = instant(prometheus, slo.error_ratio(window), at, client)
    sli = instant(prometheus, slo.sli_value(window), at, client)
    return row(slo, window, error_ratio, sli)


def row(slo: SLO, window: str, error_ratio: float | None, sli: float | None) -> Row:
    """The report's row from the window's error ratio and SLI, wherever they were read."""
    window_minutes = duration_seconds(window) / 60
    if error_ratio is None or sli is None:
        return Row(slo.id, slo.title, slo.tier, slo.kind, slo.objective, slo.threshold, sli, error_ratio, None, None,
                   "NO DATA", "-", "no samples in the window")
    error_ratio = max(0.0, error_ratio)
    consumed = error_ratio / slo.budget
    tier = policy_tier(1 - consumed)
    if slo.kind == "latency":
        passed = slo.met(sli)
    else:
        passed = error_ratio <= slo.budget
    return Row(
        slo.id, slo.title, slo.tier, slo.kind, slo.objective, slo.threshold, sli, error_ratio,
        None if slo.kind == "latency" else error_ratio * window_minutes,
        consumed * 100, "PASS" if passed else "FAIL", tier.name, tier.action,
    )


def report(prometheus: str, window: str, at: float, slos=SLOS, client: requests.Session | None = None) -> list[Row]:
    return [evaluate(prometheus, slo, window, at, client) for slo in slos]


def _connect(dsn: str):
    """A DB-API connection: psycopg 3 where installed (the project's environment), else Debian's python3-psycopg2."""
    try:
        import psycopg
    except ImportError:
        import psycopg2

        return psycopg2.connect(dsn)
    return psycopg.connect(dsn)


def report_from_postgres(dsn: str, month: str, slos=SLOS) -> list[Row]:
    """The report of a calendar month from the daily aggregates (scripts/aggregate_metrics.py, infra/aggregates.py)."""
    window, _ = month_window(month)
    first = date.fromisoformat(f"{month}-01")
    end = aggregates.add_months(first, 1)
    with _connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT slo, component, le, value FROM {aggregates.SCHEMA}.{aggregates.TABLE} "
                       "WHERE day >= %s AND day < %s", (first, end))
        stored = cursor.fetchall()
    rows = []
    for slo in slos:
        error_ratio, sli = aggregates.month_figures(slo, [(c, le, v) for s, c, le, v in stored if s == slo.id])
        rows.append(row(slo, window, error_ratio, sli))
    return rows


def _sli_text(row: Row) -> str:
    if row.sli is None:
        return "-"
    if row.kind == "ratio":
        return f"{row.sli:.3%}"
    if row.kind == "latency":
        return f"p95 {row.sli * 1000:.1f}ms"
    return f"worst {row.sli:g}"


def _target_text(row: Row) -> str:
    if row.kind == "ratio":
        return f">= {row.objective:.2%}"
    if row.kind == "latency":
        return f"p95 < {row.threshold * 1000:g}ms"
    return f"{row.objective:.0%} of time in bounds"


def table(rows: list[Row], window: str, at: float) -> str:
    header = ("tier", "slo", "target", "sli", "downtime min", "budget used", "status", "policy")
    lines = [header]
    for row in rows:
        lines.append((
            str(row.tier), row.slo, _target_text(row), _sli_text(row),
            "-" if row.downtime_minutes is None else f"{row.downtime_minutes:.2f}",
            "-" if row.budget_consumed_pct is None else f"{row.budget_consumed_pct:.1f}%",
            row.status, row.policy if row.policy == "-" else f"{row.policy}: {row.action}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    end = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"SLO report: {window} ending {end}"
    body = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join([title, *body])


def month_window(month: str) -> tuple[str, float]:
    """A calendar month 'YYYY-MM' as (window, end timestamp)."""
    year, number = (int(part) for part in month.split("-"))
    days = calendar.monthrange(year, number)[1]
    end = datetime(year + (number == 12), number % 12 + 1, 1, tzinfo=UTC)
    return f"{days}d", end.timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Monthly SLO report from Prometheus")
    parser.add_argument("--prometheus", default="https://127.0.0.1:9090", help="Prometheus base URL")
    monitoring_client.add_arguments(parser)
    parser.add_argument("--window", default="30d", help="report window (Prometheus duration), ending now or at --at")
    parser.add_argument("--at", type=float, default=None, help="end of the window, Unix seconds (default: now)")
    parser.add_argument("--month", help="a calendar month YYYY-MM (overrides --window and --at)")
    parser.add_argument("--slo", action="append", choices=sorted(SLO_BY_ID), help="only these SLOs (repeatable)")
    parser.add_argument("--from-postgres", metavar="DSN",
                        help="read --month from the daily aggregates in PostgreSQL (libpq DSN) instead of Prometheus")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    window, at = args.window, args.at if args.at is not None else datetime.now(UTC).timestamp()
    if args.month:
        window, at = month_window(args.month)
    duration_seconds(window)  # fail early on a bad window
    slos = [SLO_BY_ID[name] for name in args.slo] if args.slo else list(SLOS)
    if args.from_postgres:
        if not args.month:
            parser.error("--from-postgres reads whole months: give --month YYYY-MM")
        rows = report_from_postgres(args.from_postgres, args.month, slos)
    else:
        rows = report(args.prometheus.rstrip("/"), window, at, slos, monitoring_client.from_arguments(args))
    if args.json:
        print(json.dumps({"window": window, "end": at, "slos": [asdict(row) for row in rows]}, indent=2))
    else:
        print(table(rows, window, at))
    return 1 if any(row.status == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
