"""Prometheus and Alertmanager in the sandbox, from the monitoring renderers' files and flags.

One Prometheus and one Alertmanager per monitoring host of the topology (prod's two
Alertmanagers gossip on loopback), with the same host/port/path mapping as every other file.
Receivers' secrets are placeholders under the sandbox's secrets dir: notifications to
PagerDuty, Slack, e-mail and the dead-man heartbeat fail (no internet, no credentials), the
routing and the alerts themselves run as rendered.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import requests

from infra.sandbox import mapping as m
from infra.topology import SecretNames

if TYPE_CHECKING:
    from infra.sandbox.runner import Proc, Sandbox

PLACEHOLDER_SECRETS = {
    SecretNames.PAGERDUTY_ROUTING_KEY: "sandbox-placeholder",
    # A loopback port where nothing listens: a notification fails at once, never leaves the machine.
    SecretNames.SLACK_CRITICAL_WEBHOOK: f"http://{m.LOOPBACK}:9/sandbox-slack-critical",
    SecretNames.SLACK_WARNINGS_WEBHOOK: f"http://{m.LOOPBACK}:9/sandbox-slack-warnings",
    getattr(SecretNames, "DEADMAN_HEARTBEAT_KEY", "deadman_heartbeat_key"): "sandbox-placeholder",
}


def _renderers():
    """The monitoring renderers, or None while they are not in the tree."""
    try:
        return importlib.import_module("infra.render.prometheus"), importlib.import_module("infra.render.alertmanager")
    except ImportError:
        return None


def available() -> bool:
    return _renderers() is not None


def rendered_files(sandbox: Sandbox) -> dict[str, tuple[bytes, dict[bytes, bytes]]]:
    renderers = _renderers()
    if renderers is None:
        return {}
    prometheus, alertmanager = renderers
    mapping = m.monitoring_mapping(sandbox.layout, sandbox.topology)
    files = {}
    for render in (prometheus.render_prometheus, alertmanager.render_alertmanager):
        for path, content in render(sandbox.settings, sandbox.topology).items():
            files[path] = (content, mapping)
    return files


def flags(sandbox: Sandbox, host) -> tuple[list[str], list[str]]:
    """(prometheus argv, alertmanager argv) of one monitoring host, mapped."""
    prometheus, alertmanager = _renderers()
    mapping = m.monitoring_mapping(sandbox.layout, sandbox.topology, host)

    def mapped(args) -> list[str]:
        return [m.map_bytes(arg.encode(), mapping).decode() for arg in args]

    return (
        ["/usr/bin/prometheus", *mapped(prometheus.prometheus_args(sandbox.settings))],
        ["/usr/bin/prometheus-alertmanager", *mapped(alertmanager.alertmanager_args(sandbox.settings, sandbox.topology, host))],
    )


def start(sandbox: Sandbox, running: dict[str, Proc]) -> None:
    if not available():
        return
    from infra.sandbox.runner import wait_for

    layout = sandbox.layout
    for name, value in PLACEHOLDER_SECRETS.items():
        path = layout.secrets_dir / name
        if not path.exists():
            path.write_text(value + "\n")
            path.chmod(0o400)
    for host in sandbox.topology.monitoring:
        (layout.state_dir / host.name).mkdir(exist_ok=True)
        prometheus_argv, alertmanager_argv = flags(sandbox, host)
        if f"alertmanager-{host.name}" not in running:
            sandbox._spawn(f"alertmanager-{host.name}", alertmanager_argv)
        if f"prometheus-{host.name}" not in running:
            sandbox._spawn(f"prometheus-{host.name}", prometheus_argv)
    for host in sandbox.topology.monitoring:
        for what, port in (("prometheus", layout.prometheus(host)), ("alertmanager", layout.alertmanager(host))):
            url = f"http://{m.LOOPBACK}:{port}/-/ready"
            wait_for(f"{what} on {host.name}", lambda url=url: requests.get(url, timeout=1).status_code == 200, 60)
