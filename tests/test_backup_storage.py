"""The backup bucket as the program declares it, applied to moto's S3 (its own parser and validation), and the
objects the backup script writes there under the PostgreSQL host's own IAM policy.

- One source: pgBackRest's repo1-path, the host's grants and the lifecycle rules all name BackupLayout's
  prefixes, and the runbooks and README name no other repository location.
- The lifecycle rules cover the repository (old versions and unfinished uploads cleaned, never moved to
  Glacier, never expired by the bucket: pgBackRest expires its own) and the verification records (90 days).
- Versioning is on and the default encryption is SSE-KMS with the backups' key; a verification record is
  written with SSE-KMS and that key named, and the host may write a record but not read or delete one, nor
  write outside its prefixes.

What moto cannot see: S3 applying the lifecycle (moto stores it, never runs it), and KMS (moto's S3 keeps the
key id it is given; whether the host's kms:GenerateDataKey grant suffices is AWS's to say).
"""

from __future__ import annotations

import json
import re

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import set_initial_no_auth_action_count

from infra.engine import evaluate
from infra.render.pgbackrest import pgbackrest_config
from infra.settings import load_settings
from infra.topology import BackupLayout, audit_log_prefix, build_topology
from scripts import backup
from tests.backup_bucket import REGION, bucket_config, declare_bucket, host_policy
from tests.conftest import ROOT, stack_config


@pytest.fixture(scope="module")
def prod():
    settings = load_settings(stack_config("prod"), "prod")
    return settings, build_topology(settings), evaluate("prod", stack_config("prod"))


@pytest.fixture
def aws_env(monkeypatch):
    for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "setup")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "setup")



def _rule_for(rules: list[dict], key: str) -> list[dict]:
    """The prefix rules that apply to `key` (the whole-bucket abort rule applies to every key)."""
    return [r for r in rules if r["Status"] == "Enabled" and r["Filter"]["Prefix"] and key.startswith(r["Filter"]["Prefix"])]


def test_one_constant_places_the_repository_for_pgbackrest_iam_lifecycle_and_the_docs(prod):
    settings, topology, evaluation = prod
    node = topology.postgres[0]
    assert pgbackrest_config(settings, topology, node)["global"]["repo1-path"] == "/" + BackupLayout.REPOSITORY.rstrip("/")
    policy = json.loads(next(r.props["policy"] for r in evaluation.resources if r.name == f"postgres-{node.name}-access"))
    resources = {r for s in policy["Statement"] for r in s["Resource"] if r.startswith("arn:aws:s3:::" + topology.backup_bucket)}
    bucket = f"arn:aws:s3:::{topology.backup_bucket}"
    assert resources == {bucket, f"{bucket}/{BackupLayout.REPOSITORY}*", f"{bucket}/{BackupLayout.VERIFICATION}*"}
    lifecycle = bucket_config(evaluation, topology.backup_bucket)["BucketLifecycleConfiguration"]
    prefixes = {r["filter"]["prefix"] for r in lifecycle["rules"]} - {""}  # "": the whole bucket aborts stale uploads
    assert prefixes == {BackupLayout.REPOSITORY, BackupLayout.VERIFICATION, BackupLayout.ARCHIVE}
    # The docs say where things are in the bucket only with these prefixes (the old `daily/`, `/betting-prod` are gone).
    docs = [ROOT / "README.md", *sorted((ROOT / "docs" / "runbooks").glob("*.md"))]
    for doc in docs:
        for found in re.findall(r"s3://betting-[^/\s`]+/([^\s`)]*)", doc.read_text()):
            # ... and the audit-log bucket's per-host prefix (another bucket, its own constant).
            known = (BackupLayout.REPOSITORY, BackupLayout.VERIFICATION, BackupLayout.ARCHIVE, "bundles/",
                     audit_log_prefix("HOST").removesuffix("HOST/"))
            assert found.startswith(known), (doc, found)
    repository = f"s3://betting-<env>-pg-backups-<region>/{BackupLayout.REPOSITORY}"
    assert repository in (ROOT / "docs" / "runbooks" / "BackupFailed.md").read_text()
    assert repository in (ROOT / "README.md").read_text()


@mock_aws
def test_the_lifecycle_covers_the_repository_and_the_verification_records_with_versioning_and_sse_kms(prod, aws_env):
    settings, topology, evaluation = prod
    s3, kms = boto3.client("s3", region_name=REGION), boto3.client("kms", region_name=REGION)
    key_arn = declare_bucket(s3, kms, evaluation, topology.backup_bucket, topology.backup_key_alias)
    rules = s3.get_bucket_lifecycle_configuration(Bucket=topology.backup_bucket)["Rules"]
    stanza = topology.patroni_scope
    wal = f"{BackupLayout.REPOSITORY}archive/{stanza}/15-1/0000000100000000/000000010000000000000001-abc.zst"
    base = f"{BackupLayout.REPOSITORY}backup/{stanza}/20261201-020000F/pg_data/base/1/1259.zst"
    record = f"{BackupLayout.VERIFICATION}{stanza}/20261201-020000F/20261201T021500Z.json"
    for key in (wal, base):
        (rule,) = _rule_for(rules, key)
        # pgBackRest expires what it keeps (retentionDays); the bucket only cleans what it leaves behind, and
        # never moves the repository to Glacier: a restore must not wait for a thaw.
        assert "Expiration" not in rule and "Transitions" not in rule, rule
        assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] >= 1
    # pgBackRest leaves a multipart upload unfinished when a push dies half-way: every key's are aborted.
    (whole,) = [r for r in rules if r["Filter"]["Prefix"] == ""]
    assert whole["Status"] == "Enabled" and whole["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 7
    (rule,) = _rule_for(rules, record)
    assert rule["Expiration"]["Days"] == settings.backups.verification_retention_days == 90
    assert not _rule_for(rules, "pgbackrest.conf") and not _rule_for(rules, "verification")  # prefixes end with /
    assert s3.get_bucket_versioning(Bucket=topology.backup_bucket)["Status"] == "Enabled"
    (default,) = s3.get_bucket_encryption(Bucket=topology.backup_bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert default["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}


def _user(iam, name: str, policy: str) -> dict:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="policy", PolicyDocument=policy)
    return iam.create_access_key(UserName=name)["AccessKey"]


@mock_aws
@set_initial_no_auth_action_count(12)  # the key, its alias, the bucket and its 3 settings, 2 users; then signed
def test_the_host_writes_sse_kms_verification_records_and_nothing_else_under_its_own_policy(prod, aws_env, monkeypatch):
    settings, topology, evaluation = prod
    s3, kms, iam = (boto3.client(service, region_name=REGION) for service in ("s3", "kms", "iam"))
    declare_bucket(s3, kms, evaluation, topology.backup_bucket, topology.backup_key_alias)
    keys = _user(iam, "pg-1", host_policy(evaluation, "pg-1"))
    admin_keys = _user(iam, "admin", json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"}]}))  # from here on, IAM decides
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["SecretAccessKey"])
    from infra.hosts.postgres import backup_environment

    cfg = backup.Config(backup_environment(settings, topology, topology.postgres[0]))
    record = {"label": "20261201-020000F", "finished": "2026-12-01T02:15:00+00:00", "result": "passed", "checks": []}
    key = backup.write_record(cfg, record)
    assert key.startswith(f"{BackupLayout.VERIFICATION}{topology.patroni_scope}/20261201-020000F/")
    host = boto3.client("s3", region_name=REGION, aws_access_key_id=keys["AccessKeyId"],
                        aws_secret_access_key=keys["SecretAccessKey"])
    with pytest.raises(ClientError, match="AccessDenied"):
        host.get_object(Bucket=topology.backup_bucket, Key=key)  # written once, read by operators only
    with pytest.raises(ClientError, match="AccessDenied"):
        host.delete_object(Bucket=topology.backup_bucket, Key=key)
    with pytest.raises(ClientError, match="AccessDenied"):
        host.put_object(Bucket=topology.backup_bucket, Key=f"{BackupLayout.ARCHIVE}x", Body=b"x")
    with pytest.raises(ClientError, match="AccessDenied"):
        host.put_object(Bucket=topology.backup_bucket, Key="betting-prod/archive.info", Body=b"x")  # the old repo1-path
    host.put_object(Bucket=topology.backup_bucket, Key=f"{BackupLayout.REPOSITORY}probe", Body=b"x",
                    ServerSideEncryption="aws:kms", SSEKMSKeyId=topology.backup_key_alias)
    admin = boto3.client("s3", region_name=REGION, aws_access_key_id=admin_keys["AccessKeyId"],
                         aws_secret_access_key=admin_keys["SecretAccessKey"])
    head = admin.head_object(Bucket=topology.backup_bucket, Key=key)
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"].endswith(topology.backup_key_alias)
    assert json.loads(admin.get_object(Bucket=topology.backup_bucket, Key=key)["Body"].read())["result"] == "passed"
