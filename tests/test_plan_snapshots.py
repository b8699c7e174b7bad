"""Plan snapshots (plans/<stack>.json): fresh, stable, secret-free, and a readable diff against them."""

from __future__ import annotations

import copy
import json
import random

import pytest

from infra import plan_diff
from infra.plan_diff import compare, current_plan, diff_plans, dumps_plan, load_plan, refresh_command, save_plan

STACKS = ("dev", "staging", "prod")


def _plan(*resources, stack="dev"):
    return {"stack": stack, "environment": stack, "resources": list(resources)}


def _r(type_, name, parent=None, **props):
    return {"type": type_, "name": name, "parent": parent, "props": props}


VOLUME = "aws:ebs/volume:Volume"
INSTANCE = "aws:ec2/instance:Instance"
OLD = _plan(
    _r(VOLUME, "monitoring-1-tsdb", "monitoring", size=50, type="gp3", encrypted=True, tags={"Role": "prometheus-tsdb"}),
    _r(VOLUME, "pg-1-data", "patroni", size=100, type="gp3", encrypted=True, iops=3000),
    _r(INSTANCE, "monitoring-1", "monitoring", instanceType="t3.medium",
       userData=("#cloud-config\nwrite_files:\n- path: /etc/default/prometheus\n  content: |\n"
                 '    ARGS="--storage.tsdb.retention.time=30d"\n')),
    _r("aws:s3/bucket:Bucket", "audit", bucket="betting-dev-audit", objectLockEnabled=True),
)


def _new():
    new = copy.deepcopy(OLD)
    volume, pg, instance, bucket = new["resources"]
    volume["props"]["size"] = 100
    volume["props"]["tags"]["Host"] = "monitoring-1"
    del pg["props"]["iops"]
    instance["props"]["userData"] = instance["props"]["userData"].replace("30d", "45d")
    new["resources"].remove(bucket)
    new["resources"].append(_r(VOLUME, "monitoring-2-tsdb", "monitoring", size=100, type="gp3", encrypted=True))
    return new


def test_the_diff_lists_added_removed_and_changed_resources_property_by_property():
    text = diff_plans(OLD, _new())
    lines = text.splitlines()
    assert "+ aws:ebs/volume:Volume  monitoring-2-tsdb" in lines
    assert "    size: 100" in lines
    assert "- aws:s3/bucket:Bucket  audit" in lines
    assert "~ aws:ebs/volume:Volume  monitoring-1-tsdb" in lines
    assert "    ~ size: 50 -> 100" in lines
    assert '    + tags.Host: "monitoring-1"' in lines
    assert "    - iops: 3000" in lines
    # Multi-line values (user data) show as a line diff, not as two unreadable blobs.
    assert '        -    ARGS="--storage.tsdb.retention.time=30d"' in lines
    assert '        +    ARGS="--storage.tsdb.retention.time=45d"' in lines
    assert lines[-1] == "stack dev: 1 to add, 1 to remove, 3 to change, 0 unchanged"


def test_the_diff_order_does_not_depend_on_the_input_order():
    shuffled_old, shuffled_new = copy.deepcopy(OLD), _new()
    random.Random(7).shuffle(shuffled_old["resources"])
    random.Random(8).shuffle(shuffled_new["resources"])
    assert diff_plans(shuffled_old, shuffled_new) == diff_plans(OLD, _new())
    # Added first, then removed, then changed; each group sorted by (type, name).
    markers = [line[0] for line in diff_plans(OLD, _new()).splitlines() if line and line[0] in "+-~"]
    assert markers == ["+", "-", "~", "~", "~"]


def test_json_documents_inside_strings_diff_by_field():
    old = _plan(_r("aws:iam/rolePolicy:RolePolicy", "access", policy=json.dumps({"Statement": [{"Action": ["s3:GetObject"]}]})))
    new = _plan(_r("aws:iam/rolePolicy:RolePolicy", "access", policy=json.dumps({"Statement": [{"Action": ["s3:PutObject"]}]})))
    lines = diff_plans(old, new).splitlines()
    assert '        -        "s3:GetObject"' in lines and '        +        "s3:PutObject"' in lines


def test_a_parent_change_is_a_change():
    moved = copy.deepcopy(OLD)
    moved["resources"][1]["parent"] = "postgres"
    (change,) = compare(OLD, moved).changed
    assert change.properties == [("(parent)", "patroni", "postgres")]


def test_no_changes_says_so():
    assert diff_plans(OLD, copy.deepcopy(OLD)) == "stack dev: no changes (4 resources match the snapshot)\n"
    assert compare(OLD, copy.deepcopy(OLD)).empty


def test_without_a_snapshot_everything_is_added():
    text = diff_plans(None, OLD)
    assert text.splitlines()[-1] == "stack dev: 4 to add, 0 to remove, 0 to change, 0 unchanged"


def test_the_serialization_is_sorted_and_byte_stable(tmp_path):
    shuffled = copy.deepcopy(OLD)
    random.Random(3).shuffle(shuffled["resources"])
    assert dumps_plan(shuffled) == dumps_plan(OLD)
    names = [r["name"] for r in json.loads(dumps_plan(shuffled))["resources"]]
    assert names == ["monitoring-1-tsdb", "pg-1-data", "monitoring-1", "audit"]  # by (type, name)
    path = save_plan("dev", shuffled, plans_dir=tmp_path)
    assert path.read_text() == dumps_plan(OLD) and load_plan("dev", plans_dir=tmp_path) == json.loads(dumps_plan(OLD))
    assert load_plan("nope", plans_dir=tmp_path) is None


# --- the committed snapshots against the program as it is --------------------------------------------------


@pytest.fixture(scope="module")
def fresh():
    return {stack: current_plan(stack) for stack in STACKS}


@pytest.mark.parametrize("stack", STACKS)
def test_the_committed_snapshot_is_fresh(fresh, stack):
    committed = load_plan(stack)
    assert committed is not None, f"plans/{stack}.json is missing; create it with: {refresh_command(stack)}"
    if dumps_plan(committed) != dumps_plan(fresh[stack]):
        diff = diff_plans(committed, fresh[stack])
        shown = "\n".join(diff.splitlines()[:80])
        pytest.fail(f"plans/{stack}.json is stale; review the change below, then refresh it with:\n\n"
                    f"    {refresh_command(stack)}\n\n(`make snapshots` refreshes every stack)\n\n{shown}", pytrace=False)


@pytest.mark.parametrize("stack", STACKS)
def test_the_snapshot_bytes_are_what_dumps_plan_writes(stack):
    """The file is exactly the stable serialization, so a refresh of an unchanged program rewrites nothing."""
    path = plan_diff.plan_path(stack)
    assert path.read_text() == dumps_plan(json.loads(path.read_text()))


def test_a_second_evaluation_gives_the_same_bytes(fresh):
    assert dumps_plan(current_plan("dev")) == dumps_plan(fresh["dev"])


@pytest.mark.parametrize("stack", STACKS)
def test_snapshots_hold_no_secret(stack, fresh):
    text = plan_diff.plan_path(stack).read_text()
    # The mock engine's stand-ins for secrets and generated passwords must never reach a snapshot.
    assert "offline-placeholder" not in text and "offline-xxxx" not in text
    resources = fresh[stack]["resources"]
    secure = [r for r in resources if r["type"] == "aws:ssm/parameter:Parameter" and r["props"].get("type") == "SecureString"]
    assert secure and all(r["props"]["value"] == plan_diff.SECRET_MASK for r in secure)
    for group in (r for r in resources if r["type"] == "aws:elasticache/replicationGroup:ReplicationGroup"):
        assert group["props"]["authToken"] == plan_diff.SECRET_MASK
