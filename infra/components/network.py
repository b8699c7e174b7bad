"""Network: a VPC with one private subnet per AZ, egress through NAT, S3 and SSM endpoints,
a private DNS zone, and one security group per role with only the rules in infra.hosts.ingress_rules
and EGRESS. No data or monitoring host gets a public address; operators use SSM Session Manager.
The VPC's default security group is taken over with no rules, and every flow is logged.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Literal

import pulumi
import pulumi_aws as aws

from infra.hosts import SecurityRole, ingress_rules
from infra.platforms.aws import service_trust_policy
from infra.settings import StackSettings

SECURITY_ROLES: tuple[SecurityRole, ...] = (
    "etcd", "postgres", "postgres-lb", "redis", "clickhouse", "monitoring", "grafana", "clients",
)
SSM_ENDPOINT_SERVICES = ("ssm", "ssmmessages", "ec2messages")
HOST_ROLES: tuple[SecurityRole, ...] = ("etcd", "postgres", "clickhouse", "monitoring", "grafana")


@dataclass(frozen=True)
class Egress:
    """Outbound traffic a role may start. The instance metadata service, the Amazon Time Sync Service
    and the VPC's DNS resolver are link-local or the VPC's own, which security groups never filter."""

    roles: tuple[SecurityRole, ...]
    destination: Literal["vpc", "s3", "internet"]
    port: int
    to_port: int
    description: str


def egress_rules(settings: StackSettings) -> tuple[Egress, ...]:
    smtp_port = int(settings.alerting.smtp_smarthost.rsplit(":", 1)[1])
    return (
        Egress(HOST_ROLES, "vpc", 0, 65535, "TCP inside the VPC: peers, load-balancer targets, interface endpoints"),
        Egress(HOST_ROLES, "s3", 443, 443, "S3 through the gateway endpoint: bundles, backups, audit logs"),
        Egress(HOST_ROLES, "internet", 80, 80, "Debian packages through the NAT gateway"),
        Egress(HOST_ROLES, "internet", 443, 443, "Debian packages, PagerDuty, Slack and AWS APIs through the NAT gateway"),
        Egress(("monitoring",), "internet", smtp_port, smtp_port, "Alertmanager's SMTP smarthost"),
        Egress(("postgres-lb",), "vpc", 0, 65535, "the load balancer to its targets"),
    )


@dataclass
class NetworkArgs:
    settings: StackSettings
    tags: dict[str, str]
    flow_log_key_arn: pulumi.Input[str]  # encrypts the flow-log group


class Network(pulumi.ComponentResource):
    vpc: aws.ec2.Vpc
    subnet_ids: dict[str, pulumi.Output[str]]
    security_group_ids: dict[str, pulumi.Output[str]]
    zone: aws.route53.Zone

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:network:Network", name, None, opts)
        self._name = name
        self._args = args
        self._child = pulumi.ResourceOptions(parent=self)

        self.vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.settings.vpc_cidr,
            enable_dns_hostnames=True,
            enable_dns_support=True,
            tags={**args.tags, "Name": f"betting-{args.settings.environment}"},
            opts=self._child,
        )
        # AWS creates it with allow-all rules that any resource left without a group would get.
        aws.ec2.DefaultSecurityGroup(f"{name}-default-group", vpc_id=self.vpc.id, ingress=[], egress=[],
                                     tags={**args.tags, "Name": f"betting-{args.settings.environment}-default-unused"},
                                     opts=self._child)
        self._create_flow_logs()
        private_route_table = self._create_egress()
        self.subnet_ids = self._create_private_subnets(private_route_table)
        self.s3_prefix_list_id = self._create_endpoints(private_route_table)
        self.zone = aws.route53.Zone(
            f"{name}-zone",
            name=args.settings.dns_zone,
            comment=f"Stable names of the betting platform's {args.settings.environment} services",
            vpcs=[aws.route53.ZoneVpcArgs(vpc_id=self.vpc.id)],
            tags=args.tags,
            opts=self._child,
        )
        self.security_group_ids = self._create_security_groups()

        self.register_outputs({
            "vpc_id": self.vpc.id,
            "subnet_ids": self.subnet_ids,
            "zone_id": self.zone.zone_id,
            "security_group_ids": self.security_group_ids,
        })

    def _create_egress(self) -> aws.ec2.RouteTable:
        """Outbound only (packages, AWS APIs): one NAT gateway in a small public subnet that holds nothing else."""
        name, settings = self._name, self._args.settings
        network = ipaddress.IPv4Network(settings.vpc_cidr)
        # The last /28 of the VPC: far from the private subnets carved from its start.
        public_cidr = str(list(network.subnets(new_prefix=28))[-1])
        gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=self.vpc.id, tags=self._args.tags, opts=self._child)
        public_subnet = aws.ec2.Subnet(
            f"{name}-public",
            vpc_id=self.vpc.id,
            cidr_block=public_cidr,
            availability_zone=settings.availability_zones[0],
            map_public_ip_on_launch=False,
            tags={**self._args.tags, "Name": f"betting-{settings.environment}-nat"},
            opts=self._child,
        )
        public_routes = aws.ec2.RouteTable(
            f"{name}-public-routes",
            vpc_id=self.vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=gateway.id)],
            tags=self._args.tags,
            opts=self._child,
        )
        aws.ec2.RouteTableAssociation(f"{name}-public-routes", subnet_id=public_subnet.id,
                                      route_table_id=public_routes.id, opts=self._child)
        nat_address = aws.ec2.Eip(f"{name}-nat-ip", domain="vpc", tags=self._args.tags, opts=self._child)
        nat = aws.ec2.NatGateway(f"{name}-nat", subnet_id=public_subnet.id, allocation_id=nat_address.id,
                                 tags=self._args.tags, opts=self._child)
        return aws.ec2.RouteTable(
            f"{name}-private-routes",
            vpc_id=self.vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id)],
            tags=self._args.tags,
            opts=self._child,
        )

    def _create_private_subnets(self, route_table: aws.ec2.RouteTable) -> dict[str, pulumi.Output[str]]:
        settings = self._args.settings
        subnet_ids = {}
        for zone, cidr in zip(settings.availability_zones, settings.subnet_cidrs, strict=True):
            subnet = aws.ec2.Subnet(
                f"{self._name}-private-{zone}",
                vpc_id=self.vpc.id,
                cidr_block=cidr,
                availability_zone=zone,
                map_public_ip_on_launch=False,
                tags={**self._args.tags, "Name": f"betting-{settings.environment}-private-{zone}"},
                opts=self._child,
            )
            aws.ec2.RouteTableAssociation(f"{self._name}-private-{zone}", subnet_id=subnet.id,
                                          route_table_id=route_table.id, opts=self._child)
            subnet_ids[zone] = subnet.id
        return subnet_ids

    def _create_flow_logs(self) -> None:
        """Every accepted and rejected flow of the VPC, to a log group encrypted with the data key."""
        name, settings = self._name, self._args.settings
        group = aws.cloudwatch.LogGroup(
            f"{name}-flow-logs",
            name=f"/betting/{settings.environment}/vpc-flow-logs",
            retention_in_days=settings.security.flow_log_retention_days,
            kms_key_id=self._args.flow_log_key_arn,
            tags=self._args.tags,
            opts=self._child,
        )
        role = aws.iam.Role(
            f"{name}-flow-logs-role",
            assume_role_policy=service_trust_policy("vpc-flow-logs.amazonaws.com"),
            tags=self._args.tags,
            opts=self._child,
        )
        aws.iam.RolePolicy(
            f"{name}-flow-logs-write",
            role=role.id,
            policy=group.arn.apply(lambda arn: json.dumps({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                "Resource": [arn, f"{arn}:log-stream:*"]}]}, sort_keys=True)),
            opts=self._child,
        )
        aws.ec2.FlowLog(
            f"{name}-flow-log",
            vpc_id=self.vpc.id,
            traffic_type="ALL",
            log_destination_type="cloud-watch-logs",
            log_destination=group.arn,
            iam_role_arn=role.arn,
            max_aggregation_interval=60,
            tags=self._args.tags,
            opts=self._child,
        )

    def _create_endpoints(self, route_table: aws.ec2.RouteTable) -> pulumi.Output[str]:
        """Backups to S3 and Session Manager traffic stay inside the VPC; S3's prefix list, for egress rules."""
        name, region = self._name, self._args.settings.region
        s3 = aws.ec2.VpcEndpoint(
            f"{name}-s3",
            vpc_id=self.vpc.id,
            service_name=f"com.amazonaws.{region}.s3",
            vpc_endpoint_type="Gateway",
            route_table_ids=[route_table.id],
            tags=self._args.tags,
            opts=self._child,
        )
        endpoint_group = aws.ec2.SecurityGroup(
            f"{name}-endpoints",
            vpc_id=self.vpc.id,
            description="HTTPS to the SSM interface endpoints from inside the VPC",
            tags=self._args.tags,
            opts=self._child,
        )
        aws.vpc.SecurityGroupIngressRule(
            f"{name}-endpoints-https",
            security_group_id=endpoint_group.id,
            ip_protocol="tcp",
            from_port=443,
            to_port=443,
            cidr_ipv4=self._args.settings.vpc_cidr,
            description="HTTPS from the VPC",
            opts=self._child,
        )
        subnet_ids = list(self.subnet_ids.values())
        for service in SSM_ENDPOINT_SERVICES:
            aws.ec2.VpcEndpoint(
                f"{name}-{service}",
                vpc_id=self.vpc.id,
                service_name=f"com.amazonaws.{region}.{service}",
                vpc_endpoint_type="Interface",
                private_dns_enabled=True,
                subnet_ids=subnet_ids,
                security_group_ids=[endpoint_group.id],
                tags=self._args.tags,
                opts=self._child,
            )
        return s3.prefix_list_id

    def _create_security_groups(self) -> dict[str, pulumi.Output[str]]:
        name = self._name
        groups = {
            role: aws.ec2.SecurityGroup(
                f"{name}-{role}",
                vpc_id=self.vpc.id,
                description=f"betting {self._args.settings.environment} {role}",
                tags={**self._args.tags, "Name": f"betting-{self._args.settings.environment}-{role}", "Role": role},
                opts=self._child,
            )
            for role in SECURITY_ROLES
        }
        for rule in ingress_rules(self._args.settings):
            for source in rule.sources:
                aws.vpc.SecurityGroupIngressRule(
                    f"{name}-{rule.role}-{rule.port}-{rule.protocol}-from-{source}",
                    security_group_id=groups[rule.role].id,
                    referenced_security_group_id=groups[source].id,
                    ip_protocol=rule.protocol,
                    from_port=rule.port,
                    to_port=rule.port,
                    description=rule.description,
                    opts=self._child,
                )
        # Only the rules below: Pulumi drops the allow-all egress rule AWS puts in a new group. The
        # clients group's egress is the application's business; Redis starts no connection.
        destinations = {"vpc": {"cidr_ipv4": self._args.settings.vpc_cidr}, "s3": {"prefix_list_id": self.s3_prefix_list_id},
                        "internet": {"cidr_ipv4": "0.0.0.0/0"}}
        for rule in egress_rules(self._args.settings):
            for role in rule.roles:
                aws.vpc.SecurityGroupEgressRule(
                    f"{name}-{role}-egress-{rule.destination}-{rule.port}",
                    security_group_id=groups[role].id,
                    ip_protocol="tcp",
                    from_port=rule.port,
                    to_port=rule.to_port,
                    description=rule.description,
                    **destinations[rule.destination],
                    opts=self._child,
                )
        return {role: group.id for role, group in groups.items()}
