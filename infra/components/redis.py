"""RedisCache: an ElastiCache replication group with TLS in transit, encryption at rest and an
auth token from pulumi-random; Multi-AZ with automatic failover where the stack asks for it.
redis_exporter runs on the monitoring hosts and reads the token from SSM.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from infra.platforms.aws import AwsContext, create_secret_parameter
from infra.settings import StackSettings
from infra.topology import Ports, SecretNames, Topology


@dataclass
class RedisCacheArgs:
    settings: StackSettings
    topology: Topology
    context: AwsContext


class RedisCache(pulumi.ComponentResource):
    replication_group: aws.elasticache.ReplicationGroup

    def __init__(self, name: str, args: RedisCacheArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:cache:RedisCache", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        redis, ctx = args.settings.redis, args.context

        token = random.RandomPassword(
            f"{name}-auth-token",
            length=48,
            special=False,  # ElastiCache forbids @, " and / in auth tokens; alphanumerics avoid every escape
            opts=child,
        )
        create_secret_parameter(f"{name}-auth-token-parameter", ctx.environment, SecretNames.REDIS_AUTH_TOKEN,
                                pulumi.Output.secret(token.result), ctx.data_key_arn, self, registry=ctx.secret_parameters)
        subnets = aws.elasticache.SubnetGroup(
            f"{name}-subnets",
            subnet_ids=list(ctx.subnet_ids.values()),
            description=f"betting {ctx.environment} Redis",
            opts=child,
        )
        major = redis.engine_version.split(".")[0]
        parameters = aws.elasticache.ParameterGroup(
            f"{name}-parameters",
            family=f"redis{major}",
            description="betting cache: eviction policy",
            parameters=[aws.elasticache.ParameterGroupParameterArgs(name="maxmemory-policy", value=redis.maxmemory_policy)],
            opts=child,
        )
        self.replication_group = aws.elasticache.ReplicationGroup(
            f"{name}-group",
            description=f"betting {ctx.environment} cache",
            engine="redis",
            engine_version=redis.engine_version,
            node_type=redis.node_type,
            num_cache_clusters=redis.num_cache_clusters,
            automatic_failover_enabled=redis.num_cache_clusters > 1,
            multi_az_enabled=redis.multi_az,
            port=Ports.REDIS,
            subnet_group_name=subnets.name,
            parameter_group_name=parameters.name,
            security_group_ids=[ctx.security_group_ids["redis"]],
            transit_encryption_enabled=True,
            at_rest_encryption_enabled=True,
            kms_key_id=ctx.data_key_arn,
            auth_token=pulumi.Output.secret(token.result),
            snapshot_retention_limit=7 if ctx.environment == "prod" else 1,
            apply_immediately=ctx.environment != "prod",
            tags=ctx.tags,
            opts=child,
        )
        aws.route53.Record(
            f"{name}-dns",
            zone_id=ctx.zone_id,
            name=args.topology.redis_endpoint,
            type="CNAME",
            ttl=30,
            records=[self.replication_group.primary_endpoint_address],
            opts=child,
        )
        self.register_outputs({
            "endpoint": f"{args.topology.redis_endpoint}:{Ports.REDIS}",
            "auth_token": pulumi.Output.secret(token.result),
        })
