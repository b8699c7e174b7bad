"""ClickHouse overrides: config.d (the Prometheus endpoint, off by default, and the listen address) and users.d
(the `default` user's password and networks)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from infra.settings import StackSettings
from infra.topology import Ports, Topology

# The `default` user's password, from the server's environment (its EnvironmentFile, written from SSM):
# ClickHouse substitutes `from_env` attributes when it preprocesses config and users files alike.
DEFAULT_PASSWORD_ENV = "CLICKHOUSE_DEFAULT_PASSWORD"


def _xml(root: ET.Element) -> bytes:
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def default_user(settings: StackSettings) -> ET.Element:
    """The packaged users.xml gives `default` an empty password from ::/0: here a password, and only the VPC.
    `replace` drops the packaged children instead of merging with them (an <ip>::/0</ip> would stay)."""
    root = ET.Element("clickhouse")
    default = ET.SubElement(ET.SubElement(root, "users"), "default")
    ET.SubElement(default, "password", {"from_env": DEFAULT_PASSWORD_ENV, "replace": "replace"})
    networks = ET.SubElement(default, "networks", {"replace": "replace"})
    ET.SubElement(networks, "ip").text = settings.vpc_cidr
    return root


def render_clickhouse(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    prometheus = ET.Element("clickhouse")
    endpoint = ET.SubElement(prometheus, "prometheus")
    for tag, value in (
        ("endpoint", "/metrics"),
        ("port", str(Ports.CLICKHOUSE_METRICS)),
        ("metrics", "true"),
        ("events", "true"),
        ("asynchronous_metrics", "true"),
    ):
        ET.SubElement(endpoint, tag).text = value

    # The packaged default listens on loopback only; clients and Prometheus reach it over the VPC,
    # and the security group decides who may.
    network = ET.Element("clickhouse")
    ET.SubElement(network, "listen_host").text = "0.0.0.0"
    ET.SubElement(network, "http_port").text = str(Ports.CLICKHOUSE_HTTP)
    ET.SubElement(network, "tcp_port").text = str(Ports.CLICKHOUSE_NATIVE)

    return {
        "clickhouse/config.d/prometheus.xml": _xml(prometheus),
        "clickhouse/config.d/network.xml": _xml(network),
        "clickhouse/users.d/default.xml": _xml(default_user(settings)),
    }
