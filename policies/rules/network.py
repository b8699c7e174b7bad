"""Network: every VPC's flows logged, its default security group closed, egress to the internet only where needed,
load balancers protected from deletion where clients depend on them."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from policies.rules.model import UNKNOWN, Finding, Resource, Rule, as_list, attached_to, by_type, message

VPC = "aws:ec2/vpc:Vpc"
FLOW_LOG = "aws:ec2/flowLog:FlowLog"
LOG_GROUP = "aws:cloudwatch/logGroup:LogGroup"
DEFAULT_SECURITY_GROUP = "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS_RULE = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
LEGACY_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
LOAD_BALANCER_TYPES = ("aws:lb/loadBalancer:LoadBalancer", "aws:alb/loadBalancer:LoadBalancer")

# The provider's default destination of a flow log.
DEFAULT_FLOW_LOG_DESTINATION = "cloud-watch-logs"
# A year of flows: what an investigation of a breach found months later needs (PCI DSS keeps audit trails a year).
MIN_FLOW_LOG_RETENTION_DAYS = 365
# Packages (HTTP, HTTPS), AWS APIs, PagerDuty and Slack (HTTPS), Alertmanager's SMTP submission port.
INTERNET_EGRESS_PORTS = [80, 443, 587]
INTERNET_EGRESS_PROTOCOLS = ["tcp"]
# Where deleting the database load balancer would cut every client at once.
PROTECTED_ENVIRONMENTS = ["staging", "prod"]
PROTOCOL_NAMES = {"-1": "all", "all": "all", "6": "tcp", "17": "udp", "1": "icmp", "58": "icmpv6"}


def _names_log_group(flow_log: Resource, group: Resource) -> bool | Any:
    """Whether the flow log writes to this group: by its ARN (arn:...:logs:...:log-group:NAME[:*]), or through
    the engine's dependencies while the ARN is unknown; UNKNOWN when nobody can tell."""
    destination = flow_log.get("logDestination")
    if set(flow_log.property_dependencies.get("logDestination", ())) & group.refs():
        return True
    if destination is UNKNOWN:
        return UNKNOWN
    name = group.get("name")
    if not isinstance(destination, str) or not isinstance(name, str):
        return False
    return destination in group.refs() or re.fullmatch(rf"arn:[^:]+:logs:[^:]*:[^:]*:log-group:{re.escape(name)}(:\*)?",
                                                       destination) is not None


def check_vpc_flow_logs(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, min_days = "vpc-flow-logs", config["minRetentionDays"]
    requirement = (f"every VPC has a flow log of trafficType ALL; a CloudWatch log group it writes to is encrypted (kmsKeyId) "
                   f"and keeps the records {min_days} days or more, not forever")
    groups, checked = by_type(resources, LOG_GROUP), set()
    for vpc in by_type(resources, VPC):
        flow_logs = attached_to(vpc, resources, FLOW_LOG, "vpcId")
        if flow_logs is UNKNOWN:
            continue
        if not flow_logs:
            yield Finding(vpc, message(vpc, "no flow log: nothing records which flows the VPC accepted or rejected", rule,
                                       requirement))
            continue
        traffic = [f.get("trafficType") for f in flow_logs]
        if UNKNOWN not in traffic and "ALL" not in traffic:
            names = ", ".join(repr(f.name) for f in flow_logs)
            yield Finding(vpc, message(vpc, f"flow log {names} records trafficType {traffic!r} only", rule, requirement))
        for flow_log in flow_logs:
            kind = flow_log.get("logDestinationType")
            if kind is UNKNOWN or (kind or DEFAULT_FLOW_LOG_DESTINATION) != DEFAULT_FLOW_LOG_DESTINATION:
                continue  # a bucket destination is held by the bucket guardrails
            for group in groups:
                if group.name in checked or _names_log_group(flow_log, group) is not True:
                    continue
                checked.add(group.name)
                yield from _check_log_group(group, vpc, min_days, rule, requirement)


def _check_log_group(group: Resource, vpc: Resource, min_days: int, rule: str, requirement: str) -> Iterator[Finding]:
    key, days = group.get("kmsKeyId"), group.get("retentionInDays")
    if key is not UNKNOWN and not key:
        yield Finding(group, message(group, f"flow logs of VPC {vpc.name!r}: no kmsKeyId (CloudWatch's own encryption, no key "
                                     "of the stack's)", rule, requirement))
    if days is UNKNOWN:
        return
    if not days:
        yield Finding(group, message(group, f"flow logs of VPC {vpc.name!r}: retentionInDays is {days!r}, kept forever", rule,
                                     requirement))
    elif isinstance(days, int) and days < min_days:
        yield Finding(group, message(group, f"flow logs of VPC {vpc.name!r}: kept {days} days", rule, requirement))


def _rules_summary(rules: list[Any]) -> str:
    shown = []
    for item in rules:
        if not isinstance(item, Mapping):
            shown.append(repr(item))
            continue
        sources = as_list(item.get("cidrBlocks")) + as_list(item.get("ipv6CidrBlocks")) + \
            (["self"] if item.get("self") else []) + as_list(item.get("securityGroups"))
        shown.append(f"{item.get('protocol')} {item.get('fromPort')}-{item.get('toPort')} {sources or ''}".rstrip())
    return "; ".join(shown)


def check_default_security_group_closed(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule = "vpc-default-security-group-closed"
    requirement = "every VPC's default security group is taken over (DefaultSecurityGroup) with no ingress and no egress rule"
    for vpc in by_type(resources, VPC):
        groups = attached_to(vpc, resources, DEFAULT_SECURITY_GROUP, "vpcId")
        if groups is UNKNOWN:
            continue
        if not groups:
            yield Finding(vpc, message(vpc, "no DefaultSecurityGroup: AWS's default group keeps its allow-all rules for "
                                       "whatever is launched without a group", rule, requirement))
            continue
        for group in groups:
            for direction in ("ingress", "egress"):
                rules = group.get(direction)
                if rules is UNKNOWN or not rules:
                    continue  # absent: the provider removes every rule when it takes the group over
                yield Finding(group, message(group, f"VPC {vpc.name!r}: {direction} {_rules_summary(as_list(rules))}", rule,
                                             requirement))
            for rule_type in (INGRESS_RULE, EGRESS_RULE, LEGACY_RULE):
                attached = attached_to(group, resources, rule_type, "securityGroupId")
                if attached is UNKNOWN:
                    continue
                for extra in attached:
                    yield Finding(group, message(group, f"VPC {vpc.name!r}: {extra.label} adds a rule to it", rule, requirement))


def _egress_entries(resource: Resource) -> list[tuple[Any, Any, Any, list[Any]]]:
    """(protocol, from, to, destinations) for each egress this resource allows."""
    if resource.type == EGRESS_RULE:
        return [(resource.get("ipProtocol"), resource.get("fromPort"), resource.get("toPort"),
                 [resource.get("cidrIpv4"), resource.get("cidrIpv6")])]
    if resource.type == LEGACY_RULE:
        if resource.get("type") != "egress":
            return []
        destinations = as_list(resource.get("cidrBlocks")) + as_list(resource.get("ipv6CidrBlocks"))
        return [(resource.get("protocol"), resource.get("fromPort"), resource.get("toPort"), destinations)]
    entries = []
    for block in as_list(resource.get("egress")):
        if not isinstance(block, Mapping):
            continue
        destinations = as_list(block.get("cidrBlocks")) + as_list(block.get("ipv6CidrBlocks"))
        entries.append((block.get("protocol"), block.get("fromPort"), block.get("toPort"), destinations))
    return entries


def _is_internet(cidr: Any) -> bool:
    """0.0.0.0/0, ::/0 and every other spelling of "any address"."""
    if not isinstance(cidr, str):
        return False
    try:
        return ipaddress.ip_network(cidr, strict=False).prefixlen == 0
    except ValueError:
        return False


def check_sg_egress_narrow(resource: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, ports, protocols = "sg-egress-narrow", sorted(config["internetEgressPorts"]), list(config["internetEgressProtocols"])
    requirement = (f"egress to 0.0.0.0/0 or ::/0 only over {'/'.join(protocols)} to ports {', '.join(map(str, ports))}; "
                   "the rest stays inside the VPC, its endpoints and the S3 prefix list")
    for protocol, low, high, destinations in _egress_entries(resource):
        internet = [d for d in destinations if _is_internet(d)]
        if not internet or protocol is UNKNOWN:
            continue
        to = ", ".join(internet)
        name = PROTOCOL_NAMES.get(str(protocol).lower(), str(protocol).lower())
        if name == "all":
            yield Finding(resource, message(resource, f"all traffic (protocol {protocol!r}) to {to}", rule, requirement))
            continue
        if name not in protocols:
            yield Finding(resource, message(resource, f"protocol {protocol!r} to {to}", rule, requirement))
            continue
        if not isinstance(low, int) or not isinstance(high, int):
            continue  # unknown until the update
        allowed = [p for p in ports if low <= p <= high]
        if len(allowed) < high - low + 1:
            shown = f"port {low}" if low == high else f"ports {low}-{high}"
            yield Finding(resource, message(resource, f"{shown}/{protocol} to {to}", rule, requirement))


def check_lb_deletion_protection(resource: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, environments = "lb-deletion-protection", list(config["environments"])
    requirement = f"in {', '.join(environments)} (by the Environment tag), every load balancer has enableDeletionProtection true"
    tags = resource.props.get("tags")
    if tags is UNKNOWN or resource.tags.get("Environment") not in environments:
        return
    protected = resource.get("enableDeletionProtection")
    if protected is not UNKNOWN and protected is not True:
        yield Finding(resource, message(resource, f"{resource.tags['Environment']}: enableDeletionProtection is {protected!r}",
                                        rule, requirement))


RULES = (
    Rule(
        name="vpc-flow-logs",
        category="security",
        description="Every VPC logs all its flows, into an encrypted log group with a retention.",
        kind="stack",
        check=check_vpc_flow_logs,
        config_schema={"minRetentionDays": {"type": "integer", "minimum": 1, "default": MIN_FLOW_LOG_RETENTION_DAYS}},
    ),
    Rule(
        name="vpc-default-security-group-closed",
        category="security",
        description="Every VPC's default security group is taken over with no rules.",
        kind="stack",
        check=check_default_security_group_closed,
    ),
    Rule(
        name="sg-egress-narrow",
        category="security",
        description="No security group lets traffic out to the internet but TCP to the allowed ports (80, 443, 587 by default).",
        kind="resource",
        check=check_sg_egress_narrow,
        resource_types=(EGRESS_RULE, SECURITY_GROUP, LEGACY_RULE),
        config_schema={
            "internetEgressPorts": {"type": "array", "items": {"type": "integer"}, "default": INTERNET_EGRESS_PORTS},
            "internetEgressProtocols": {"type": "array", "items": {"type": "string"}, "default": INTERNET_EGRESS_PROTOCOLS},
        },
    ),
    Rule(
        name="lb-deletion-protection",
        category="security",
        description="In staging and prod, every load balancer has deletion protection.",
        kind="resource",
        check=check_lb_deletion_protection,
        resource_types=LOAD_BALANCER_TYPES,
        config_schema={"environments": {"type": "array", "items": {"type": "string"}, "default": PROTECTED_ENVIRONMENTS}},
    ),
)
