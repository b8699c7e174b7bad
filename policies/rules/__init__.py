"""Every guardrail, as plain validators (`Rule`s) over resource types and properties.

Nothing here imports the policy SDK: `policies/__main__.py` wraps these rules for the Pulumi
engine (`policies.rules.pack`), `policies.engine` runs them over the offline plan.
"""

from __future__ import annotations

from policies.rules import compute, kms, network, retention, security, storage, trails
from policies.rules.model import UNKNOWN, Finding, Resource, Rule

RULES: tuple[Rule, ...] = (retention.RULES + storage.RULES + security.RULES + kms.RULES + network.RULES + trails.RULES
                           + compute.RULES)
RULES_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}

__all__ = ["RULES", "RULES_BY_NAME", "UNKNOWN", "Finding", "Resource", "Rule"]
