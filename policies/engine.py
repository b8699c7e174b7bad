"""Run every rule offline over a plan's resources: what `infra plan STACK` prints and fails on.

Enforcement follows the stack's policy config (policies/config/<stack>.json, the same file CI
passes to `pulumi preview --policy-pack-config`), except that prod is always mandatory: no file
can soften a production guardrail.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.rules import RULES
from policies.rules.model import Resource, Rule, normalize

CONFIG_DIR = Path(__file__).resolve().parent / "config"
LEVELS = ("mandatory", "advisory", "disabled")
DEFAULT_LEVEL = "mandatory"
ALWAYS_MANDATORY = ("prod",)


@dataclass(frozen=True, order=True)
class Violation:
    policy: str
    enforcement: str  # mandatory | advisory
    resource: str | None  # "type::name", None for the stack as a whole
    message: str

    @property
    def mandatory(self) -> bool:
        return self.enforcement == "mandatory"

    def __str__(self) -> str:
        return f"[{self.enforcement}] {self.policy}: {self.message}"


class PolicyConfigError(ValueError):
    pass


def config_path(stack: str) -> Path:
    return CONFIG_DIR / f"{stack}.json"


def load_policy_config(stack: str) -> dict[str, Any]:
    """The stack's policy config, or {} (every policy mandatory with its defaults) when it has none."""
    path = config_path(stack)
    if not path.exists():
        return {}
    config = json.loads(path.read_text())
    check_policy_config(config, source=str(path))
    return config


def check_policy_config(config: Mapping[str, Any], source: str = "policy config") -> None:
    """Reject names and levels the Pulumi engine would reject too, so a typo fails here first."""
    names = {rule.name for rule in RULES}
    problems = []
    for key, value in config.items():
        if key != "all" and key not in names:
            problems.append(f"{key}: no such policy; known: {', '.join(sorted(names))}")
            continue
        level = value if isinstance(value, str) else value.get("enforcementLevel") if isinstance(value, Mapping) else None
        if level is not None and level not in LEVELS:
            problems.append(f"{key}: enforcement level {level!r}; allowed: {', '.join(LEVELS)}")
    if problems:
        raise PolicyConfigError(f"{source}:\n" + "\n".join(f"  - {p}" for p in problems))


def enforcement_level(rule: Rule, environment: str, config: Mapping[str, Any]) -> str:
    if environment in ALWAYS_MANDATORY:
        return "mandatory"
    own = config.get(rule.name)
    if isinstance(own, str):
        return own
    if isinstance(own, Mapping) and "enforcementLevel" in own:
        return own["enforcementLevel"]
    return config.get("all", DEFAULT_LEVEL)


def rule_overrides(rule: Rule, config: Mapping[str, Any]) -> dict[str, Any]:
    own = config.get(rule.name)
    return {k: v for k, v in own.items() if k != "enforcementLevel"} if isinstance(own, Mapping) else {}


def plan_resource(entry: Mapping[str, Any]) -> Resource:
    """A resource of the plan (`{"type", "name", "parent", "props"}`) as the rules see it."""
    dependencies = entry.get("propertyDependencies") or {}
    return Resource(
        type=entry["type"],
        name=entry["name"],
        props=normalize(entry.get("props") or {}),
        urn=entry.get("urn", ""),
        parent=entry.get("parent"),
        property_dependencies={key: tuple(value) for key, value in dependencies.items()},
    )


def evaluate(resources: Iterable[Mapping[str, Any] | Resource], environment: str, stack: str,
             config: Mapping[str, Any] | None = None) -> list[Violation]:
    """Every rule over every resource; violations sorted (mandatory first), each with its enforcement level."""
    config = load_policy_config(stack) if config is None else config
    check_policy_config(config)
    plain = [r if isinstance(r, Resource) else plan_resource(r) for r in resources]
    violations = set()
    for rule in RULES:
        level = enforcement_level(rule, environment, config)
        if level == "disabled":
            continue
        overrides = rule_overrides(rule, config)
        if rule.kind == "stack":
            findings = rule.run_stack(plain, overrides)
        else:
            findings = [f for resource in plain for f in rule.run_resource(resource, overrides)]
        for finding in findings:
            where = f"{finding.resource.type}::{finding.resource.name}" if finding.resource is not None else None
            violations.add(Violation(rule.name, level, where, finding.message))
    return sorted(violations, key=lambda v: (not v.mandatory, v.policy, v.resource or "", v.message))


def mandatory(violations: Iterable[Violation]) -> list[Violation]:
    return [v for v in violations if v.mandatory]
