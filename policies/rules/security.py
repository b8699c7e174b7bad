"""Security: private, encrypted, versioned S3; no world-open service ports; IMDSv2; narrow IAM; encrypted Redis."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from policies.rules.model import (
    UNKNOWN,
    Finding,
    Resource,
    Rule,
    as_list,
    attached_to,
    by_type,
    dig,
    message,
    policy_document,
    policy_statements,
)

BUCKET = "aws:s3/bucket:Bucket"
PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
ENCRYPTION = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
VERSIONING = "aws:s3/bucketVersioning:BucketVersioning"
BUCKET_POLICY = "aws:s3/bucketPolicy:BucketPolicy"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
LEGACY_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
INSTANCE = "aws:ec2/instance:Instance"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
IAM_POLICY_TYPES = (
    "aws:iam/rolePolicy:RolePolicy",
    "aws:iam/policy:Policy",
    "aws:iam/userPolicy:UserPolicy",
    "aws:iam/groupPolicy:GroupPolicy",
    "aws:iam/role:Role",  # inlinePolicies
)
REPLICATION_GROUP = "aws:elasticache/replicationGroup:ReplicationGroup"

PUBLIC_ACCESS_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
KMS_ALGORITHMS = ("aws:kms", "aws:kms:dsse")
WORLD = ("0.0.0.0/0", "::/0")
# Every port a service of this platform listens on (infra/topology.py Ports), and SSH.
SERVICE_PORTS = [22, 2379, 2380, 3000, 5000, 5001, 5432, 6379, 6432, 7000, 8008, 8123, 9000, 9090, 9093, 9094, 9100, 9121, 9127,
                 9187, 9363]
# Actions AWS only authorizes on Resource "*": no narrower resource exists for them.
RESOURCE_WILDCARD_ACTIONS = [
    "ec2:Describe*", "autoscaling:Describe*", "elasticloadbalancing:Describe*", "elasticache:Describe*",
    "cloudwatch:PutMetricData", "cloudwatch:GetMetricData", "cloudwatch:ListMetrics", "ssm:DescribeParameters",
    "kms:ListKeys", "kms:ListAliases", "s3:ListAllMyBuckets", "sts:GetCallerIdentity", "tag:GetResources",
    "route53:ListHostedZones", "logs:DescribeLogGroups",
]


def _bucket_parts(bucket: Resource, resources: Sequence[Resource], resource_type: str, what: str, rule: str,
                  requirement: str) -> Iterator[Resource | Finding]:
    """The bucket's configuration resources of one type, or a Finding when it has none."""
    parts = attached_to(bucket, resources, resource_type, "bucket")
    if parts is UNKNOWN:
        return
    if not parts:
        yield Finding(bucket, message(bucket, f"no {what}", rule, requirement))
        return
    yield from parts


def check_s3_public_access_block(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule = "s3-public-access-block"
    requirement = f"every bucket has a BucketPublicAccessBlock with {', '.join(PUBLIC_ACCESS_FLAGS)} all true"
    for bucket in by_type(resources, BUCKET):
        for part in _bucket_parts(bucket, resources, PUBLIC_ACCESS_BLOCK, "BucketPublicAccessBlock", rule, requirement):
            if isinstance(part, Finding):
                yield part
                continue
            off = [f"{flag}={part.get(flag)!r}" for flag in PUBLIC_ACCESS_FLAGS if part.get(flag) not in (True, UNKNOWN)]
            if off:
                yield Finding(part, message(part, f"bucket {bucket.name!r}: {', '.join(off)}", rule, requirement))


def check_s3_sse_kms(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, requirement = "s3-sse-kms", "every bucket encrypts by default with SSE-KMS (aws:kms or aws:kms:dsse)"
    for bucket in by_type(resources, BUCKET):
        for part in _bucket_parts(bucket, resources, ENCRYPTION, "server-side encryption configuration", rule, requirement):
            if isinstance(part, Finding):
                yield part
                continue
            rules = part.get("rules")
            if rules is UNKNOWN:
                continue
            algorithms = [dig(r, "applyServerSideEncryptionByDefault", "sseAlgorithm") for r in as_list(rules)]
            if UNKNOWN in algorithms:
                continue
            if not algorithms or any(a not in KMS_ALGORITHMS for a in algorithms):
                yield Finding(part, message(part, f"bucket {bucket.name!r}: sseAlgorithm {algorithms!r}", rule, requirement))


def check_s3_versioning(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, requirement = "s3-versioning", "every bucket has versioning Enabled"
    for bucket in by_type(resources, BUCKET):
        for part in _bucket_parts(bucket, resources, VERSIONING, "BucketVersioning", rule, requirement):
            if isinstance(part, Finding):
                yield part
                continue
            status = part.get("versioningConfiguration", "status")
            if status is not UNKNOWN and status != "Enabled":
                yield Finding(part, message(part, f"bucket {bucket.name!r}: versioning status {status!r}", rule, requirement))


def _denies_plain_http(statement: Mapping[str, Any]) -> bool:
    condition = dig(statement, "Condition", "Bool", "aws:SecureTransport")
    principal = statement.get("Principal")
    actions = as_list(statement.get("Action"))
    return (
        statement.get("Effect") == "Deny"
        and str(condition).lower() == "false"
        and principal in ("*", {"AWS": "*"}, {"AWS": ["*"]})
        and any(a in ("*", "s3:*") for a in actions)
    )


def check_s3_deny_non_tls(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule = "s3-deny-non-tls"
    requirement = "every bucket policy denies s3:* to every principal when aws:SecureTransport is false"
    for bucket in by_type(resources, BUCKET):
        parts = list(_bucket_parts(bucket, resources, BUCKET_POLICY, "BucketPolicy", rule, requirement))
        findings = [p for p in parts if isinstance(p, Finding)]
        yield from findings
        documents = [policy_document(p.get("policy")) for p in parts if isinstance(p, Resource)]
        if findings or not documents or UNKNOWN in documents:
            continue
        if not any(_denies_plain_http(s) for d in documents if d for s in policy_statements(d)):
            names = ", ".join(repr(p.name) for p in parts)
            yield Finding(bucket, message(bucket, f"policy {names} has no Deny on aws:SecureTransport=false", rule, requirement))


def _ingress_entries(resource: Resource) -> list[tuple[Any, Any, Any, list[Any]]]:
    """(protocol, from, to, sources) for each ingress this resource opens."""
    if resource.type == INGRESS_RULE:
        return [(resource.get("ipProtocol"), resource.get("fromPort"), resource.get("toPort"),
                 [resource.get("cidrIpv4"), resource.get("cidrIpv6")])]
    if resource.type == LEGACY_RULE:
        if resource.get("type") != "ingress":
            return []
        sources = as_list(resource.get("cidrBlocks")) + as_list(resource.get("ipv6CidrBlocks"))
        return [(resource.get("protocol"), resource.get("fromPort"), resource.get("toPort"), sources)]
    entries = []
    for block in as_list(resource.get("ingress")):
        if block is UNKNOWN:
            continue
        sources = as_list(block.get("cidrBlocks")) + as_list(block.get("ipv6CidrBlocks"))
        entries.append((block.get("protocol"), block.get("fromPort"), block.get("toPort"), sources))
    return entries


def check_no_public_ingress(resource: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, ports = "no-public-ingress", sorted(config["servicePorts"])
    requirement = "no ingress from 0.0.0.0/0 or ::/0 on a service port (" + ", ".join(map(str, ports)) + ")"
    for protocol, low, high, sources in _ingress_entries(resource):
        open_to = [s for s in sources if s in WORLD]
        if not open_to:
            continue
        if str(protocol) in ("-1", "all"):
            yield Finding(resource, message(resource, f"all traffic open to {', '.join(open_to)}", rule, requirement))
            continue
        if UNKNOWN in (low, high) or not isinstance(low, int) or not isinstance(high, int):
            continue
        exposed = [p for p in ports if low <= p <= high]
        if exposed:
            found = f"ports {low}-{high}/{protocol} open to {', '.join(open_to)} (service ports {exposed})"
            yield Finding(resource, message(resource, found, rule, requirement))


def check_imdsv2(resource: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, requirement = "imdsv2-required", "metadataOptions.httpTokens is 'required' (IMDSv2 only)"
    options = resource.get("metadataOptions")
    if options is UNKNOWN:
        return
    tokens, endpoint = dig(options, "httpTokens"), dig(options, "httpEndpoint")
    if UNKNOWN in (tokens, endpoint) or endpoint == "disabled" or tokens == "required":
        return
    yield Finding(resource, message(resource, f"metadataOptions.httpTokens is {tokens!r} (IMDSv1 answers)", rule, requirement))


def _covers(pattern: str, action: str) -> bool:
    """Whether an IAM action pattern such as ec2:Describe* allows `action` (case-insensitive, * suffix)."""
    pattern, action = pattern.lower(), action.lower()
    return action == pattern or (pattern.endswith("*") and action.startswith(pattern[:-1]))


def _iam_documents(resource: Resource) -> list[tuple[str, Any]]:
    if resource.type == "aws:iam/role:Role":
        return [(f"inline policy {dig(p, 'name')!r}", policy_document(dig(p, "policy")))
                for p in as_list(resource.get("inlinePolicies")) if p is not UNKNOWN]
    return [("policy", policy_document(resource.get("policy")))]


def check_iam_least_privilege(resource: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, allowed = "iam-least-privilege", list(config["resourceWildcardActions"])
    requirement = ("Allow statements name actions without '*' for a whole service and resources without '*', "
                   "except for actions AWS only grants on '*'")
    for where, document in _iam_documents(resource):
        if document is UNKNOWN or not document:
            continue
        for index, statement in enumerate(policy_statements(document)):
            if statement.get("Effect") != "Allow":
                continue
            sid = statement.get("Sid", f"#{index}")
            actions = [a for a in as_list(statement.get("Action")) if isinstance(a, str)]
            if "NotAction" in statement:
                yield Finding(resource, message(resource, f"{where} statement {sid} allows NotAction {statement['NotAction']!r}",
                                                rule, requirement))
            broad = [a for a in actions if a == "*" or a.endswith(":*")]
            if broad:
                yield Finding(resource, message(resource, f"{where} statement {sid} allows action {broad!r}", rule, requirement))
            resources = as_list(statement.get("Resource"))
            if "*" in resources:
                narrowable = [a for a in actions if not any(_covers(p, a) for p in allowed)]
                if narrowable or not actions:
                    yield Finding(resource, message(
                        resource, f"{where} statement {sid} grants {narrowable or actions!r} on Resource '*'", rule, requirement))


def check_elasticache_encryption(resource: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, requirement = "elasticache-encryption", "transitEncryptionEnabled and atRestEncryptionEnabled are both true"
    for flag in ("transitEncryptionEnabled", "atRestEncryptionEnabled"):
        value = resource.get(flag)
        if value is UNKNOWN or value is True or value == "true":
            continue
        yield Finding(resource, message(resource, f"{flag} is {value!r}", rule, requirement))


RULES = (
    Rule(
        name="s3-public-access-block",
        category="security",
        description="Every S3 bucket blocks public ACLs and policies with all four public-access-block settings.",
        kind="stack",
        check=check_s3_public_access_block,
        severity="critical",
    ),
    Rule(
        name="s3-sse-kms",
        category="security",
        description="Every S3 bucket encrypts objects by default with SSE-KMS.",
        kind="stack",
        check=check_s3_sse_kms,
    ),
    Rule(
        name="s3-versioning",
        category="security",
        description="Every S3 bucket has versioning enabled.",
        kind="stack",
        check=check_s3_versioning,
    ),
    Rule(
        name="s3-deny-non-tls",
        category="security",
        description="Every S3 bucket policy denies requests that do not use TLS.",
        kind="stack",
        check=check_s3_deny_non_tls,
    ),
    Rule(
        name="no-public-ingress",
        category="security",
        description="No security group admits 0.0.0.0/0 or ::/0 on a service port.",
        kind="resource",
        check=check_no_public_ingress,
        resource_types=(INGRESS_RULE, SECURITY_GROUP, LEGACY_RULE),
        config_schema={"servicePorts": {"type": "array", "items": {"type": "integer"}, "default": SERVICE_PORTS}},
        severity="critical",
    ),
    Rule(
        name="imdsv2-required",
        category="security",
        description="Every instance (and launch template) requires IMDSv2 session tokens.",
        kind="resource",
        check=check_imdsv2,
        resource_types=(INSTANCE, LAUNCH_TEMPLATE),
    ),
    Rule(
        name="iam-least-privilege",
        category="security",
        description="No IAM policy allows a '*' action or a '*' resource where a narrower one exists.",
        kind="resource",
        check=check_iam_least_privilege,
        resource_types=IAM_POLICY_TYPES,
        config_schema={
            "resourceWildcardActions": {"type": "array", "items": {"type": "string"}, "default": RESOURCE_WILDCARD_ACTIONS},
        },
    ),
    Rule(
        name="elasticache-encryption",
        category="security",
        description="Every ElastiCache replication group encrypts in transit and at rest.",
        kind="resource",
        check=check_elasticache_encryption,
        resource_types=(REPLICATION_GROUP,),
    ),
)
