"""Every validator, run the way the Pulumi engine runs it: compliant, violating, and with unknown values."""

from __future__ import annotations

import base64
import copy
import gzip
import json

import pytest
from guardrail_cases import (
    ACCOUNT,
    AUDIT_BUCKET,
    BACKUP_BUCKET,
    KEY_ADMIN,
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
DATA_KEY = "data-key"
VPC = "network-vpc"
FLOW_LOG = "network-flow-log"
FLOW_LOG_GROUP = "network-flow-logs"
DEFAULT_GROUP = "network-default-group"
INTERNET_HTTPS = "network-postgres-egress-internet-443"
TRAIL = "backups-data-access-trail"
DATA_ACCESS_LIFECYCLE = "backups-data-access-logs-lifecycle"
ROOT_ARN = f"arn:aws:iam::{ACCOUNT}:root"


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


def _key_statements(change):
    """Change the key policy's statements (a list, in the JSON text of `policy`)."""
    def apply(props):
        document = json.loads(props["policy"])
        change(document["Statement"])
        props["policy"] = json.dumps(document)
    return apply


def _key_statement(sid: str, change):
    def apply(statements):
        (statement,) = [s for s in statements if s.get("Sid") == sid]
        change(statement)
    return _key_statements(apply)


def _without_statement(sid: str):
    return _key_statements(lambda statements: statements.remove(next(s for s in statements if s.get("Sid") == sid)))


def _with_statement(statement: dict):
    return _key_statements(lambda statements: statements.append(statement))


ADMINISTRATION, KEY_USE, GUARD = "KeyAdministration", "UseThroughAwsServices", "OnlyAdministratorsMayDisableOrDelete"


def _wildcard_administrators(statements):
    """Administrators named by a pattern (ArnNotLike), one of whom may encrypt."""
    for statement in statements:
        if statement.get("Sid") == GUARD:
            statement["Condition"] = {"ArnNotLike": {"aws:PrincipalArn": f"arn:aws:iam::{ACCOUNT}:role/key-admin-*"}}
        if statement.get("Sid") == ADMINISTRATION:
            statement["Principal"] = {"AWS": f"arn:aws:iam::{ACCOUNT}:role/key-admin-alice"}
            statement["Action"] = [*statement["Action"], "kms:Encrypt*"]


def _selector(change):
    def apply(props):
        change(props["eventSelectors"][0])
    return apply


def _data_resource(change):
    return _selector(lambda selector: change(selector["dataResources"][0]))


INTERNET = {"cidrIpv4": "0.0.0.0/0"}
DATA_ACCESS_ADVANCED = [{"name": "backups-objects", "fieldSelectors": [
    {"field": "eventCategory", "equals": ["Data"]},
    {"field": "resources.type", "equals": ["AWS::S3::Object"]},
    {"field": "resources.ARN", "startsWith": [f"arn:aws:s3:::{BACKUP_BUCKET}/", f"arn:aws:s3:::{AUDIT_BUCKET}/"]},
]}]


def _advanced_selectors(*extra_fields: dict):
    def apply(props):
        props.pop("eventSelectors")
        selectors = json.loads(json.dumps(DATA_ACCESS_ADVANCED))
        selectors[0]["fieldSelectors"].extend(extra_fields)
        props["advancedEventSelectors"] = selectors
    return apply


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
    # kms-key-policy: a policy of its own, nothing broad, deletion and disabling denied but to administrators who cannot use it.
    ("kms-key-policy", DATA_KEY, lambda p: p.pop("policy"), "no key policy: AWS's default gives every KMS action to IAM"),
    ("kms-key-policy", DATA_KEY, lambda p: p.update(policy=""), "no key policy"),
    ("kms-key-policy", DATA_KEY, lambda p: p.update(policy="{'Statement': []"), "not a JSON policy document"),
    # AWS's default statement, "Enable IAM User Permissions".
    ("kms-key-policy", DATA_KEY, _with_statement({"Sid": "EnableIamUserPermissions", "Effect": "Allow",
                                                  "Principal": {"AWS": ROOT_ARN}, "Action": "kms:*", "Resource": "*"}),
     f"statement 'EnableIamUserPermissions' allows ['kms:*'] to ['{ROOT_ARN}']"),
    ("kms-key-policy", DATA_KEY, _with_statement({"Effect": "Allow", "Principal": {"AWS": ROOT_ARN}, "Action": ["*"],
                                                  "Resource": "*"}), "statement '#4' allows ['*']"),
    ("kms-key-policy", DATA_KEY, _with_statement({"Sid": "AllButDeletion", "Effect": "Allow", "Principal": {"AWS": ROOT_ARN},
                                                  "NotAction": "kms:ScheduleKeyDeletion", "Resource": "*"}),
     "statement 'AllButDeletion' allows NotAction 'kms:ScheduleKeyDeletion'"),
    ("kms-key-policy", DATA_KEY, _key_statement(KEY_USE, lambda s: (s.pop("Condition"), s.update(Principal="*"))),
     "statement 'UseThroughAwsServices' allows ['kms:Encrypt', 'kms:Decrypt', 'kms:ReEncrypt*', 'kms:GenerateDataKey*', "
     "'kms:DescribeKey'] to every principal ('*') without a Condition"),
    ("kms-key-policy", DATA_KEY, _without_statement(GUARD),
     "nothing denies kms:ScheduleKeyDeletion, kms:DisableKey, kms:DisableKeyRotation, kms:PutKeyPolicy to every principal but "
     "the administrators"),
    ("kms-key-policy", DATA_KEY, _key_statement(GUARD, lambda s: s.update(Action=["kms:ScheduleKeyDeletion"])),
     "nothing denies kms:DisableKey, kms:DisableKeyRotation, kms:PutKeyPolicy"),
    ("kms-key-policy", DATA_KEY, _key_statement(GUARD, lambda s: s["Condition"].update(
        Bool={"aws:MultiFactorAuthPresent": "false"})),
     "statement 'OnlyAdministratorsMayDisableOrDelete' applies only when Bool ['aws:MultiFactorAuthPresent'] also holds"),
    ("kms-key-policy", DATA_KEY, _key_statement(GUARD, lambda s: s.update(
        Condition={"StringNotEquals": {"aws:username": "admin"}})), "applies only when StringNotEquals ['aws:username']"),
    ("kms-key-policy", DATA_KEY, _key_statement(GUARD, lambda s: s.pop("Condition")),
     "has no Condition naming administrators: nobody could manage the key"),
    ("kms-key-policy", DATA_KEY, _key_statement(GUARD, lambda s: s.update(Principal={"AWS": ROOT_ARN})),
     f"denies them only to {{'AWS': '{ROOT_ARN}'}}"),
    ("kms-key-policy", DATA_KEY, _key_statement(ADMINISTRATION, lambda s: s["Action"].append("kms:Decrypt")),
     f"administrators' statement 'KeyAdministration' ({KEY_ADMIN}) allows kms:Decrypt (by 'kms:Decrypt')"),
    # AWS's console set: kms:Create* takes in kms:CreateGrant.
    ("kms-key-policy", DATA_KEY, _key_statement(ADMINISTRATION, lambda s: s["Action"].append("kms:Create*")),
     "allows kms:CreateGrant (by 'kms:Create*'), which can hand the key's use to anyone"),
    ("kms-key-policy", DATA_KEY, _key_statement(ADMINISTRATION, lambda s: s.update(Action="kms:*")),
     "kms:GenerateDataKey (by 'kms:*')"),
    ("kms-key-policy", DATA_KEY, _key_statements(_wildcard_administrators),
     f"(arn:aws:iam::{ACCOUNT}:role/key-admin-alice) allows kms:Encrypt (by 'kms:Encrypt*')"),
    # vpc-flow-logs: every flow, to an encrypted group with a retention.
    ("vpc-flow-logs", FLOW_LOG, lambda p: p.update(vpcId="vpc-elsewhere"), "Vpc 'network-vpc': no flow log"),
    ("vpc-flow-logs", FLOW_LOG, lambda p: p.update(trafficType="REJECT"), "records trafficType ['REJECT'] only"),
    ("vpc-flow-logs", FLOW_LOG_GROUP, lambda p: p.pop("kmsKeyId"), "flow logs of VPC 'network-vpc': no kmsKeyId"),
    ("vpc-flow-logs", FLOW_LOG_GROUP, lambda p: p.pop("retentionInDays"), "retentionInDays is None, kept forever"),
    ("vpc-flow-logs", FLOW_LOG_GROUP, lambda p: p.update(retentionInDays=0), "retentionInDays is 0, kept forever"),
    ("vpc-flow-logs", FLOW_LOG_GROUP, lambda p: p.update(retentionInDays=30), "kept 30 days"),
    # vpc-default-security-group-closed: taken over, no rules.
    ("vpc-default-security-group-closed", DEFAULT_GROUP, lambda p: p.update(vpcId="vpc-elsewhere"),
     "Vpc 'network-vpc': no DefaultSecurityGroup: AWS's default group keeps its allow-all rules"),
    ("vpc-default-security-group-closed", DEFAULT_GROUP,
     lambda p: p.update(ingress=[{"protocol": "-1", "fromPort": 0, "toPort": 0, "self": True}]), "ingress -1 0-0 ['self']"),
    ("vpc-default-security-group-closed", DEFAULT_GROUP,
     lambda p: p.update(egress=[{"protocol": "-1", "fromPort": 0, "toPort": 0, "cidrBlocks": ["0.0.0.0/0"]}]),
     "egress -1 0-0 ['0.0.0.0/0']"),
    ("vpc-default-security-group-closed", "network-postgres-egress-vpc-0",
     lambda p: p.update(securityGroupId="network-default-group_id"),
     "SecurityGroupEgressRule 'network-postgres-egress-vpc-0' adds a rule to it"),
    # sg-egress-narrow: to the internet only TCP 80, 443, 587.
    ("sg-egress-narrow", INTERNET_HTTPS, lambda p: p.update(ipProtocol="-1", fromPort=None, toPort=None),
     "all traffic (protocol '-1') to 0.0.0.0/0"),
    ("sg-egress-narrow", INTERNET_HTTPS, lambda p: p.update(fromPort=0, toPort=65535), "ports 0-65535/tcp to 0.0.0.0/0"),
    ("sg-egress-narrow", INTERNET_HTTPS, lambda p: p.update(fromPort=80, toPort=443), "ports 80-443/tcp"),
    ("sg-egress-narrow", INTERNET_HTTPS, lambda p: p.update(ipProtocol="udp", fromPort=53, toPort=53), "protocol 'udp'"),
    ("sg-egress-narrow", INTERNET_HTTPS, lambda p: (p.pop("cidrIpv4"), p.update(cidrIpv6="::/0", fromPort=22, toPort=22)),
     "port 22/tcp to ::/0"),
    ("sg-egress-narrow", "network-postgres",
     lambda p: p.update(egress=[{"protocol": "-1", "fromPort": 0, "toPort": 0, "cidrBlocks": ["0.0.0.0/0"]}]),
     "SecurityGroup 'network-postgres': all traffic (protocol '-1') to 0.0.0.0/0"),
    # s3-abort-incomplete-uploads: an enabled whole-bucket rule, within 7 days.
    ("s3-abort-incomplete-uploads", BACKUPS_LIFECYCLE,
     lambda p: p.update(rules=[r for r in p["rules"] if r["id"] != "abort-incomplete-uploads"]),
     "Bucket 'backups-backups': no lifecycle rule aborts incomplete multipart uploads"),
    ("s3-abort-incomplete-uploads", BACKUPS_LIFECYCLE, _lifecycle_rule("abort-incomplete-uploads", lambda r: r.update(
        status="Disabled")), "rule 'abort-incomplete-uploads' is not enabled"),
    ("s3-abort-incomplete-uploads", BACKUPS_LIFECYCLE, _lifecycle_rule("abort-incomplete-uploads", lambda r: r.update(
        filter={"prefix": "pgbackrest/"})), "rule 'abort-incomplete-uploads' applies only to {'prefix': 'pgbackrest/'}"),
    ("s3-abort-incomplete-uploads", AUDIT_LIFECYCLE, _lifecycle_rule("abort-incomplete-uploads", lambda r: r.update(
        filter={"objectSizeGreaterThan": 1048576})), "applies only to {'objectSizeGreaterThan': 1048576}"),
    ("s3-abort-incomplete-uploads", AUDIT_LIFECYCLE, _lifecycle_rule("abort-incomplete-uploads", lambda r: r.update(
        abortIncompleteMultipartUpload={"daysAfterInitiation": 30})), "rule 'abort-incomplete-uploads' aborts after 30 days"),
    ("s3-abort-incomplete-uploads", DATA_ACCESS_LIFECYCLE, lambda p: p.update(bucket="elsewhere"),
     "Bucket 'backups-data-access-logs': no lifecycle configuration: abandoned multipart uploads are billed forever"),
    # s3-data-events-logged: the backup and audit buckets' object reads and writes, by an encrypted, validated trail.
    ("s3-data-events-logged", TRAIL, _data_resource(lambda d: d.update(values=[f"arn:aws:s3:::{BACKUP_BUCKET}/"])),
     "Bucket 'backups-audit': no trail logs all its AWS::S3::Object data events (reads and writes)"),
    ("s3-data-events-logged", TRAIL, _data_resource(lambda d: d.update(type="AWS::Lambda::Function")),
     "Bucket 'backups-backups': no trail logs all its AWS::S3::Object data events"),
    ("s3-data-events-logged", TRAIL, _selector(lambda s: s.update(readWriteType="WriteOnly")),
     "trail 'backups-data-access-trail': readWriteType 'WriteOnly'"),
    ("s3-data-events-logged", TRAIL, _data_resource(lambda d: d.update(values=[
        f"arn:aws:s3:::{BACKUP_BUCKET}/pgbackrest/", f"arn:aws:s3:::{AUDIT_BUCKET}/"])),
     f"only objects under 'arn:aws:s3:::{BACKUP_BUCKET}/pgbackrest/'"),
    ("s3-data-events-logged", TRAIL, _data_resource(lambda d: d.update(values=[
        f"arn:aws:s3:::{BACKUP_BUCKET}", f"arn:aws:s3:::{AUDIT_BUCKET}/"])), "Bucket 'backups-backups': no trail logs"),
    ("s3-data-events-logged", TRAIL, _advanced_selectors({"field": "readOnly", "equals": ["true"]}),
     "advanced selector 'backups-objects' is narrowed by readOnly"),
    ("s3-data-events-logged", TRAIL, _advanced_selectors(
        {"field": "resources.ARN", "notStartsWith": [f"arn:aws:s3:::{AUDIT_BUCKET}/"]}),
     f"resources.ARN notStartsWith ['arn:aws:s3:::{AUDIT_BUCKET}/']"),
    ("s3-data-events-logged", TRAIL, lambda p: p.pop("kmsKeyId"),
     f"Trail 'backups-data-access-trail': logs the data events of '{BACKUP_BUCKET}', '{AUDIT_BUCKET}', but no kmsKeyId"),
    ("s3-data-events-logged", TRAIL, lambda p: p.update(enableLogFileValidation=False),
     "enableLogFileValidation is False: a changed or deleted log file goes unnoticed"),
    ("s3-data-events-logged", TRAIL, lambda p: p.pop("enableLogFileValidation"), "enableLogFileValidation is None"),
    ("s3-data-events-logged", TRAIL, lambda p: p.update(enableLogging=False), "enableLogging is False: it records nothing"),
    ("s3-data-events-logged", TRAIL, lambda p: p.update(s3BucketName="someone-elses-logs"),
     "it delivers to 'someone-elses-logs', no bucket of this stack"),
    # lb-deletion-protection: the compliant stack is dev's; the same load balancer in staging or prod must be protected.
    ("lb-deletion-protection", "postgres-lb", lambda p: p["tags"].update(Environment="staging"),
     "LoadBalancer 'postgres-lb': staging: enableDeletionProtection is False"),
    ("lb-deletion-protection", "postgres-lb", lambda p: (p.pop("enableDeletionProtection"), p["tags"].update(Environment="prod")),
     "prod: enableDeletionProtection is None"),
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
    ("kms-key-policy", DATA_KEY, _set(["policy"], UNKNOWN_STRING)),
    ("vpc-flow-logs", FLOW_LOG, _set(["vpcId"], UNKNOWN_STRING)),
    ("vpc-flow-logs", FLOW_LOG, _set(["trafficType"], UNKNOWN_STRING)),
    ("vpc-flow-logs", FLOW_LOG, _set(["logDestination"], UNKNOWN_STRING)),
    ("vpc-flow-logs", FLOW_LOG, _set(["logDestinationType"], UNKNOWN_STRING)),
    ("vpc-flow-logs", FLOW_LOG_GROUP, _set(["retentionInDays"], UNKNOWN_NUMBER)),
    ("vpc-flow-logs", FLOW_LOG_GROUP, _set(["kmsKeyId"], UNKNOWN_STRING)),
    ("vpc-default-security-group-closed", DEFAULT_GROUP, _set(["vpcId"], UNKNOWN_STRING)),
    ("vpc-default-security-group-closed", DEFAULT_GROUP, _set(["ingress"], UNKNOWN_ARRAY)),
    ("vpc-default-security-group-closed", "network-postgres-egress-vpc-0", _set(["securityGroupId"], UNKNOWN_STRING)),
    ("sg-egress-narrow", INTERNET_HTTPS, _set(["cidrIpv4"], UNKNOWN_STRING)),
    ("sg-egress-narrow", INTERNET_HTTPS, _set(["ipProtocol"], UNKNOWN_STRING)),
    ("sg-egress-narrow", INTERNET_HTTPS, _set(["toPort"], UNKNOWN_NUMBER)),
    ("sg-egress-narrow", "network-postgres", _set(["egress"], UNKNOWN_ARRAY)),
    ("s3-abort-incomplete-uploads", BACKUPS_LIFECYCLE, _set(["bucket"], UNKNOWN_STRING)),
    ("s3-abort-incomplete-uploads", BACKUPS_LIFECYCLE, _set(["rules"], UNKNOWN_ARRAY)),
    ("s3-abort-incomplete-uploads", BACKUPS_LIFECYCLE, _set(["rules", 3, "status"], UNKNOWN_STRING)),
    ("s3-abort-incomplete-uploads", BACKUPS_LIFECYCLE, _set(["rules", 3, "filter"], UNKNOWN_OBJECT)),
    ("s3-abort-incomplete-uploads", BACKUPS_LIFECYCLE,
     _set(["rules", 3, "abortIncompleteMultipartUpload", "daysAfterInitiation"], UNKNOWN_NUMBER)),
    ("s3-data-events-logged", TRAIL, _set(["eventSelectors"], UNKNOWN_ARRAY)),
    ("s3-data-events-logged", TRAIL, _set(["eventSelectors", 0, "dataResources", 0, "values", 1], UNKNOWN_STRING)),
    ("s3-data-events-logged", TRAIL, _set(["kmsKeyId"], UNKNOWN_STRING)),
    ("s3-data-events-logged", TRAIL, _set(["enableLogFileValidation"], UNKNOWN_BOOLEAN)),
    ("s3-data-events-logged", TRAIL, _set(["s3BucketName"], UNKNOWN_STRING)),
    ("s3-data-events-logged", BACKUPS, _set(["bucket"], UNKNOWN_STRING)),
    ("s3-data-events-logged", BACKUPS, _set(["tags"], UNKNOWN_OBJECT)),
    ("lb-deletion-protection", "postgres-lb", lambda p: p.update(tags=UNKNOWN_OBJECT, enableDeletionProtection=False)),
    ("lb-deletion-protection", "postgres-lb", lambda p: p.update(tags={"Environment": UNKNOWN_STRING})),
    ("lb-deletion-protection", "postgres-lb", lambda p: p.update(tags={"Environment": "prod"},
                                                                 enableDeletionProtection=UNKNOWN_BOOLEAN)),
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


# --- the AWS account-level controls: what passes besides the program's own shape, and joins across resources ----------


@pytest.mark.parametrize("change", [
    # kms:Disable* covers DisableKey and DisableKeyRotation; {"AWS": "*"} is everyone as much as "*".
    _key_statement(GUARD, lambda s: s.update(Principal={"AWS": "*"}, Action=[
        "kms:Disable*", "kms:ScheduleKeyDeletion", "kms:PutKeyPolicy"])),
    # A Deny of everything but using the key, to all but a pattern of administrators.
    _key_statement(GUARD, lambda s: (s.pop("Action"), s.update(
        NotAction=["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*", "kms:DescribeKey"],
        Condition={"ArnNotLike": {"aws:PrincipalArn": f"arn:aws:iam::{ACCOUNT}:role/betting-platform-key-*"}}))),
    # Administrators may create grants for AWS resources only (what EBS asks for on their behalf).
    _with_statement({"Sid": "AdminGrantsForAwsResources", "Effect": "Allow", "Principal": {"AWS": KEY_ADMIN},
                     "Action": "kms:CreateGrant", "Resource": "*",
                     "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}}}),
    # A service principal and a conditioned '*' principal are no "to everyone".
    _with_statement({"Sid": "OrganizationReads", "Effect": "Allow", "Principal": "*", "Action": "kms:DescribeKey",
                     "Resource": "*", "Condition": {"StringEquals": {"aws:PrincipalOrgID": "o-abc123"}}}),
], ids=["disable-star", "not-action-arn-not-like", "grants-for-aws-resources", "conditioned-everyone"])
def test_key_policies_that_keep_administrators_and_users_apart_pass(change):
    assert run_policy("kms-key-policy", changed(DATA_KEY, change)) == []


def test_key_policy_guarded_actions_are_configurable():
    config = {"guardedActions": ["kms:ScheduleKeyDeletion", "kms:DisableKey", "kms:CancelKeyDeletion"]}
    (message,) = [m for _, m in run_policy("kms-key-policy", compliant_stack(), config=config) if DATA_KEY in m]
    assert "nothing denies kms:CancelKeyDeletion to every principal but the administrators" in message


def test_the_flow_log_group_is_found_by_its_arn_with_the_stream_wildcard_or_through_dependencies():
    without_key = changed(FLOW_LOG_GROUP, lambda p: p.pop("kmsKeyId"))
    find(without_key, FLOW_LOG)["props"]["logDestination"] += ":*"
    assert [m for _, m in run_policy("vpc-flow-logs", without_key) if "no kmsKeyId" in m]
    # During a preview the group's ARN and the VPC id are unknown; the engine still knows where they come from.
    find(without_key, FLOW_LOG)["props"].update(logDestination=UNKNOWN_STRING, vpcId=UNKNOWN_STRING)
    assert run_policy("vpc-flow-logs", without_key) == []
    reported = run_policy("vpc-flow-logs", without_key, dependencies={
        FLOW_LOG: {"logDestination": [FLOW_LOG_GROUP], "vpcId": [VPC]}})
    assert [m for _, m in reported if "LogGroup 'network-flow-logs'" in m and "no kmsKeyId" in m], reported


def test_a_flow_log_to_a_bucket_is_not_held_to_the_log_group_rules():
    to_bucket = changed(FLOW_LOG, lambda p: p.update(logDestinationType="s3", logDestination="arn:aws:s3:::flow-logs"))
    find(to_bucket, FLOW_LOG_GROUP)["props"].pop("retentionInDays")  # the group no longer receives flow logs
    assert run_policy("vpc-flow-logs", to_bucket) == []


def test_a_rule_added_to_the_default_group_is_caught_through_dependencies_during_a_preview():
    resources = changed("network-postgres-egress-vpc-0", lambda p: p.update(securityGroupId=UNKNOWN_STRING))
    reported = run_policy("vpc-default-security-group-closed", resources,
                          dependencies={"network-postgres-egress-vpc-0": {"securityGroupId": [DEFAULT_GROUP]}})
    assert [m for _, m in reported if "'network-postgres-egress-vpc-0' adds a rule to it" in m], reported


def _legacy_rule(**props) -> list[dict]:
    rule = {"type": "aws:ec2/securityGroupRule:SecurityGroupRule", "name": "network-legacy", "parent": None,
            "props": {"securityGroupId": "network-postgres_id", **props}}
    return [*compliant_stack(), rule]


@pytest.mark.parametrize(("resources", "found"), [
    (_legacy_rule(type="egress", protocol="tcp", fromPort=25, toPort=25, cidrBlocks=["10.10.0.0/16", "0.0.0.0/0"]),
     "SecurityGroupRule 'network-legacy': port 25/tcp to 0.0.0.0/0"),
    (_legacy_rule(type="egress", protocol="all", fromPort=0, toPort=0, ipv6CidrBlocks=["::0/0"]),
     "all traffic (protocol 'all') to ::0/0"),
    (_legacy_rule(type="egress", protocol="6", fromPort=8080, toPort=8080, cidrBlocks=["0.0.0.0/0"]), "port 8080/6"),
])
def test_legacy_egress_rules_to_the_internet_are_narrowed_too(resources, found):
    reported = [m for _, m in run_policy("sg-egress-narrow", resources)]
    assert len(reported) == 1 and found in reported[0], reported


@pytest.mark.parametrize("resources", [
    _legacy_rule(type="ingress", protocol="tcp", fromPort=0, toPort=65535, cidrBlocks=["10.10.0.0/16"]),
    _legacy_rule(type="egress", protocol="-1", fromPort=0, toPort=0, cidrBlocks=["10.10.0.0/16"]),  # inside the VPC
    _legacy_rule(type="egress", protocol="tcp", fromPort=443, toPort=443, prefixListIds=["pl-network-s3"]),
    _legacy_rule(type="egress", protocol="tcp", fromPort=443, toPort=443, cidrBlocks=["0.0.0.0/0"]),
])
def test_egress_inside_the_vpc_to_the_prefix_list_or_to_allowed_ports_passes(resources):
    assert run_policy("sg-egress-narrow", resources) == []


def test_internet_egress_ports_are_configurable():
    assert run_policy("sg-egress-narrow", compliant_stack(), config={"internetEgressPorts": [443]})  # no SMTP: 587 is out
    smtp = changed(INTERNET_HTTPS, lambda p: p.update(fromPort=465, toPort=465))
    assert run_policy("sg-egress-narrow", smtp, config={"internetEgressPorts": [80, 443, 465, 587]}) == []


@pytest.mark.parametrize("change", [
    _lifecycle_rule("abort-incomplete-uploads", lambda r: r.pop("filter")),  # no filter: the whole bucket
    _lifecycle_rule("abort-incomplete-uploads", lambda r: r.update(filter={})),
    _lifecycle_rule("abort-incomplete-uploads", lambda r: (r.pop("filter"), r.update(prefix=""))),  # the legacy prefix
    _lifecycle_rule("abort-incomplete-uploads", lambda r: r.update(abortIncompleteMultipartUpload={"daysAfterInitiation": 1})),
], ids=["no-filter", "empty-filter", "legacy-empty-prefix", "one-day"])
def test_a_whole_bucket_abort_rule_in_any_spelling_passes(change):
    assert run_policy("s3-abort-incomplete-uploads", changed(BACKUPS_LIFECYCLE, change)) == []


def test_a_buckets_own_lifecycle_rules_count_for_aborting_uploads():
    resources = changed(DATA_ACCESS_LIFECYCLE, lambda p: p.update(bucket="elsewhere"))
    find(resources, "backups-data-access-logs")["props"]["lifecycleRules"] = [
        {"id": "abort", "enabled": True, "prefix": "", "abortIncompleteMultipartUploadDays": 7}]
    assert run_policy("s3-abort-incomplete-uploads", resources) == []
    find(resources, "backups-data-access-logs")["props"]["lifecycleRules"][0]["enabled"] = False
    assert [m for _, m in run_policy("s3-abort-incomplete-uploads", resources) if "rule 'abort' is not enabled" in m]


@pytest.mark.parametrize("change", [
    _advanced_selectors(),
    _advanced_selectors({"field": "resources.ARN", "notStartsWith": ["arn:aws:s3:::someone-else/"]}),
    _data_resource(lambda d: d.update(values=["arn:aws:s3"])),  # every bucket of the account
    _selector(lambda s: s.pop("readWriteType")),  # the provider's default is All
    lambda p: p.update(eventSelectors=[{"readWriteType": "All", "dataResources": [
        {"type": "AWS::Lambda::Function", "values": ["arn:aws:lambda"]}]}, *p["eventSelectors"]]),
], ids=["advanced", "advanced-excluding-another-bucket", "all-buckets", "read-write-default", "second-selector"])
def test_trails_that_log_every_object_read_and_write_pass(change):
    assert run_policy("s3-data-events-logged", changed(TRAIL, change)) == []


def _with_replica(multi_region: bool) -> list[dict]:
    """A replica of the backups in another region, named in the trail's selector."""
    replica = "betting-dev-pg-backups-eu-central-1"
    resources = changed(TRAIL, _data_resource(lambda d: d["values"].append(f"arn:aws:s3:::{replica}/")))
    find(resources, TRAIL)["props"]["isMultiRegionTrail"] = multi_region
    resources.append({"type": "aws:s3/bucket:Bucket", "name": "backups-backups-replica", "parent": "backups", "props": {
        "bucket": replica, "tags": {"Purpose": "backups", "ReplicaOf": BACKUP_BUCKET}}})
    return resources


def test_a_replica_in_another_region_needs_a_multi_region_trail():
    assert run_policy("s3-data-events-logged", _with_replica(multi_region=True)) == []
    ((where, found),) = run_policy("s3-data-events-logged", _with_replica(multi_region=False))
    assert where.endswith("::backups-data-access-trail")
    assert "isMultiRegionTrail is False while the replica 'betting-dev-pg-backups-eu-central-1' is in another region" in found


def test_a_replica_no_trail_names_is_a_violation():
    resources = [*compliant_stack(), {"type": "aws:s3/bucket:Bucket", "name": "backups-audit-replica", "parent": "backups",
                                      "props": {"bucket": "betting-dev-audit-logs-eu-central-1",
                                                "tags": {"Purpose": "audit-logs", "ReplicaOf": AUDIT_BUCKET}}}]
    reported = [m for _, m in run_policy("s3-data-events-logged", resources)]
    assert len(reported) == 1 and reported[0].startswith("Bucket 'backups-audit-replica': no trail logs"), reported


def test_one_good_trail_is_enough_and_other_buckets_need_none():
    second = {**copy.deepcopy(find(compliant_stack(), TRAIL)), "name": "backups-unvalidated-trail"}
    second["props"]["enableLogFileValidation"] = False
    assert run_policy("s3-data-events-logged", [*compliant_stack(), second]) == []
    # The host-bundles bucket is no backup or audit bucket: no trail needs to name it.
    assert run_policy("s3-data-events-logged", compliant_stack(), config={"purposes": ["backups"]}) == []
    assert [m for _, m in run_policy("s3-data-events-logged", compliant_stack(), config={"purposes": ["data-access-logs"]})
            if "Bucket 'backups-data-access-logs': no trail" in m]


def test_a_protected_load_balancer_in_prod_passes_and_the_environments_are_configurable():
    prod = changed("postgres-lb", lambda p: (p.update(enableDeletionProtection=True), p["tags"].update(Environment="prod")))
    assert run_policy("lb-deletion-protection", prod) == []
    assert run_policy("lb-deletion-protection", compliant_stack(), config={"environments": ["dev", "staging", "prod"]})
