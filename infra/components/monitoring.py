"""Monitoring: Prometheus + Alertmanager hosts (each with its own TSDB volume; Alertmanagers
clustered), Grafana, and the alerting secrets they read from SSM at boot.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from infra.hosts import HostSpec
from infra.platforms.aws import AwsContext, AwsHost, create_host, create_secret_parameter
from infra.render.webconfig import web_config
from infra.topology import Ports, SecretNames


@dataclass
class MonitoringArgs:
    prometheus_specs: tuple[HostSpec, ...]
    grafana_specs: tuple[HostSpec, ...]
    context: AwsContext
    # Pulumi config secrets, passed through untouched (they stay secret Outputs).
    pagerduty_routing_key: pulumi.Input[str]
    slack_critical_webhook: pulumi.Input[str]
    slack_warnings_webhook: pulumi.Input[str]
    deadman_heartbeat_key: pulumi.Input[str]
    smtp_auth_password: pulumi.Input[str] | None = None  # only with alerting.smtpAuthUsername
    managed_prometheus: bool = False  # monitoring.managedPrometheus.enabled: the stack's AMP workspace


class Monitoring(pulumi.ComponentResource):
    prometheus: list[AwsHost]
    grafana: list[AwsHost]
    workspace: aws.amp.Workspace | None = None

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:monitoring:Monitoring", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        ctx = args.context

        parameters = []
        for secret, value in (
            (SecretNames.PAGERDUTY_ROUTING_KEY, args.pagerduty_routing_key),
            (SecretNames.SLACK_CRITICAL_WEBHOOK, args.slack_critical_webhook),
            (SecretNames.SLACK_WARNINGS_WEBHOOK, args.slack_warnings_webhook),
            (SecretNames.DEADMAN_HEARTBEAT_KEY, args.deadman_heartbeat_key),
            *([(SecretNames.SMTP_AUTH_PASSWORD, args.smtp_auth_password)] if args.smtp_auth_password is not None else []),
        ):
            parameters.append(create_secret_parameter(f"{name}-{secret.replace('_', '-')}", ctx.environment, secret, value,
                                                      ctx.data_key_arn, self, registry=ctx.secret_parameters))
        grafana_password = random.RandomPassword(f"{name}-grafana-admin-password", length=32, special=False, opts=child)
        # Explicit: the provider's additional_secret_outputs is not honoured by every engine (the mock one ignores it).
        self.grafana_admin_password = pulumi.Output.secret(grafana_password.result)
        grafana_parameter = create_secret_parameter(f"{name}-grafana-admin-password-parameter", ctx.environment,
                                                    SecretNames.GRAFANA_ADMIN_PASSWORD, self.grafana_admin_password,
                                                    ctx.data_key_arn, self, registry=ctx.secret_parameters)

        # The monitoring API's credential: clients read the password, Prometheus and Alertmanager check its hash, which
        # reaches them inside the web config (a secret too: infra/render/webconfig.py renders it from the hash).
        monitoring_password = random.RandomPassword(f"{name}-monitoring-password", length=32, special=False, opts=child)
        self.monitoring_password = pulumi.Output.secret(monitoring_password.result)
        monitoring_parameters = [
            create_secret_parameter(f"{name}-monitoring-password-parameter", ctx.environment,
                                    SecretNames.MONITORING_PASSWORD, self.monitoring_password, ctx.data_key_arn, self,
                                    registry=ctx.secret_parameters),
            create_secret_parameter(f"{name}-monitoring-web-config-parameter", ctx.environment,
                                    SecretNames.MONITORING_WEB_CONFIG,
                                    pulumi.Output.secret(monitoring_password.bcrypt_hash).apply(web_config),
                                    ctx.data_key_arn, self, registry=ctx.secret_parameters),
        ]

        if args.managed_prometheus:
            # Remote-written by every Prometheus, queried by Grafana; each host's role reaches this workspace only.
            self.workspace = aws.amp.Workspace(f"{name}-workspace", alias=f"betting-{ctx.environment}",
                                               tags={**ctx.tags, "Purpose": "managed-prometheus"}, opts=child)
            # Its id is AWS's: the hosts read it from SSM, the files carry a token for it (managed_prometheus.py).
            workspace_parameter = create_secret_parameter(
                f"{name}-amp-workspace-id", ctx.environment, SecretNames.AMP_WORKSPACE_ID, self.workspace.id,
                ctx.data_key_arn, self, registry=ctx.secret_parameters)
            ctx = replace(ctx, amp_workspace_arn=self.workspace.arn)
            parameters.append(workspace_parameter)
            grafana_parameter = [grafana_parameter, workspace_parameter]
        else:
            grafana_parameter = [grafana_parameter]

        self.prometheus = [create_host(name, spec, ctx, self, boots_after=parameters + monitoring_parameters)
                           for spec in args.prometheus_specs]
        self.grafana = [create_host(name, spec, ctx, self, boots_after=[*grafana_parameter, monitoring_parameters[0]])
                        for spec in args.grafana_specs]

        self.register_outputs({
            "prometheus_urls": [f"https://{spec.host.fqdn}:{Ports.PROMETHEUS}" for spec in args.prometheus_specs],
            "alertmanager_urls": [f"https://{spec.host.fqdn}:{Ports.ALERTMANAGER}" for spec in args.prometheus_specs],
            "grafana_urls": [f"https://{spec.host.fqdn}:{Ports.GRAFANA}" for spec in args.grafana_specs],
            "grafana_admin_password": self.grafana_admin_password,
            "amp_remote_write_url": (self.workspace.prometheus_endpoint.apply(lambda url: f"{url}api/v1/remote_write")
                                     if self.workspace else None),
        })
