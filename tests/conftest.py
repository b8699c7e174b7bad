"""Shared fixtures: the shipped stacks' settings, loaded the way the program loads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from infra.settings import load_settings
from infra.topology import build_topology

ROOT = Path(__file__).resolve().parents[1]
STACKS = ("dev", "staging", "prod")


# Live fixtures of the whole session: the modules that use one run on the same pytest-xdist worker.
SESSION_LIVE_FIXTURES = {"live_sandbox"}
# moto keeps its state in module globals of the process: an in-process mock_aws() resets what the backup tests'
# S3 endpoint (infra/sandbox/s3.py serves moto from a thread) holds. Modules using either share one worker, in order.
MOTO_MARKERS = ("mock_aws", "S3Endpoint")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: -n 2 --dist loadgroup) every module runs whole on one worker, so its module
    fixtures (daemons, evaluated plans) start once; the modules sharing a session's live sandbox share a worker."""
    modules: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if SESSION_LIVE_FIXTURES & set(item.fixturenames):
            modules[module] = "live-sandbox"
        elif module not in modules and any(marker in item.path.read_text() for marker in MOTO_MARKERS):
            modules[module] = "moto"
        modules.setdefault(module, module)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(modules[item.nodeid.split("::", 1)[0]]))


def stack_config(stack: str) -> dict[str, str]:
    """The stack file's config as the engine passes it: strings, structured values as JSON."""
    raw = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())["config"]
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in raw.items()}


@pytest.fixture(params=STACKS)
def stack(request) -> str:
    return request.param


@pytest.fixture
def settings(stack):
    return load_settings(stack_config(stack), stack)


@pytest.fixture
def topology(settings):
    return build_topology(settings)
