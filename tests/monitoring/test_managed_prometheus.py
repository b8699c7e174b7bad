"""Amazon Managed Prometheus (monitoring.managedPrometheus): the rendered remote_write checked by the real promtool,
the workspace, its IAM scope and the Grafana data source under Pulumi's mock engine (prod ships with AMP on, dev and
staging with it off), the agent's substitution of the workspace id, the sandbox cutting the section.

What these cannot see: AWS itself (the workspace's real endpoint shape is AWS's documented
`https://aps-workspaces.<region>.amazonaws.com/workspaces/<id>/`, which the mock engine copies; that IAM accepts
the actions). tests/monitoring/test_managed_prometheus_live.py runs the section in a real Prometheus.
"""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import yaml

from infra.bundle import bundle_document
from infra.hostagent import agent
from infra.hosts import host_specs
from infra.render import managed_prometheus
from infra.render.grafana import render_grafana
from infra.render.prometheus import prometheus_args, render_prometheus
from infra.sandbox.mapping import map_bytes
from infra.settings import load_settings
from infra.topology import Paths, build_topology
from tests.conftest import STACKS, stack_config
from tests.monitoring.conftest import binary
from tests.test_program import named, of_type, plan

WORKSPACE = "monitoring-workspace_id"  # the mock engine's id for the component's workspace
WORKSPACE_ARN = f"arn:aws:aps:eu-west-1:123456789012:workspace/{WORKSPACE}"


def _settings(stack: str = "prod", **managed):
    config = stack_config(stack)
    if managed:
        monitoring = json.loads(config["betting-platform:monitoring"])
        monitoring["managedPrometheus"] = managed
        config["betting-platform:monitoring"] = json.dumps(monitoring)
    return load_settings(config, stack)


def _prometheus_yml(settings) -> dict:
    return yaml.safe_load(render_prometheus(settings, build_topology(settings))["prometheus/prometheus.yml"])


def _promtool(tmp_path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run([binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("send", ["aggregates", "all"])
def test_promtool_accepts_the_remote_write_as_rendered_and_as_substituted(tmp_path, send):
    config = _prometheus_yml(_settings(enabled=True, send=send))
    section = {"global": config["global"], "remote_write": config["remote_write"]}
    result = _promtool(tmp_path, section)
    assert result.returncode == 0, result.stdout + result.stderr
    substituted = yaml.safe_load(yaml.safe_dump(section).replace(managed_prometheus.WORKSPACE_TOKEN, "ws-0a1b2c3d-e4f5"))
    result = _promtool(tmp_path, substituted)
    assert result.returncode == 0, result.stdout + result.stderr
    (remote,) = config["remote_write"]
    assert remote["url"] == (f"https://aps-workspaces.eu-west-1.amazonaws.com/workspaces/"
                             f"{managed_prometheus.WORKSPACE_TOKEN}/api/v1/remote_write")
    assert remote["sigv4"] == {"region": "eu-west-1"}  # no keys: the instance role
    relabel = remote.get("write_relabel_configs", [])
    assert relabel == ([{"source_labels": ["__name__"], "regex": ".+:.+", "action": "keep"}] if send == "aggregates" else [])


def test_promtool_rejects_a_broken_remote_write(tmp_path):
    """The check above can fail: a sigv4 block beside basic auth is refused by Prometheus 2.42."""
    config = _prometheus_yml(_settings(enabled=True))
    section = {"remote_write": copy.deepcopy(config["remote_write"])}
    section["remote_write"][0]["basic_auth"] = {"username": "x", "password": "y"}
    result = _promtool(tmp_path, section)
    assert result.returncode != 0


def test_the_aggregates_regex_keeps_exactly_the_recording_rules():
    """Every recorded series has a colon in its name, and no alert or scraped name the rules read has one."""
    import re

    from infra.render.prometheus import rule_groups

    settings = _settings()
    keep = re.compile(managed_prometheus.AGGREGATE_NAMES)
    recorded = {r["record"] for g in rule_groups(settings).values() for r in g["rules"] if "record" in r}
    assert recorded and all(keep.fullmatch(name) for name in recorded)
    for name in ("up", "ALERTS", "ALERTS_FOR_STATE", "pg_up", "patroni_master", "node_cpu_seconds_total"):
        assert not keep.fullmatch(name)


def test_disabled_stacks_render_nothing_of_amp():
    settings = _settings("dev")
    assert not settings.monitoring.managed_prometheus.enabled
    config = _prometheus_yml(settings)
    assert "remote_write" not in config and "alert_relabel_configs" not in config["alerting"]
    assert managed_prometheus.REPLICA_LABEL not in config["global"]["external_labels"]
    assert managed_prometheus.REPLICA_FLAG not in prometheus_args(settings)
    grafana = render_grafana(settings, build_topology(settings))
    sources = yaml.safe_load(grafana["grafana/provisioning/datasources/datasources.yml"])["datasources"]
    assert "amp" not in {s["uid"] for s in sources} and b"sigv4" not in grafana["grafana/grafana.ini"]


def test_each_replica_names_itself_and_alerts_drop_the_name():
    settings = _settings()
    config = _prometheus_yml(settings)
    assert config["global"]["external_labels"]["__replica__"] == "${PROMETHEUS_REPLICA}"
    assert config["alerting"]["alert_relabel_configs"] == [{"action": "labeldrop", "regex": "__replica__"}]
    topology = build_topology(settings)
    for spec in (s for s in host_specs(settings, topology) if s.host.role == "monitoring"):
        defaults = next(f for f in spec.files if f.path == "/etc/default/prometheus").content.decode()
        assert f'PROMETHEUS_REPLICA="{spec.host.name}"' in defaults.splitlines()
        assert managed_prometheus.REPLICA_FLAG in defaults


def test_the_agent_writes_prometheus_yml_with_the_workspace_id(tmp_path):
    settings = _settings()
    topology = build_topology(settings)
    spec = next(s for s in host_specs(settings, topology) if s.host.name == "monitoring-1")
    entry = next(f for f in bundle_document(spec, settings, topology)["files"] if f["path"] == Paths.PROMETHEUS_CONFIG)
    assert entry["parameters"] == {managed_prometheus.WORKSPACE_TOKEN: "/betting/prod/amp_workspace_id"}

    class Parameters:
        def secret(self, parameter):
            return {"/betting/prod/amp_workspace_id": "ws-0a1b2c3d-e4f5"}[parameter]

    written = yaml.safe_load(agent._with_parameters(entry, Parameters()))
    assert written["remote_write"][0]["url"] == ("https://aps-workspaces.eu-west-1.amazonaws.com/workspaces/"
                                                 "ws-0a1b2c3d-e4f5/api/v1/remote_write")


def test_the_sandbox_cuts_the_remote_write_section():
    """The sandbox has no AWS: the section goes, and what is left is still valid YAML with every other key."""
    from infra.sandbox.mapping import _unsent_remote_write

    settings = _settings()
    content = render_prometheus(settings, build_topology(settings))["prometheus/prometheus.yml"]
    mapping = {k.encode(): v.encode() for k, v in _unsent_remote_write(settings).items()}
    mapped = yaml.safe_load(map_bytes(content, mapping))
    assert "remote_write" not in mapped
    assert set(mapped) == set(yaml.safe_load(content)) - {"remote_write"}


# ---- under Pulumi's mock engine: the shipped stacks --------------------------------------------------------------
@pytest.mark.parametrize("stack", STACKS)
def test_the_workspace_exists_only_where_the_stack_enables_it(stack):
    enabled = load_settings(stack_config(stack), stack).monitoring.managed_prometheus.enabled
    assert enabled == (stack == "prod")  # what the stacks ship with (README, Monitoring)
    workspaces = of_type(stack, "amp/workspace:Workspace")
    aps = [s for p in of_type(stack, "iam/rolePolicy:RolePolicy") for s in json.loads(p.props["policy"])["Statement"]
           if any(a.startswith("aps:") for a in s["Action"])]
    if not enabled:
        assert workspaces == [] and aps == []
        assert "amp_workspace_endpoint" not in plan(stack).outputs
        return
    (workspace,) = workspaces
    assert workspace.props["alias"] == f"betting-{stack}"
    assert workspace.props["tags"]["Environment"] == stack and workspace.props["tags"]["ManagedBy"] == "pulumi"
    parameter = named(stack, "monitoring-amp-workspace-id")
    assert parameter.props["name"] == f"/betting/{stack}/amp_workspace_id"
    assert plan(stack).outputs["amp_workspace_endpoint"] == (
        f"https://aps-workspaces.eu-west-1.amazonaws.com/workspaces/{WORKSPACE}/")


def _aps_statements(stack: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for policy in of_type(stack, "iam/rolePolicy:RolePolicy"):
        for statement in json.loads(policy.props["policy"])["Statement"]:
            if any(a.startswith("aps:") for a in statement["Action"]):
                found.setdefault(policy.name, []).append(statement)
    return found


def test_only_prometheus_writes_and_only_grafana_reads_that_workspace():
    statements = _aps_statements("prod")
    assert set(statements) == {"monitoring-monitoring-1-access", "monitoring-monitoring-2-access",
                               "monitoring-grafana-1-access"}
    for name, found in statements.items():
        (statement,) = found
        assert statement["Effect"] == "Allow" and statement["Resource"] == [WORKSPACE_ARN], name
        assert "Condition" not in statement
        expected = (["aps:RemoteWrite"] if "grafana" not in name else
                    ["aps:QueryMetrics", "aps:GetSeries", "aps:GetLabels", "aps:GetMetricMetadata"])
        assert statement["Action"] == expected, name


def test_the_hosts_read_the_workspace_id_and_grafana_gets_a_sigv4_data_source():
    resources = plan("prod").resources
    grafana_instance = next(r for r in of_type("prod", "ec2/instance:Instance") if r.props["tags"]["Role"] == "grafana")
    from tests.test_program import bundle_of

    bundle = bundle_of(grafana_instance, resources)
    (environment,) = [e for e in bundle["secret_environments"] if e["unit"] == "grafana-server"]
    assert environment["variables"]["AMP_WORKSPACE_ID"] == "/betting/prod/amp_workspace_id"
    files = {f["path"]: f["content"] for f in bundle["files"]}
    sources = yaml.safe_load(files[f"{Paths.GRAFANA_PROVISIONING}/datasources/datasources.yml"])["datasources"]
    (amp,) = [s for s in sources if s["uid"] == "amp"]
    assert amp["url"] == "https://aps-workspaces.eu-west-1.amazonaws.com/workspaces/${AMP_WORKSPACE_ID}"
    assert amp["jsonData"] == {"httpMethod": "POST", "sigV4Auth": True, "sigV4AuthType": "default",
                               "sigV4Region": "eu-west-1"}
    assert "sigv4_auth_enabled = true" in files[Paths.GRAFANA_CONFIG].splitlines()
    # Its IAM grant names the parameter (ReadOwnSecrets) like any secret it reads.
    statements = {s.get("Sid"): s for s in json.loads(named("prod", "monitoring-grafana-1-access").props["policy"])["Statement"]}
    assert any(r.endswith("parameter/betting/prod/amp_workspace_id") for r in statements["ReadOwnSecrets"]["Resource"])
