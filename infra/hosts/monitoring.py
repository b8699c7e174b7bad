"""A monitoring host: Prometheus, Alertmanager and redis_exporter; the daily SLO aggregates job."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from infra import aggregates, pki
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
from infra.render.webconfig import MONITORING_USER, password_path, redis_exporter_tls_flags
from infra.settings import StackSettings
from infra.topology import Host, Paths, Ports, SecretNames, Topology, secret_path

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "infra" / "hostagent" / "files"
# The aggregates job (scripts/aggregate_metrics.py) and the pure modules it imports, installed verbatim and run by
# Debian's /usr/bin/python3 (the script's folder is first on its path, so `infra` resolves beside it).
AGGREGATES_LIB = "/usr/local/lib/betting-aggregates"
AGGREGATES_SOURCES = {
    "aggregate_metrics.py": ROOT / "scripts" / "aggregate_metrics.py",
    "infra/__init__.py": ROOT / "infra" / "__init__.py",
    "infra/units.py": ROOT / "infra" / "units.py",
    "infra/slo.py": ROOT / "infra" / "slo.py",
    "infra/aggregates.py": ROOT / "infra" / "aggregates.py",
}
AGGREGATES_UNIT = "betting-aggregate-metrics"
AGGREGATES_ENV = f"/etc/default/{AGGREGATES_UNIT}"
AGGREGATES_PACKAGES = ("python3-requests", "python3-psycopg2")

MONITORING_SECRETS = (
    SecretNames.PAGERDUTY_ROUTING_KEY,
    SecretNames.SLACK_CRITICAL_WEBHOOK,
    SecretNames.SLACK_WARNINGS_WEBHOOK,
    SecretNames.DEADMAN_HEARTBEAT_KEY,
    # The monitoring API's web config (TLS, the password's hash) and the password Prometheus scrapes and alerts with.
    SecretNames.MONITORING_WEB_CONFIG,
    SecretNames.MONITORING_PASSWORD,
    # The aggregates job's login (metrics_aggregator).
    SecretNames.METRICS_AGGREGATOR_PASSWORD,
)


def aggregates_environment(settings: StackSettings, topology: Topology, host: Host) -> dict[str, str]:
    """What betting-aggregate-metrics.service reads: this host's Prometheus, the writer endpoint of the cluster
    (HAProxy's writer port, PgBouncer behind it) over TLS verified against the stack's CA."""
    dsn = (f"host={topology.postgres_primary_endpoint} port={Ports.HAPROXY_PRIMARY} dbname={settings.aggregates.database} "
           f"user={aggregates.ROLE} sslmode=verify-full sslrootcert={pki.ca_path()} connect_timeout=10")
    return {
        "PROMETHEUS_URL": f"https://{host.fqdn}:{Ports.PROMETHEUS}",
        "CA_FILE": pki.ca_path(),
        "MONITORING_USER": MONITORING_USER,
        "MONITORING_PASSWORD_FILE": password_path(),
        "POSTGRES_DSN": dsn,
        "DB_PASSWORD_FILE": secret_path(SecretNames.METRICS_AGGREGATOR_PASSWORD),
        "MONTHS_KEPT": str(settings.aggregates.months_kept),
        # The first monitoring host's figures win; the others fill only the days it missed.
        "EXTRA_ARGS": "" if host == topology.monitoring[0] else "--if-missing",
    }


def aggregates_files(settings: StackSettings, topology: Topology, host: Host) -> list[File]:
    return [
        *(File(f"{AGGREGATES_LIB}/{name}", source.read_bytes(), mode="0644") for name, source in AGGREGATES_SOURCES.items()),
        File(AGGREGATES_ENV, env_file(aggregates_environment(settings, topology, host))),
        *(File(f"/etc/systemd/system/{AGGREGATES_UNIT}.{kind}", (FILES / f"{AGGREGATES_UNIT}.{kind}").read_bytes())
          for kind in ("service", "timer")),
    ]


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
        *aggregates_files(settings, topology, host),
    ]
    prometheus_settings = settings.monitoring.prometheus
    return HostSpec(
        host=host,
        instance_type=prometheus_settings.instance_type,
        packages=BASE_PACKAGES + ("prometheus", "prometheus-alertmanager", "prometheus-redis-exporter", *AGGREGATES_PACKAGES),
        files=tuple(files),
        services=("prometheus", "prometheus-alertmanager", "prometheus-redis-exporter", "prometheus-node-exporter",
                  f"{AGGREGATES_UNIT}.timer"),
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
