"""A small compliant stack in the plan format, and ways to run rules the way the Pulumi engine does.

The stack mirrors what the AWS program declares (same types, camelCase property names, ids as
"<name>_id" like the mock engine); each test changes one value in a copy and expects one rule to
object, naming the resource, the value and the rule.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml
from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    StackValidationArgs,
    proxy,
)
from pulumi_policy.proxy import unknown_checking_proxy

from policies.rules import RULES_BY_NAME
from policies.rules.pack import build_policy

UNKNOWN_STRING = proxy.UNKNOWN_STRING_VALUE
UNKNOWN_NUMBER = proxy.UNKNOWN_NUMBER_VALUE
UNKNOWN_BOOLEAN = proxy.UNKNOWN_BOOLEAN_VALUE
UNKNOWN_OBJECT = proxy.UNKNOWN_OBJECT_VALUE
UNKNOWN_ARRAY = proxy.UNKNOWN_ARRAY_VALUE


def prometheus_defaults(args: str) -> str:
    return f'# managed by pulumi\nARGS="{args}"\n'


def cloud_config(files: dict[str, str]) -> str:
    document = {"hostname": "h", "write_files": [{"path": p, "permissions": "0644", "content": c} for p, c in files.items()]}
    return "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False)


PROMETHEUS_ARGS = ("--config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/var/lib/prometheus "
                   "--storage.tsdb.retention.time=30d --storage.tsdb.retention.size=42GB --web.listen-address=:9090")


ACCOUNT = "123456789012"
KEY_ADMIN = f"arn:aws:iam::{ACCOUNT}:role/betting-platform-key-admin"
KEY_ADMIN_ACTIONS = [
    "kms:CreateAlias", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*", "kms:Revoke*", "kms:Disable*",
    "kms:Get*", "kms:Delete*", "kms:TagResource", "kms:UntagResource", "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion",
]
GUARDED_KEY_ACTIONS = ["kms:ScheduleKeyDeletion", "kms:DisableKey", "kms:DisableKeyRotation", "kms:PutKeyPolicy"]
VPC_CIDR = "10.10.0.0/16"
FLOW_LOG_GROUP = "/betting/dev/vpc-flow-logs"
BACKUP_BUCKET = "betting-dev-pg-backups-eu-west-1"
AUDIT_BUCKET = "betting-dev-audit-logs-eu-west-1"
DATA_ACCESS_BUCKET = "betting-dev-data-access-logs-eu-west-1"
TRAIL_ARN = f"arn:aws:cloudtrail:eu-west-1:{ACCOUNT}:trail/betting-dev-data-access"


def _res(type_: str, name: str, props: dict[str, Any], parent: str | None = None) -> dict[str, Any]:
    return {"type": type_, "name": name, "parent": parent, "props": props}


def _tls_policy(bucket: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }]})


def _bucket(name: str, bucket: str, purpose: str, object_lock: bool) -> list[dict[str, Any]]:
    ref = bucket  # the mock engine's id of a bucket is its name
    return [
        _res("aws:s3/bucket:Bucket", name, {"bucket": bucket, "objectLockEnabled": object_lock, "tags": {"Purpose": purpose}}),
        _res("aws:s3/bucketVersioning:BucketVersioning", f"{name}-versioning",
             {"bucket": ref, "versioningConfiguration": {"status": "Enabled"}}),
        _res("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration", f"{name}-encryption",
             {"bucket": ref, "rules": [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": "aws:kms",
                                                                                "kmsMasterKeyId": "arn:aws:kms:key"},
                                        "bucketKeyEnabled": True}]}),
        _res("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", f"{name}-public-access",
             {"bucket": ref, "blockPublicAcls": True, "blockPublicPolicy": True, "ignorePublicAcls": True,
              "restrictPublicBuckets": True}),
        _res("aws:s3/bucketPolicy:BucketPolicy", f"{name}-tls-only", {"bucket": ref, "policy": _tls_policy(bucket)}),
    ]


def key_policy(*service_statements: dict[str, Any]) -> str:
    """A key policy as infra/platforms/kms.py writes one: administrators manage, the account uses through services."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "KeyAdministration", "Effect": "Allow", "Principal": {"AWS": [KEY_ADMIN]}, "Action": KEY_ADMIN_ACTIONS,
         "Resource": "*"},
        {"Sid": "UseThroughAwsServices", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"],
         "Resource": "*",
         "Condition": {"StringEquals": {"kms:ViaService": ["ec2.eu-west-1.amazonaws.com"], "kms:CallerAccount": ACCOUNT}}},
        {"Sid": "GrantsForAwsResources", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:ViaService": ["ec2.eu-west-1.amazonaws.com"], "kms:CallerAccount": ACCOUNT},
                       "Bool": {"kms:GrantIsForAWSResource": "true"}}},
        *service_statements,
        {"Sid": "OnlyAdministratorsMayDisableOrDelete", "Effect": "Deny", "Principal": "*", "Action": GUARDED_KEY_ACTIONS,
         "Resource": "*", "Condition": {"ArnNotEquals": {"aws:PrincipalArn": [KEY_ADMIN]}}},
    ]})


ABORT_RULE = {"id": "abort-incomplete-uploads", "status": "Enabled", "filter": {"prefix": ""},
              "abortIncompleteMultipartUpload": {"daysAfterInitiation": 7}}


def _network() -> list[dict[str, Any]]:
    """The VPC as network.py builds it: flow logs, the default group closed, egress per destination."""
    def egress(role: str, destination: str, port: int, to_port: int, target: dict[str, str]) -> dict[str, Any]:
        return _res("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule", f"network-{role}-egress-{destination}-{port}", {
            "ipProtocol": "tcp", "fromPort": port, "toPort": to_port, "securityGroupId": f"network-{role}_id", **target,
        }, parent="network")

    return [
        _res("aws:ec2/vpc:Vpc", "network-vpc", {"cidrBlock": VPC_CIDR, "enableDnsSupport": True}, parent="network"),
        _res("aws:ec2/defaultSecurityGroup:DefaultSecurityGroup", "network-default-group",
             {"vpcId": "network-vpc_id", "ingress": [], "egress": []}, parent="network"),
        _res("aws:cloudwatch/logGroup:LogGroup", "network-flow-logs",
             {"name": FLOW_LOG_GROUP, "retentionInDays": 365, "kmsKeyId": "arn:aws:kms:key"}, parent="network"),
        _res("aws:ec2/flowLog:FlowLog", "network-flow-log", {
            "vpcId": "network-vpc_id", "trafficType": "ALL", "logDestinationType": "cloud-watch-logs",
            "logDestination": f"arn:aws:logs:eu-west-1:{ACCOUNT}:log-group:{FLOW_LOG_GROUP}",
            "iamRoleArn": f"arn:aws:iam::{ACCOUNT}:role/network-flow-logs-role",
        }, parent="network"),
        # Dev's: deletion protection only where clients depend on it (staging, prod).
        _res("aws:lb/loadBalancer:LoadBalancer", "postgres-lb", {
            "loadBalancerType": "network", "internal": True, "enableDeletionProtection": False,
            "securityGroups": ["network-postgres-lb_id"], "tags": {"Environment": "dev"},
        }, parent="postgres"),
        egress("postgres", "vpc", 0, 65535, {"cidrIpv4": VPC_CIDR}),
        egress("postgres", "s3", 443, 443, {"prefixListId": "pl-network-s3"}),
        egress("postgres", "internet", 443, 443, {"cidrIpv4": "0.0.0.0/0"}),
        egress("monitoring", "internet", 587, 587, {"cidrIpv4": "0.0.0.0/0"}),
    ]


def data_access_trail(*buckets: str) -> dict[str, Any]:
    return _res("aws:cloudtrail/trail:Trail", "backups-data-access-trail", {
        "name": "betting-dev-data-access", "s3BucketName": DATA_ACCESS_BUCKET, "kmsKeyId": "arn:aws:kms:backups-key",
        "enableLogFileValidation": True, "isMultiRegionTrail": True, "includeGlobalServiceEvents": True,
        "eventSelectors": [{"readWriteType": "All", "includeManagementEvents": False, "dataResources": [
            {"type": "AWS::S3::Object", "values": [f"arn:aws:s3:::{b}/" for b in buckets]}]}],
    }, parent="backups")


def compliant_stack() -> list[dict[str, Any]]:
    host_tags = {"Role": "monitoring", "Host": "monitoring-1", "Name": "monitoring-1.dev.betting.internal"}
    resources = [
        _res("aws:ec2/instance:Instance", "monitoring-monitoring-1", {
            "instanceType": "t3.medium",
            "metadataOptions": {"httpTokens": "required", "httpEndpoint": "enabled", "httpPutResponseHopLimit": 1},
            "rootBlockDevice": {"encrypted": True, "volumeSize": 20, "volumeType": "gp3"},
            "userData": cloud_config({"/etc/default/prometheus": prometheus_defaults(PROMETHEUS_ARGS),
                                      "/etc/prometheus/prometheus.yml": "global: {}\n"}),
            "tags": host_tags,
        }, parent="monitoring"),
        _res("aws:ebs/volume:Volume", "monitoring-monitoring-1-prometheus-tsdb", {
            "size": 50, "type": "gp3", "encrypted": True, "kmsKeyId": "arn:aws:kms:key",
            "tags": {**host_tags, "Role": "prometheus-tsdb"},
        }, parent="monitoring"),
        _res("aws:ec2/volumeAttachment:VolumeAttachment", "monitoring-monitoring-1-prometheus-tsdb-attachment", {
            "deviceName": "/dev/sdf", "instanceId": "monitoring-monitoring-1_id",
            "volumeId": "monitoring-monitoring-1-prometheus-tsdb_id",
        }, parent="monitoring"),
        _res("aws:ec2/instance:Instance", "patroni-pg-1", {
            "instanceType": "t3.medium",
            "metadataOptions": {"httpTokens": "required"},
            "rootBlockDevice": {"encrypted": True, "volumeType": "gp3"},
            "userData": cloud_config({"/etc/patroni/config.yml": "scope: betting-dev\n"}),
            "tags": {"Role": "postgres", "Host": "pg-1"},
        }, parent="patroni"),
        _res("aws:ebs/volume:Volume", "patroni-pg-1-postgres-data", {
            "size": 50, "type": "gp3", "encrypted": True, "tags": {"Role": "postgres-data", "Host": "pg-1"},
        }, parent="patroni"),
        _res("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule", "network-postgres-5432-tcp-from-monitoring", {
            "ipProtocol": "tcp", "fromPort": 5432, "toPort": 5432, "referencedSecurityGroupId": "network-monitoring_id",
            "securityGroupId": "network-postgres_id",
        }, parent="network"),
        _res("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule", "network-endpoints-https", {
            "ipProtocol": "tcp", "fromPort": 443, "toPort": 443, "cidrIpv4": "10.10.0.0/16",
            "securityGroupId": "network-endpoints_id",
        }, parent="network"),
        _res("aws:ec2/securityGroup:SecurityGroup", "network-postgres", {"description": "postgres", "vpcId": "network-vpc_id"},
             parent="network"),
        _res("aws:iam/rolePolicy:RolePolicy", "monitoring-monitoring-1-access", {
            "role": "monitoring-monitoring-1-role_id",
            "policy": json.dumps({"Version": "2012-10-17", "Statement": [
                {"Sid": "ReadOwnSecrets", "Effect": "Allow", "Action": ["ssm:GetParameter"],
                 "Resource": ["arn:aws:ssm:eu-west-1:123456789012:parameter/betting/dev/pagerduty_routing_key"]},
                {"Sid": "Discovery", "Effect": "Allow", "Action": ["ec2:DescribeInstances"], "Resource": "*"},
            ]}),
        }, parent="monitoring"),
        _res("aws:iam/role:Role", "monitoring-monitoring-1-role", {
            "assumeRolePolicy": json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}),
        }, parent="monitoring"),
        _res("aws:elasticache/replicationGroup:ReplicationGroup", "redis", {
            "transitEncryptionEnabled": True, "atRestEncryptionEnabled": True, "authToken": "[secret]",
            "nodeType": "cache.t4g.micro",
        }, parent="redis"),
        _res("aws:kms/key:Key", "data-key", {"enableKeyRotation": True, "deletionWindowInDays": 30, "policy": key_policy()}),
        _res("aws:kms/key:Key", "backups-key", {"enableKeyRotation": True, "deletionWindowInDays": 30, "policy": key_policy({
            "Sid": "CloudTrailEncryptsItsLogs", "Effect": "Allow", "Principal": {"Service": "cloudtrail.amazonaws.com"},
            "Action": ["kms:GenerateDataKey*", "kms:DescribeKey"], "Resource": "*",
            "Condition": {"StringEquals": {"aws:SourceArn": TRAIL_ARN}},
        })}, parent="backups"),
        *_network(),
    ]
    resources += _bucket("backups-backups", BACKUP_BUCKET, "backups", object_lock=False)
    resources.append(_res("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", "backups-backups-lifecycle", {
        "bucket": "betting-dev-pg-backups-eu-west-1",
        "rules": [
            {"id": "backup-verification", "status": "Enabled", "filter": {"prefix": "verification/"}, "expiration": {"days": 90}},
            {"id": "base-backups-and-wal", "status": "Enabled", "filter": {"prefix": "pgbackrest/"},
             "noncurrentVersionExpiration": {"noncurrentDays": 30}},
            {"id": "archive-to-glacier", "status": "Enabled", "filter": {"prefix": "archive/"},
             "transitions": [{"days": 30, "storageClass": "GLACIER"}]},
            copy.deepcopy(ABORT_RULE),
        ],
    }))
    resources += _bucket("backups-audit", AUDIT_BUCKET, "audit-logs", object_lock=True)
    resources += [
        _res("aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration", "backups-audit-object-lock", {
            "bucket": "betting-dev-audit-logs-eu-west-1",
            "rule": {"defaultRetention": {"mode": "COMPLIANCE", "years": 7}},
        }),
        _res("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", "backups-audit-lifecycle", {
            "bucket": "betting-dev-audit-logs-eu-west-1",
            "rules": [{"id": "audit-to-deep-archive", "status": "Enabled", "filter": {"prefix": ""},
                       "transitions": [{"days": 30, "storageClass": "DEEP_ARCHIVE"}], "expiration": {"days": 2557}},
                      copy.deepcopy(ABORT_RULE)],
        }),
    ]
    # CloudTrail's record of every object read and write in the two buckets above.
    resources += _bucket("backups-data-access-logs", DATA_ACCESS_BUCKET, "data-access-logs", object_lock=True)
    resources += [
        _res("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", "backups-data-access-logs-lifecycle", {
            "bucket": DATA_ACCESS_BUCKET, "rules": [copy.deepcopy(ABORT_RULE)],
        }),
        data_access_trail(BACKUP_BUCKET, AUDIT_BUCKET),
    ]
    return resources


def find(resources: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (match,) = [r for r in resources if r["name"] == name]
    return match


def changed(name: str, change) -> list[dict[str, Any]]:
    """The compliant stack with `change(props)` applied to resource `name` (a deep copy)."""
    resources = copy.deepcopy(compliant_stack())
    change(find(resources, name)["props"])
    return resources


def _options(parent: str | None = None) -> PolicyResourceOptions:
    return PolicyResourceOptions(protect=False, ignore_changes=[], delete_before_replace=None, aliases=[],
                                 custom_timeouts=PolicyCustomTimeouts(0, 0, 0), additional_secret_outputs=[], parent=parent)


def urn(resource: dict[str, Any]) -> str:
    return f"urn:pulumi:dev::betting-platform::{resource['type']}::{resource['name']}"


def run_policy(rule_name: str, resources: list[dict[str, Any]], config: dict[str, Any] | None = None,
               dependencies: dict[str, dict[str, list[str]]] | None = None) -> list[tuple[str | None, str]]:
    """Run one policy as the engine would: (urn, message) for each reported violation.

    Props go through the SDK's unknown-checking proxy, exactly as in `Analyze` / `AnalyzeStack`;
    `dependencies` maps a resource name to {property: [names of the resources it came from]}.
    """
    rule = RULES_BY_NAME[rule_name]
    policy = build_policy(rule)
    reported: list[tuple[str | None, str]] = []

    def report(message: str, urn_: str | None = None) -> None:
        reported.append((urn_, message))

    if rule.kind == "resource":
        for r in resources:
            if r["type"] not in rule.resource_types:
                continue
            args = ResourceValidationArgs(r["type"], unknown_checking_proxy(copy.deepcopy(r["props"])), urn(r), r["name"],
                                          _options(), None, config)
            policy.validate(args, lambda message, _urn=None, r=r: report(message, urn(r)))
        return reported
    by_name = {r["name"]: PolicyResource(r["type"], unknown_checking_proxy(copy.deepcopy(r["props"])), urn(r), r["name"],
                                         _options(), None, None, [], {}) for r in resources}
    for name, props in (dependencies or {}).items():
        for prop, sources in props.items():
            by_name[name].property_dependencies[prop] = [by_name[s] for s in sources]
    policy.validate(StackValidationArgs(list(by_name.values()), config), report)
    return reported
