"""Amazon Managed Service for Prometheus (AMP): every Prometheus remote-writes to the stack's workspace, with
SigV4 through the instance role, and Grafana queries it. Pure: settings in, config fragments out.

The workspace id is AWS's, random, known only once the workspace exists, while every rendered file is known
before anything is created. The files therefore carry WORKSPACE_TOKEN where the id goes; the program stores
the id in the SSM parameter SecretNames.AMP_WORKSPACE_ID, and the agent writes prometheus.yml with the token
replaced (a File's `parameters`), Grafana expands it from its environment. Prometheus 2.42 reads the remote
write URL from nowhere but prometheus.yml (no env expansion there, no url_file), hence the substitution.

Both Prometheus replicas send the same series. AMP keeps one replica's samples per `cluster` (its HA
deduplication): each replica adds `__replica__` (its host name, from /etc/default/prometheus through
--enable-feature=expand-external-labels), and alerts drop it again so Alertmanager still sees the pair's
alerts as one.
"""

from __future__ import annotations

from infra.settings import StackSettings
from infra.topology import SecretNames

WORKSPACE_TOKEN = "@amp_workspace_id@"
GRAFANA_WORKSPACE_VARIABLE = "AMP_WORKSPACE_ID"  # Grafana expands $VAR in provisioning files
REPLICA_VARIABLE = "PROMETHEUS_REPLICA"
REPLICA_LABEL = "__replica__"  # AMP's HA deduplication label (with `cluster`); AMP drops it on ingestion
REPLICA_FLAG = "--enable-feature=expand-external-labels"
REMOTE_WRITE_NAME = "amp"
# The recording rules' series (sli:..., slo:...): Prometheus' naming convention puts a colon in a name only there.
AGGREGATE_NAMES = ".+:.+"
# AWS's documented queue settings for AMP (1,000 samples a request); AMP's default ingestion quota (tens of thousands
# of samples/s per workspace, adjustable) is far above one stack's rate. Over it AMP answers 429: retried, not dropped.
QUEUE_CONFIG = {"capacity": 2500, "max_shards": 200, "max_samples_per_send": 1000, "retry_on_http_429": True}
GRAFANA_UID = "amp"


def enabled(settings: StackSettings) -> bool:
    return settings.monitoring.managed_prometheus.enabled


def workspace_endpoint(region: str, workspace_id: str = WORKSPACE_TOKEN) -> str:
    """The workspace's prometheus_endpoint (without its trailing slash), as AWS forms it from the id."""
    return f"https://aps-workspaces.{region}.amazonaws.com/workspaces/{workspace_id}"


def remote_write_url(region: str, workspace_id: str = WORKSPACE_TOKEN) -> str:
    return f"{workspace_endpoint(region, workspace_id)}/api/v1/remote_write"


def remote_write(settings: StackSettings) -> list[dict]:
    """prometheus.yml's remote_write: nothing when the stack has no workspace."""
    if not enabled(settings):
        return []
    entry: dict = {
        "url": remote_write_url(settings.region),
        "name": REMOTE_WRITE_NAME,
        # No keys: the SDK's default chain, i.e. the instance role through IMDSv2 on EC2.
        "sigv4": {"region": settings.region},
        "queue_config": dict(QUEUE_CONFIG),
        # AMP stores metadata for 20,000 metrics at most; the aggregates need none.
        "metadata_config": {"send": settings.monitoring.managed_prometheus.send == "all"},
    }
    if settings.monitoring.managed_prometheus.send == "aggregates":
        entry["write_relabel_configs"] = [{"source_labels": ["__name__"], "regex": AGGREGATE_NAMES, "action": "keep"}]
    return [entry]


def replica_label(settings: StackSettings) -> dict[str, str]:
    """The external label telling the replicas apart in AMP (expanded from the host's /etc/default/prometheus)."""
    return {REPLICA_LABEL: f"${{{REPLICA_VARIABLE}}}"} if enabled(settings) else {}


def alert_relabel_configs(settings: StackSettings) -> list[dict]:
    """Alerts lose the replica label: both replicas' alerts stay identical, so Alertmanager deduplicates them."""
    return [{"action": "labeldrop", "regex": REPLICA_LABEL}] if enabled(settings) else []


def prometheus_flags(settings: StackSettings) -> tuple[str, ...]:
    return (REPLICA_FLAG,) if enabled(settings) else ()


def prometheus_environment(settings: StackSettings, host_name: str) -> dict[str, str]:
    """What /etc/default/prometheus adds beside ARGS: the replica's name."""
    return {REPLICA_VARIABLE: host_name} if enabled(settings) else {}


def prometheus_parameters(settings: StackSettings) -> tuple[tuple[str, str], ...]:
    """prometheus.yml's substitution: the token -> the workspace id's parameter."""
    return ((WORKSPACE_TOKEN, SecretNames.AMP_WORKSPACE_ID),) if enabled(settings) else ()


def grafana_datasource(settings: StackSettings) -> list[dict]:
    """Grafana's data source for the workspace, signed with the instance role (SigV4, the default chain)."""
    if not enabled(settings):
        return []
    return [{
        "name": "Amazon Managed Prometheus",
        "type": "prometheus",
        "uid": GRAFANA_UID,
        "access": "proxy",
        "url": workspace_endpoint(settings.region, f"${{{GRAFANA_WORKSPACE_VARIABLE}}}"),
        "editable": False,
        "jsonData": {"httpMethod": "POST", "sigV4Auth": True, "sigV4AuthType": "default",
                     "sigV4Region": settings.region},
    }]


def grafana_ini_lines(settings: StackSettings) -> list[str]:
    """Grafana offers SigV4 on its Prometheus data sources only with this switch."""
    return ["", "[auth]", "sigv4_auth_enabled = true", ""] if enabled(settings) else []
