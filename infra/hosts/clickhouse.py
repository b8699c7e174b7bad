"""The ClickHouse server, with its Prometheus endpoint on."""

from __future__ import annotations

from infra.hosts.spec import BASE_PACKAGES, DataVolume, HostSpec, node_exporter_file, place
from infra.render.clickhouse import render_clickhouse
from infra.settings import StackSettings
from infra.topology import Host, Paths, Topology


def spec(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    return HostSpec(
        host=host,
        instance_type=settings.clickhouse.instance_type,
        packages=BASE_PACKAGES + ("clickhouse-server",),
        files=(*place(render_clickhouse(settings, topology), {"clickhouse/config.d/": Paths.CLICKHOUSE_CONFIG_D + "/"}),
               node_exporter_file()),
        services=("clickhouse-server", "prometheus-node-exporter"),
        volume=DataVolume("clickhouse-data", Paths.CLICKHOUSE_DATA, "clickhouse:clickhouse", settings.clickhouse.data_volume),
    )
