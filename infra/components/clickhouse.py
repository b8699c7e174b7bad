"""ClickHouse: one EC2 host with an encrypted gp3 data volume; config.d turns on its Prometheus endpoint, users.d
gives the `default` user this component's password (in SSM) and only the VPC's networks."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_random as random

from infra.hosts import HostSpec
from infra.platforms.aws import AwsContext, AwsHost, create_host, create_secret_parameter
from infra.topology import Ports, SecretNames


@dataclass
class ClickHouseArgs:
    specs: tuple[HostSpec, ...]
    context: AwsContext


class ClickHouse(pulumi.ComponentResource):
    hosts: list[AwsHost]

    def __init__(self, name: str, args: ClickHouseArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:analytics:ClickHouse", name, None, opts)
        ctx = args.context
        # Clients read it from SSM (/betting/<env>/clickhouse_default_password); the server from its environment.
        password = random.RandomPassword(f"{name}-default-password", length=32, special=False,
                                         opts=pulumi.ResourceOptions(parent=self))
        self.default_password = pulumi.Output.secret(password.result)
        parameter = create_secret_parameter(f"{name}-default-password-parameter", ctx.environment,
                                            SecretNames.CLICKHOUSE_DEFAULT_PASSWORD, self.default_password,
                                            ctx.data_key_arn, self, registry=ctx.secret_parameters)
        self.hosts = [create_host(name, spec, ctx, self, boots_after=[parameter]) for spec in args.specs]
        self.register_outputs({
            "http_endpoints": [f"{spec.host.fqdn}:{Ports.CLICKHOUSE_HTTP}" for spec in args.specs],
            "metrics_endpoints": [f"{spec.host.fqdn}:{Ports.CLICKHOUSE_METRICS}" for spec in args.specs],
        })
