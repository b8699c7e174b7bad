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
