"""The Grafana host: provisioned data sources and dashboards."""

from __future__ import annotations

from infra.hosts.spec import BASE_PACKAGES, HostSpec, SecretEnvironment, SecretFile, node_exporter_files, place, tls_files
from infra.render import managed_prometheus
from infra.render.grafana import render_grafana
from infra.settings import StackSettings
from infra.topology import Host, Paths, SecretNames, Topology

QUERY_ACTIONS = ("aps:QueryMetrics", "aps:GetSeries", "aps:GetLabels", "aps:GetMetricMetadata")


def spec(settings: StackSettings, topology: Topology, host: Host) -> HostSpec:
    amp_variables = (((managed_prometheus.GRAFANA_WORKSPACE_VARIABLE, SecretNames.AMP_WORKSPACE_ID),)
                     if managed_prometheus.enabled(settings) else ())
    return HostSpec(
        host=host,
        instance_type=settings.monitoring.grafana.instance_type,
        packages=BASE_PACKAGES + ("grafana",),
        files=(*place(render_grafana(settings, topology), {
            "grafana/grafana.ini": Paths.GRAFANA_CONFIG,
            "grafana/provisioning/": Paths.GRAFANA_PROVISIONING + "/",
            "grafana/dashboards/": Paths.GRAFANA_DASHBOARDS + "/",
        }, owner="root:grafana", mode="0640"), *node_exporter_files()),
        services=("grafana-server", "prometheus-node-exporter"),
        # Its data sources' password (read through $__file at start); Grafana reads its certificate at start only.
        secret_files=(SecretFile(SecretNames.MONITORING_PASSWORD, "grafana:grafana"),
                      *tls_files(topology, host, reloads=(("grafana-server", "restart"),))),
        secret_environments=(
            # Grafana reads any setting from a GF_<SECTION>_<KEY> environment variable.
            SecretEnvironment("grafana-server", (("GF_SECURITY_ADMIN_PASSWORD", SecretNames.GRAFANA_ADMIN_PASSWORD),
                                                 # Expanded in the AMP data source's URL (infra/render/managed_prometheus.py).
                                                 *amp_variables), "grafana:grafana"),
        ),
        # Queries only, on the stack's workspace only.
        workspace_actions=QUERY_ACTIONS if managed_prometheus.enabled(settings) else (),
    )
