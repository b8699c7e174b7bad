"""Prometheus and Alertmanager in the sandbox, once the monitoring renderers exist."""

from __future__ import annotations


def start(sandbox, running) -> None:
    return None
