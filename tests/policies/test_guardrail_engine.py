"""Enforcement per stack, the offline engine `infra plan` uses, and the pack served as the Pulumi CLI runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2, json_format, struct_pb2
from guardrail_cases import changed, compliant_stack, urn
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc

from policies.engine import (
    CONFIG_DIR,
    PolicyConfigError,
    evaluate,
    load_policy_config,
    mandatory,
)
from policies.rules import RULES, RULES_BY_NAME

ROOT = Path(__file__).resolve().parents[2]
SMALL_TSDB = ("monitoring-monitoring-1-prometheus-tsdb", lambda p: p.update(size=20))
VERSIONING_OFF = ("backups-backups-versioning", lambda p: p["versioningConfiguration"].update(status="Suspended"))


def test_the_compliant_stack_has_no_violation_offline():
    assert evaluate(compliant_stack(), "dev", "dev") == []


def test_a_violation_carries_policy_level_resource_and_message():
    violations = evaluate(changed(*SMALL_TSDB), "staging", "staging")
    # The small volume breaks two rules: its own size, and the 42GB size retention no longer fits on it.
    assert [v.policy for v in violations] == ["prometheus-retention", "prometheus-tsdb-volume"]
    violation = violations[1]
    assert violation.policy == "prometheus-tsdb-volume"
    assert violation.enforcement == "mandatory"
    assert violation.resource == "aws:ebs/volume:Volume::monitoring-monitoring-1-prometheus-tsdb"
    assert "size is 20 GiB" in violation.message and "'monitoring-monitoring-1-prometheus-tsdb'" in violation.message
    assert str(violation).startswith("[mandatory] prometheus-tsdb-volume: Volume 'monitoring-monitoring-1-prometheus-tsdb'")


def test_a_stack_config_can_make_a_policy_advisory_or_disable_it():
    advisory = evaluate(changed(*VERSIONING_OFF), "dev", "dev", config={"s3-versioning": {"enforcementLevel": "advisory"}})
    assert [(v.policy, v.enforcement) for v in advisory] == [("s3-versioning", "advisory")] and mandatory(advisory) == []
    assert evaluate(changed(*VERSIONING_OFF), "dev", "dev", config={"all": "disabled"}) == []
    assert mandatory(evaluate(changed(*VERSIONING_OFF), "dev", "dev", config={"all": "advisory", "s3-versioning": "mandatory"}))


def test_prod_is_mandatory_whatever_its_config_says():
    for config in ({"all": "advisory"}, {"s3-versioning": "disabled"}, {"all": "disabled"}):
        violations = evaluate(changed(*VERSIONING_OFF), "prod", "prod", config=config)
        assert [v.enforcement for v in violations] == ["mandatory"], config


def test_policy_config_thresholds_reach_the_rules_offline():
    violations = evaluate(compliant_stack(), "dev", "dev", config={"prometheus-retention": {"minRetentionDays": 45}})
    assert [v.policy for v in violations] == ["prometheus-retention"]
    assert "retention time 30d" in violations[0].message


MISTYPED = [{"prometheus-retension": "advisory"}, {"all": "warn"}, {"s3-versioning": {"enforcementLevel": "off"}}]


@pytest.mark.parametrize("config", MISTYPED)
def test_a_mistyped_policy_config_is_refused(config):
    with pytest.raises(PolicyConfigError):
        evaluate(compliant_stack(), "dev", "dev", config=config)


def test_the_plan_unknown_marker_is_unknown_not_a_value():
    resources = changed("patroni-pg-1-postgres-data", lambda p: p.update(encrypted="[unknown]", type="[unknown]"))
    assert evaluate(resources, "dev", "dev") == []


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_every_shipped_stack_has_a_valid_policy_config(stack):
    config = load_policy_config(stack)  # raises on an unknown policy or level
    assert config, f"{CONFIG_DIR / (stack + '.json')} is missing"
    for name, value in config.items():
        if isinstance(value, dict):
            schema = RULES_BY_NAME[name].config_schema
            assert set(value) - {"enforcementLevel"} <= set(schema), (stack, name)


def test_prod_config_softens_nothing():
    config = json.loads((CONFIG_DIR / "prod.json").read_text())
    assert config.get("all") == "mandatory"
    for name, value in config.items():
        if name == "all":
            continue
        assert value.get("enforcementLevel", "mandatory") == "mandatory", name
        for key, setting in value.items():
            if key != "enforcementLevel":
                assert setting == RULES_BY_NAME[name].config_schema[key]["default"], (name, key)


# --- the pack, served by policies/__main__.py and spoken to over gRPC as the Pulumi CLI does ----------------


@pytest.fixture(scope="module")
def analyzer():
    process = subprocess.Popen([sys.executable, "-u", "__main__.py"], cwd=ROOT / "policies",
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = process.stdout.readline().strip()
        assert port.isdigit(), f"the pack printed {port!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=20)
        yield analyzer_pb2_grpc.AnalyzerStub(channel)
        channel.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


def _struct(props: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    json_format.ParseDict(props, message)
    return message


def _analyzer_resource(resource: dict) -> analyzer_pb2.AnalyzerResource:
    return analyzer_pb2.AnalyzerResource(type=resource["type"], name=resource["name"], urn=urn(resource),
                                         properties=_struct(resource["props"]))


def test_the_pack_announces_every_rule_as_mandatory(analyzer):
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty())
    assert info.name == "betting-platform-guardrails"
    assert {p.name for p in info.policies} == {rule.name for rule in RULES}
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}


def test_the_pack_reports_a_resource_violation(analyzer):
    resources = changed(*SMALL_TSDB)
    (volume,) = [r for r in resources if r["name"] == SMALL_TSDB[0]]
    response = analyzer.Analyze(analyzer_pb2.AnalyzeRequest(type=volume["type"], name=volume["name"], urn=urn(volume),
                                                            properties=_struct(volume["props"])))
    diagnostics = [(d.policyName, d.enforcementLevel, d.message) for d in response.diagnostics]
    assert [(name, level) for name, level, _ in diagnostics] == [("prometheus-tsdb-volume", analyzer_pb2.MANDATORY)]
    assert "size is 20 GiB" in diagnostics[0][2]


def test_the_pack_reports_oversized_user_data_and_skips_it_unknown(analyzer):
    from guardrail_cases import UNKNOWN_STRING

    def analyze(user_data):
        resources = changed("monitoring-monitoring-1", lambda p: p.update(userData=user_data))
        (instance,) = [r for r in resources if r["name"] == "monitoring-monitoring-1"]
        response = analyzer.Analyze(analyzer_pb2.AnalyzeRequest(type=instance["type"], name=instance["name"],
                                                                urn=urn(instance), properties=_struct(instance["props"])))
        return [(d.policyName, d.enforcementLevel, d.message) for d in response.diagnostics]

    diagnostics = analyze("#" * 16_385)
    assert [(name, level) for name, level, _ in diagnostics] == [("user-data-size", analyzer_pb2.MANDATORY)]
    assert "'monitoring-monitoring-1': user data is 16,385 bytes raw" in diagnostics[0][2]
    assert [name for name, _, _ in analyze("#" * 16_384)] == []
    # Unknown during preview: prometheus-retention and user-data-size both skip it.
    assert analyze(UNKNOWN_STRING) == []


def test_the_pack_reports_a_stack_violation_and_accepts_the_compliant_stack(analyzer):
    compliant = analyzer.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(
        resources=[_analyzer_resource(r) for r in compliant_stack()]))
    assert list(compliant.diagnostics) == []
    resources = changed("backups-audit-object-lock", lambda p: p["rule"]["defaultRetention"].update(mode="GOVERNANCE"))
    response = analyzer.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=[_analyzer_resource(r) for r in resources]))
    assert [(d.policyName, d.urn.rsplit("::", 1)[-1]) for d in response.diagnostics] == [
        ("audit-log-retention", "backups-audit-object-lock")]


def test_the_pack_stays_quiet_on_values_unknown_during_preview(analyzer):
    """The engine sends unknowns as sentinel strings; the pack must neither fail nor report."""
    from guardrail_cases import UNKNOWN_BOOLEAN, UNKNOWN_NUMBER, UNKNOWN_STRING

    volume = {"type": "aws:ebs/volume:Volume", "name": "monitoring-monitoring-1-prometheus-tsdb",
              "props": {"size": UNKNOWN_NUMBER, "type": UNKNOWN_STRING, "encrypted": UNKNOWN_BOOLEAN,
                        "tags": {"Role": "prometheus-tsdb", "Host": "monitoring-1"}}}
    response = analyzer.Analyze(analyzer_pb2.AnalyzeRequest(type=volume["type"], name=volume["name"], urn=urn(volume),
                                                            properties=_struct(volume["props"])))
    assert list(response.diagnostics) == []
    stack = [r for r in compliant_stack() if r["name"] != "backups-backups-lifecycle"]
    rule = {"id": "x", "status": "Enabled", "filter": {"prefix": "verification/"}, "expiration": {"days": UNKNOWN_NUMBER}}
    lifecycle = {"type": "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", "name": "backups-backups-lifecycle",
                 "props": {"bucket": UNKNOWN_STRING, "rules": [rule]}}
    response = analyzer.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(
        resources=[_analyzer_resource(r) for r in [*stack, lifecycle]]))
    assert list(response.diagnostics) == []
