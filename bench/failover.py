"""Failover RTO and acknowledged writes lost, per Patroni timing, on a 3-node sandbox cluster.

    .venv/bin/python -m bench.failover                    # prod timing and Patroni's defaults, 5 drills each
    .venv/bin/python -m bench.failover --drills 3 --timings prod 20/1/9 --no-curve

Each timing gets a fresh sandbox of the stack (same settings, only the Patroni timing
differs) and runs every scenario `--drills` times: node loss (leader's Patroni and postmaster
SIGKILL), PostgreSQL crash (postmaster SIGKILL), planned switchover, and split brain (only
the leader's Patroni SIGKILLed). Then the node-loss curve over the leader key's ttl (10, 20,
30 s; 10 is below Patroni's documented minimum of 20 and shown only for the curve).
RTO = fault -> first acknowledged write on a new connection to the new primary, measured twice in
every drill: straight at PostgreSQL (the node whose Patroni answers /primary) and through the
writer endpoint as a client sees it (each node's HAProxy in turn, then PgBouncer, as an
application role). The last line is the client-visible RTO of the stack's own timing:

    client RTO via writer endpoint: node-loss p95 N s, switchover p95 S s, writes misrouted 0
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from infra.sandbox.cli import stack_settings
from infra.sandbox.runner import Sandbox, SandboxError
from scripts.failover_drill import SCENARIOS, DrillResult, run_drill

PATRONI_DEFAULTS = {"ttl": 30, "loop_wait": 10, "retry_timeout": 10, "primary_start_timeout": 300}
CURVE_TTLS = (10, 20, 30)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def with_timing(settings, timing: dict):
    return settings.model_copy(update={"patroni": settings.patroni.model_copy(update=timing)})


def parse_timing(text: str, settings) -> tuple[str, dict]:
    if text == "prod":
        p = settings.patroni
        return (f"{settings.stack} ({p.ttl}/{p.loop_wait}/{p.retry_timeout})", {})
    if text == "defaults":
        return ("Patroni defaults (30/10/10)", dict(PATRONI_DEFAULTS))
    ttl, loop_wait, retry_timeout = (int(x) for x in text.split("/"))
    return (f"{ttl}/{loop_wait}/{retry_timeout}", {"ttl": ttl, "loop_wait": loop_wait, "retry_timeout": retry_timeout})


def curve_timing(settings, ttl: int) -> dict:
    """The stack's loop_wait, and the largest retry_timeout Patroni's rule allows (at least 3)."""
    loop_wait = settings.patroni.loop_wait
    retry_timeout = max(3, min(settings.patroni.retry_timeout, (ttl - loop_wait) // 2))
    return {"ttl": ttl, "loop_wait": loop_wait, "retry_timeout": retry_timeout}


def run_config(label: str, settings, scenarios, drills: int, sandbox: Sandbox) -> list[dict]:
    print(f"\n== {label}: ttl {settings.patroni.ttl}, loop_wait {settings.patroni.loop_wait}, "
          f"retry_timeout {settings.patroni.retry_timeout}, synchronous_mode {settings.patroni.synchronous_mode}", flush=True)
    started = time.monotonic()
    sandbox.up(settings, services=["postgres"])
    print(f"  cluster up in {time.monotonic() - started:.1f}s", flush=True)
    rows = []
    try:
        for scenario in scenarios:
            results = []
            for i in range(1, drills + 1):
                try:
                    result = run_drill(sandbox, scenario, progress=lambda text: None)
                except SandboxError as error:
                    # Counted as a drill without a new primary; the next drill waits for a healthy cluster.
                    print(f"  {scenario} {i}/{drills}: FAILED: {error}", flush=True)
                    result = DrillResult(scenario, "?", None, None, 0, 0, None)
                    sandbox.start_patroni_everywhere()
                else:
                    print(f"  {scenario} {i}/{drills}: {result.line()}", flush=True)
                results.append(result)
            rtos = [r.rto_s for r in results if r.rto_s is not None]
            client = [r.endpoint_rto_s for r in results if r.endpoint_rto_s is not None]
            rows.append({
                "timing": label, "scenario": scenario, "drills": drills, "failed": drills - len(rtos),
                "p50": percentile(rtos, 0.5) if rtos else None, "p95": percentile(rtos, 0.95) if rtos else None,
                "max": max(rtos) if rtos else None, "acknowledged": sum(r.acknowledged for r in results),
                "lost": sum(r.lost for r in results),
                "client_failed": drills - len(client),
                "client_p50": percentile(client, 0.5) if client else None,
                "client_p95": percentile(client, 0.95) if client else None,
                "client_max": max(client) if client else None,
                "client_acknowledged": sum(r.endpoint_acknowledged for r in results),
                "client_lost": sum(r.endpoint_lost for r in results),
                "misrouted": sum(r.endpoint_misrouted for r in results),
                "reads_without_primary": sum(r.reads_without_primary for r in results),
                "reader_longest_gap": max((r.reader_longest_gap_s or 0.0 for r in results), default=0.0),
                "results": [asdict(r) for r in results],
            })
    finally:
        sandbox.down()
    return rows


def _s(value) -> str:
    return f"{value:.1f} s" if value is not None else "-"


def print_table(rows: list[dict]) -> None:
    print("\n| timing (ttl/loop_wait/retry_timeout) | scenario | drills | RTO p50 | RTO p95 | RTO max | writes acknowledged "
          "| lost | via writer endpoint: RTO p50 | p95 | max | acknowledged | lost | misrouted "
          "| reader: answers without a primary, longest gap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        failed = f" ({row['failed']} without a new primary)" if row["failed"] else ""
        client_failed = f" ({row['client_failed']} none)" if row.get("client_failed") else ""
        print(f"| {row['timing']} | {row['scenario']}{failed} | {row['drills']} | {_s(row['p50'])} | {_s(row['p95'])} | "
              f"{_s(row['max'])} | {row['acknowledged']} | {row['lost']} | {_s(row.get('client_p50'))}{client_failed} | "
              f"{_s(row.get('client_p95'))} | {_s(row.get('client_max'))} | {row.get('client_acknowledged', 0)} | "
              f"{row.get('client_lost', 0)} | {row.get('misrouted', 0)} | {row.get('reads_without_primary', 0)}, "
              f"{_s(row.get('reader_longest_gap'))} |")


def client_line(rows: list[dict], timing: str) -> str:
    """The bench's last line: the client-visible RTO of `timing` (the stack's own), misrouted writes of every row."""
    p95 = {row["scenario"]: row.get("client_p95") for row in rows if row["timing"] == timing}

    def figure(scenario: str) -> str:
        return f"{p95[scenario]:.1f} s" if p95.get(scenario) is not None else "n/a"

    misrouted = sum(row.get("misrouted", 0) for row in rows)
    return (f"client RTO via writer endpoint: node-loss p95 {figure('node-loss')}, "
            f"switchover p95 {figure('switchover')}, writes misrouted {misrouted}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", default="prod")
    parser.add_argument("--drills", type=int, default=5)
    parser.add_argument("--timings", nargs="+", default=["prod", "defaults"],
                        help="prod, defaults or TTL/LOOP_WAIT/RETRY_TIMEOUT")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--no-curve", action="store_true", help="skip the node-loss curve over ttl 10/20/30")
    parser.add_argument("--port-base", type=int, default=26000)
    parser.add_argument("--json", type=Path, help="also write every drill's result here")
    args = parser.parse_args(argv)

    base = stack_settings(args.stack)
    # One sandbox object for every timing: it remembers the settings it runs, including the
    # curve's ttl 10 that StackSettings would refuse to load back from the state file.
    sandbox = Sandbox(Path(tempfile.mkdtemp(prefix="bench-failover-")), args.port_base)
    rows: list[dict] = []
    for text in args.timings:
        label, timing = parse_timing(text, base)
        rows += run_config(label, with_timing(base, timing), args.scenarios, args.drills, sandbox)
    if not args.no_curve:
        p = base.patroni
        for ttl in CURVE_TTLS:
            timing = curve_timing(base, ttl)
            label = f"curve ttl {ttl} ({ttl}/{timing['loop_wait']}/{timing['retry_timeout']})"
            same_as_stack = (ttl, timing["loop_wait"], timing["retry_timeout"]) == (p.ttl, p.loop_wait, p.retry_timeout)
            measured = [r for r in rows if same_as_stack and r["timing"].startswith(base.stack) and r["scenario"] == "node-loss"]
            if measured:
                rows.append({**measured[0], "timing": label + ", as above"})
                continue
            rows += run_config(label, with_timing(base, timing), ["node-loss"], args.drills, sandbox)
    print_table(rows)
    bad = any(row["lost"] or row["failed"] or row.get("client_lost") or row.get("misrouted") for row in rows)
    if bad:
        print(f"\nlogs of the drills: {sandbox.layout.log_dir}")
    else:
        shutil.rmtree(sandbox.layout.state_dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(client_line(rows, parse_timing(args.timings[0], base)[0]))
    return 1 if any(row["lost"] or row.get("client_lost") or row.get("misrouted") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
