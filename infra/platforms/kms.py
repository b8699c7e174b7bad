"""Key policies for the stack's KMS keys: administrators and users kept apart.

Without a policy of its own a key gets AWS's default, which hands every KMS action to IAM: whoever
may `kms:*` in the account may disable the backups key and make seven years of audit logs
unreadable. Here:

- the key administrators (the roles `security.keyAdministratorRoles` names) manage the key and
  nobody else may change its policy, disable it, stop its rotation or schedule its deletion (an
  explicit Deny, which no IAM policy can outweigh); they cannot encrypt or decrypt with it, nor create
  the grants that would let them;
- principals of the account use the key only through the AWS services that need it (`kms:ViaService`),
  as their own IAM policies allow (the hosts' roles name the keys they use); AWS services that
  act on their own behalf (CloudWatch Logs, CloudTrail) get a statement each, scoped by encryption
  context and source.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

# AWS's key-administrator actions (the console's "key administrators" set), but kms:CreateAlias for its
# kms:Create*: that would include kms:CreateGrant, with which an administrator could give anyone, itself
# included, the key's use. No cryptographic use.
ADMIN_ACTIONS = [
    "kms:CreateAlias", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*", "kms:Revoke*",
    "kms:Disable*", "kms:Get*", "kms:Delete*", "kms:TagResource", "kms:UntagResource", "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion", "kms:RotateKeyOnDemand",
]
USE_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
# What only an administrator may do: each of these can make the key's data unreadable or the key unmanageable.
GUARDED_ACTIONS = ["kms:ScheduleKeyDeletion", "kms:DisableKey", "kms:DisableKeyRotation", "kms:PutKeyPolicy"]


def role_arn(account_id: str, role: str) -> str:
    return f"arn:aws:iam::{account_id}:role/{role}"


def key_policy(account_id: str, administrators: Sequence[str], via_services: Sequence[str],
               service_statements: Sequence[dict] = (), administrators_may_decrypt: bool = True) -> str:
    """The key policy document (JSON). `administrators` are role names; `via_services` the AWS service
    endpoints (e.g. "s3.eu-west-1.amazonaws.com") through which the account's principals may use the key.
    `administrators_may_decrypt` False: the administrators may not decrypt even through a service (the
    backups key: managing it must not mean reading the backups and the audit logs). The data key must
    allow it: `pulumi up`, run as an administrator, encrypts volumes, secrets and bundles with it."""
    if not administrators:
        raise ValueError("a key policy needs at least one administrator role")
    admins = [role_arn(account_id, role) for role in administrators]
    account_root = f"arn:aws:iam::{account_id}:root"
    statements = [
        {"Sid": "KeyAdministration", "Effect": "Allow", "Principal": {"AWS": admins},
         "Action": ADMIN_ACTIONS, "Resource": "*"},
        {"Sid": "UseThroughAwsServices", "Effect": "Allow", "Principal": {"AWS": account_root},
         "Action": USE_ACTIONS, "Resource": "*",
         "Condition": {"StringEquals": {"kms:ViaService": sorted(via_services), "kms:CallerAccount": account_id}}},
        # EBS and ElastiCache hold a key through grants for the resources they attach.
        {"Sid": "GrantsForAwsResources", "Effect": "Allow", "Principal": {"AWS": account_root},
         "Action": ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:ViaService": sorted(via_services), "kms:CallerAccount": account_id},
                       "Bool": {"kms:GrantIsForAWSResource": "true"}}},
        *service_statements,
        {"Sid": "OnlyAdministratorsMayDisableOrDelete", "Effect": "Deny", "Principal": "*",
         "Action": GUARDED_ACTIONS, "Resource": "*",
         "Condition": {"ArnNotEquals": {"aws:PrincipalArn": admins}}},
    ]
    if not administrators_may_decrypt:
        statements.append({"Sid": "AdministratorsMayNotDecrypt", "Effect": "Deny", "Principal": "*",
                           "Action": ["kms:Decrypt", "kms:ReEncrypt*"], "Resource": "*",
                           "Condition": {"ArnEquals": {"aws:PrincipalArn": admins}}})
    return json.dumps({"Version": "2012-10-17", "Statement": statements}, sort_keys=True)


def cloudwatch_logs_statement(account_id: str, region: str) -> dict:
    """CloudWatch Logs encrypting this account's log groups in the region (AWS's documented statement)."""
    return {
        "Sid": "CloudWatchLogsEncryptsLogGroups", "Effect": "Allow",
        "Principal": {"Service": f"logs.{region}.amazonaws.com"},
        "Action": ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"],
        "Resource": "*",
        "Condition": {"ArnLike": {"kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{region}:{account_id}:log-group:*"}},
    }


def cloudtrail_statement(account_id: str, trail_arn: str) -> dict:
    """CloudTrail encrypting the log files of one trail of this account."""
    return {
        "Sid": "CloudTrailEncryptsItsLogs", "Effect": "Allow", "Principal": {"Service": "cloudtrail.amazonaws.com"},
        "Action": ["kms:GenerateDataKey*", "kms:DescribeKey"], "Resource": "*",
        "Condition": {"StringEquals": {"aws:SourceArn": trail_arn},
                      "StringLike": {"kms:EncryptionContext:aws:cloudtrail:arn": f"arn:aws:cloudtrail:*:{account_id}:trail/*"}},
    }
