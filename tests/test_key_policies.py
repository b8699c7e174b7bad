"""The stack's KMS key policies, as KMS would decide requests against them.

The key policies and the hosts' IAM policies are taken from the program as it declares them (under
the mock engine); `decide` below applies AWS's documented evaluation for KMS: an explicit Deny in the
key policy or the caller's IAM policy wins; else the key policy must allow the caller itself, or allow
the account and the caller's IAM policy allow too. It implements the condition operators these
policies use (StringEquals, StringLike, ArnEquals, ArnLike, ArnNotEquals, Bool; several values of a
key are alternatives, several keys all hold). moto's KMS enforces no key policy, so nothing here is
checked by AWS's own code; not seen either: organisation SCPs, permission boundaries, session
policies and grants made after creation.
"""

from __future__ import annotations

import fnmatch
import json

import pytest

from infra.platforms.kms import GUARDED_ACTIONS, USE_ACTIONS
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import stack_config
from tests.test_program import named, of_type

ACCOUNT = "123456789012"  # the mock engine's account
REGION = "eu-west-1"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/betting-platform-key-admin"
# An account administrator who is not a key administrator: IAM allows it everything.
OPERATOR = f"arn:aws:iam::{ACCOUNT}:role/platform-operator"
EVERYTHING = json.dumps({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def _matches(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value.lower(), pattern.lower()) if "*" in pattern or "?" in pattern else \
        value.lower() == pattern.lower()


def _condition_holds(condition: dict, context: dict[str, str]) -> bool:
    for operator, tests in condition.items():
        for key, expected in tests.items():
            value, wanted = context.get(key), _list(expected)
            if operator in ("StringEquals", "ArnEquals"):
                ok = value is not None and value in wanted
            elif operator in ("StringLike", "ArnLike"):
                ok = value is not None and any(_matches(p, value) for p in wanted)
            elif operator == "ArnNotEquals":
                ok = value is None or value not in wanted
            elif operator == "Bool":
                ok = value is not None and value.lower() in [str(w).lower() for w in wanted]
            else:
                raise AssertionError(f"operator {operator} not implemented here: extend decide() first")
            if not ok:
                return False
    return True


def _principal_matches(statement: dict, caller: str) -> bool:
    principal = statement.get("Principal")
    if principal is None:  # an identity policy: it is the caller's own
        return True
    if principal == "*":
        return True
    names = [*_list(principal.get("AWS", [])), *_list(principal.get("Service", []))]
    account = f"arn:aws:iam::{caller.split(':')[4]}:root" if caller.startswith("arn:") else None
    return "*" in names or caller in names or (account in names)


def _effects(document: str, caller: str, action: str, resource: str, context: dict[str, str]) -> set[str]:
    out = set()
    for statement in json.loads(document)["Statement"]:
        if not _principal_matches(statement, caller):
            continue
        if not any(_matches(a, action) for a in _list(statement["Action"])):
            continue
        if not any(_matches(r, resource) for r in _list(statement["Resource"])):
            continue
        if _condition_holds(statement.get("Condition", {}), context):
            out.add(statement["Effect"])
    return out


def _direct(document: str, caller: str, action: str, context: dict[str, str]) -> set[str]:
    """Effects of key-policy statements that name the caller itself (not the account)."""
    kept = {"Version": "2012-10-17", "Statement": [
        s for s in json.loads(document)["Statement"]
        if s["Effect"] == "Allow" and s.get("Principal") != "*" and caller in
        [*_list(s["Principal"].get("AWS", [])), *_list(s["Principal"].get("Service", []))]]}
    return _effects(json.dumps(kept), caller, action, "*", context)


def decide(key_policy: str, caller: str, action: str, context: dict[str, str] | None = None,
           identity_policy: str | None = None, key_arn: str = "*") -> bool:
    context = {"aws:PrincipalArn": caller, "kms:CallerAccount": ACCOUNT, **(context or {})}
    in_key = _effects(key_policy, caller, action, "*", context)
    in_iam = _effects(identity_policy, caller, action, key_arn, context) if identity_policy else set()
    if "Deny" in in_key or "Deny" in in_iam:
        return False
    if "Allow" in _direct(key_policy, caller, action, context):
        return True
    return "Allow" in in_key and "Allow" in in_iam


def _key(name: str) -> tuple[str, str]:
    """A key's policy and ARN (the mock engine's ARN, which the hosts' IAM policies name too)."""
    return named("prod", name).props["policy"], f"arn:aws:offline:{REGION}:{ACCOUNT}:key/{name}"


KEYS = ("data-key", "backups-key", "backups-replica-key")


def test_every_key_of_every_stack_has_a_policy_of_its_own():
    for stack in ("dev", "staging", "prod"):
        for key in of_type(stack, "kms/key:Key"):
            assert json.loads(key.props["policy"])["Statement"], (stack, key.name)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("action", GUARDED_ACTIONS)
def test_only_a_key_administrator_may_disable_delete_or_repolicy_a_key(key, action):
    policy, _ = _key(key)
    assert not decide(policy, OPERATOR, action, identity_policy=EVERYTHING)
    # Even with AWS's default statement added back (the account, hence IAM, may do everything), the
    # explicit Deny wins for whoever is not an administrator.
    document = json.loads(policy)
    document["Statement"].append({"Sid": "Enable IAM User Permissions", "Effect": "Allow",
                                  "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*", "Resource": "*"})
    assert not decide(json.dumps(document), OPERATOR, action, identity_policy=EVERYTHING)
    assert decide(json.dumps(document), OPERATOR, "kms:DescribeKey", identity_policy=EVERYTHING)  # the evaluator sees it
    assert decide(policy, ADMIN, action)
    # KMS refuses a key policy that would lock its author out: the administrator, who runs `pulumi up`,
    # may put the policy again.
    assert decide(policy, ADMIN, "kms:PutKeyPolicy")


@pytest.mark.parametrize("key", ("backups-key", "backups-replica-key"))
def test_administering_the_backups_key_is_not_reading_the_backups(key):
    policy, _ = _key(key)
    service = "s3.eu-central-1.amazonaws.com" if key == "backups-replica-key" else f"s3.{REGION}.amazonaws.com"
    assert not decide(policy, ADMIN, "kms:Decrypt", {"kms:ViaService": service}, identity_policy=EVERYTHING)


@pytest.mark.parametrize("key", KEYS)
def test_no_one_uses_a_key_outside_the_services_it_serves(key):
    policy, _ = _key(key)
    for action in USE_ACTIONS:
        assert not decide(policy, OPERATOR, action, identity_policy=EVERYTHING), action  # no kms:ViaService
        assert not decide(policy, OPERATOR, action, {"kms:ViaService": "lambda.eu-west-1.amazonaws.com"},
                          identity_policy=EVERYTHING), action


def test_a_postgres_host_uses_the_keys_exactly_as_its_role_says():
    host = named("prod", "postgres-pg-1-access").props["policy"]
    role = f"arn:aws:iam::{ACCOUNT}:role/postgres-pg-1-role"
    data, data_arn = _key("data-key")
    backups, backups_arn = _key("backups-key")
    s3, ssm = {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}, {"kms:ViaService": f"ssm.{REGION}.amazonaws.com"}
    assert decide(data, role, "kms:Decrypt", ssm, host, data_arn)  # its secrets
    assert decide(data, role, "kms:Decrypt", s3, host, data_arn)  # its bundles
    assert decide(backups, role, "kms:GenerateDataKey", s3, host, backups_arn)  # WAL and backups it writes
    assert decide(backups, role, "kms:Decrypt", s3, host, backups_arn)  # and reads back to restore
    assert not decide(backups, role, "kms:Decrypt", {}, host, backups_arn)  # only through S3
    assert not decide(backups, role, "kms:ScheduleKeyDeletion", {}, host, backups_arn)


def test_cloudtrail_encrypts_only_the_data_access_trails_logs():
    policy, _ = _key("backups-key")
    topology = build_topology(load_settings(stack_config("prod"), "prod"))
    assert topology.data_access_log_bucket in named("prod", "backups-data-access-trail").props["s3BucketName"]
    ours = f"arn:aws:cloudtrail:{REGION}:{ACCOUNT}:trail/betting-prod-data-access"
    context = {"aws:SourceArn": ours, "kms:EncryptionContext:aws:cloudtrail:arn": ours}
    assert decide(policy, "cloudtrail.amazonaws.com", "kms:GenerateDataKey", context)
    other = f"arn:aws:cloudtrail:{REGION}:{ACCOUNT}:trail/someone-elses"
    assert not decide(policy, "cloudtrail.amazonaws.com", "kms:GenerateDataKey",
                      {"aws:SourceArn": other, "kms:EncryptionContext:aws:cloudtrail:arn": other})
    assert not decide(policy, "cloudtrail.amazonaws.com", "kms:Decrypt", context)


def test_cloudwatch_logs_encrypts_only_this_accounts_log_groups_with_the_data_key():
    policy, _ = _key("data-key")
    logs = f"logs.{REGION}.amazonaws.com"
    group = named("prod", "network-flow-logs").props["name"]
    ours = {"kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{group}"}
    assert decide(policy, logs, "kms:GenerateDataKey", ours)
    assert not decide(policy, logs, "kms:GenerateDataKey",
                      {"kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{REGION}:999999999999:log-group:{group}"})


def test_the_evaluator_itself_refuses_what_it_does_not_implement():
    policy = json.dumps({"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*",
                                        "Condition": {"NumericLessThan": {"kms:x": "1"}}}]})
    with pytest.raises(AssertionError, match="not implemented"):
        decide(policy, OPERATOR, "kms:Decrypt")
