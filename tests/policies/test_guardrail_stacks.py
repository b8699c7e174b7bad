"""The shipped stacks, evaluated by the program under the mock engine, against every policy."""

from __future__ import annotations

import copy
import json

import pytest

from infra.plan_diff import current_plan
from policies import engine
from policies.rules import RULES
from policies.rules.pack import build_policy
from policies.rules.prometheus_flags import DEFAULTS_FILE, bundle_files

STACKS = ("dev", "staging", "prod")


@pytest.fixture(scope="module")
def plans():
    return {stack: current_plan(stack) for stack in STACKS}


@pytest.mark.parametrize("stack", STACKS)
def test_every_shipped_stack_passes_every_policy(plans, stack):
    plan = plans[stack]
    assert engine.evaluate(plan["resources"], plan["environment"], stack) == []


@pytest.mark.parametrize("stack", STACKS)
def test_the_rules_see_what_they_guard_in_the_real_program(plans, stack):
    """Guard against rules that pass because they match nothing: the program's resources are the ones they read."""
    resources = plans[stack]["resources"]
    types = {r["type"] for r in resources}
    for rule in RULES:
        if rule.kind == "resource":
            assert types & set(rule.resource_types), f"{rule.name} matches no resource of stack {stack}"
    instances = [r for r in resources if r["type"] == "aws:ec2/instance:Instance"]
    monitoring = [r for r in instances if r["props"]["tags"].get("Role") == "monitoring"]
    bundles = {r["props"]["tags"]["Host"]: r["props"]["content"] for r in resources
               if r["type"] == "aws:s3/bucketObjectv2:BucketObjectv2"}
    # The flags reach a host in its bundle; the rule reads them there (the user data is only the stub).
    assert monitoring and all(DEFAULTS_FILE in bundle_files(bundles[r["props"]["tags"]["Host"]]) for r in monitoring)
    purposes = {r["props"].get("tags", {}).get("Purpose") for r in resources if r["type"] == "aws:s3/bucket:Bucket"}
    assert {"backups", "audit-logs"} <= purposes
    # The account-level controls' stack rules join these: each must be there for them to judge.
    assert {"aws:ec2/vpc:Vpc", "aws:ec2/flowLog:FlowLog", "aws:cloudwatch/logGroup:LogGroup",
            "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup", "aws:cloudtrail/trail:Trail",
            "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"} <= types


def _mutate(plan, name, change):
    resources = copy.deepcopy(plan["resources"])
    (resource,) = [r for r in resources if r["name"] == name]
    change(resource["props"])
    return resources


def _retention_changed(days: str):
    def change(props):
        flag = "--storage.tsdb.retention.time="
        props["content"] = props["content"].replace(f"{flag}30d", f"{flag}{days}")
    return change


def test_a_drifted_prometheus_flag_in_the_real_bundle_is_caught(plans):
    plan = plans["prod"]
    assert "--storage.tsdb.retention.time=30d" in json.dumps(plan)
    violations = engine.evaluate(_mutate(plan, "bundles-monitoring-1", _retention_changed("7d")), "prod", "prod")
    assert [(v.policy, v.enforcement, v.resource) for v in violations] == [
        ("prometheus-retention", "mandatory", "aws:ec2/instance:Instance::monitoring-monitoring-1")]
    assert "retention time 7d" in violations[0].message


@pytest.mark.parametrize(("name", "change", "policy"), [
    ("monitoring-monitoring-2-prometheus-tsdb", lambda p: p.update(type="st1"), "prometheus-tsdb-volume"),
    ("postgres-pg-1-postgres-data", lambda p: p.update(encrypted=False), "data-volume-encrypted-ssd"),
    ("redis-group", lambda p: p.update(atRestEncryptionEnabled=False), "elasticache-encryption"),
    ("backups-backups-replication", lambda p: p["rules"][0]["sourceSelectionCriteria"]["sseKmsEncryptedObjects"].update(
        status="Disabled"), "backup-replication"),
    ("backups-audit-replication", lambda p: p["rules"][0]["destination"]["encryptionConfiguration"].pop("replicaKmsKeyId"),
     "backup-replication"),
    ("backups-audit-replication", lambda p: p["rules"][0].pop("deleteMarkerReplication"), "backup-replication"),
    ("backups-backups-replication", lambda p: p["rules"][0].update(status="Disabled"), "backup-replication"),
    ("backups-audit-replication", lambda p: p["rules"][0]["destination"].update(
        bucket="arn:aws:s3:::betting-prod-pg-backups-eu-central-1"), "backup-replication"),
    ("backups-audit-replica", lambda p: p.update(objectLockEnabled=False), "backup-replication"),
    ("backups-backups-replication", lambda p: p.update(bucket="elsewhere"), "backup-replication"),
    ("backups-key", lambda p: p.pop("policy"), "kms-key-policy"),
    ("backups-replica-key", lambda p: p.update(policy=p["policy"].replace('"kms:CreateAlias"', '"kms:Create*"')),
     "kms-key-policy"),
    ("data-key", lambda p: p.update(policy=p["policy"].replace('"kms:DisableKey", ', '')), "kms-key-policy"),
    ("network-flow-log", lambda p: p.update(trafficType="ACCEPT"), "vpc-flow-logs"),
    ("network-flow-logs", lambda p: p.pop("retentionInDays"), "vpc-flow-logs"),
    ("network-flow-logs", lambda p: p.pop("kmsKeyId"), "vpc-flow-logs"),
    ("network-default-group", lambda p: p.update(vpcId="vpc-elsewhere"), "vpc-default-security-group-closed"),
    ("network-default-group", lambda p: p.update(ingress=[{"protocol": "-1", "fromPort": 0, "toPort": 0, "self": True}]),
     "vpc-default-security-group-closed"),
    ("network-monitoring-egress-internet-587", lambda p: p.update(fromPort=0, toPort=65535), "sg-egress-narrow"),
    ("network-etcd-egress-internet-80", lambda p: p.update(ipProtocol="-1"), "sg-egress-narrow"),
    ("bundles-bucket-lifecycle", lambda p: p.update(rules=[r for r in p["rules"] if r["id"] != "abort-incomplete-uploads"]),
     "s3-abort-incomplete-uploads"),
    ("backups-audit-replica-lifecycle", lambda p: p["rules"][-1].update(status="Disabled"), "s3-abort-incomplete-uploads"),
    ("backups-data-access-trail", lambda p: p.update(isMultiRegionTrail=False), "s3-data-events-logged"),
    ("backups-data-access-trail", lambda p: p.update(enableLogFileValidation=False), "s3-data-events-logged"),
    ("backups-data-access-trail", lambda p: p["eventSelectors"][0]["dataResources"][0]["values"].pop(), "s3-data-events-logged"),
    ("postgres-lb", lambda p: p.update(enableDeletionProtection=False), "lb-deletion-protection"),
])
def test_a_change_to_the_real_prod_plan_breaks_the_rule_it_should(plans, name, change, policy):
    plan = plans["prod"]
    assert any(r["name"] == name for r in plan["resources"]), f"the program no longer declares {name}"
    violations = engine.evaluate(_mutate(plan, name, change), "prod", "prod")
    assert policy in {v.policy for v in violations}
    assert all(v.mandatory for v in violations)


def test_the_pack_agrees_with_the_offline_engine_on_the_real_plan(plans):
    """Through the SDK's arguments, as during `pulumi preview` with dev's policy config (what CI passes as
    --policy-pack-config): the real dev stack passes every policy."""
    from guardrail_cases import run_policy

    resources, config = plans["dev"]["resources"], engine.load_policy_config("dev")
    for rule in RULES:
        assert run_policy(rule.name, resources, config=engine.rule_overrides(rule, config)) == [], rule.name
    assert isinstance(build_policy(RULES[0]).name, str)


def test_infra_plan_exits_non_zero_and_prints_each_mandatory_violation(monkeypatch, tmp_path, capsys):
    """`infra plan STACK` runs the same rules: a stack config demanding a 1000 GiB TSDB makes it fail."""
    from infra import cli

    (tmp_path / "staging.json").write_text(json.dumps({"all": "mandatory", "prometheus-tsdb-volume": {"minSizeGiB": 1000}}))
    monkeypatch.setattr(engine, "CONFIG_DIR", tmp_path)
    code = cli.main(["plan", "staging"])
    output = capsys.readouterr()
    text = output.out + output.err
    assert code != 0
    for volume in ("monitoring-monitoring-1-prometheus-tsdb", "monitoring-monitoring-2-prometheus-tsdb"):
        assert f"Volume '{volume}': size is " in text and "has 1000 GiB or more" in text, text[-2000:]
