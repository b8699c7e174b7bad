"""An etcd member: the DCS Patroni elects its leader through."""

from __future__ import annotations

from infra.hosts.spec import BASE_PACKAGES, DataVolume, HostSpec, node_exporter_files, place, tls_files
from infra.hosts.system import data_volume_drop_in
from infra.render.etcd import render_etcd
from infra.settings import StackSettings
from infra.topology import Host, Paths, Topology


def spec(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    rendered = render_etcd(settings, topology, host)
    volume = DataVolume("etcd-data", Paths.ETCD_DATA, "etcd:etcd", settings.etcd.data_volume)
    return HostSpec(
        host=host,
        instance_type=settings.etcd.instance_type,
        packages=BASE_PACKAGES + ("etcd-server",),
        files=(*place(rendered, {f"etcd/{host.name}.env": Paths.ETCD_CONFIG}), *node_exporter_files(),
               data_volume_drop_in("etcd", volume)),
        services=("etcd", "prometheus-node-exporter"),
        volume=volume,
        # etcd 3.4 reads its certificate and key again at each new connection, but its trusted CA only at start.
        secret_files=tls_files(topology, host, reloads=(("etcd", "restart"),)),
    )
