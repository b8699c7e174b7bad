"""Network: a VPC with one private subnet per AZ, egress through NAT, S3 and SSM endpoints,
a private DNS zone, and one security group per role with only the rules in infra.hosts.ingress_rules.
No data or monitoring host gets a public address; operators use SSM Session Manager.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.hosts import SecurityRole, ingress_rules
from infra.settings import StackSettings

SECURITY_ROLES: tuple[SecurityRole, ...] = (
    "etcd", "postgres", "postgres-lb", "redis", "clickhouse", "monitoring", "grafana", "clients",
)
SSM_ENDPOINT_SERVICES = ("ssm", "ssmmessages", "ec2messages")


@dataclass
class NetworkArgs:
    settings: StackSettings
    tags: dict[str, str]


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
        private_route_table = self._create_egress()
        self.subnet_ids = self._create_private_subnets(private_route_table)
        self._create_endpoints(private_route_table)
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

    def _create_endpoints(self, route_table: aws.ec2.RouteTable) -> None:
        """Backups to S3 and Session Manager traffic stay inside the VPC."""
        name, region = self._name, self._args.settings.region
        aws.ec2.VpcEndpoint(
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
        for role, group in groups.items():
            if role == "clients":
                continue  # the application's own egress is its business
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-{role}-egress",
                security_group_id=group.id,
                ip_protocol="-1",
                cidr_ipv4="0.0.0.0/0",
                description="outbound: packages through NAT, AWS APIs, peers",
                opts=self._child,
            )
        return {role: group.id for role, group in groups.items()}
