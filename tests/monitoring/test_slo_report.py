"""scripts/slo_report.py against a real Prometheus holding a day of known traffic (backfilled with
`promtool tsdb create-blocks-from openmetrics`), so every figure of the report has a known answer."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from infra.slo import SLO_BY_ID
from scripts import slo_report
from tests.monitoring.conftest import binary
from tests.monitoring.harness import free_port, wait_ready, wait_scraped

pytestmark = pytest.mark.live

STEP = 60
MINUTES = 24 * 60 + 30  # a day of data and a margin before the window opens
LAG_SPIKE_MINUTES = 30


def _openmetrics(end: int) -> str:
    """Per minute: 998 good and 2 failed requests (availability 99.8 %); query1: 90 under 1 ms, 8 more
    under 5 ms, 2 under 10 ms (p95 3.5 ms, 2 % slow); 39999 commits and 1 rollback; replication lag
    0.2 s except a 30-minute spike at 5 s."""
    start = end - MINUTES * STEP
    times = [start + i * STEP for i in range(MINUTES + 1)]
    def series(name: str, labels: str, per_minute: float) -> list[str]:
        return [f"{name}{{{labels}}} {i * per_minute} {t}" for i, t in enumerate(times)]

    out = ["# TYPE http_requests counter"]
    for status, per_minute in (("200", 998), ("500", 2)):
        out += series("http_requests_total", f'endpoint="/api/bets",status="{status}"', per_minute)
    out.append("# TYPE query_duration_seconds histogram")
    for le, cumulative in (("0.001", 90), ("0.005", 98), ("0.01", 100), ("+Inf", 100)):
        out += series("query_duration_seconds_bucket", f'query_name="query1",le="{le}"', cumulative)
    out += series("query_duration_seconds_count", 'query_name="query1"', 100)
    out += series("query_duration_seconds_sum", 'query_name="query1"', 0.2)
    # postgres_exporter's counters do not end in _total, which OpenMetrics demands of a counter: typed gauge here.
    for name, per_minute in (("xact_commit", 39999), ("xact_rollback", 1)):
        out.append(f"# TYPE pg_stat_database_{name} gauge")
        out += series(f"pg_stat_database_{name}", 'datname="betting"', per_minute)
    out.append("# TYPE pg_replication_lag_seconds gauge")
    spike = range(MINUTES - 120, MINUTES - 120 + LAG_SPIKE_MINUTES)
    out += [f'pg_replication_lag_seconds{{instance="pg-2"}} {5 if i in spike else 0.2} {t}' for i, t in enumerate(times)]
    return "\n".join(out) + "\n# EOF\n"


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slo-report")
    end = int(time.time()) // STEP * STEP - 10 * STEP
    source = workdir / "metrics.om"
    source.write_text(_openmetrics(end))
    tsdb = workdir / "tsdb"
    created = subprocess.run([binary("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(source), str(tsdb)],
                             capture_output=True, text=True)
    assert created.returncode == 0, created.stdout + created.stderr
    (workdir / "prometheus.yml").write_text("global: {}\n")
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary("prometheus"), f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={tsdb}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        wait_scraped(url, f"http_requests_total @ {end}")
        yield url, end
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_report_figures(backfilled):
    url, end = backfilled
    rows = {row.slo: row for row in slo_report.report(url, "1d", end)}

    availability = rows["api-availability"]
    assert availability.sli == pytest.approx(0.998, abs=1e-6)
    assert availability.downtime_minutes == pytest.approx(0.002 * 1440, rel=1e-3)  # 2.88 minutes
    assert availability.budget_consumed_pct == pytest.approx(200, rel=1e-3)
    assert (availability.status, availability.policy) == ("FAIL", "exhausted")

    query1 = rows["query1-latency"]
    assert query1.sli == pytest.approx(0.0035, rel=1e-3)  # p95 interpolated in the (1 ms, 5 ms] bucket
    assert query1.error_ratio == pytest.approx(0.02, rel=1e-3)
    assert query1.budget_consumed_pct == pytest.approx(40, rel=1e-3)
    assert (query1.status, query1.policy) == ("PASS", "healthy")

    transactions = rows["transaction-success"]
    assert transactions.sli == pytest.approx(1 - 1 / 40000, abs=1e-9)
    assert transactions.budget_consumed_pct == pytest.approx(25, rel=1e-3)
    assert (transactions.status, transactions.policy) == ("PASS", "healthy")

    lag = rows["replication-lag"]
    assert lag.sli == 5
    assert lag.error_ratio == pytest.approx(LAG_SPIKE_MINUTES / 1440, abs=2 / 1440)
    assert lag.status == "FAIL" and lag.policy == "exhausted"

    assert rows["bet-placement-latency"].status == "NO DATA"


def test_report_cli_json_and_table(backfilled, capsys):
    url, end = backfilled
    code = slo_report.main(["--prometheus", url, "--window", "1d", "--at", str(end), "--slo", "api-availability", "--json"])
    output = json.loads(capsys.readouterr().out)
    assert code == 1  # a FAIL makes the exit status non-zero
    assert [s["slo"] for s in output["slos"]] == ["api-availability"]
    assert output["slos"][0]["status"] == "FAIL"
    slo_report.main(["--prometheus", url, "--window", "1d", "--at", str(end), "--slo", "query1-latency"])
    text = capsys.readouterr().out
    assert "query1-latency" in text and "p95 3.5ms" in text and "PASS" in text


def test_month_window():
    assert slo_report.month_window("2026-02") == ("28d", 1772323200.0)  # 2026-03-01T00:00Z
    assert slo_report.month_window("2026-12")[0] == "31d"


def test_policy_tiers_follow_the_document():
    from infra.slo import policy_tier

    assert [policy_tier(r).name for r in (0.9, 0.5, 0.3, 0.25, 0.1, 0.0, -1)] == [
        "healthy", "caution", "caution", "freeze", "freeze", "exhausted", "exhausted"
    ]
    assert SLO_BY_ID["api-availability"].budget == pytest.approx(0.001)
