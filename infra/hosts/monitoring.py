"""A monitoring host: Prometheus, Alertmanager and redis_exporter."""

from __future__ import annotations

from dataclasses import replace

from infra.hosts.spec import (
    BASE_PACKAGES,
    DataVolume,
    File,
    HostSpec,
    SecretEnvironment,
    SecretFile,
    env_file,
    node_exporter_files,
    place,
    shell_args,
    tls_files,
)
from infra.render import managed_prometheus
from infra.render.alertmanager import alertmanager_args, render_alertmanager
from infra.render.prometheus import prometheus_args, render_prometheus
from infra.render.webconfig import redis_exporter_tls_flags
from infra.settings import StackSettings
from infra.topology import Host, Paths, Ports, SecretNames, Topology

MONITORING_SECRETS = (
    SecretNames.PAGERDUTY_ROUTING_KEY,
    SecretNames.SLACK_CRITICAL_WEBHOOK,
    SecretNames.SLACK_WARNINGS_WEBHOOK,
    SecretNames.DEADMAN_HEARTBEAT_KEY,
    # The monitoring API's web config (TLS, the password's hash) and the password Prometheus scrapes and alerts with.
    SecretNames.MONITORING_WEB_CONFIG,
    SecretNames.MONITORING_PASSWORD,
)


def spec(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    prometheus = render_prometheus(settings, topology)
    alertmanager = render_alertmanager(settings, topology)
    redis_exporter_args = [
        f"--redis.addr=rediss://{topology.redis_endpoint}:{Ports.REDIS}",
        f"--web.listen-address=:{Ports.REDIS_EXPORTER}",
        *redis_exporter_tls_flags(),
    ]
    placed = place(prometheus, {"prometheus/prometheus.yml": Paths.PROMETHEUS_CONFIG,
                                "prometheus/rules/": Paths.PROMETHEUS_RULES_DIR + "/"})
    # The AMP workspace id reaches prometheus.yml at apply time (infra/render/managed_prometheus.py).
    placed = [replace(f, parameters=managed_prometheus.prometheus_parameters(settings))
              if f.path == Paths.PROMETHEUS_CONFIG else f for f in placed]
    files = [
        *placed,
        *place(alertmanager, {"alertmanager/alertmanager.yml": Paths.ALERTMANAGER_CONFIG,
                              "alertmanager/": "/etc/prometheus/alertmanager/"}),
        # The flags Prometheus really runs with (retention included); the policy pack reads them from here.
        File("/etc/default/prometheus", env_file({"ARGS": shell_args(prometheus_args(settings)),
                                                  **managed_prometheus.prometheus_environment(settings, host.name)})),
        File("/etc/default/prometheus-alertmanager", env_file({"ARGS": shell_args(alertmanager_args(settings, topology, host))})),
        File("/etc/default/prometheus-redis-exporter", env_file({"ARGS": shell_args(redis_exporter_args)})),
        *node_exporter_files(),
    ]
    prometheus_settings = settings.monitoring.prometheus
    return HostSpec(
        host=host,
        instance_type=prometheus_settings.instance_type,
        packages=BASE_PACKAGES + ("prometheus", "prometheus-alertmanager", "prometheus-redis-exporter"),
        files=tuple(files),
        services=("prometheus", "prometheus-alertmanager", "prometheus-redis-exporter", "prometheus-node-exporter"),
        volume=DataVolume("prometheus-tsdb", Paths.PROMETHEUS_DATA, "prometheus:prometheus", prometheus_settings.volume),
        secret_files=tuple(SecretFile(name, "prometheus:prometheus") for name in MONITORING_SECRETS + (
            (SecretNames.SMTP_AUTH_PASSWORD,) if settings.alerting.smtp_auth_username else ()))
        # No reloads: Prometheus and Alertmanager read the web config, hence the key and certificate, at every
        # request (exporter-toolkit), redis_exporter its pair at every handshake, and Prometheus' clients re-read a
        # changed CA file (prometheus/common).
        + tls_files(topology, host),
        workspace_actions=("aps:RemoteWrite",) if managed_prometheus.enabled(settings) else (),
        secret_environments=(
            SecretEnvironment("prometheus-redis-exporter", (("REDIS_PASSWORD", SecretNames.REDIS_AUTH_TOKEN),),
                              "prometheus:prometheus"),
        ),
    )
