"""Every validator, run the way the Pulumi engine runs it: compliant, violating, and with unknown values."""

from __future__ import annotations

import base64
import gzip
import json

import pytest
from guardrail_cases import (
    PROMETHEUS_ARGS,
    UNKNOWN_ARRAY,
    UNKNOWN_BOOLEAN,
    UNKNOWN_NUMBER,
    UNKNOWN_OBJECT,
    UNKNOWN_STRING,
    changed,
    cloud_config,
    compliant_stack,
    find,
    prometheus_defaults,
    run_policy,
    urn,
)

from policies.engine import evaluate
from policies.rules import RULES, RULES_BY_NAME
from policies.rules.compute import MAX_USER_DATA_BYTES as USER_DATA_LIMIT

MONITORING = "monitoring-monitoring-1"
TSDB = "monitoring-monitoring-1-prometheus-tsdb"
PG_VOLUME = "patroni-pg-1-postgres-data"
BACKUPS = "backups-backups"
BACKUPS_LIFECYCLE = "backups-backups-lifecycle"
AUDIT = "backups-audit"
AUDIT_LOCK = "backups-audit-object-lock"
AUDIT_LIFECYCLE = "backups-audit-lifecycle"
PUBLIC_ACCESS = "backups-backups-public-access"


def _prometheus_args(args: str):
    def change(props):
        props["userData"] = cloud_config({"/etc/default/prometheus": prometheus_defaults(args)})
    return change


def _lifecycle_rule(rule_id: str, change):
    def apply(props):
        (rule,) = [r for r in props["rules"] if r["id"] == rule_id]
        change(rule)
    return apply


def _policy_statement(statement: dict):
    def change(props):
        props["policy"] = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    return change


def _user_data_base64(raw: bytes):
    def change(props):
        props.pop("userData")
        props["userDataBase64"] = base64.b64encode(raw).decode()
    return change


# (rule, resource changed, change, text every message must contain: the value found)
VIOLATIONS = [
    ("prometheus-retention", MONITORING, _prometheus_args(PROMETHEUS_ARGS.replace("retention.time=30d", "retention.time=15d")),
     "retention time 15d"),
    ("prometheus-retention", MONITORING, _prometheus_args("--config.file=/etc/prometheus/prometheus.yml"),
     "default 15d"),
    ("prometheus-retention", MONITORING, _prometheus_args(PROMETHEUS_ARGS.replace(" --storage.tsdb.retention.time=30d", "")),
     "no time retention"),
    ("prometheus-retention", MONITORING, _prometheus_args(PROMETHEUS_ARGS.replace("retention.time=30d", "retention.time=0s")),
     "no time retention"),
    ("prometheus-retention", MONITORING, _prometheus_args(PROMETHEUS_ARGS.replace("retention.time=30d", "retention.time 7d")),
     "retention time 7d"),
    ("prometheus-retention", MONITORING, _prometheus_args(PROMETHEUS_ARGS.replace("retention.size=42GB", "retention.size=48GB")),
     "retention size 48GB"),
    ("prometheus-retention", MONITORING, _prometheus_args(PROMETHEUS_ARGS.replace(" --storage.tsdb.retention.size=42GB", "")),
     "no --storage.tsdb.retention.size"),
    ("prometheus-retention", MONITORING, _prometheus_args(PROMETHEUS_ARGS.replace("retention.time=30d", "retention.time=thirty")),
     "'thirty' is not a duration"),
    ("prometheus-retention", MONITORING, lambda p: p.update(userData=cloud_config({"/etc/hosts": "127.0.0.1 localhost\n"})),
     "write no /etc/default/prometheus"),
    ("prometheus-retention", TSDB, lambda p: p["tags"].update(Role="scratch"), "no prometheus-tsdb volume"),
    ("prometheus-retention", MONITORING, lambda p: p.update(userData="#cloud-config\nwrite_files: [\n"),
     "not valid #cloud-config YAML"),
    ("backup-verification-retention", BACKUPS_LIFECYCLE,
     _lifecycle_rule("backup-verification", lambda r: r.update(expiration={"days": 30})), "expires after 30 days"),
    ("backup-verification-retention", BACKUPS_LIFECYCLE, _lifecycle_rule("backup-verification", lambda r: r.pop("expiration")),
     "no lifecycle expiration"),
    ("backup-verification-retention", BACKUPS_LIFECYCLE,
     lambda p: p["rules"].append({"id": "all", "status": "Enabled", "filter": {"prefix": ""}, "expiration": {"days": 7}}),
     "expires after 7 days"),
    ("backup-archive-glacier", BACKUPS_LIFECYCLE,
     _lifecycle_rule("archive-to-glacier", lambda r: r.update(transitions=[{"days": 30, "storageClass": "STANDARD_IA"}])),
     "STANDARD_IA"),
    ("backup-archive-glacier", BACKUPS_LIFECYCLE, _lifecycle_rule("archive-to-glacier", lambda r: r.update(status="Disabled")),
     "no transition"),
    ("audit-log-retention", AUDIT, lambda p: p.update(objectLockEnabled=False), "objectLockEnabled is False"),
    ("audit-log-retention", AUDIT_LOCK, lambda p: p["rule"]["defaultRetention"].update(mode="GOVERNANCE"), "'GOVERNANCE'"),
    ("audit-log-retention", AUDIT_LOCK, lambda p: p["rule"]["defaultRetention"].update(years=1), "default retention 1 years"),
    ("audit-log-retention", AUDIT_LOCK, lambda p: p.update(bucket="some-other-bucket"), "no BucketObjectLockConfiguration"),
    ("audit-log-retention", AUDIT_LIFECYCLE,
     _lifecycle_rule("audit-to-deep-archive", lambda r: r.update(expiration={"days": 365})), "expire after 365 days"),
    ("prometheus-tsdb-volume", TSDB, lambda p: p.update(size=20), "size is 20 GiB"),
    ("prometheus-tsdb-volume", TSDB, lambda p: p.update(type="st1"), "type is 'st1'"),
    ("prometheus-tsdb-volume", TSDB, lambda p: p.update(type="standard"), "type is 'standard'"),
    ("data-volume-encrypted-ssd", PG_VOLUME, lambda p: p.update(encrypted=False), "encrypted is False"),
    ("data-volume-encrypted-ssd", PG_VOLUME, lambda p: p.pop("encrypted"), "encrypted is None"),
    ("data-volume-encrypted-ssd", PG_VOLUME, lambda p: p.update(type="sc1"), "type is 'sc1'"),
    ("data-volume-encrypted-ssd", "patroni-pg-1", lambda p: p["rootBlockDevice"].update(encrypted=False),
     "root block device encrypted is False"),
    ("s3-public-access-block", PUBLIC_ACCESS, lambda p: p.update(ignorePublicAcls=False), "ignorePublicAcls=False"),
    ("s3-public-access-block", PUBLIC_ACCESS, lambda p: p.update(bucket="elsewhere"), "no BucketPublicAccessBlock"),
    ("s3-sse-kms", "backups-audit-encryption",
     lambda p: p["rules"][0]["applyServerSideEncryptionByDefault"].update(sseAlgorithm="AES256"), "'AES256'"),
    ("s3-versioning", "backups-backups-versioning", lambda p: p["versioningConfiguration"].update(status="Suspended"),
     "versioning status 'Suspended'"),
    ("s3-deny-non-tls", "backups-backups-tls-only",
     _policy_statement({"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:root"}, "Action": "s3:GetObject",
                        "Resource": "*"}),
     "no Deny on aws:SecureTransport=false"),
    ("s3-deny-non-tls", "backups-audit-tls-only", lambda p: p.update(bucket="elsewhere"), "no BucketPolicy"),
    ("no-public-ingress", "network-endpoints-https", lambda p: p.update(cidrIpv4="0.0.0.0/0", fromPort=5432, toPort=5432),
     "ports 5432-5432/tcp open to 0.0.0.0/0"),
    ("no-public-ingress", "network-endpoints-https", lambda p: p.update(cidrIpv4=None, cidrIpv6="::/0", ipProtocol="-1"),
     "all traffic open to ::/0"),
    ("no-public-ingress", "network-postgres",
     lambda p: p.update(ingress=[{"protocol": "tcp", "fromPort": 9000, "toPort": 9100, "cidrBlocks": ["0.0.0.0/0"]}]),
     "service ports [9000, 9090, 9093, 9094, 9100]"),
    ("imdsv2-required", "patroni-pg-1", lambda p: p["metadataOptions"].update(httpTokens="optional"), "httpTokens is 'optional'"),
    ("imdsv2-required", "patroni-pg-1", lambda p: p.pop("metadataOptions"), "httpTokens is None"),
    ("iam-least-privilege", "monitoring-monitoring-1-access",
     _policy_statement({"Sid": "Everything", "Effect": "Allow", "Action": "*", "Resource": "arn:aws:s3:::b/*"}), "['*']"),
    ("iam-least-privilege", "monitoring-monitoring-1-access",
     _policy_statement({"Sid": "AllS3", "Effect": "Allow", "Action": ["s3:*"], "Resource": "arn:aws:s3:::b/*"}), "['s3:*']"),
    ("iam-least-privilege", "monitoring-monitoring-1-access",
     _policy_statement({"Sid": "AnyBucket", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "*"}),
     "grants ['s3:GetObject'] on Resource '*'"),
    ("iam-least-privilege", "monitoring-monitoring-1-role",
     lambda p: p.update(inlinePolicies=[{"name": "wide", "policy": json.dumps(
         {"Statement": [{"Effect": "Allow", "NotAction": "iam:*", "Resource": "arn:aws:s3:::b"}]})}]),
     "NotAction 'iam:*'"),
    ("elasticache-encryption", "redis", lambda p: p.update(transitEncryptionEnabled=False), "transitEncryptionEnabled is False"),
    ("elasticache-encryption", "redis", lambda p: p.pop("atRestEncryptionEnabled"), "atRestEncryptionEnabled is None"),
    ("user-data-size", MONITORING, lambda p: p.update(userData="#" * (USER_DATA_LIMIT + 1)), "user data is 16,385 bytes raw"),
    # 8,193 characters, but each "é" is two bytes in UTF-8: 16,385 bytes.
    ("user-data-size", MONITORING, lambda p: p.update(userData="#" + "é" * (USER_DATA_LIMIT // 2)),
     "user data is 16,385 bytes raw (8,193 characters in UTF-8)"),
    ("user-data-size", MONITORING, _user_data_base64(b"#" * (USER_DATA_LIMIT + 1)),
     "user data is 16,385 bytes raw (decoded from base64 userDataBase64)"),
    ("user-data-size", MONITORING, lambda p: (p.pop("userData"), p.update(userDataBase64="#cloud-config\n")),
     "userDataBase64 is not valid base64"),
    # The compliant stack is dev's shape (no replica); the same bucket in prod must have its second copy.
    ("backup-replication", BACKUPS, lambda p: p["tags"].update(Environment="prod"),
     "no BucketReplicationConfig: the only copy is in this region"),
    ("backup-replication", AUDIT, lambda p: p["tags"].update(Environment="prod"), "no BucketReplicationConfig"),
]


@pytest.mark.parametrize("rule", [rule.name for rule in RULES])
def test_the_compliant_stack_passes(rule):
    assert run_policy(rule, compliant_stack()) == []


def test_every_rule_has_a_violating_case():
    assert {case[0] for case in VIOLATIONS} == set(RULES_BY_NAME)


@pytest.mark.parametrize(("rule", "name", "change", "found"), VIOLATIONS,
                         ids=[f"{c[0]}:{c[3]}" for c in VIOLATIONS])
def test_a_violation_names_the_resource_the_value_and_the_rule(rule, name, change, found):
    reported = run_policy(rule, changed(name, change))
    assert reported, f"{rule} accepted the change to {name}"
    messages = [message for _, message in reported]
    assert all(f"[rule {rule}:" in m for m in messages), messages
    assert any(found in m for m in messages), messages
    # The violation is pinned to a resource of the stack (its URN), named in the message.
    by_urn = {urn(r): r["name"] for r in changed(name, change)}
    for urn_, message in reported:
        assert urn_ in by_urn and repr(by_urn[urn_]) in message, (urn_, message)


def _set(path, value):
    def change(props):
        target = props
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return change


# During a preview, values computed by the cloud are unknown: a rule must neither crash nor object.
UNKNOWNS = [
    ("prometheus-retention", MONITORING, _set(["userData"], UNKNOWN_STRING)),
    ("prometheus-retention", TSDB, _set(["size"], UNKNOWN_NUMBER)),
    ("prometheus-retention", TSDB, _set(["tags"], UNKNOWN_OBJECT)),  # then only the attachment can tell
    ("backup-verification-retention", BACKUPS_LIFECYCLE, _set(["bucket"], UNKNOWN_STRING)),
    ("backup-verification-retention", BACKUPS_LIFECYCLE, _set(["rules"], UNKNOWN_ARRAY)),
    ("backup-verification-retention", BACKUPS_LIFECYCLE, _set(["rules", 0, "expiration", "days"], UNKNOWN_NUMBER)),
    ("backup-archive-glacier", BACKUPS_LIFECYCLE, _set(["rules", 2, "transitions", 0, "storageClass"], UNKNOWN_STRING)),
    ("audit-log-retention", AUDIT, _set(["objectLockEnabled"], UNKNOWN_BOOLEAN)),
    ("audit-log-retention", AUDIT_LOCK, _set(["bucket"], UNKNOWN_STRING)),
    ("audit-log-retention", AUDIT_LOCK, _set(["rule"], UNKNOWN_OBJECT)),
    ("backup-replication", BACKUPS, _set(["tags"], UNKNOWN_OBJECT)),
    ("prometheus-tsdb-volume", TSDB, _set(["size"], UNKNOWN_NUMBER)),
    ("prometheus-tsdb-volume", TSDB, _set(["type"], UNKNOWN_STRING)),
    ("data-volume-encrypted-ssd", PG_VOLUME, _set(["encrypted"], UNKNOWN_BOOLEAN)),
    ("data-volume-encrypted-ssd", "patroni-pg-1", _set(["rootBlockDevice"], UNKNOWN_OBJECT)),
    ("s3-public-access-block", PUBLIC_ACCESS, _set(["bucket"], UNKNOWN_STRING)),
    ("s3-public-access-block", PUBLIC_ACCESS, _set(["blockPublicAcls"], UNKNOWN_BOOLEAN)),
    ("s3-sse-kms", "backups-audit-encryption", _set(["rules"], UNKNOWN_ARRAY)),
    ("s3-versioning", "backups-backups-versioning", _set(["versioningConfiguration", "status"], UNKNOWN_STRING)),
    ("s3-deny-non-tls", "backups-backups-tls-only", _set(["policy"], UNKNOWN_STRING)),
    ("no-public-ingress", "network-endpoints-https", _set(["cidrIpv4"], UNKNOWN_STRING)),
    ("no-public-ingress", "network-postgres", _set(["ingress"], UNKNOWN_ARRAY)),
    ("imdsv2-required", "patroni-pg-1", _set(["metadataOptions"], UNKNOWN_OBJECT)),
    ("imdsv2-required", "patroni-pg-1", _set(["metadataOptions", "httpTokens"], UNKNOWN_STRING)),
    ("iam-least-privilege", "monitoring-monitoring-1-access", _set(["policy"], UNKNOWN_STRING)),
    ("elasticache-encryption", "redis", _set(["transitEncryptionEnabled"], UNKNOWN_BOOLEAN)),
    ("user-data-size", MONITORING, _set(["userData"], UNKNOWN_STRING)),
    ("user-data-size", MONITORING, lambda p: (p.pop("userData"), p.update(userDataBase64=UNKNOWN_STRING))),
]


@pytest.mark.parametrize(("rule", "name", "change"), UNKNOWNS, ids=[f"{c[0]}:{c[1]}:{i}" for i, c in enumerate(UNKNOWNS)])
def test_unknown_values_are_neither_a_crash_nor_a_violation(rule, name, change):
    assert run_policy(rule, changed(name, change)) == []


def test_every_rule_has_an_unknown_case():
    assert {case[0] for case in UNKNOWNS} == set(RULES_BY_NAME)


def test_an_unknown_value_does_not_hide_a_known_violation():
    """The bucket id is unknown in a preview, but the engine's property dependencies still join the two."""
    resources = changed(BACKUPS_LIFECYCLE, _lifecycle_rule("backup-verification", lambda r: r.update(expiration={"days": 30})))
    find(resources, BACKUPS_LIFECYCLE)["props"]["bucket"] = UNKNOWN_STRING
    reported = run_policy("backup-verification-retention", resources, dependencies={BACKUPS_LIFECYCLE: {"bucket": [BACKUPS]}})
    assert [m for _, m in reported if "expires after 30 days" in m]


def test_the_tsdb_volume_is_found_through_its_attachment_when_tags_say_nothing():
    resources = changed(TSDB, lambda p: p.update(size=50, tags={"Role": "prometheus-tsdb"}))
    find(resources, MONITORING)["props"]["userData"] = cloud_config({"/etc/default/prometheus": prometheus_defaults(
        PROMETHEUS_ARGS.replace("retention.size=42GB", "retention.size=45GB"))})
    reported = run_policy("prometheus-retention", resources)
    assert [m for _, m in reported if "retention size 45GB" in m and TSDB in m], reported


def test_the_bundle_a_host_applies_is_what_counts_for_its_retention():
    """Hosts boot from a stub; their files arrive as a bundle object tagged with the host, which the agent
    applies over whatever the user data wrote."""
    resources = compliant_stack()
    host = find(resources, MONITORING)["props"]["tags"]["Host"]
    bundle = {"files": [{"path": "/etc/default/prometheus", "content": prometheus_defaults(
        PROMETHEUS_ARGS.replace("retention.time=30d", "retention.time=15d"))}]}
    resources.append({"type": "aws:s3/bucketObjectv2:BucketObjectv2", "name": f"bundles-{host}", "parent": None,
                      "props": {"key": f"bundles/{host}/abc.json", "content": json.dumps(bundle), "tags": {"Host": host}}})
    assert [m for _, m in run_policy("prometheus-retention", resources) if "retention time 15d" in m]
    find(resources, f"bundles-{host}")["props"]["content"] = UNKNOWN_STRING
    assert not run_policy("prometheus-retention", resources)  # unknown during a preview: no verdict


def test_policy_config_thresholds_apply():
    """A stack's policy config can tighten a rule: 30d is too short once minRetentionDays is 60."""
    assert run_policy("prometheus-retention", compliant_stack(), config={"minRetentionDays": 60.0})
    assert run_policy("prometheus-tsdb-volume", compliant_stack(), config={"minSizeGiB": 100})
    assert not run_policy("prometheus-tsdb-volume", compliant_stack(), config={"minSizeGiB": 50})


def test_only_world_open_service_ports_are_violations():
    https = changed("network-endpoints-https", lambda p: p.update(cidrIpv4="0.0.0.0/0"))
    assert run_policy("no-public-ingress", https) == []  # 443 is not a service port of this platform


def test_actions_aws_grants_only_on_star_may_use_it():
    statement = {"Sid": "Discovery", "Effect": "Allow", "Action": ["ec2:DescribeInstances", "ec2:DescribeTags"], "Resource": "*"}
    assert run_policy("iam-least-privilege", changed("monitoring-monitoring-1-access", _policy_statement(statement))) == []


def test_gzip_base64_user_data_is_read():
    text = cloud_config({"/etc/default/prometheus": prometheus_defaults(PROMETHEUS_ARGS.replace("30d", "7d"))})
    encoded = base64.b64encode(gzip.compress(text.encode())).decode()
    resources = changed(MONITORING, lambda p: (p.pop("userData"), p.update(userDataBase64=encoded)))
    assert [m for _, m in run_policy("prometheus-retention", resources) if "retention time 7d" in m]



# --- user-data-size: EC2 takes at most 16 KB of user data in raw form, before base64 ----------------------------

LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"


def _with_launch_template(user_data) -> list[dict]:
    """The compliant stack plus a launch template, whose userData the provider takes as base64 already."""
    template = {"type": LAUNCH_TEMPLATE, "name": "workers-template", "parent": None, "props": {
        "imageId": "ami-0debian12offline0", "instanceType": "t3.medium",
        "metadataOptions": {"httpTokens": "required", "httpEndpoint": "enabled"}, "userData": user_data,
    }}
    return [*compliant_stack(), template]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_the_user_data_limit_is_ec2s_16_kib():
    assert USER_DATA_LIMIT == 16_384
    assert RULES_BY_NAME["user-data-size"].config_schema == {}  # a fixed API limit: nothing to configure


def test_a_user_data_violation_reads_as_every_other():
    reported = run_policy("user-data-size", changed(MONITORING, lambda p: p.update(userData="#" * 48_692)))
    assert reported == [(urn(find(compliant_stack(), MONITORING)),
                         "Instance 'monitoring-monitoring-1': user data is 48,692 bytes raw "
                         "[rule user-data-size: EC2 accepts at most 16,384 bytes of user data before base64]")]


@pytest.mark.parametrize("change", [
    lambda p: p.update(userData="#" * USER_DATA_LIMIT),
    lambda p: p.update(userData="é" * (USER_DATA_LIMIT // 2)),  # 16,384 bytes of two-byte characters
    lambda p: p.update(userData=""),
    lambda p: p.pop("userData"),
    _user_data_base64(b"#" * USER_DATA_LIMIT),
    # What EC2 counts is the raw (here gzip-compressed) bytes, not what cloud-init unpacks them into.
    _user_data_base64(gzip.compress(b"#cloud-config\n" + b"# padding\n" * 10_000)),
], ids=["userData-16384-ascii", "userData-16384-utf8", "userData-empty", "no-user-data", "userDataBase64-16384",
        "userDataBase64-gzip"])
def test_instance_user_data_up_to_the_limit_passes(change):
    assert run_policy("user-data-size", changed(MONITORING, change)) == []


@pytest.mark.parametrize("user_data", [
    _b64(b"#" * USER_DATA_LIMIT),
    base64.encodebytes(b"#" * USER_DATA_LIMIT).decode(),  # MIME line breaks, skipped as the provider's decoder does
    None,
    UNKNOWN_STRING,
])
def test_a_launch_template_up_to_the_limit_or_unknown_passes(user_data):
    assert run_policy("user-data-size", _with_launch_template(user_data)) == []


@pytest.mark.parametrize(("user_data", "found"), [
    (_b64(b"#" * (USER_DATA_LIMIT + 1)), "user data is 16,385 bytes raw (decoded from base64 userData)"),
    (_b64("é".encode() * (USER_DATA_LIMIT // 2) + b"#"), "user data is 16,385 bytes raw (decoded from base64 userData)"),
    # A launch template's userData is base64 already: raw #cloud-config text there is refused, not counted.
    ("#cloud-config\nhostname: worker\n", "userData is not valid base64"),
    (_b64(b"#" * 30)[:-1], "userData is not valid base64"),  # truncated: padding missing
])
def test_a_launch_template_over_the_limit_or_not_base64_is_a_violation(user_data, found):
    reported = run_policy("user-data-size", _with_launch_template(user_data))
    assert [urn_.rsplit("::", 1)[-1] for urn_, _ in reported] == ["workers-template"], reported
    (message,) = [m for _, m in reported]
    assert message.startswith("LaunchTemplate 'workers-template': ") and found in message, message
    assert message.endswith("[rule user-data-size: EC2 accepts at most 16,384 bytes of user data before base64]")


def test_no_policy_config_raises_the_user_data_limit():
    oversized = changed(MONITORING, lambda p: p.update(userData="#" * (USER_DATA_LIMIT + 1)))
    assert run_policy("user-data-size", oversized, config={"maxBytes": 65_536, "limit": 65_536})


def test_the_offline_plan_skips_user_data_it_cannot_see():
    """The plan writes unknown values as "[unknown]" and secrets as "[secret]": neither is the user data."""
    def size_violations(resources):
        return [v for v in evaluate(resources, "dev", "dev") if v.policy == "user-data-size"]

    for masked in ("[unknown]", "[secret]"):
        assert size_violations(_with_launch_template(masked)) == [], masked
        assert size_violations(changed(MONITORING, lambda p, masked=masked: p.update(userData=masked))) == [], masked
    violations = evaluate(_with_launch_template(_b64(b"#" * (USER_DATA_LIMIT + 1))), "prod", "prod")
    assert [(v.policy, v.enforcement, v.resource) for v in violations] == [
        ("user-data-size", "mandatory", f"{LAUNCH_TEMPLATE}::workers-template")]
