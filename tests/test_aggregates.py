"""The pure math of the SLO aggregates (infra/aggregates.py), the job's arguments and its units.

histogram_quantile is checked against figures the real Prometheus 2.42 returned for the same buckets (the live test,
tests/monitoring/test_aggregates_live.py, compares a whole month with Prometheus); month sums against hand-worked
figures. The units pass `systemd-analyze verify`; systemd itself firing the timer is not seen here.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from datetime import date

import pytest

from infra import aggregates
from infra.hosts import host_specs
from infra.hosts.monitoring import AGGREGATES_ENV, AGGREGATES_LIB, AGGREGATES_UNIT
from infra.slo import SLO_BY_ID, SLOS
from scripts import aggregate_metrics


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    # Interpolation inside the bucket that holds the rank: 95 of 100 lies 45/50 of the way through (0.005, 0.01].
    (0.95, {"0.005": 50, "0.01": 100, "+Inf": 100}, 0.005 + 0.005 * 45 / 50),
    # The first bucket starts at 0.
    (0.5, {"0.1": 10, "+Inf": 10}, 0.05),
    # A rank in the +Inf bucket: the highest finite bound.
    (0.99, {"0.1": 90, "0.5": 95, "+Inf": 100}, 0.5),
    # Non-monotonic counts (a scrape between bucket updates) are raised to the bucket below's.
    (0.5, {"0.1": 10, "0.2": 8, "0.4": 20, "+Inf": 20}, 0.1),
    (0.75, {"0.1": 10, "0.2": 8, "0.4": 20, "+Inf": 20}, 0.2 + 0.2 * 5 / 10),
    # A first bound at or below zero is returned as is.
    (0.1, {"-1": 5, "0": 5, "+Inf": 10}, -1),
    # Equal bounds written differently add up.
    (0.5, {"0.5": 5, "5e-1": 5, "+Inf": 20}, 0.5),
])
def test_histogram_quantile_is_prometheus_interpolation(q, buckets, expected):
    assert aggregates.histogram_quantile(q, buckets) == pytest.approx(expected)


def test_histogram_quantile_edge_cases_are_prometheus_ones():
    assert math.isnan(aggregates.histogram_quantile(0.95, {"0.1": 5}))  # no +Inf bucket
    assert math.isnan(aggregates.histogram_quantile(0.95, {"+Inf": 5}))  # fewer than two buckets
    assert math.isnan(aggregates.histogram_quantile(0.95, {"0.1": 0, "+Inf": 0}))  # no observation
    assert aggregates.histogram_quantile(-0.1, {"0.1": 1, "+Inf": 1}) == -math.inf
    assert aggregates.histogram_quantile(1.1, {"0.1": 1, "+Inf": 1}) == math.inf


def test_a_month_is_the_sum_of_its_days():
    availability = SLO_BY_ID["api-availability"]
    rows = [("bad", "", 1.0), ("total", "", 1000.0), ("bad", "", 3.0), ("total", "", 3000.0)]
    assert aggregates.month_figures(availability, rows) == (pytest.approx(0.001), pytest.approx(0.999))
    latency = SLO_BY_ID["query1-latency"]
    days = [[("bucket", "0.005", 90.0), ("bucket", "0.01", 100.0), ("bucket", "+Inf", 100.0)]] * 2
    error_ratio, p95 = aggregates.month_figures(latency, [row for day in days for row in day])
    assert error_ratio == pytest.approx(0.1) and p95 == pytest.approx(0.005 + 0.005 * (190 - 180) / 20)
    lag = SLO_BY_ID["replication-lag"]
    rows = [("bad_minutes", "", 15.0), ("minutes", "", 1440.0), ("worst", "", 3.0),
            ("bad_minutes", "", 0.0), ("minutes", "", 1440.0), ("worst", "", 0.4)]
    assert aggregates.month_figures(lag, rows) == (pytest.approx(15 / 2880), 3.0)
    cache = SLO_BY_ID["cache-hit-rate"]  # "> 0.8": the worst day is the lowest
    assert aggregates.month_figures(cache, [("bad_minutes", "", 0.0), ("minutes", "", 10.0), ("worst", "", 0.5),
                                            ("worst", "", 0.9)])[1] == 0.5
    assert aggregates.month_figures(availability, []) == (None, None)  # no data: the report's NO DATA


def test_every_slo_has_components_whose_promql_ends_the_day_at_midnight():
    for slo in SLOS:
        names = [component.name for component in aggregates.components(slo)]
        assert names == {"ratio": ["bad", "total"], "latency": ["bucket"],
                         "threshold": ["bad_minutes", "minutes", "worst"]}[slo.kind], slo.id
    assert aggregates.day_end(date(2026, 10, 31)) == 1793491200  # 2026-11-01T00:00:00Z


def test_partitions_older_than_the_months_kept_expire():
    names = ["slo_daily_2025_10", "slo_daily_2025_11", "slo_daily_2025_12", "slo_daily_2026_12", "other_2020_01"]
    assert aggregates.expired(names, date(2026, 12, 1), 12) == ["slo_daily_2025_10", "slo_daily_2025_11"]
    assert aggregates.add_months(date(2026, 12, 1), 1) == date(2027, 1, 1)


@pytest.mark.parametrize(("argv", "message"), [
    (["--day", "2026-13-01"], "not a day YYYY-MM-DD: '2026-13-01'"),
    (["--backfill", "0"], "not a whole number of days, 1 or more: '0'"),
    (["--months-kept", "6"], "must be a whole number of months, at least 12"),
])
def test_bad_arguments_get_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        aggregate_metrics.main(["--prometheus", "https://x", "--dsn", "dbname=x", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_unreachable_prometheus_is_one_line_and_exit_3(capsys, tmp_path):
    code = aggregate_metrics.main(["--prometheus", "https://127.0.0.1:1", "--dsn", "dbname=x", "--day", "2026-10-01",
                                   "--today", "2026-10-05"])
    err = capsys.readouterr().err
    assert code in (3, 4) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_day_that_would_be_dropped_at_once_is_refused(capsys):
    code = aggregate_metrics.main(["--prometheus", "https://x", "--dsn", "dbname=x", "--day", "2024-01-01",
                                   "--today", "2026-10-05"])
    assert code == 2 and "the oldest month kept" in capsys.readouterr().err


def _monitoring_files(settings, topology):
    specs = [spec for spec in host_specs(settings, topology) if spec.host.role == "monitoring"]
    return [{file.path: file for file in spec.files} for spec in specs]


def test_the_job_is_installed_verbatim_on_every_monitoring_host_the_first_one_replacing(settings, topology):
    hosts = _monitoring_files(settings, topology)
    for index, files in enumerate(hosts):
        assert files[f"{AGGREGATES_LIB}/infra/aggregates.py"].content == open(aggregates.__file__, "rb").read()
        env = files[AGGREGATES_ENV].content.decode()
        assert f"user={aggregates.ROLE} sslmode=verify-full" in env and topology.postgres_primary_endpoint in env
        assert ('EXTRA_ARGS=""' if index == 0 else 'EXTRA_ARGS="--if-missing"') in env


def test_the_units_pass_systemd_analyze_verify(settings, topology, tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed"
    files = _monitoring_files(settings, topology)[0]
    for kind in ("service", "timer"):
        (tmp_path / f"{AGGREGATES_UNIT}.{kind}").write_bytes(files[f"/etc/systemd/system/{AGGREGATES_UNIT}.{kind}"].content)
    result = subprocess.run([analyze, "verify", str(tmp_path / f"{AGGREGATES_UNIT}.timer"),
                             str(tmp_path / f"{AGGREGATES_UNIT}.service")], capture_output=True, text=True)
    # verify checks the ExecStart binary exists: /usr/bin/python3 does here; the script's path is an argument.
    assert result.returncode == 0, result.stdout + result.stderr
