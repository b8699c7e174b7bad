"""Debian's `patroni --validate-config` (3.0.2) accepts every rendered patroni.yml of every shipped stack.

Two things about this validator, worked around in the open:
- it resolves and connects to every etcd host: the stacks' names live in the VPC's private
  zone, so validate_shim.py points `*.ZONE:2379` at a live etcd on loopback (the file itself is
  validated unchanged, with its real DNS names: the validator rejects loopback connect addresses);
- 3.0.2's schema requires `bootstrap.pg_hba` even when pg_hba is set under `postgresql:` (where
  Patroni 3 reads it; `bootstrap.pg_hba` is the old place): that one message, and only it, is
  tolerated, and a broken config shows that the validator still reports everything else.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from infra.render.patroni import render_patroni
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import STACKS, stack_config
from tests.postgres.conftest import VALIDATE_ETCD_PORT

pytestmark = pytest.mark.live

PATRONI_PYTHON = "/usr/bin/python3"  # Debian's patroni runs on the system interpreter
SHIM = Path(__file__).with_name("validate_shim.py")
KNOWN_QUIRK = "bootstrap.pg_hba  is not defined."


@pytest.fixture(scope="module")
def live_etcd(tmp_path_factory):
    data = tmp_path_factory.mktemp("etcd")
    client, peer = f"http://127.0.0.1:{VALIDATE_ETCD_PORT}", f"http://127.0.0.1:{VALIDATE_ETCD_PORT + 1}"
    process = subprocess.Popen(
        ["/usr/bin/etcd", "--name", "validate", "--data-dir", str(data), "--listen-client-urls", client,
         "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"validate={peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{client}/health", timeout=1).json()["health"] == "true":
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "etcd did not start"
            time.sleep(0.2)
        yield VALIDATE_ETCD_PORT
    finally:
        process.terminate()
        process.wait(10)


def _validate(path: Path, zone: str, etcd_port: int) -> tuple[int, list[str]]:
    run = subprocess.run([PATRONI_PYTHON, str(SHIM), zone, str(etcd_port), str(path)],
                         capture_output=True, text=True, timeout=60)
    return run.returncode, [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("stack", STACKS)
def test_validator_accepts_every_rendered_patroni_yml(stack, live_etcd, tmp_path):
    settings = load_settings(stack_config(stack), stack)
    topology = build_topology(settings)
    for node in topology.postgres:
        ((name, content),) = render_patroni(settings, topology, node).items()
        path = tmp_path / name.replace("/", "-")
        path.write_bytes(content)
        code, lines = _validate(path, settings.dns_zone, live_etcd)
        assert lines == [KNOWN_QUIRK], (node.name, lines)
        assert code in (0, 1)


def test_validator_still_reports_real_errors(live_etcd, tmp_path):
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    (content,) = render_patroni(settings, topology, topology.postgres[0]).values()
    broken = yaml.safe_load(content)
    broken["watchdog"]["mode"] = "sometimes"
    broken["postgresql"]["connect_address"] = "127.0.0.1:5432"
    broken["etcd3"]["hosts"] = [f"etcd-9.{settings.dns_zone}:2999"]
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    code, lines = _validate(path, settings.dns_zone, live_etcd)
    assert code != 0
    problems = [line for line in lines if line != KNOWN_QUIRK]
    assert any("watchdog.mode" in line for line in problems), lines
    assert any("postgresql.connect_address" in line for line in problems), lines
    assert any("etcd3.hosts" in line for line in problems), lines
