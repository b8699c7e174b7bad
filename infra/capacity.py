"""How many days each Prometheus volume holds: the stack's scrape jobs and intervals (the rendered prometheus.yml)
times the series each target exports and the bytes a sample takes on disk, as measured on the real exporters by
bench/ingestion.py (infra/data/prometheus_ingestion.json). Pure: `infra plan` prints it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from infra.render.prometheus import prometheus_config, rule_groups
from infra.settings import StackSettings
from infra.topology import Topology
from infra.units import duration_seconds, size_bytes

DATA_FILE = Path(__file__).resolve().parent / "data" / "prometheus_ingestion.json"

# The WAL counts against --storage.tsdb.retention.size (Prometheus 2.42) and keeps at least the head's samples:
# about three hours of them between two head compactions.
WAL_HOURS = 3
DAY = 86400


class CapacityError(ValueError):
    """A scrape job with no measured or assumed figure: say in the data file what its targets export."""


@dataclass(frozen=True)
class RetentionEstimate:
    series: int  # what one Prometheus scrapes, over every job and target
    samples_per_second: float  # scrapes and rule evaluations
    bytes_per_day: float  # in blocks
    wal_bytes: float
    days_held: float  # what --storage.tsdb.retention.size holds at this rate
    retention_days: float  # --storage.tsdb.retention.time
    assumed_jobs: tuple[str, ...]  # jobs whose figures are assumed, not measured (no such exporter here)

    @property
    def below_promise(self) -> bool:
        return self.days_held < self.retention_days

    def line(self) -> str:
        assumed = f"; assumed, not measured: {', '.join(self.assumed_jobs)}" if self.assumed_jobs else ""
        return (f"{self.series} series, {self.samples_per_second:.0f} samples/s, {self.bytes_per_day / 2**30:.2f} GiB/day: "
                f"the size retention holds {self.days_held:.0f} days of the {self.retention_days:g}-day time retention"
                f"{assumed}")

    def as_dict(self) -> dict:
        return {"series": self.series, "samples_per_second": round(self.samples_per_second, 1),
                "bytes_per_day": round(self.bytes_per_day), "wal_bytes": round(self.wal_bytes),
                "days_held": round(self.days_held, 1), "retention_days": self.retention_days,
                "below_promise": self.below_promise, "assumed_jobs": list(self.assumed_jobs)}


def load_figures(path: Path | None = None) -> dict:
    return json.loads((path or DATA_FILE).read_text())


def estimate(settings: StackSettings, topology: Topology, figures: dict | None = None) -> RetentionEstimate:
    """One Prometheus of the stack (each replica scrapes every target, so all hold the same)."""
    figures = figures if figures is not None else load_figures()
    config = prometheus_config(settings, topology)
    measured, assumed = figures["series_per_target"], figures.get("assumed_series_per_target", {})
    series = 0
    rate = 0.0
    assumed_jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        targets = sum(len(group["targets"]) for group in job.get("static_configs", []))
        if not targets:
            continue
        if name in measured:
            per_target = measured[name]
        elif name in assumed:
            per_target = assumed[name]["series"]
            assumed_jobs.append(name)
        else:
            raise CapacityError(f"scrape job {name!r} has no series figure in {DATA_FILE.name}: run bench/ingestion.py, or "
                                "add it under assumed_series_per_target with its reason")
        series += targets * per_target
        rate += targets * per_target / duration_seconds(job.get("scrape_interval", config["global"]["scrape_interval"]))
    evaluation = duration_seconds(config["global"]["evaluation_interval"])
    for name, group in rule_groups(settings).items():
        samples = figures["rule_samples_per_evaluation"].get(name, 0)
        rate += samples / (duration_seconds(group["interval"]) if "interval" in group else evaluation)
    bytes_per_day = rate * DAY * figures["bytes_per_sample"]
    wal = rate * WAL_HOURS * 3600 * figures["wal_bytes_per_sample"]
    prom = settings.monitoring.prometheus
    days = max(size_bytes(prom.retention_size) - wal, 0) / bytes_per_day
    return RetentionEstimate(series, rate, bytes_per_day, wal, days, duration_seconds(prom.retention_time) / DAY,
                             tuple(assumed_jobs))
