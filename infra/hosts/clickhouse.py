"""The ClickHouse server, with its Prometheus endpoint on and its `default` user's password from SSM."""

from __future__ import annotations

from infra.hosts.spec import BASE_PACKAGES, DataVolume, HostSpec, SecretEnvironment, node_exporter_files, place, tls_files
from infra.render.clickhouse import DEFAULT_PASSWORD_ENV, render_clickhouse
from infra.settings import StackSettings
from infra.topology import Host, Paths, SecretNames, Topology


def spec(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    return HostSpec(
        host=host,
        instance_type=settings.clickhouse.instance_type,
        packages=BASE_PACKAGES + ("clickhouse-server",),
        files=(*place(render_clickhouse(settings, topology), {"clickhouse/config.d/": Paths.CLICKHOUSE_CONFIG_D + "/",
                                                              "clickhouse/users.d/": Paths.CLICKHOUSE_USERS_D + "/"}),
               *node_exporter_files()),
        services=("clickhouse-server", "prometheus-node-exporter"),
        secret_files=tls_files(topology, host),  # node_exporter's TLS: ClickHouse itself serves none
        volume=DataVolume("clickhouse-data", Paths.CLICKHOUSE_DATA, "clickhouse:clickhouse", settings.clickhouse.data_volume),
        # users.d/default.xml reads it `from_env`: the server's environment, never a rendered file.
        secret_environments=(
            SecretEnvironment("clickhouse-server", ((DEFAULT_PASSWORD_ENV, SecretNames.CLICKHOUSE_DEFAULT_PASSWORD),)),
        ),
    )
