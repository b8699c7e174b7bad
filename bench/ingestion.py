"""What a Prometheus of this platform ingests, measured on the real exporters: series per target of each scrape
job, samples per rule evaluation, and bytes per sample on disk, for the estimate `infra plan` prints
(infra/capacity.py reads the figures from infra/data/prometheus_ingestion.json).

    .venv/bin/python -m bench.ingestion                 # measure and print
    .venv/bin/python -m bench.ingestion --write         # ... and write infra/data/prometheus_ingestion.json

A prod-shaped sandbox runs every exporter it can (node, postgres, Patroni, PgBouncer, HAProxy, etcd, Redis,
Prometheus, Alertmanager). A second Prometheus runs monitoring-1's mapped prometheus.yml and rules (no alerting)
with 10-minute blocks instead of 2-hour ones, so that a block is cut within about 16 minutes: its meta.json
counts the samples, its files their bytes. Shorter blocks hold shorter chunks (at a 15 s interval, 40 samples a
chunk instead of 120), so bytes per sample come out somewhat above a 2-hour block's: the estimate errs towards
fewer days. Ports 26000-26099 and 26148 (the bench range).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from infra.capacity import DATA_FILE
from infra.sandbox.cli import stack_settings
from infra.sandbox.runner import Sandbox

PORT_BASE = 26000
PROMETHEUS_PORT = 26148
BLOCK = "10m"


def _query(url: str, query: str) -> list[dict]:
    return requests.get(f"{url}/api/v1/query", params={"query": query}, timeout=10).json()["data"]["result"]


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(sandbox: Sandbox, work: Path, wait: float) -> dict:
    monitoring = sandbox.topology.monitoring[0]
    root = sandbox.layout.host_root(monitoring)
    config = yaml.safe_load((root / "etc/prometheus/prometheus.yml").read_text())
    config.pop("alerting", None)  # measuring, not paging
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    data = work / "tsdb"
    process = subprocess.Popen(
        ["prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={data}",
         f"--storage.tsdb.min-block-duration={BLOCK}", f"--storage.tsdb.max-block-duration={BLOCK}",
         f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
        stdout=subprocess.DEVNULL, stderr=(work / "prometheus.log").open("w"))
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}"
    try:
        deadline = time.monotonic() + wait
        blocks: list[Path] = []
        while time.monotonic() < deadline and not blocks:
            time.sleep(15)
            blocks = [p.parent for p in data.glob("*/meta.json")]
            print(f"  waiting for the first {BLOCK} block ({int(deadline - time.monotonic())} s left)", file=sys.stderr)
        if not blocks:
            raise SystemExit(f"no block was cut within {wait:.0f} s; see {work / 'prometheus.log'}")
        samples = sum(json.loads((b / "meta.json").read_text())["stats"]["numSamples"] for b in blocks)
        block_bytes = sum(_folder_bytes(b) for b in blocks)
        series = {r["metric"]["job"]: float(r["value"][1])
                  for r in _query(url, "avg by (job) (scrape_samples_post_metric_relabeling)")}
        targets = {r["metric"]["job"]: int(float(r["value"][1])) for r in _query(url, "count by (job) (up == 1)")}
        rules = {r["metric"]["rule_group"].rsplit(";", 1)[1]: round(float(r["value"][1]))
                 for r in _query(url, '{__name__=~"prometheus_rule_group_last_(evaluation_)?samples"}')}
        appended = float(_query(url, "prometheus_tsdb_head_samples_appended_total")[0]["value"][1])
        wal_bytes = _folder_bytes(data / "wal")
        return {
            "measured": datetime.date.today().isoformat(),
            "how": "bench/ingestion.py: prod-shaped sandbox, Prometheus 2.42 with 10-minute blocks",
            "series_per_target": {job: round(value) for job, value in sorted(series.items()) if targets.get(job)},
            "rule_samples_per_evaluation": dict(sorted(rules.items())),
            "bytes_per_sample": round(block_bytes / samples, 3),
            "wal_bytes_per_sample": round(wal_bytes / appended, 3),
            "block_samples": samples,
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ingestion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write the figures to {DATA_FILE} (default: print only)")
    parser.add_argument("--wait", type=float, default=1500, help="seconds to wait for the first block (default: 1500)")
    args = parser.parse_args(argv)
    settings = stack_settings("prod")
    work = Path(tempfile.mkdtemp(prefix="bench-ingestion-"))
    work.chmod(0o755)  # the daemons' users reach the sandbox's state dir inside it
    sandbox = Sandbox(work / "sandbox", PORT_BASE)
    try:
        sandbox.up(settings)
        sandbox.wait_healthy()
        figures = measure(sandbox, work, args.wait)
    finally:
        sandbox.down()
    previous = json.loads(DATA_FILE.read_text()) if DATA_FILE.exists() else {}
    figures["assumed_series_per_target"] = previous.get("assumed_series_per_target", {})
    print(json.dumps(figures, indent=1))
    if args.write:
        DATA_FILE.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    print(f"ingestion: {sum(figures['series_per_target'].values())} series over {len(figures['series_per_target'])} jobs "
          f"per target set, {figures['bytes_per_sample']} bytes/sample in blocks, "
          f"{figures['wal_bytes_per_sample']} in the WAL")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
