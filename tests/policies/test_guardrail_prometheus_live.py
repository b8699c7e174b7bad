"""The retention the policy reads from /etc/default/prometheus is the one the real Prometheus applies.

Each case starts Prometheus 2.42 with the retention flags of a defaults file and compares the
policy's reading with Prometheus' own `storageRetention` (/api/v1/status/runtimeinfo).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from infra.units import duration_seconds
from policies.rules.prometheus_flags import DEFAULTS_FILE, args_from_defaults, bundle_files, retention_from_args

ROOT = Path(__file__).resolve().parents[2]
_BINARY_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}


def _shipped_defaults_file(stack: str) -> str:
    plan = json.loads((ROOT / "plans" / f"{stack}.json").read_text())
    # The host's files arrive in its bundle (the user data is only the boot stub).
    (bundle,) = [r for r in plan["resources"] if r["name"] == "bundles-monitoring-1"]
    return bundle_files(bundle["props"]["content"])[DEFAULTS_FILE]


CASES = {
    "shipped-dev": lambda: _shipped_defaults_file("dev"),
    "shipped-prod": lambda: _shipped_defaults_file("prod"),
    "no-flag": lambda: 'ARGS="--web.enable-lifecycle"\n',
    "size-only": lambda: 'ARGS="--storage.tsdb.retention.size=40GB"\n',
    "separate-value": lambda: "ARGS='--storage.tsdb.retention.time 45d'\n",
    "deprecated-flag": lambda: 'ARGS="--storage.tsdb.retention=20d"\n',
    "last-assignment-wins": lambda: ('ARGS="--storage.tsdb.retention.time=7d"\n# local override\n'
                                     'ARGS="--storage.tsdb.retention.time=31d"\n'),
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _applied_retention(tokens: list[str], tmp_path: Path) -> str:
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\n")
    port = _free_port()
    retention_flags, index = [], 0
    while index < len(tokens):
        if tokens[index].startswith("--storage.tsdb.retention"):
            retention_flags.append(tokens[index])
            if "=" not in tokens[index] and index + 1 < len(tokens):  # "--flag value"
                retention_flags.append(tokens[index + 1])
                index += 1
        index += 1
    process = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", *retention_flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/runtimeinfo", timeout=1) as response:
                    return json.load(response)["data"]["storageRetention"]
            except OSError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.stderr.read() if process.poll() is not None else ""
                    raise AssertionError(f"prometheus did not serve: {output}") from error
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=10)


def _parse_applied(text: str) -> tuple[float | None, int | None]:
    """Prometheus' "30d or 42GiB" / "15d" / "42GiB" as (seconds, bytes)."""
    seconds, size = None, None
    for part in text.split(" or "):
        match = re.fullmatch(r"(\d+)(B|KiB|MiB|GiB|TiB|PiB)", part)
        if match:
            size = int(match.group(1)) * _BINARY_UNITS[match.group(2)]
        else:
            seconds = duration_seconds(part)
    return seconds, size


def _unit_arguments(defaults: str, tmp_path: Path) -> list[str]:
    """What Debian's prometheus.service passes: EnvironmentFile=/etc/default/prometheus, ExecStart=... $ARGS
    (an unquoted $ARGS is split on whitespace). Read by bash, independently of the policy's parser."""
    path = tmp_path / "prometheus.defaults"
    path.write_text(defaults)
    result = subprocess.run(["bash", "-c", 'set -a; . "$1"; printf "%s" "$ARGS"', "bash", str(path)],
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


@pytest.mark.live
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_policy_reads_the_retention_prometheus_applies(case, tmp_path):
    defaults = CASES[case]()
    reading = retention_from_args(args_from_defaults(defaults), DEFAULTS_FILE)
    applied = _applied_retention(_unit_arguments(defaults, tmp_path), tmp_path)
    assert _parse_applied(applied) == (reading.time_seconds, reading.size_bytes), (case, applied, reading)
