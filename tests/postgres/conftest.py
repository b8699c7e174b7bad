"""One live prod-shaped sandbox (3 etcd, 3 Patroni/PostgreSQL, Redis, exporters, Prometheus,
Alertmanager) shared by the live tests of this folder, on its own ports and state dir."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest

from infra.sandbox.runner import ALL_SERVICES, Sandbox
from infra.settings import load_settings
from tests.conftest import stack_config
from tests.ports import port

# Inside the sandbox range (25000-26999), away from a user's sandbox (25000) and the bench (26000).
LIVE_PORT_BASE = port(26500)
VALIDATE_ETCD_PORT = port(26590)


@pytest.fixture(scope="session")
def prod_settings():
    return load_settings(stack_config("prod"), "prod")


@contextlib.contextmanager
def running_sandbox(settings, port_base: int, prefix: str, services=ALL_SERVICES):
    """A sandbox of `settings` on its own ports, always taken down and removed."""
    # Not pytest's tmp_path: the postgres user must be able to reach the state dir.
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    sandbox = Sandbox(state_dir, port_base)
    try:
        sandbox.up(settings, services=services)
        sandbox.use_agent_clients()  # tests call the agent's Patroni and etcd functions themselves
        yield sandbox
    finally:
        sandbox.down()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def live_sandbox(prod_settings):
    with running_sandbox(prod_settings, LIVE_PORT_BASE, "pg-live-") as sandbox:
        yield sandbox


@pytest.fixture
def cluster(live_sandbox, prod_settings):
    """The shared sandbox, with whatever an earlier test stopped started again and every replica streaming."""
    live_sandbox.up(prod_settings)
    live_sandbox.wait_healthy()
    return live_sandbox
