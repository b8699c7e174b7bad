"""How many days a Prometheus volume holds (infra/capacity.py), from the rendered scrape config and the figures
bench/ingestion.py measured on the real exporters; `infra plan` prints it and warns under the time retention.

What these tests cannot see: a real month of ingestion. The figures are a prod-shaped sandbox's (one Redis, no
application, ClickHouse or Grafana: those jobs' figures are assumed and the plan says so), and bytes per sample
come from 10-minute blocks, a little above what 2-hour blocks take (the estimate errs towards fewer days).
"""

from __future__ import annotations

import json

import pytest

from infra import capacity
from infra.cli import main
from infra.render.prometheus import prometheus_config
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import STACKS, stack_config


def _stack(stack: str):
    settings = load_settings(stack_config(stack), stack)
    return settings, build_topology(settings)


def _with_prometheus(settings, **changes):
    prom = settings.monitoring.prometheus.model_copy(update=changes)
    return settings.model_copy(update={"monitoring": settings.monitoring.model_copy(update={"prometheus": prom})})


def test_the_figures_were_measured_by_the_bench_on_the_exporters_the_sandbox_runs():
    figures = capacity.load_figures()
    assert figures["how"].startswith("bench/ingestion.py")
    # Every exporter the sandbox runs has a measured figure; only what it cannot run is assumed, with a reason.
    assert {"node", "postgres", "patroni", "pgbouncer", "haproxy", "etcd", "prometheus", "alertmanager",
            "redis"} <= set(figures["series_per_target"])
    for job, assumption in figures["assumed_series_per_target"].items():
        assert job not in figures["series_per_target"] and assumption["series"] > 0 and assumption["reason"], job
    assert 0.5 < figures["bytes_per_sample"] < 10


@pytest.mark.parametrize("stack", STACKS)
def test_every_scrape_job_of_every_stack_has_a_figure_and_the_shipped_volumes_keep_the_promise(stack):
    settings, topology = _stack(stack)
    estimate = capacity.estimate(settings, topology)
    jobs = {j["job_name"] for j in prometheus_config(settings, topology)["scrape_configs"]}
    figures = capacity.load_figures()
    assert jobs - {"app"} <= set(figures["series_per_target"]) | set(figures["assumed_series_per_target"])
    assert estimate.retention_days == 30
    assert not estimate.below_promise, estimate.line()


def test_the_estimate_follows_the_scrape_interval_and_the_size_retention():
    settings, topology = _stack("prod")
    base = capacity.estimate(settings, topology)
    faster = capacity.estimate(_with_prometheus(settings, scrape_interval="5s"), topology)
    assert faster.samples_per_second > 2 * base.samples_per_second
    assert faster.days_held < base.days_held / 2
    smaller = capacity.estimate(_with_prometheus(settings, retention_size="20GB"), topology)
    assert smaller.days_held < base.days_held * 20 / 42 + 0.5


def test_a_job_without_a_figure_is_named():
    settings, topology = _stack("prod")
    figures = capacity.load_figures()
    del figures["series_per_target"]["haproxy"]
    with pytest.raises(capacity.CapacityError, match="'haproxy'"):
        capacity.estimate(settings, topology, figures)


def test_plan_prints_the_days_and_warns_under_the_time_retention(capsys, tmp_path, monkeypatch):
    assert main(["plan", "prod"]) == 0
    out = capsys.readouterr().out
    assert "Prometheus retention (estimate from infra/data/prometheus_ingestion.json" in out
    assert "holds about" in out and "warning: under the time retention" not in out
    heavy = {**capacity.load_figures(), "bytes_per_sample": 40.0}  # as if every sample took 40 bytes
    path = tmp_path / "figures.json"
    path.write_text(json.dumps(heavy))
    monkeypatch.setattr(capacity, "DATA_FILE", path)
    assert main(["plan", "prod", "--json", str(tmp_path / "prod.json")]) == 0
    out = capsys.readouterr().out
    assert "warning: under the time retention of 30d" in out
    retention = json.loads((tmp_path / "prod.json").read_text())["estimates"]["prometheus_retention"]
    assert retention["below_promise"] is True and retention["days_held"] < 30


def test_diff_shows_a_changed_estimate(capsys, tmp_path, monkeypatch):
    heavy = {**capacity.load_figures(), "bytes_per_sample": 40.0}
    path = tmp_path / "figures.json"
    path.write_text(json.dumps(heavy))
    monkeypatch.setattr(capacity, "DATA_FILE", path)
    main(["diff", "dev"])
    out = capsys.readouterr().out
    assert "~ estimate prometheus_retention.days_held:" in out
    assert "~ estimate prometheus_retention.below_promise: false -> true" in out
