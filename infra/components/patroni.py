"""PatroniCluster: etcd members and Patroni/PostgreSQL nodes, their passwords, and an internal
load balancer in front of every node's HAProxy: its writer port forwards to the leader's PgBouncer
and its reader port to the replicas' (infra/render/haproxy.py), so every node is a target of both.
A target is healthy while its HAProxy sees a primary (or a replica); with none healthy, the load
balancer sends connections to every target, and each still forwards writes only to the leader.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random
import pulumi_tls as tls

from infra.hosts import HostSpec
from infra.platforms.aws import AwsContext, AwsHost, create_host, create_secret_parameter
from infra.render.haproxy import HEALTH_READER, HEALTH_WRITER
from infra.render.patroni import RESTAPI_USERNAME
from infra.render.pgbackrest import TLS_CLIENT_CN, uses_tls_server
from infra.settings import StackSettings
from infra.topology import Ports, SecretNames, Topology

PASSWORDS = (
    SecretNames.POSTGRES_SUPERUSER_PASSWORD,
    SecretNames.POSTGRES_REPLICATION_PASSWORD,
    SecretNames.POSTGRES_REWIND_PASSWORD,
    SecretNames.POSTGRES_EXPORTER_PASSWORD,
    SecretNames.PATRONI_RESTAPI_PASSWORD,
    SecretNames.METRICS_AGGREGATOR_PASSWORD,
)
# The load balancer listens on the ports HAProxy listens on: a client's connection string is the same
# through the load balancer and straight at a node.
WRITE_PORT = Ports.HAPROXY_PRIMARY
READ_PORT = Ports.HAPROXY_REPLICAS
# pgBackRest's TLS identity: renewed by the `pulumi up` inside its last 90 days; a host takes a new one
# with its next bundle rollout (the agent rewrites secret files on every apply).
TLS_VALIDITY_HOURS = 5 * 365 * 24
TLS_EARLY_RENEWAL_HOURS = 90 * 24


@dataclass
class PatroniClusterArgs:
    settings: StackSettings
    topology: Topology
    etcd_specs: tuple[HostSpec, ...]
    node_specs: tuple[HostSpec, ...]
    context: AwsContext
    lb_security_group_id: pulumi.Input[str]


class PatroniCluster(pulumi.ComponentResource):
    etcd: list[AwsHost]
    nodes: list[AwsHost]
    load_balancer: aws.lb.LoadBalancer
    writer_endpoint: str
    reader_endpoint: str

    def __init__(self, name: str, args: PatroniClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:postgres:PatroniCluster", name, None, opts)
        self._name = name
        self._args = args
        self._child = pulumi.ResourceOptions(parent=self)

        self.passwords, parameters = self._create_passwords()
        if uses_tls_server(args.topology):
            parameters += self._create_pgbackrest_tls()
        self.etcd = [create_host(name, spec, args.context, self) for spec in args.etcd_specs]
        self.nodes = [create_host(name, spec, args.context, self, boots_after=parameters) for spec in args.node_specs]
        self.load_balancer = self._create_load_balancer()
        # The stable names in the private zone (aliases of the load balancer) and their ports.
        self.writer_endpoint = f"{args.topology.postgres_primary_endpoint}:{WRITE_PORT}"
        self.reader_endpoint = f"{args.topology.postgres_replica_endpoint}:{READ_PORT}"

        self.register_outputs({
            "writer_endpoint": self.writer_endpoint,
            "reader_endpoint": self.reader_endpoint,
            "nodes": [spec.host.fqdn for spec in args.node_specs],
            "etcd": [spec.host.fqdn for spec in args.etcd_specs],
            "superuser_password": self.passwords[SecretNames.POSTGRES_SUPERUSER_PASSWORD],
        })

    def _create_passwords(self) -> tuple[dict[str, pulumi.Output[str]], list[aws.ssm.Parameter]]:
        passwords, parameters = {}, []
        for secret in PASSWORDS:
            password = random.RandomPassword(
                f"{self._name}-{secret.replace('_', '-')}",
                length=32,
                special=False,  # passwords travel through env files and connection strings
                opts=self._child,
            )
            parameters.append(create_secret_parameter(
                f"{self._name}-{secret.replace('_', '-')}-parameter", self._args.settings.environment,
                secret, pulumi.Output.secret(password.result), self._args.context.data_key_arn, self,
                registry=self._args.context.secret_parameters))
            passwords[secret] = pulumi.Output.secret(password.result)
        # The REST API's user name is no secret, but travels with its password (Patroni's environment file).
        parameters.append(create_secret_parameter(
            f"{self._name}-{SecretNames.PATRONI_RESTAPI_USERNAME.replace('_', '-')}-parameter",
            self._args.settings.environment, SecretNames.PATRONI_RESTAPI_USERNAME,
            pulumi.Output.secret(RESTAPI_USERNAME), self._args.context.data_key_arn, self))
        return passwords, parameters

    def _create_pgbackrest_tls(self) -> list[aws.ssm.Parameter]:
        """One key and self-signed certificate for every member's pgBackRest TLS server and client: each
        server trusts exactly this certificate, and it names every member, so a backup on a standby reaches
        the primary (render/pgbackrest.py)."""
        name, args = self._name, self._args
        key = tls.PrivateKey(f"{name}-pgbackrest-tls-key", algorithm="ECDSA", ecdsa_curve="P256", opts=self._child)
        certificate = tls.SelfSignedCert(
            f"{name}-pgbackrest-tls-cert",
            private_key_pem=key.private_key_pem,
            subject=tls.SelfSignedCertSubjectArgs(common_name=TLS_CLIENT_CN, organization=f"betting {args.settings.environment}"),
            dns_names=[host.fqdn for host in args.topology.postgres],
            allowed_uses=["digital_signature", "key_encipherment", "server_auth", "client_auth"],
            validity_period_hours=TLS_VALIDITY_HOURS,
            early_renewal_hours=TLS_EARLY_RENEWAL_HOURS,
            opts=self._child,
        )
        return [
            create_secret_parameter(f"{name}-{secret.replace('_', '-')}-parameter", args.settings.environment, secret,
                                    pulumi.Output.secret(value), args.context.data_key_arn, self,
                                    registry=args.context.secret_parameters)
            for secret, value in ((SecretNames.PGBACKREST_TLS_KEY, key.private_key_pem),
                                  (SecretNames.PGBACKREST_TLS_CERT, certificate.cert_pem))
        ]

    def _create_load_balancer(self) -> aws.lb.LoadBalancer:
        name, args = self._name, self._args
        lb = aws.lb.LoadBalancer(
            f"{name}-lb",
            internal=True,
            load_balancer_type="network",
            subnets=list(args.context.subnet_ids.values()),
            security_groups=[args.lb_security_group_id],
            enable_cross_zone_load_balancing=True,
            # Deleting it cuts every client at once: in staging and prod only a deliberate change to this may.
            enable_deletion_protection=args.settings.environment != "dev",
            tags=args.context.tags,
            opts=self._child,
        )
        for purpose, port, health_path, alias in (
            ("primary", WRITE_PORT, HEALTH_WRITER, args.topology.postgres_primary_endpoint),
            ("replicas", READ_PORT, HEALTH_READER, args.topology.postgres_replica_endpoint),
        ):
            group = aws.lb.TargetGroup(
                f"{name}-{purpose}",
                port=port,
                protocol="TCP",
                vpc_id=args.context.vpc_id,
                target_type="instance",
                # HAProxy answers 200 while it has a server up behind that port (the leader for the writer port).
                # AWS's minimums: the checks only need to drop a lost node; a failover is HAProxy's to follow.
                health_check=aws.lb.TargetGroupHealthCheckArgs(
                    protocol="HTTP", port=str(Ports.HAPROXY_STATS), path=health_path,
                    interval=5, healthy_threshold=2, unhealthy_threshold=2, timeout=3),
                deregistration_delay=5,
                connection_termination=True,  # a deregistered target keeps no sessions
                tags=args.context.tags,
                opts=self._child,
            )
            for spec, node in zip(args.node_specs, self.nodes, strict=True):
                aws.lb.TargetGroupAttachment(
                    f"{name}-{purpose}-{spec.host.name}",
                    target_group_arn=group.arn,
                    target_id=node.instance.id,
                    port=port,
                    opts=self._child,
                )
            aws.lb.Listener(
                f"{name}-{purpose}",
                load_balancer_arn=lb.arn,
                port=port,
                protocol="TCP",
                default_actions=[aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=group.arn)],
                opts=self._child,
            )
            aws.route53.Record(
                f"{name}-{purpose}-dns",
                zone_id=args.context.zone_id,
                name=alias,
                type="A",
                aliases=[aws.route53.RecordAliasArgs(name=lb.dns_name, zone_id=lb.zone_id, evaluate_target_health=True)],
                opts=self._child,
            )
        return lb
