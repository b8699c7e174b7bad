"""Amazon Managed Prometheus (monitoring.managedPrometheus): the rendered remote_write checked by the real promtool,
the workspace, its IAM scope and the Grafana data source under Pulumi's mock engine (the shipped stacks keep it off;
prod with it on is evaluated here), the agent's substitution of the workspace id, the sandbox cutting the section.

What these cannot see: AWS itself (the workspace's real endpoint shape is AWS's documented
`https://aps-workspaces.<region>.amazonaws.com/workspaces/<id>/`, which the mock engine copies; that IAM accepts
the actions). tests/monitoring/test_managed_prometheus_live.py runs the section in a real Prometheus.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess

import pytest
import yaml

from infra.bundle import bundle_document
from infra.engine import evaluate
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
from tests.test_program import SENTINELS, bundle_of

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
    settings = _settings(enabled=True)
    config = _prometheus_yml(settings)
    assert config["global"]["external_labels"]["__replica__"] == "${PROMETHEUS_REPLICA}"
    assert config["alerting"]["alert_relabel_configs"] == [{"action": "labeldrop", "regex": "__replica__"}]
    topology = build_topology(settings)
    for spec in (s for s in host_specs(settings, topology) if s.host.role == "monitoring"):
        defaults = next(f for f in spec.files if f.path == "/etc/default/prometheus").content.decode()
        assert f'PROMETHEUS_REPLICA="{spec.host.name}"' in defaults.splitlines()
        assert managed_prometheus.REPLICA_FLAG in defaults


def test_the_agent_writes_prometheus_yml_with_the_workspace_id(tmp_path):
    settings = _settings(enabled=True)
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

    settings = _settings(enabled=True)
    content = render_prometheus(settings, build_topology(settings))["prometheus/prometheus.yml"]
    mapping = {k.encode(): v.encode() for k, v in _unsent_remote_write(settings).items()}
    mapped = yaml.safe_load(map_bytes(content, mapping))
    assert "remote_write" not in mapped
    assert set(mapped) == set(yaml.safe_load(content)) - {"remote_write"}


# ---- under Pulumi's mock engine ---------------------------------------------------------------------------------
@functools.cache
def enabled_plan():
    """prod with monitoring.managedPrometheus enabled (the shipped stacks keep it off: README, Monitoring)."""
    config = stack_config("prod")
    monitoring = json.loads(config["betting-platform:monitoring"])
    monitoring["managedPrometheus"] = {"enabled": True, "send": "aggregates"}
    config["betting-platform:monitoring"] = json.dumps(monitoring)
    evaluation = evaluate("prod", config, secret_values=SENTINELS)
    assert evaluation.error is None, evaluation.error
    return evaluation


def _of_type(resources, suffix: str):
    return [r for r in resources if r.type.endswith(suffix)]


def _aps_statements(resources) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for policy in _of_type(resources, "iam/rolePolicy:RolePolicy"):
        for statement in json.loads(policy.props["policy"])["Statement"]:
            if any(a.startswith("aps:") for a in statement["Action"]):
                found.setdefault(policy.name, []).append(statement)
    return found


@pytest.mark.parametrize("stack", STACKS)
def test_the_shipped_stacks_ask_for_no_workspace(stack):
    """(The program creates the workspace only with the setting; the enabled plan below shows it does then.)"""
    settings = load_settings(stack_config(stack), stack)
    assert not settings.monitoring.managed_prometheus.enabled
    specs = host_specs(settings, build_topology(settings))
    assert all(not s.workspace_actions and not any(f.parameters for f in s.files) for s in specs)


def test_an_enabled_stack_gets_one_tagged_workspace_and_its_id_parameter():
    evaluation = enabled_plan()
    (workspace,) = _of_type(evaluation.resources, "amp/workspace:Workspace")
    assert workspace.props["alias"] == "betting-prod" and workspace.parent == "monitoring"
    assert workspace.props["tags"]["Environment"] == "prod" and workspace.props["tags"]["ManagedBy"] == "pulumi"
    (parameter,) = [r for r in evaluation.resources if r.name == "monitoring-amp-workspace-id"]
    assert parameter.props["name"] == "/betting/prod/amp_workspace_id" and parameter.props["type"] == "SecureString"
    assert evaluation.outputs["amp_workspace_endpoint"] == (
        f"https://aps-workspaces.eu-west-1.amazonaws.com/workspaces/{WORKSPACE}/")


def test_only_prometheus_writes_and_only_grafana_reads_that_workspace():
    statements = _aps_statements(enabled_plan().resources)
    assert set(statements) == {"monitoring-monitoring-1-access", "monitoring-monitoring-2-access",
                               "monitoring-grafana-1-access"}
    for name, found in statements.items():
        (statement,) = found
        assert statement["Effect"] == "Allow" and statement["Resource"] == [WORKSPACE_ARN], name
        assert "Condition" not in statement
        expected = (["aps:RemoteWrite"] if "grafana" not in name else
                    ["aps:QueryMetrics", "aps:GetSeries", "aps:GetLabels", "aps:GetMetricMetadata"])
        assert statement["Action"] == expected, name
    # Still no wildcard anywhere (tests/test_program.py checks the shipped stacks likewise).
    for policy in _of_type(enabled_plan().resources, "iam/rolePolicy:RolePolicy"):
        if policy.name != "network-flow-logs-write":
            for statement in json.loads(policy.props["policy"])["Statement"]:
                assert not any("*" in a for a in statement["Action"]), policy.name
                assert all(r != "*" and not r.endswith(":*") for r in statement["Resource"]), policy.name


def test_the_hosts_read_the_workspace_id_and_grafana_gets_a_sigv4_data_source():
    resources = enabled_plan().resources
    instances = {r.props["tags"]["Host"]: r for r in _of_type(resources, "ec2/instance:Instance")}
    bundle = bundle_of(instances["grafana-1"], resources)
    (environment,) = [e for e in bundle["secret_environments"] if e["unit"] == "grafana-server"]
    assert environment["variables"]["AMP_WORKSPACE_ID"] == "/betting/prod/amp_workspace_id"
    files = {f["path"]: f["content"] for f in bundle["files"]}
    sources = yaml.safe_load(files[f"{Paths.GRAFANA_PROVISIONING}/datasources/datasources.yml"])["datasources"]
    (amp,) = [s for s in sources if s["uid"] == "amp"]
    assert amp["url"] == "https://aps-workspaces.eu-west-1.amazonaws.com/workspaces/${AMP_WORKSPACE_ID}"
    assert amp["jsonData"] == {"httpMethod": "POST", "sigV4Auth": True, "sigV4AuthType": "default",
                               "sigV4Region": "eu-west-1"}
    assert "sigv4_auth_enabled = true" in files[Paths.GRAFANA_CONFIG].splitlines()
    prometheus = next(f for f in bundle_of(instances["monitoring-1"], resources)["files"]
                      if f["path"] == Paths.PROMETHEUS_CONFIG)
    assert prometheus["parameters"] == {managed_prometheus.WORKSPACE_TOKEN: "/betting/prod/amp_workspace_id"}
    # Both read the parameter like any secret (ReadOwnSecrets), and boot after it exists.
    for host in ("grafana-1", "monitoring-1"):
        policy = next(r for r in resources if r.name == f"monitoring-{host}-access")
        statements = {s.get("Sid"): s for s in json.loads(policy.props["policy"])["Statement"]}
        assert any(r.endswith("parameter/betting/prod/amp_workspace_id") for r in statements["ReadOwnSecrets"]["Resource"])
