"""What runs on each host: one module per role builds its HostSpec; spec.py holds the types."""

from __future__ import annotations

from infra.hosts import clickhouse, etcd, grafana, monitoring, postgres
from infra.hosts.spec import (
    BASE_PACKAGES,
    BucketGrant,
    DataVolume,
    Directory,
    File,
    HostSpec,
    Ingress,
    SecretEnvironment,
    SecretFile,
    SecurityRole,
    env_file,
    ingress_rules,
)
from infra.hosts.system import with_time_sync
from infra.settings import StackSettings
from infra.topology import Topology

__all__ = [
    "BASE_PACKAGES", "BucketGrant", "DataVolume", "Directory", "File", "HostSpec", "Ingress", "SecretEnvironment", "SecretFile",
    "SecurityRole", "env_file", "host_specs", "ingress_rules",
]


def host_specs(settings: StackSettings, topology: Topology) -> tuple[HostSpec, ...]:
    return tuple(with_time_sync(spec) for spec in (
        *(etcd.spec(settings, topology, h) for h in topology.etcd),
        *(postgres.spec(settings, topology, h) for h in topology.postgres),
        *(clickhouse.spec(settings, topology, h) for h in topology.clickhouse),
        *(monitoring.spec(settings, topology, h) for h in topology.monitoring),
        *(grafana.spec(settings, topology, h) for h in topology.grafana),
    ))
