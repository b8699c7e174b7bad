"""A restart-requiring change rolled through prod's 3 Patroni nodes by the host agent, with a writer.

    .venv/bin/python -m bench.rollout                  # prod, max_connections +10, topology order
    .venv/bin/python -m bench.rollout --runs 3

A fresh sandbox of the stack boots its hosts with the host agent; each run raises the stack's
patroni.maxConnections by 10 and rolls the new bundles with `Sandbox.roll`: the agent's whole
apply (files, PATCH /config, the pending restart one member at a time, the health gate) host by
host in rollout order, as the SSM associations do, while a writer inserts through whichever node answers /primary and a
sampler reads /cluster every 0.2 s. Last line:
`rollout: 3 members in T s, longest write gap G s, acknowledged writes lost L, members down at once M`.
Ports 26000-26099 (the bench range).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import requests

from infra.sandbox.cli import stack_settings
from infra.sandbox.runner import Sandbox
from infra.topology import SecretNames
from scripts.failover_drill import ClusterSampler, Writer

PORT_BASE = 26000


def _max_connections(sandbox: Sandbox, node) -> int:
    with psycopg.connect(sandbox.dsn(node), autocommit=True, connect_timeout=3) as conn:
        return int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'max_connections'").fetchone()[0])


def roll(sandbox: Sandbox, settings, new_max_connections: int) -> dict:
    urls = {n.name: sandbox.patroni_url(n) for n in sandbox.topology.postgres}
    changed = settings.model_copy(update={"patroni": settings.patroni.model_copy(
        update={"max_connections": new_max_connections})})
    history = len(requests.get(f"{next(iter(urls.values()))}/history", timeout=3, verify=sandbox.ca_file).json())
    writer = Writer(list(urls.values()), sandbox.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD),
                    verify=sandbox.ca_file, tls=sandbox.client_tls())
    writer.ensure_table()
    writer.start()
    with ClusterSampler(urls, verify=sandbox.ca_file) as sampler:
        start = time.monotonic()
        sandbox.roll(changed)
        took = time.monotonic() - start
        time.sleep(1)
    writer.stop()
    leader = sandbox.leader()
    after = [a.at for a in writer.acks if a.at >= start]
    gaps = [b - a for a, b in zip(after, after[1:], strict=False)]
    values = {n.name: _max_connections(sandbox, n) for n in sandbox.topology.postgres}
    return {"took": took, "gap": max(gaps, default=0.0), "lost": len(writer.missing(sandbox.dsn(leader))),
            "down": sampler.most_down, "acks": len(writer.acks), "values": values,
            "switchovers": len(requests.get(f"{urls[leader.name]}/history", timeout=3, verify=sandbox.ca_file).json()) - history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", default="prod")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    settings = stack_settings(args.stack)
    state_dir = Path(tempfile.mkdtemp(prefix="bench-rollout-"))  # reachable by the postgres user
    sandbox = Sandbox(state_dir, PORT_BASE)
    results = []
    try:
        sandbox.up(settings, services=("postgres",))
        sandbox.wait_healthy()
        base = settings.patroni.max_connections
        for run in range(1, args.runs + 1):
            result = roll(sandbox, settings, base + 10 * run)
            if set(result["values"].values()) != {base + 10 * run}:
                print(f"run {run}: not every member runs the new value: {result['values']}", file=sys.stderr)
                return 1
            print(f"run {run}: {result['took']:.1f} s, {result['acks']} writes acknowledged, {result['switchovers']} "
                  f"switchover(s), longest write gap {result['gap']:.2f} s, lost {result['lost']}, "
                  f"at most {result['down']} member(s) down", flush=True)
            results.append(result)
    finally:
        sandbox.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    worst = max(results, key=lambda r: r["gap"])
    print(f"rollout: {len(sandbox.topology.postgres)} members in {max(r['took'] for r in results):.1f} s, "
          f"longest write gap {worst['gap']:.2f} s, acknowledged writes lost {sum(r['lost'] for r in results)}, "
          f"members down at once {max(r['down'] for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
