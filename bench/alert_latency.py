"""Alert latency: seconds from a fault to the receiver getting the PostgreSQLDown page.

    .venv/bin/python bench/alert_latency.py [--stack dev] [--runs 8] [--parallel 4]

Each run starts the real Prometheus and Alertmanager from the stack's rendered files on loopback
(only hosts, ports and paths mapped: no interval, `for` or group_wait is changed), with a local
exporter as job postgres, instance pg-1. Once Prometheus has scraped `pg_up 1`, the run waits a
random part of a scrape interval (so faults do not line up with scrapes), injects the fault, and
times the PagerDuty webhook receiving PostgreSQLDown. Two faults: the metric starts to breach
(`pg_up 0`: PostgreSQL down, exporter up) and the target stops (the exporter is gone).
Prints p50 and p95 beside the configured scrape interval, evaluation interval, `for` and
group_wait, and the goal: p95 at most `for` + 20 s.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.render.alertmanager import render_alertmanager  # noqa: E402
from infra.render.prometheus import render_prometheus  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from infra.topology import build_topology  # noqa: E402
from infra.units import duration_seconds  # noqa: E402
from tests.conftest import stack_config  # noqa: E402
from tests.monitoring.harness import MetricsTarget, Webhook, mentions, start_stack, wait_scraped  # noqa: E402

ALERT = "PostgreSQLDown"
GOAL_MARGIN_SECONDS = 20


def configured(files: dict[str, bytes]) -> dict[str, str]:
    """The timings that bound the latency, read from the rendered files."""
    prometheus = yaml.safe_load(files["prometheus/prometheus.yml"])
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "postgres")
    for path, content in files.items():
        if path.startswith("prometheus/rules/"):
            for group in yaml.safe_load(content)["groups"]:
                for rule in group["rules"]:
                    if rule.get("alert") == ALERT:
                        evaluation, for_ = group.get("interval", prometheus["global"]["evaluation_interval"]), rule["for"]
    route = yaml.safe_load(files["alertmanager/alertmanager.yml"])["route"]
    critical = next(r for r in route["routes"] if 'severity="critical"' in r.get("matchers", []))
    return {
        "scrape_interval": job.get("scrape_interval", prometheus["global"]["scrape_interval"]),
        "evaluation_interval": evaluation,
        "for": for_,
        "group_wait": critical.get("group_wait", route["group_wait"]),
    }


def one_run(files: dict[str, bytes], fault: str, scrape_seconds: float, timeout: float) -> float | None:
    webhook = Webhook()
    target = MetricsTarget({"pg_up": 1})
    with tempfile.TemporaryDirectory(prefix="alert-latency-") as workdir:
        # The stand-in exporter serves plain HTTP (the real one's TLS adds no alert latency worth measuring here).
        stack = start_stack(Path(workdir), files, {"postgres": [(target.address, "pg-1")]}, webhook, plain_jobs=("postgres",))
        try:
            wait_scraped(stack.prometheus_url, 'pg_up{instance="pg-1"} == 1', timeout=scrape_seconds * 4, client=stack.client)
            time.sleep(random.uniform(0, scrape_seconds))
            started = time.monotonic()
            if fault == "metric":
                target.metrics["pg_up"] = 0
            else:
                target.stop()
            paged = webhook.wait_for(lambda n: n.path == "/pagerduty" and mentions(n, ALERT), timeout)
            return None if paged is None else paged.at - started
        finally:
            stack.stop()
            if fault == "metric":
                target.stop()
            webhook.close()


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile: with few runs, p95 is the slowest or nearly."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Seconds from a fault to the PostgreSQLDown page")
    parser.add_argument("--stack", default="dev", choices=("dev", "staging", "prod"))
    parser.add_argument("--runs", type=int, default=8, help="runs per fault")
    parser.add_argument("--parallel", type=int, default=4, help="runs at the same time (each has its own daemons and ports)")
    parser.add_argument("--faults", default="metric,target-stop")
    args = parser.parse_args(argv)

    settings = load_settings(stack_config(args.stack), args.stack)
    topology = build_topology(settings)
    files = {**render_prometheus(settings, topology), **render_alertmanager(settings, topology)}
    timings = configured(files)
    for_seconds = duration_seconds(timings["for"])
    goal = for_seconds + GOAL_MARGIN_SECONDS
    timeout = goal * 3
    print(f"stack {args.stack}: scrape_interval {timings['scrape_interval']}  "
          f"evaluation_interval {timings['evaluation_interval']}  for {timings['for']}  "
          f"group_wait {timings['group_wait']}  goal p95 <= {goal:g}s")
    worst_p95 = 0.0
    for fault in args.faults.split(","):
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = [pool.submit(one_run, files, fault, duration_seconds(timings["scrape_interval"]), timeout)
                       for _ in range(args.runs)]
            results = [f.result() for f in futures]
        latencies = [r for r in results if r is not None]
        missed = len(results) - len(latencies)
        if not latencies:
            print(f"{fault:12s} no alert within {timeout:g}s in {len(results)} runs")
            return 1
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        worst_p95 = max(worst_p95, p95)
        print(f"{fault:12s} runs {len(latencies)}  min {min(latencies):.1f}s  p50 {p50:.1f}s  p95 {p95:.1f}s  "
              f"max {max(latencies):.1f}s" + (f"  missed {missed}" if missed else ""))
    verdict = "PASS" if worst_p95 <= goal else "FAIL"
    print(f"{verdict}: p95 {worst_p95:.1f}s against for + {GOAL_MARGIN_SECONDS}s = {goal:g}s")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
