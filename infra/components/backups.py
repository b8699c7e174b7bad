"""BackupStorage: the PostgreSQL backup bucket and the audit-log bucket, both SSE-KMS with a
customer-managed key, versioned, private, TLS-only, with the retention the requirements set:
backup-verification records 90 days, an archive prefix in Glacier, audit logs 7 years under
Object Lock in compliance mode.

The second copy (backups.replicaRegion): S3 replicates both buckets to buckets in another region,
through a provider for that region, each replica encrypted with a KMS key of its own region and
kept under the same rules (the audit replica created with Object Lock, as S3 requires for
replicating locked objects). One IAM role, with the permissions AWS documents for SSE-KMS
replication and nothing wider, replicates both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.platforms.aws import PrivateBucket, abort_incomplete_uploads_rule, create_versioned_bucket, service_trust_policy
from infra.platforms.kms import cloudtrail_statement, key_policy
from infra.settings import StackSettings
from infra.topology import BackupLayout, Topology, backup_key_alias

DAYS_PER_YEAR = 365
NONCURRENT_VERSION_DAYS = 30

# Replicas: backups stay instantly readable (a restore in the other region must not wait for a thaw);
# audit logs go where the source's lifecycle takes them after a day.
BACKUP_REPLICA_STORAGE_CLASS = "STANDARD_IA"
AUDIT_REPLICA_STORAGE_CLASS = "DEEP_ARCHIVE"


def replica_bucket_name(bucket: str, region: str, replica_region: str) -> str:
    """Bucket names end with their region (topology): the replica's ends with the replica's."""
    return bucket.removesuffix(region) + replica_region


@dataclass
class BackupStorageArgs:
    settings: StackSettings
    topology: Topology
    tags: dict[str, str]
    account_id: pulumi.Input[str]


def data_access_trail_name(environment: str) -> str:
    return f"betting-{environment}-data-access"


def trail_bucket_statements(bucket_arn: str, account_id: str, trail_arn: str) -> list[dict]:
    """What CloudTrail needs on its log bucket (AWS's documented policy), for this one trail only."""
    source = {"StringEquals": {"aws:SourceArn": trail_arn}}
    return [
        {"Sid": "CloudTrailChecksTheBucketAcl", "Effect": "Allow", "Principal": {"Service": "cloudtrail.amazonaws.com"},
         "Action": "s3:GetBucketAcl", "Resource": bucket_arn, "Condition": source},
        {"Sid": "CloudTrailWritesItsLogs", "Effect": "Allow", "Principal": {"Service": "cloudtrail.amazonaws.com"},
         "Action": "s3:PutObject", "Resource": f"{bucket_arn}/AWSLogs/{account_id}/*",
         "Condition": {"StringEquals": {"aws:SourceArn": trail_arn, "s3:x-amz-acl": "bucket-owner-full-control"}}},
    ]


class BackupStorage(pulumi.ComponentResource):
    key: aws.kms.Key
    backup_bucket: aws.s3.Bucket
    audit_bucket: aws.s3.Bucket
    replica_key: aws.kms.Key | None = None
    backup_replica: aws.s3.Bucket | None = None
    audit_replica: aws.s3.Bucket | None = None

    def __init__(self, name: str, args: BackupStorageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:backups:BackupStorage", name, None, opts)
        self._name = name
        self._args = args
        self._child = pulumi.ResourceOptions(parent=self)
        protect = args.settings.environment == "prod"
        environment = args.settings.environment

        region, admins = args.settings.region, args.settings.security.key_administrator_roles
        account = pulumi.Output.from_input(args.account_id)
        self.trail_arn = account.apply(
            lambda a: f"arn:aws:cloudtrail:{region}:{a}:trail/{data_access_trail_name(environment)}")
        self.key = aws.kms.Key(
            f"{name}-key",
            description=f"betting {environment} backups, audit logs and their data-access logs",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            policy=pulumi.Output.all(account, self.trail_arn).apply(lambda a: key_policy(
                a[0], admins, [f"s3.{region}.amazonaws.com"], [cloudtrail_statement(a[0], a[1])],
                administrators_may_decrypt=False)),
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, protect=protect),
        )
        # pgbackrest.conf and scripts/backup.py name the key by this alias (rendered before the key exists).
        aws.kms.Alias(f"{name}-key-alias", name=args.topology.backup_key_alias,
                      target_key_id=self.key.key_id, opts=self._child)

        backups = self._create_bucket("backups", args.topology.backup_bucket, object_lock=False, protect=protect)
        self.backup_bucket = backups.bucket
        self._create_backup_lifecycle(self.backup_bucket, "backups")
        audit = self._create_bucket("audit", args.topology.audit_bucket, object_lock=True, protect=protect)
        self.audit_bucket = audit.bucket
        self._create_audit_retention(self.audit_bucket, "audit")

        outputs = {"key_arn": self.key.arn, "backup_bucket": self.backup_bucket.bucket, "audit_bucket": self.audit_bucket.bucket}
        if args.settings.backups.replica_region:
            self._create_replicas(backups, audit, protect)
            outputs.update(replica_key_arn=self.replica_key.arn, backup_replica=self.backup_replica.bucket,
                           audit_replica=self.audit_replica.bucket)
        # After the replicas: they hold the same data, so their reads are logged too.
        self.data_access_logs = self._create_data_access_trail(account, protect)
        outputs["data_access_log_bucket"] = self.data_access_logs.bucket
        self.register_outputs(outputs)

    def _create_bucket(self, purpose: str, bucket_name: str, object_lock: bool, protect: bool,
                       key_arn: pulumi.Input[str] | None = None, provider: pulumi.ProviderResource | None = None,
                       tags: dict[str, str] | None = None, tag_purpose: str | None = None,
                       extra_statements=None) -> PrivateBucket:
        return create_versioned_bucket(f"{self._name}-{purpose}", bucket_name, key_arn or self.key.arn, tags or self._args.tags,
                                       self, purpose=tag_purpose or ("audit-logs" if object_lock else "backups"),
                                       object_lock=object_lock, protect=protect, provider=provider,
                                       extra_statements=extra_statements)

    def _create_data_access_trail(self, account: pulumi.Output[str], protect: bool) -> aws.s3.Bucket:
        """CloudTrail data events: every read, write and delete of an object in the backup and audit buckets and
        their replicas, into a bucket under the audit logs' own Object Lock and retention, encrypted with the same key."""
        environment = self._args.settings.environment
        logged = [b for b in (self.backup_bucket, self.audit_bucket, self.backup_replica, self.audit_replica) if b is not None]
        logs = self._create_bucket(
            "data-access-logs", self._args.topology.data_access_log_bucket, object_lock=True, protect=protect,
            tag_purpose="data-access-logs",
            extra_statements=lambda arn: pulumi.Output.all(account, self.trail_arn).apply(
                lambda a: trail_bucket_statements(arn, a[0], a[1])))
        self._create_audit_retention(logs.bucket, "data-access-logs")
        aws.cloudtrail.Trail(
            f"{self._name}-data-access-trail",
            name=data_access_trail_name(environment),
            s3_bucket_name=logs.bucket.bucket,
            kms_key_id=self.key.arn,
            enable_log_file_validation=True,
            # Multi-region, for the replicas' region; CloudTrail requires global service events with it, but
            # with management events off the trail records only these buckets' data events.
            include_global_service_events=True,
            is_multi_region_trail=True,
            event_selectors=[aws.cloudtrail.TrailEventSelectorArgs(
                read_write_type="All",
                include_management_events=False,
                data_resources=[aws.cloudtrail.TrailEventSelectorDataResourceArgs(
                    type="AWS::S3::Object",
                    values=[bucket.arn.apply(lambda a: f"{a}/") for bucket in logged],
                )],
            )],
            tags=self._args.tags,
            # CloudTrail checks its bucket's policy and the key's when the trail is created.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[logs.versioning, logs.policy, self.key]),
        )
        return logs.bucket

    def _create_replicas(self, backups: PrivateBucket, audit: PrivateBucket, protect: bool) -> None:
        settings = self._args.settings
        region, replica_region = settings.region, settings.backups.replica_region
        name = self._name
        provider = aws.Provider(f"{name}-replica-region", region=replica_region, opts=self._child)
        in_replica_region = pulumi.ResourceOptions(parent=self, provider=provider)
        self.replica_key = aws.kms.Key(
            f"{name}-replica-key",
            description=f"betting {settings.environment} backup and audit-log replicas in {replica_region}",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            policy=pulumi.Output.from_input(self._args.account_id).apply(lambda account: key_policy(
                account, settings.security.key_administrator_roles, [f"s3.{replica_region}.amazonaws.com"],
                administrators_may_decrypt=False)),
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self, provider=provider, protect=protect),
        )
        aws.kms.Alias(f"{name}-replica-key-alias", name=backup_key_alias(settings.environment),
                      target_key_id=self.replica_key.key_id, opts=in_replica_region)

        pairs = []
        for purpose, source, object_lock in (("backups", backups, False), ("audit", audit, True)):
            source_name = self._args.topology.backup_bucket if purpose == "backups" else self._args.topology.audit_bucket
            replica = self._create_bucket(f"{purpose}-replica", replica_bucket_name(source_name, region, replica_region),
                                          object_lock=object_lock, protect=protect, key_arn=self.replica_key.arn,
                                          provider=provider, tags={**self._args.tags, "ReplicaOf": source_name})
            # Replication copies objects, not the source's rules: the replica keeps them by its own.
            if object_lock:
                self._create_audit_retention(replica.bucket, f"{purpose}-replica", provider)
            else:
                self._create_backup_lifecycle(replica.bucket, f"{purpose}-replica", provider)
            pairs.append((purpose, source, replica))
        self.backup_replica, self.audit_replica = pairs[0][2].bucket, pairs[1][2].bucket

        role = aws.iam.Role(
            f"{name}-replication-role",
            assume_role_policy=service_trust_policy("s3.amazonaws.com"),
            tags=self._args.tags,
            opts=self._child,
        )
        policy = aws.iam.RolePolicy(
            f"{name}-replication-access",
            role=role.id,
            policy=pulumi.Output.all(
                self.key.arn, self.replica_key.arn, *(p[1].bucket.arn for p in pairs), *(p[2].bucket.arn for p in pairs),
            ).apply(lambda arns: replication_policy(region, replica_region, arns[0], arns[1], arns[2:4], arns[4:6],
                                                    locked_sources=[arns[3]])),
            opts=self._child,
        )
        for purpose, source, replica in pairs:
            self._create_replication(purpose, source, replica, role, policy, replica_region)

    def _create_replication(self, purpose: str, source: PrivateBucket, replica: PrivateBucket, role: aws.iam.Role,
                            policy: aws.iam.RolePolicy, replica_region: str) -> None:
        rule = aws.s3.BucketReplicationConfigRuleArgs
        # Delete markers: pgBackRest expires old backups and WAL with plain DELETEs, and the replica follows
        # (the versions stay there as noncurrent for NONCURRENT_VERSION_DAYS, like in the source). Audit logs
        # are never deleted on purpose: a delete marker in the source must not hide the replica's copy.
        delete_markers = "Enabled" if purpose == "backups" else "Disabled"
        aws.s3.BucketReplicationConfig(
            f"{self._name}-{purpose}-replication",
            bucket=source.bucket.id,
            role=role.arn,
            rules=[rule(
                id=f"{purpose}-to-{replica_region}",
                status="Enabled",
                priority=1,
                filter=aws.s3.BucketReplicationConfigRuleFilterArgs(prefix=""),
                delete_marker_replication=aws.s3.BucketReplicationConfigRuleDeleteMarkerReplicationArgs(status=delete_markers),
                # Every object here is SSE-KMS (the bucket default); S3 replicates none unless asked to.
                source_selection_criteria=aws.s3.BucketReplicationConfigRuleSourceSelectionCriteriaArgs(
                    sse_kms_encrypted_objects=aws.s3.BucketReplicationConfigRuleSourceSelectionCriteriaSseKmsEncryptedObjectsArgs(
                        status="Enabled")),
                destination=aws.s3.BucketReplicationConfigRuleDestinationArgs(
                    bucket=replica.bucket.arn,
                    storage_class=BACKUP_REPLICA_STORAGE_CLASS if purpose == "backups" else AUDIT_REPLICA_STORAGE_CLASS,
                    encryption_configuration=aws.s3.BucketReplicationConfigRuleDestinationEncryptionConfigurationArgs(
                        replica_kms_key_id=self.replica_key.arn),
                ),
            )],
            # S3 refuses a replication configuration until both buckets are versioned and the role may act.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[source.versioning, replica.versioning, policy]),
        )

    def _create_backup_lifecycle(self, bucket: aws.s3.Bucket, purpose: str,
                                 provider: pulumi.ProviderResource | None = None) -> None:
        backups = self._args.settings.backups
        rule = aws.s3.BucketLifecycleConfigurationRuleArgs
        prefix = aws.s3.BucketLifecycleConfigurationRuleFilterArgs
        aws.s3.BucketLifecycleConfiguration(
            f"{self._name}-{purpose}-lifecycle",
            bucket=bucket.id,
            rules=[
                rule(
                    id="backup-verification",
                    status="Enabled",
                    filter=prefix(prefix=BackupLayout.VERIFICATION),
                    expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(days=backups.verification_retention_days),
                    noncurrent_version_expiration=aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
                        noncurrent_days=1),
                ),
                # pgBackRest expires its own backups and WAL (retentionDays); the bucket only cleans up the
                # versions and unfinished uploads it leaves behind. They stay in Standard: a restore must not
                # wait for a thaw.
                rule(
                    id="base-backups-and-wal",
                    status="Enabled",
                    filter=prefix(prefix=BackupLayout.REPOSITORY),
                    noncurrent_version_expiration=aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
                        noncurrent_days=NONCURRENT_VERSION_DAYS),
                ),
                rule(
                    id="archive-to-glacier",
                    status="Enabled",
                    filter=prefix(prefix=BackupLayout.ARCHIVE),
                    transitions=[aws.s3.BucketLifecycleConfigurationRuleTransitionArgs(
                        days=backups.archive_transition_days, storage_class="GLACIER")],
                ),
                abort_incomplete_uploads_rule(),
            ],
            opts=pulumi.ResourceOptions(parent=self, provider=provider),
        )

    def _create_audit_retention(self, bucket: aws.s3.Bucket, purpose: str,
                                provider: pulumi.ProviderResource | None = None) -> None:
        years = self._args.settings.backups.audit_retention_years
        opts = pulumi.ResourceOptions(parent=self, provider=provider)
        aws.s3.BucketObjectLockConfiguration(
            f"{self._name}-{purpose}-object-lock",
            bucket=bucket.id,
            rule=aws.s3.BucketObjectLockConfigurationRuleArgs(
                default_retention=aws.s3.BucketObjectLockConfigurationRuleDefaultRetentionArgs(mode="COMPLIANCE", years=years)),
            opts=opts,
        )
        aws.s3.BucketLifecycleConfiguration(
            f"{self._name}-{purpose}-lifecycle",
            bucket=bucket.id,
            rules=[aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="audit-logs-deep-archive",
                status="Enabled",
                filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=""),
                transitions=[aws.s3.BucketLifecycleConfigurationRuleTransitionArgs(days=1, storage_class="DEEP_ARCHIVE")],
                # Object Lock keeps every version for the full term (+2 for leap days); expiry removes what it released.
                expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(days=years * DAYS_PER_YEAR + 2),
            ), abort_incomplete_uploads_rule()],
            opts=opts,
        )


def replication_policy(region: str, replica_region: str, source_key: str, replica_key: str, sources: list[str],
                       replicas: list[str], locked_sources: list[str]) -> str:
    """The replication role's policy: AWS's documented permissions for replicating SSE-KMS objects, scoped
    to these buckets and keys (and S3 as the caller of KMS), plus reading Object Lock settings on the
    locked source, which S3 copies to the replica."""
    # With S3 Bucket Keys (on for every bucket here) the encryption context is the bucket's ARN, else the object's.
    def context(arns: list[str]) -> list[str]:
        return [value for arn in arns for value in (arn, f"{arn}/*")]

    statements = [
        {"Sid": "ReadReplicationConfiguration", "Effect": "Allow",
         "Action": ["s3:GetReplicationConfiguration", "s3:ListBucket"], "Resource": sources},
        {"Sid": "ReadSourceVersions", "Effect": "Allow",
         "Action": ["s3:GetObjectVersionForReplication", "s3:GetObjectVersionAcl", "s3:GetObjectVersionTagging"],
         "Resource": [f"{arn}/*" for arn in sources]},
        {"Sid": "ReadSourceObjectLock", "Effect": "Allow", "Action": ["s3:GetObjectRetention", "s3:GetObjectLegalHold"],
         "Resource": [f"{arn}/*" for arn in locked_sources]},
        {"Sid": "WriteReplicas", "Effect": "Allow", "Action": ["s3:ReplicateObject", "s3:ReplicateDelete", "s3:ReplicateTags"],
         "Resource": [f"{arn}/*" for arn in replicas]},
        {"Sid": "DecryptSource", "Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": [source_key],
         "Condition": {"StringLike": {"kms:ViaService": f"s3.{region}.amazonaws.com",
                                      "kms:EncryptionContext:aws:s3:arn": context(sources)}}},
        {"Sid": "EncryptReplicas", "Effect": "Allow", "Action": ["kms:Encrypt"], "Resource": [replica_key],
         "Condition": {"StringLike": {"kms:ViaService": f"s3.{replica_region}.amazonaws.com",
                                      "kms:EncryptionContext:aws:s3:arn": context(replicas)}}},
    ]
    return json.dumps({"Version": "2012-10-17", "Statement": statements}, sort_keys=True)
