"""Day-2 safety under Pulumi's mock engine: what a config change does to the resources of a stack.

A change to a rendered file, a setting or a rule must change bundles and rollout parameters
only: never an instance's user data or image, and nothing else. The mock engine cannot tell
what the AWS provider would replace; the test reads the resource options the engine is given
(ignoreChanges, protect, deleteBeforeReplace) and checks the provider-side facts it relies on in
FIELD-NOTES (ami forces replacement; userData stops the instance) are neutralised by them.
"""

from __future__ import annotations

import json

import pytest

from infra import bundle as bundles
from infra.engine import evaluate
from infra.hosts import host_specs
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import stack_config

EC2_USER_DATA_LIMIT = 16_384  # bytes, raw (before base64): EC2's documented limit
INSTANCE = "aws:ec2/instance:Instance"
DELIVERY_TYPES = {"aws:s3/bucketObjectv2:BucketObjectv2", "aws:ssm/parameter:Parameter", "aws:ssm/association:Association"}


def _evaluate(stack: str, **changes):
    config = stack_config(stack)
    for key, mutate in changes.items():
        full = f"betting-platform:{key}"
        value = json.loads(config[full])
        mutate(value)
        config[full] = json.dumps(value)
    evaluation = evaluate(stack, config)
    assert evaluation.error is None, evaluation.error
    return {(r.type, r.name): r for r in evaluation.resources}


@pytest.fixture(scope="module")
def prod_before():
    return _evaluate("prod")


def _changed(before, after) -> dict[tuple[str, str], set[str]]:
    assert set(before) == set(after), "a config change added or removed resources"
    changed = {}
    for key, resource in after.items():
        props = {k for k in set(resource.props) | set(before[key].props)
                 if resource.props.get(k) != before[key].props.get(k)}
        if props:
            changed[key] = props
    return changed


def _set(path: list[str], value):
    def mutate(target):
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return mutate


CHANGES = {
    "a PostgreSQL parameter (restart)": {"patroni": _set(["maxConnections"], 410)},
    "a Patroni DCS setting": {"patroni": _set(["maximumLagOnFailover"], 524288)},
    "a scrape interval": {"monitoring": _set(["prometheus", "scrapeInterval"], "20s")},
    "a rule evaluation interval": {"monitoring": _set(["prometheus", "evaluationInterval"], "20s")},
    "an etcd setting": {"etcd": _set(["electionTimeoutMs"], 2000)},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_config_change_reaches_bundles_and_rollouts_only(prod_before, change):
    after = _evaluate("prod", **CHANGES[change])
    changed = _changed(prod_before, after)
    assert changed, "the change reached no resource at all"
    assert {t for t, _ in changed} <= DELIVERY_TYPES, changed
    for (typ, name), props in changed.items():
        if typ == "aws:ssm/parameter:Parameter":
            assert props == {"value"} and name.endswith("-digest"), (name, props)
        if typ == "aws:ssm/association:Association":
            assert props == {"parameters"}, (name, props)
        if typ == "aws:s3/bucketObjectv2:BucketObjectv2":
            assert props == {"key", "content"}, (name, props)


def test_an_alert_rule_change_reaches_the_monitoring_bundles_only(prod_before, monkeypatch):
    """Not a stack setting: change the renderer's output, as a code change would."""
    from infra.render import prometheus

    original = prometheus.render_prometheus

    def with_changed_rule(settings, topology):
        files = dict(original(settings, topology))
        name = next(p for p in files if p.startswith("prometheus/rules/") and b"for: 30s" in files[p])
        files[name] = files[name].replace(b"for: 30s", b"for: 45s", 1)
        return files

    monkeypatch.setattr("infra.hosts.monitoring.render_prometheus", with_changed_rule)
    changed = _changed(prod_before, _evaluate("prod"))
    hosts = {name.removeprefix("bundles-") for typ, name in changed if typ == "aws:s3/bucketObjectv2:BucketObjectv2"}
    assert hosts == {"monitoring-1", "monitoring-2"}
    assert {t for t, _ in changed} <= DELIVERY_TYPES


def test_no_instance_user_data_comes_near_the_ec2_limit(stack):
    evaluation = evaluate(stack, stack_config(stack))
    for instance in (r for r in evaluation.resources if r.type == INSTANCE):
        size = len(instance.props["userData"].encode())
        # "A few KB at most": the stub never grows with the config.
        assert size <= 6 * 1024 < EC2_USER_DATA_LIMIT, (instance.name, size)


def test_instances_ignore_user_data_and_image_and_stateful_prod_hosts_are_protected(stack):
    evaluation = evaluate(stack, stack_config(stack))
    for instance in (r for r in evaluation.resources if r.type == INSTANCE):
        assert instance.options["ignoreChanges"] == ["ami", "userData"], instance.name
        stateful = instance.props["tags"]["Role"] in ("postgres", "etcd", "monitoring", "clickhouse")
        protected = stateful and stack == "prod"
        assert instance.options["protect"] is protected, instance.name
        assert bool(instance.props.get("disableApiTermination")) is protected, instance.name
        # Else the provider refuses to destroy it, and a roll could never replace it.
        assert bool(instance.props.get("forceDestroy")) is protected, instance.name
        # A replaced host gives its data volume up before the new one attaches it.
        has_volume = instance.props["tags"]["Role"] != "grafana"
        assert instance.options["deleteBeforeReplace"] is has_volume, instance.name


def test_the_roll_host_alone_may_take_a_new_image(stack):
    config = stack_config(stack) | {"betting-platform:rollHost": "pg-2"}
    evaluation = evaluate(stack, config)
    assert evaluation.error is None
    ignored = {r.name: r.options["ignoreChanges"] for r in evaluation.resources if r.type == INSTANCE}
    assert ignored.pop("postgres-pg-2") == []
    assert all(value == ["ami", "userData"] for value in ignored.values())


def test_an_unknown_roll_host_is_refused_before_any_resource(stack):
    evaluation = evaluate(stack, stack_config(stack) | {"betting-platform:rollHost": "pg-9"})
    assert "rollHost: no host 'pg-9' in this stack; allowed: etcd-1" in str(evaluation.error)
    assert evaluation.resources == []


def test_each_role_rolls_one_host_at_a_time_stopping_at_the_first_failure_in_role_order(stack):
    evaluation = evaluate(stack, stack_config(stack))
    settings = load_settings(stack_config(stack), stack)
    topology = build_topology(settings)
    objects = {r.name: r for r in evaluation.resources if r.type == "aws:s3/bucketObjectv2:BucketObjectv2"}
    associations = {r.name: r for r in evaluation.resources if r.type == "aws:ssm/association:Association"}
    assert list(associations) == [f"rollout-{role}" for role in ("etcd", "postgres", "clickhouse", "monitoring", "grafana")]
    previous = None
    for name, association in associations.items():
        assert association.props["maxConcurrency"] == "1" and association.props["maxErrors"] == "0"
        assert association.props["waitForSuccessTimeoutSeconds"] >= 1200
        digests = json.loads(association.props["parameters"]["digests"])
        role = name.removeprefix("rollout-")
        hosts = [h.name for h in topology.hosts if h.role == role]
        assert sorted(digests) == sorted(hosts)
        assert association.props["targets"] == [{"key": "InstanceIds",
                                                  "values": [f"{_component(role)}-{h}_id" for h in hosts]}]
        for host, value in digests.items():
            # The digest the association carries is the key of the object the host fetches.
            assert objects[f"bundles-{host}"].props["key"] == bundles.bundle_key(host, value)
        if previous:
            assert previous in association.options["dependsOn"]
        previous = name


def _component(role: str) -> str:
    return {"etcd": "postgres", "postgres": "postgres", "clickhouse": "clickhouse", "monitoring": "monitoring",
            "grafana": "monitoring"}[role]


def test_bundle_objects_are_content_addressed_and_encrypted(settings, topology):
    evaluation = evaluate(settings.stack, stack_config(settings.stack))
    objects = {r.name: r for r in evaluation.resources if r.type == "aws:s3/bucketObjectv2:BucketObjectv2"}
    for spec in host_specs(settings, topology):
        content = bundles.render_bundle(spec, settings, topology)
        obj = objects[f"bundles-{spec.host.name}"]
        assert obj.props["content"].encode() == content
        assert obj.props["key"] == f"bundles/{spec.host.name}/{bundles.digest(content)}.json"
        assert obj.props["serverSideEncryption"] == "aws:kms" and obj.props["kmsKeyId"].endswith("data-key")


def test_every_host_file_is_in_its_bundle_byte_for_byte_with_a_change_rule(settings, topology):
    for spec in host_specs(settings, topology):
        document = json.loads(bundles.render_bundle(spec, settings, topology))
        files = {f["path"]: f for f in document["files"]}
        for file in spec.files:
            assert files[file.path]["content"].encode() == file.content, file.path
            assert (files[file.path]["mode"], files[file.path]["owner"]) == (file.mode, file.owner)
        assert bundles.AGENT_COMMAND in files
        for entry in document["files"]:
            assert entry["on_change"] in ("none", "reload", "restart")
            assert entry["on_change"] == "none" or entry["unit"] in {s["unit"] for s in document["services"]}, entry["path"]


def test_a_file_without_a_change_rule_is_refused():
    with pytest.raises(ValueError, match="no change rule for /etc/unheard-of.conf"):
        bundles.change_rule("/etc/unheard-of.conf")


def test_each_host_role_reads_only_its_own_bundles(stack):
    evaluation = evaluate(stack, stack_config(stack))
    settings = load_settings(stack_config(stack), stack)
    topology = build_topology(settings)
    policies = {r.name.removesuffix("-access"): json.loads(r.props["policy"]) for r in evaluation.resources
                if r.type == "aws:iam/rolePolicy:RolePolicy"}
    for host in topology.hosts:
        (name,) = [n for n in policies if n.endswith(f"-{host.name}")]
        statements = {s.get("Sid"): s for s in policies[name]["Statement"]}
        assert statements["ReadOwnBundles"]["Resource"] == [
            f"arn:aws:s3:::{topology.bundle_bucket}/bundles/{host.name}/*"]
        parameter = bundles.digest_parameter_name(settings.environment, host.name)
        assert statements["ReadOwnBundleDigest"]["Resource"] == [
            f"arn:aws:ssm:{settings.region}:123456789012:parameter{parameter}"]


def test_every_rollout_parameter_passes_the_documents_allowed_pattern(stack):
    """SSM refuses an association whose parameter does not match the document's allowedPattern."""
    import re

    evaluation = evaluate(stack, stack_config(stack))
    (document,) = [r for r in evaluation.resources if r.type == "aws:ssm/document:Document"]
    pattern = json.loads(document.props["content"])["parameters"]["digests"]["allowedPattern"]
    for association in (r for r in evaluation.resources if r.type == "aws:ssm/association:Association"):
        assert re.fullmatch(pattern, association.props["parameters"]["digests"]), association.name
    assert not re.fullmatch(pattern, '{"pg-1": "$(reboot)"}')
