"""Every file rendered for a stack, one folder per service, plus each host's user data (the stub) and
bundle: what `infra render` writes."""

from __future__ import annotations

from infra.bundle import render_bundle
from infra.hosts import host_specs
from infra.render.alertmanager import render_alertmanager
from infra.render.backup import render_backup_timers
from infra.render.clickhouse import render_clickhouse
from infra.render.cloudinit import render_cloud_init
from infra.render.etcd import render_etcd
from infra.render.exporters import render_exporters
from infra.render.grafana import render_grafana
from infra.render.haproxy import render_haproxy
from infra.render.patroni import render_patroni
from infra.render.pgbackrest import render_pgbackrest
from infra.render.pgbouncer import render_pgbouncer
from infra.render.prometheus import render_prometheus
from infra.render.redis import render_redis
from infra.settings import StackSettings
from infra.topology import Topology


def render_all(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    specs = host_specs(settings, topology)
    parts = [
        render_prometheus(settings, topology),
        render_alertmanager(settings, topology),
        render_grafana(settings, topology),
        render_exporters(settings, topology),
        render_clickhouse(settings, topology),
        *(render_pgbackrest(settings, topology, node) for node in topology.postgres),
        render_backup_timers(settings),
        render_redis(settings, topology),
        render_pgbouncer(settings),
        render_haproxy(settings, topology),
        *(render_patroni(settings, topology, node) for node in topology.postgres),
        *(render_etcd(settings, topology, member) for member in topology.etcd),
        {f"cloud-init/{spec.host.name}.yaml": render_cloud_init(spec.host, settings.environment, settings.region,
                                                                 topology.bundle_bucket) for spec in specs},
        {f"bundles/{spec.host.name}.json": render_bundle(spec, settings, topology) for spec in specs},
    ]
    for part in parts:
        for path, content in part.items():
            if path in files and files[path] != content:
                raise ValueError(f"two renderers produce {path} with different content")
            files[path] = content
    return dict(sorted(files.items()))
