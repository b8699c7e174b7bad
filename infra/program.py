"""The Pulumi program: settings -> rendered specs -> components. Run by infra/__main__.py
under the Pulumi engine, and by `infra plan` / the tests under the embedded mock engine.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi.runtime.config import CONFIG, get_config_env

from infra.components.backups import BackupStorage, BackupStorageArgs
from infra.components.bundles import HostBundles, HostBundlesArgs
from infra.components.clickhouse import ClickHouse, ClickHouseArgs
from infra.components.monitoring import Monitoring, MonitoringArgs
from infra.components.network import Network, NetworkArgs
from infra.components.patroni import PatroniCluster, PatroniClusterArgs
from infra.components.pki import CertificateAuthority, CertificateAuthorityArgs
from infra.components.redis import RedisCache, RedisCacheArgs
from infra.components.rollout import Rollout, RolloutArgs, secrets_revision
from infra.hosts import host_specs
from infra.platforms.aws import AwsContext
from infra.platforms.kms import cloudwatch_logs_statement, key_policy
from infra.settings import PROJECT, SECRET_KEYS, SettingsError, load_settings
from infra.topology import build_topology

DEBIAN_ACCOUNT = "136693071363"  # publishes the official Debian AMIs


def stack_config() -> dict[str, Any]:
    """The stack's config as the engine hands it to the program (env for `pulumi up`, set_all_config for mocks)."""
    return {**get_config_env(), **CONFIG.get()}


def secret_revision(spec, parameters: dict[str, aws.ssm.Parameter]) -> pulumi.Output[str]:
    """secrets_revision of what `spec`'s host reads: every secret the program made that its bundle names."""
    names = [name for name in spec.secret_names if name in parameters]
    return pulumi.Output.all(*(parameters[name].version for name in names)).apply(
        lambda versions: secrets_revision(dict(zip(names, versions, strict=True))))


def run() -> None:
    stack = pulumi.get_stack()
    raw_config = stack_config()
    settings = load_settings(raw_config, stack)  # raises before any resource exists
    config = pulumi.Config()
    secrets = {key: config.require_secret(key) for key in SECRET_KEYS}
    smtp_password = None
    if settings.alerting.smtp_auth_username:
        if not raw_config.get(f"{PROJECT}:smtpAuthPassword"):  # presence only; the value stays a secret Output
            raise SettingsError(stack, [f"{PROJECT}:smtpAuthPassword: missing; alerting.smtpAuthUsername is set, so set "
                                        "it with: pulumi config set --secret smtpAuthPassword <password>"])
        smtp_password = config.require_secret("smtpAuthPassword")
    topology = build_topology(settings)
    if settings.roll_host and settings.roll_host not in {h.name for h in topology.hosts}:
        raise SettingsError(stack, [f"{PROJECT}:rollHost: no host {settings.roll_host!r} in this stack; allowed: "
                                    f"{', '.join(h.name for h in topology.hosts)} (set only by `infra roll`)"])
    specs = host_specs(settings, topology)  # every config file is rendered here, before any resource
    by_role = {role: tuple(s for s in specs if s.host.role == role)
               for role in ("etcd", "postgres", "clickhouse", "monitoring", "grafana")}
    tags = {"Project": "betting-platform", "Environment": settings.environment, "Stack": stack, "ManagedBy": "pulumi",
            **settings.tags}
    protect = settings.environment == "prod"

    account_id = aws.get_caller_identity_output().account_id
    region = settings.region
    data_key = aws.kms.Key(
        "data-key",
        description=f"betting {settings.environment}: EBS volumes, ElastiCache, SSM secrets, host bundles, flow logs",
        enable_key_rotation=True,
        deletion_window_in_days=30,
        policy=account_id.apply(lambda account: key_policy(
            account, settings.security.key_administrator_roles,
            [f"{service}.{region}.amazonaws.com" for service in ("ec2", "elasticache", "ssm", "s3")],
            [cloudwatch_logs_statement(account, region)])),
        tags=tags,
        opts=pulumi.ResourceOptions(protect=protect),
    )
    network = Network("network", NetworkArgs(settings=settings, tags=tags, flow_log_key_arn=data_key.arn))
    backups = BackupStorage("backups", BackupStorageArgs(settings=settings, topology=topology, tags=tags,
                                                         account_id=account_id))
    bundles = HostBundles("bundles", HostBundlesArgs(settings=settings, topology=topology, specs=specs,
                                                   key_arn=data_key.arn, tags=tags))
    secret_parameters: dict[str, aws.ssm.Parameter] = {}  # every component's, by name (rollout revisions)
    authority = CertificateAuthority("pki", CertificateAuthorityArgs(
        environment=settings.environment, topology=topology, key_arn=data_key.arn, registry=secret_parameters))
    # A host boots once its bundle is published and the secrets it reads exist.
    boot_dependencies = {host: [*bundles.published.get(host, []), *authority.parameters.get(host, [])]
                         for host in {s.host.name for s in specs}}
    # The pinned image, looked up by id only to prove it is Debian's and the one named: no lookup picks one.
    image = aws.ec2.get_ami_output(
        owners=[DEBIAN_ACCOUNT],
        filters=[aws.ec2.GetAmiFilterArgs(name="image-id", values=[settings.image.ami_id]),
                 aws.ec2.GetAmiFilterArgs(name="name", values=[settings.image.name]),
                 aws.ec2.GetAmiFilterArgs(name="architecture", values=["x86_64"])],
    )
    context = AwsContext(
        environment=settings.environment,
        region=settings.region,
        account_id=account_id,
        ami_id=image.id,
        vpc_id=network.vpc.id,
        subnet_ids=network.subnet_ids,
        security_group_ids=network.security_group_ids,
        zone_id=network.zone.zone_id,
        data_key_arn=data_key.arn,
        bundle_bucket=topology.bundle_bucket,
        boot_dependencies=boot_dependencies,
        secret_parameters=secret_parameters,
        roll_host=settings.roll_host,
        bucket_key_arns={topology.backup_bucket: backups.key.arn, topology.audit_bucket: backups.key.arn},
        protect_data=protect,
        tags=tags,
    )

    redis = RedisCache("redis", RedisCacheArgs(settings=settings, topology=topology, context=context))
    postgres = PatroniCluster("postgres", PatroniClusterArgs(
        settings=settings, topology=topology, etcd_specs=by_role["etcd"], node_specs=by_role["postgres"],
        context=context, lb_security_group_id=network.security_group_ids["postgres-lb"]))
    clickhouse = ClickHouse("clickhouse", ClickHouseArgs(specs=by_role["clickhouse"], context=context))
    monitoring = Monitoring("monitoring", MonitoringArgs(
        prometheus_specs=by_role["monitoring"], grafana_specs=by_role["grafana"], context=context,
        pagerduty_routing_key=secrets["pagerdutyRoutingKey"],
        slack_critical_webhook=secrets["slackCriticalWebhook"],
        slack_warnings_webhook=secrets["slackWarningsWebhook"],
        deadman_heartbeat_key=secrets["deadmanHeartbeatKey"],
        smtp_auth_password=smtp_password,
        managed_prometheus=settings.monitoring.managed_prometheus.enabled,
    ), opts=pulumi.ResourceOptions(depends_on=[redis]))  # redis_exporter reads Redis' token at boot

    instances = {
        "etcd": postgres.etcd, "postgres": postgres.nodes, "clickhouse": clickhouse.hosts,
        "monitoring": monitoring.prometheus, "grafana": monitoring.grafana,
    }
    Rollout("rollout", RolloutArgs(
        environment=settings.environment,
        hosts={role: [(spec.host.name, host.instance.id, bundles.digests[spec.host.name])
                      for spec, host in zip(by_role[role], instances[role], strict=True)] for role in instances},
        published=[r for resources in bundles.published.values() for r in resources],
        tags=tags,
        secret_revisions={spec.host.name: secret_revision(spec, secret_parameters) for spec in specs},
    ))

    pulumi.export("environment", settings.environment)
    pulumi.export("vpc_id", network.vpc.id)
    pulumi.export("clients_security_group_id", network.security_group_ids["clients"])
    pulumi.export("dns_zone", settings.dns_zone)
    # Through the load balancer, every node's HAProxy and PgBouncer (transaction pooling): README, Connecting.
    pulumi.export("postgres_writer", postgres.writer_endpoint)
    pulumi.export("postgres_reader", postgres.reader_endpoint)
    pulumi.export("postgres_nodes", [s.host.fqdn for s in by_role["postgres"]])
    pulumi.export("redis_endpoint", f"{topology.redis_endpoint}:6379")
    pulumi.export("clickhouse_hosts", [s.host.fqdn for s in by_role["clickhouse"]])
    pulumi.export("prometheus_urls", [f"https://{s.host.fqdn}:9090" for s in by_role["monitoring"]])
    pulumi.export("grafana_url", f"http://{by_role['grafana'][0].host.fqdn}:3000")
    pulumi.export("grafana_admin_password", monitoring.grafana_admin_password)
    pulumi.export("backup_bucket", backups.backup_bucket.bucket)
    pulumi.export("audit_bucket", backups.audit_bucket.bucket)
    pulumi.export("postgres_load_balancer", postgres.load_balancer.dns_name)
    pulumi.export("clickhouse_instance_ids", [h.instance.id for h in clickhouse.hosts])
    pulumi.export("bundle_bucket", topology.bundle_bucket)
    pulumi.export("bundle_digests", bundles.digests)
    # What clients verify every TLS endpoint of the stack against (README, Security).
    pulumi.export("ca_certificate", authority.ca_certificate)
    if monitoring.workspace is not None:  # monitoring.managedPrometheus: query it with SigV4 (README, Monitoring)
        pulumi.export("amp_workspace_endpoint", monitoring.workspace.prometheus_endpoint)
