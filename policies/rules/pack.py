"""The rules as pulumi_policy policies. Building them starts nothing; only `PolicyPack(...)` does."""

from __future__ import annotations

from collections.abc import Iterable

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    PolicyResource,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    Severity,
    StackValidationArgs,
    StackValidationPolicy,
)

from policies.rules import RULES
from policies.rules.model import Resource, Rule, normalize

PACK_NAME = "betting-platform-guardrails"


def resource_from_args(args: ResourceValidationArgs) -> Resource:
    parent = args.opts.parent if args.opts is not None else None
    return Resource(type=args.resource_type, name=args.name, props=normalize(args.props), urn=args.urn, parent=parent)


def resource_from_stack(resource: PolicyResource) -> Resource:
    return Resource(
        type=resource.resource_type,
        name=resource.name,
        props=normalize(resource.props),
        urn=resource.urn,
        parent=resource.parent.urn if resource.parent is not None else None,
        property_dependencies={key: tuple(d.urn for d in deps) for key, deps in (resource.property_dependencies or {}).items()},
    )


def validate_resource(rule: Rule):
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        if args.resource_type not in rule.resource_types:
            return
        for finding in rule.run_resource(resource_from_args(args), args.get_config()):
            report_violation(finding.message, None)

    return validate


def validate_stack(rule: Rule):
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        resources = [resource_from_stack(r) for r in args.resources]
        for finding in rule.run_stack(resources, args.get_config()):
            urn = finding.resource.urn if finding.resource is not None and finding.resource.urn else None
            report_violation(finding.message, urn)

    return validate


def build_policy(rule: Rule) -> ResourceValidationPolicy | StackValidationPolicy:
    common = {
        "name": rule.name,
        "description": rule.description,
        # Mandatory unless a stack's policy config (policies/config/<stack>.json) says otherwise.
        "enforcement_level": EnforcementLevel.MANDATORY,
        "config_schema": PolicyConfigSchema(properties={k: dict(v) for k, v in rule.config_schema.items()})
        if rule.config_schema else None,
        "severity": Severity(rule.severity),
        "tags": [rule.category],
    }
    if rule.kind == "resource":
        return ResourceValidationPolicy(validate=validate_resource(rule), **common)
    return StackValidationPolicy(validate=validate_stack(rule), **common)


def build_policies(rules: Iterable[Rule] = RULES) -> list[ResourceValidationPolicy | StackValidationPolicy]:
    return [build_policy(rule) for rule in rules]
