"""The second copy: S3 replication of the backup and audit-log buckets to another region.

Under Pulumi's mock engine (what each stack declares) and on moto (what S3 and IAM accept: the
program's replication rules and role policy, on buckets made as BackupStorage makes them).

What moto cannot show: it does not replicate (no object ever reaches the replica), it does not
check that the role may really read, decrypt and write (replication runs as S3, outside moto's
IAM enforcement), it does not compare the buckets' regions or check KMS key policies, and it
does not require the Object Lock token an old S3 API asked for (no longer needed), and it
drops SourceSelectionCriteria and DeleteMarkerReplication from what it stores (it always answers
Disabled): the mock-engine tests check those parts.
"""

from __future__ import annotations

import functools
import json

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from infra.components.backups import replica_bucket_name
from infra.engine import evaluate
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import stack_config

REPLICA_REGION = "eu-central-1"


@functools.cache
def plan(stack: str):
    evaluation = evaluate(stack, stack_config(stack))
    assert evaluation.error is None, evaluation.error
    return evaluation


def named(stack: str, name: str):
    (resource,) = [r for r in plan(stack).resources if r.name == name]
    return resource


def test_dev_has_no_second_copy():
    assert not [r for r in plan("dev").resources if "replica" in r.name and r.parent == "backups"]
    assert not [r for r in plan("dev").resources if r.type == "pulumi:providers:aws"]


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_replicas_live_in_the_replica_region_with_their_own_key(stack):
    settings = load_settings(stack_config(stack), stack)
    topology = build_topology(settings)
    provider = named(stack, "backups-replica-region")
    assert provider.type == "pulumi:providers:aws" and provider.props["region"] == REPLICA_REGION
    assert provider.parent == "backups"
    key = named(stack, "backups-replica-key")
    assert key.options["provider"] == "backups-replica-region" and key.props["enableKeyRotation"] is True
    for source_name, replica, locked in ((topology.backup_bucket, "backups-backups-replica", False),
                                         (topology.audit_bucket, "backups-audit-replica", True)):
        bucket = named(stack, replica)
        assert bucket.props["bucket"] == replica_bucket_name(source_name, settings.region, REPLICA_REGION)
        assert bucket.props["bucket"].endswith(REPLICA_REGION) and bucket.props["tags"]["ReplicaOf"] == source_name
        assert bucket.props["objectLockEnabled"] is locked  # Object Lock replication needs a locked replica
        for child in [bucket, *(r for r in plan(stack).resources if r.name.startswith(replica + "-"))]:
            assert child.options["provider"] == "backups-replica-region", child.name
        assert named(stack, f"{replica}-versioning").props["versioningConfiguration"]["status"] == "Enabled"
        (sse,) = named(stack, f"{replica}-encryption").props["rules"]
        assert sse["applyServerSideEncryptionByDefault"] == {"kmsMasterKeyId": key.props.get("arn", sse[
            "applyServerSideEncryptionByDefault"]["kmsMasterKeyId"]), "sseAlgorithm": "aws:kms"}
        assert REPLICA_REGION in sse["applyServerSideEncryptionByDefault"]["kmsMasterKeyId"]
    lock = named(stack, "backups-audit-replica-object-lock").props["rule"]["defaultRetention"]
    assert lock == {"mode": "COMPLIANCE", "years": settings.backups.audit_retention_years}
    assert named("prod", "backups-audit-replica").options["protect"] is True


@pytest.mark.parametrize(("purpose", "markers", "storage"), [("backups", "Enabled", "STANDARD_IA"),
                                                             ("audit", "Disabled", "DEEP_ARCHIVE")])
def test_each_bucket_replicates_every_sse_kms_object_to_its_replica(purpose, markers, storage):
    replication = named("prod", f"backups-{purpose}-replication")
    replica = named("prod", f"backups-{purpose}-replica")
    source = named("prod", f"backups-{purpose}")
    assert replication.props["bucket"] == source.props["bucket"] and replication.options["provider"] == ""
    (rule,) = replication.props["rules"]
    assert rule["status"] == "Enabled" and rule["filter"] == {"prefix": ""}
    assert rule["sourceSelectionCriteria"] == {"sseKmsEncryptedObjects": {"status": "Enabled"}}
    assert rule["deleteMarkerReplication"] == {"status": markers}
    assert rule["destination"]["bucket"] == f"arn:aws:s3:::{replica.props['bucket']}"
    assert rule["destination"]["storageClass"] == storage
    assert rule["destination"]["encryptionConfiguration"]["replicaKmsKeyId"].endswith(":key/backups-replica-key")
    assert {f"backups-{purpose}-versioning", f"backups-{purpose}-replica-versioning",
            "backups-replication-access"} <= set(replication.options["dependsOn"])


def test_the_replication_role_has_the_documented_permissions_and_no_more():
    role = named("prod", "backups-replication-role")
    assert json.loads(role.props["assumeRolePolicy"])["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"}, "Action": "sts:AssumeRole"}]
    statements = {s["Sid"]: s for s in json.loads(named("prod", "backups-replication-access").props["policy"])["Statement"]}
    sources = ["arn:aws:s3:::betting-prod-pg-backups-eu-west-1", "arn:aws:s3:::betting-prod-audit-logs-eu-west-1"]
    replicas = ["arn:aws:s3:::betting-prod-pg-backups-eu-central-1", "arn:aws:s3:::betting-prod-audit-logs-eu-central-1"]
    assert statements["ReadReplicationConfiguration"]["Action"] == ["s3:GetReplicationConfiguration", "s3:ListBucket"]
    assert statements["ReadReplicationConfiguration"]["Resource"] == sources
    assert statements["ReadSourceVersions"]["Action"] == [
        "s3:GetObjectVersionForReplication", "s3:GetObjectVersionAcl", "s3:GetObjectVersionTagging"]
    assert statements["ReadSourceVersions"]["Resource"] == [f"{a}/*" for a in sources]
    assert statements["ReadSourceObjectLock"]["Resource"] == [f"{sources[1]}/*"]
    assert statements["WriteReplicas"]["Action"] == ["s3:ReplicateObject", "s3:ReplicateDelete", "s3:ReplicateTags"]
    assert statements["WriteReplicas"]["Resource"] == [f"{a}/*" for a in replicas]
    decrypt, encrypt = statements["DecryptSource"], statements["EncryptReplicas"]
    assert decrypt["Action"] == ["kms:Decrypt"] and decrypt["Resource"][0].endswith(":key/backups-key")
    assert decrypt["Condition"]["StringLike"]["kms:ViaService"] == "s3.eu-west-1.amazonaws.com"
    assert encrypt["Action"] == ["kms:Encrypt"] and encrypt["Resource"] == [
        "arn:aws:offline:eu-central-1:123456789012:key/backups-replica-key"]
    assert encrypt["Condition"]["StringLike"]["kms:ViaService"] == "s3.eu-central-1.amazonaws.com"
    assert set(encrypt["Condition"]["StringLike"]["kms:EncryptionContext:aws:s3:arn"]) == {
        *replicas, *(f"{a}/*" for a in replicas)}
    actions = [a for s in statements.values() for a in s["Action"]]
    assert not [a for a in actions if "*" in a] and len(statements) == 6


def _api(value):
    """A plan's camelCase property tree in the S3 API's shape (ReplicaKmsKeyID and ID are spelled so)."""
    special = {"id": "ID", "replicaKmsKeyId": "ReplicaKmsKeyID"}
    if isinstance(value, dict):
        return {special.get(k, k[0].upper() + k[1:]): _api(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_api(v) for v in value]
    return value


def _bucket(s3, name: str, region: str, locked: bool, versioned: bool = True) -> None:
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region}, ObjectLockEnabledForBucket=locked)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})


@mock_aws
def test_s3_accepts_the_programs_replication_and_iam_accepts_its_role(monkeypatch):
    for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    iam = boto3.client("iam", region_name="eu-west-1")
    role = iam.create_role(RoleName="backups-replication-role",
                           AssumeRolePolicyDocument=named("prod", "backups-replication-role").props["assumeRolePolicy"])
    iam.put_role_policy(RoleName="backups-replication-role", PolicyName="replication",
                        PolicyDocument=named("prod", "backups-replication-access").props["policy"])
    source_s3, replica_s3 = (boto3.client("s3", region_name=r) for r in ("eu-west-1", REPLICA_REGION))
    replica_key = boto3.client("kms", region_name=REPLICA_REGION).create_key()["KeyMetadata"]["Arn"]
    for purpose in ("backups", "audit"):
        replication = named("prod", f"backups-{purpose}-replication").props
        locked = named("prod", f"backups-{purpose}").props["objectLockEnabled"]
        _bucket(source_s3, replication["bucket"], "eu-west-1", locked)
        replica = named("prod", f"backups-{purpose}-replica").props
        _bucket(replica_s3, replica["bucket"], REPLICA_REGION, replica["objectLockEnabled"])
        rules = _api(replication["rules"])
        for rule in rules:
            rule["Destination"]["EncryptionConfiguration"]["ReplicaKmsKeyID"] = replica_key
        source_s3.put_bucket_replication(Bucket=replication["bucket"],
                                         ReplicationConfiguration={"Role": role["Role"]["Arn"], "Rules": rules})
        stored = source_s3.get_bucket_replication(Bucket=replication["bucket"])["ReplicationConfiguration"]
        (rule,) = stored["Rules"]
        # moto accepts SourceSelectionCriteria but does not keep it: the mock-engine test above checks it.
        assert rule["ID"] == f"{purpose}-to-{REPLICA_REGION}" and rule["Status"] == "Enabled"
        assert rule["Destination"]["EncryptionConfiguration"] == {"ReplicaKmsKeyID": replica_key}

    # Why the configuration waits for versioning: S3 refuses it on an unversioned bucket.
    _bucket(source_s3, "unversioned-source", "eu-west-1", locked=False, versioned=False)
    with pytest.raises(ClientError, match="InvalidRequest|versioning"):
        source_s3.put_bucket_replication(Bucket="unversioned-source", ReplicationConfiguration={
            "Role": role["Role"]["Arn"], "Rules": _api(named("prod", "backups-backups-replication").props["rules"])})
