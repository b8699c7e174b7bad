"""ClickHouse: one EC2 host with an encrypted gp3 data volume; config.d turns on its Prometheus endpoint."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from infra.hosts import HostSpec
from infra.platforms.aws import AwsContext, AwsHost, create_host
from infra.topology import Ports


@dataclass
class ClickHouseArgs:
    specs: tuple[HostSpec, ...]
    context: AwsContext


class ClickHouse(pulumi.ComponentResource):
    hosts: list[AwsHost]

    def __init__(self, name: str, args: ClickHouseArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:analytics:ClickHouse", name, None, opts)
        self.hosts = [create_host(name, spec, args.context, self) for spec in args.specs]
        self.register_outputs({
            "http_endpoints": [f"{spec.host.fqdn}:{Ports.CLICKHOUSE_HTTP}" for spec in args.specs],
            "metrics_endpoints": [f"{spec.host.fqdn}:{Ports.CLICKHOUSE_METRICS}" for spec in args.specs],
        })
