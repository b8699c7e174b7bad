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
    ]
    resources += _bucket("backups-backups", "betting-dev-pg-backups-eu-west-1", "backups", object_lock=False)
    resources.append(_res("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", "backups-backups-lifecycle", {
        "bucket": "betting-dev-pg-backups-eu-west-1",
        "rules": [
            {"id": "backup-verification", "status": "Enabled", "filter": {"prefix": "verification/"}, "expiration": {"days": 90}},
            {"id": "base-backups-and-wal", "status": "Enabled", "filter": {"prefix": "pgbackrest/"},
             "noncurrentVersionExpiration": {"noncurrentDays": 30}},
            {"id": "archive-to-glacier", "status": "Enabled", "filter": {"prefix": "archive/"},
             "transitions": [{"days": 30, "storageClass": "GLACIER"}]},
        ],
    }))
    resources += _bucket("backups-audit", "betting-dev-audit-logs-eu-west-1", "audit-logs", object_lock=True)
    resources += [
        _res("aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration", "backups-audit-object-lock", {
            "bucket": "betting-dev-audit-logs-eu-west-1",
            "rule": {"defaultRetention": {"mode": "COMPLIANCE", "years": 7}},
        }),
        _res("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", "backups-audit-lifecycle", {
            "bucket": "betting-dev-audit-logs-eu-west-1",
            "rules": [{"id": "audit-to-deep-archive", "status": "Enabled", "filter": {"prefix": ""},
                       "transitions": [{"days": 30, "storageClass": "DEEP_ARCHIVE"}], "expiration": {"days": 2557}}],
        }),
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
