"""Helpers for the monitoring tests: render the files into a folder, find the real binaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from infra.render.alertmanager import render_alertmanager
from infra.render.exporters import render_exporters
from infra.render.grafana import render_grafana
from infra.render.prometheus import render_prometheus

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def binary(name: str) -> str:
    """The daemon's or tool's path; a missing one fails the test (the README's setup installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install -y prometheus prometheus-alertmanager")
    return path


def write_files(directory: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return directory


def render_all(settings, topology) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for render in (render_prometheus, render_alertmanager, render_grafana, render_exporters):
        files.update(render(settings, topology))
    return files


@pytest.fixture
def rendered(settings, topology, tmp_path) -> Path:
    """Every monitoring file of the stack, written under tmp_path/rendered."""
    return write_files(tmp_path / "rendered", render_all(settings, topology))
