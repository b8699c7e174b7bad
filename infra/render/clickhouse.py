"""ClickHouse config.d overrides: the Prometheus endpoint (off by default) and listen address."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from infra.settings import StackSettings
from infra.topology import Ports, Topology


def _xml(root: ET.Element) -> bytes:
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


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
    }
