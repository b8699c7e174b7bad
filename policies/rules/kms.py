"""KMS: every key has a policy of its own that keeps its administrators and its users apart.

Without one a key gets AWS's default policy, which hands every KMS action to IAM: whoever may
`kms:*` in the account may disable the backups key and make the audit logs unreadable. The rule
wants what infra/platforms/kms.py builds, read from the policy document itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from policies.rules.model import UNKNOWN, Finding, Resource, Rule, as_list, dig, message, policy_document, policy_statements

KEY = "aws:kms/key:Key"
# What makes a key's data unreadable (deletion, disabling), weakens it (no rotation), or lifts these
# very Deny statements (a new policy): only the administrators may.
GUARDED_ACTIONS = ["kms:ScheduleKeyDeletion", "kms:DisableKey", "kms:DisableKeyRotation", "kms:PutKeyPolicy"]
# Using a key, as opposed to managing it.
CRYPTOGRAPHIC_ACTIONS = [
    "kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext", "kms:GenerateDataKeyPair", "kms:GenerateDataKeyPairWithoutPlaintext",
    "kms:Sign", "kms:Verify", "kms:GenerateMac", "kms:VerifyMac", "kms:DeriveSharedSecret",
]
# A grant gives the key's use to whichever principal it names, the administrator's own included,
# unless it may only be created for an AWS resource (kms:GrantIsForAWSResource).
CREATE_GRANT = "kms:CreateGrant"
# Conditions that leave principals out of a Deny by their ARN (the String forms compare the same text).
EXEMPTING_OPERATORS = ("ArnNotEquals", "ArnNotLike", "StringNotEquals", "StringNotLike")


def _glob(pattern: str, value: str, case_sensitive: bool = False) -> bool:
    """IAM's wildcards: `*` any run of characters, `?` one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case_sensitive else re.IGNORECASE) is not None


def _sid(statement: Mapping[str, Any], index: int) -> str:
    return repr(statement.get("Sid", f"#{index}"))


def _granting(statement: Mapping[str, Any], action: str) -> str | None:
    """The Action pattern (or NotAction) through which the statement applies to `action`; None if it does not."""
    if "NotAction" in statement:
        excluded = [a for a in as_list(statement.get("NotAction")) if isinstance(a, str)]
        return None if any(_glob(p, action) for p in excluded) else "NotAction"
    return next((p for p in as_list(statement.get("Action")) if isinstance(p, str) and _glob(p, action)), None)


def _aws_principals(statement: Mapping[str, Any]) -> list[str]:
    principal = statement.get("Principal")
    if principal == "*":
        return ["*"]
    if isinstance(principal, Mapping):
        return [p for p in as_list(principal.get("AWS")) if isinstance(p, str)]
    return []


def _to_everyone(statement: Mapping[str, Any]) -> bool:
    return "*" in _aws_principals(statement)


def _exempted(statement: Mapping[str, Any]) -> tuple[list[tuple[str, str]], str | None]:
    """The administrators a Deny leaves out, as (operator, ARN or pattern), or why it is no such Deny."""
    condition = statement.get("Condition")
    if not isinstance(condition, Mapping) or not condition:
        return [], "has no Condition naming administrators: nobody could manage the key"
    exempted, others = [], []
    for operator, block in condition.items():
        base = operator.removesuffix("IfExists")
        if base in EXEMPTING_OPERATORS and isinstance(block, Mapping) and {k.lower() for k in block} == {"aws:principalarn"}:
            exempted += [(base, arn) for values in block.values() for arn in as_list(values) if isinstance(arn, str)]
        else:
            others.append(f"{operator} {sorted(block) if isinstance(block, Mapping) else block!r}")
    if others:
        return [], f"applies only when {'; '.join(others)} also holds"
    if not exempted:
        return [], "names no administrator ARN"
    return exempted, None


def _is_administrator(principal: str, exempted: list[tuple[str, str]]) -> bool:
    return any(_glob(arn, principal, case_sensitive=True) if operator.endswith("Like") else principal == arn
               for operator, arn in exempted)


def _only_for_aws_resources(statement: Mapping[str, Any]) -> bool:
    value = dig(statement, "Condition", "Bool", "kms:GrantIsForAWSResource")
    return str(value).lower() == "true"


def check_kms_key_policy(key: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, guarded = "kms-key-policy", list(config["guardedActions"])
    requirement = (f"a key policy of its own; no Allow of kms:* or *; {', '.join(guarded)} denied to all but named "
                   "administrators (ArnNotEquals/ArnNotLike aws:PrincipalArn), who may neither use the key nor create grants")
    value = key.get("policy")
    if value is UNKNOWN:
        return
    if value is None or value == "":
        yield Finding(key, message(key, "no key policy: AWS's default gives every KMS action to IAM, to administrators and "
                                   "users alike", rule, requirement))
        return
    document = policy_document(value)
    if not document:
        yield Finding(key, message(key, "the policy is not a JSON policy document", rule, requirement))
        return
    statements = list(enumerate(policy_statements(document)))
    allows = [(i, s) for i, s in statements if s.get("Effect") == "Allow"]
    for index, statement in allows:
        sid, principals = _sid(statement, index), _aws_principals(statement) or statement.get("Principal")
        broad = [a for a in as_list(statement.get("Action")) if isinstance(a, str) and a.lower() in ("*", "kms:*")]
        if broad:
            yield Finding(key, message(key, f"statement {sid} allows {broad!r} to {principals!r}", rule, requirement))
        if "NotAction" in statement:
            yield Finding(key, message(key, f"statement {sid} allows NotAction {statement['NotAction']!r}", rule, requirement))
        if _to_everyone(statement) and not statement.get("Condition"):
            actions = statement.get("Action", statement.get("NotAction"))
            yield Finding(key, message(key, f"statement {sid} allows {actions!r} to every principal ('*') without a "
                                       "Condition", rule, requirement))

    exempted: list[tuple[str, str]] = []
    missing, near_misses = list(guarded), []
    for index, statement in statements:
        if statement.get("Effect") != "Deny":
            continue
        covered = [a for a in guarded if _granting(statement, a)]
        if not covered:
            continue
        if not _to_everyone(statement):
            near_misses.append(f"statement {_sid(statement, index)} denies them only to {statement.get('Principal')!r}")
            continue
        admins, why = _exempted(statement)
        if why:
            near_misses.append(f"statement {_sid(statement, index)} {why}")
            continue
        exempted += admins
        missing = [a for a in missing if a not in covered]
    if missing:
        found = f"nothing denies {', '.join(missing)} to every principal but the administrators"
        yield Finding(key, message(key, "; ".join([found, *near_misses]), rule, requirement))

    for index, statement in allows:
        administrators = [p for p in _aws_principals(statement) if p != "*" and _is_administrator(p, exempted)]
        if not administrators:
            continue
        uses = [f"{a} (by {pattern!r})" for a in CRYPTOGRAPHIC_ACTIONS if (pattern := _granting(statement, a))]
        grant = _granting(statement, CREATE_GRANT)
        if grant and not _only_for_aws_resources(statement):
            uses.append(f"{CREATE_GRANT} (by {grant!r}), which can hand the key's use to anyone")
        if uses:
            found = f"administrators' statement {_sid(statement, index)} ({', '.join(administrators)}) allows {', '.join(uses)}"
            yield Finding(key, message(key, found, rule, requirement))


RULES = (
    Rule(
        name="kms-key-policy",
        category="security",
        description="Every KMS key has its own policy: nothing allows kms:* or *, only named administrators may delete, "
                    "disable or re-policy it, and they cannot use it.",
        kind="resource",
        check=check_kms_key_policy,
        resource_types=(KEY,),
        config_schema={"guardedActions": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                          "default": GUARDED_ACTIONS}},
        severity="critical",
    ),
)
