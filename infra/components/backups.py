"""BackupStorage: the PostgreSQL backup bucket and the audit-log bucket, both SSE-KMS with a
customer-managed key, versioned, private, TLS-only, with the retention the requirements set:
backup-verification records 90 days, an archive prefix in Glacier, audit logs 7 years under
Object Lock in compliance mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.platforms.aws import create_private_bucket
from infra.settings import StackSettings
from infra.topology import BackupLayout, Topology

DAYS_PER_YEAR = 365
NONCURRENT_VERSION_DAYS = 30
# pgBackRest leaves a multipart upload unfinished when a push or backup dies half-way; S3 bills its parts.
ABORT_INCOMPLETE_UPLOAD_DAYS = 7


@dataclass
class BackupStorageArgs:
    settings: StackSettings
    topology: Topology
    tags: dict[str, str]


class BackupStorage(pulumi.ComponentResource):
    key: aws.kms.Key
    backup_bucket: aws.s3.Bucket
    audit_bucket: aws.s3.Bucket

    def __init__(self, name: str, args: BackupStorageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:backups:BackupStorage", name, None, opts)
        self._name = name
        self._args = args
        self._child = pulumi.ResourceOptions(parent=self)
        protect = args.settings.environment == "prod"

        self.key = aws.kms.Key(
            f"{name}-key",
            description=f"betting {args.settings.environment} backups and audit logs",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, protect=protect),
        )
        # pgbackrest.conf and scripts/backup.py name the key by this alias (rendered before the key exists).
        aws.kms.Alias(f"{name}-key-alias", name=args.topology.backup_key_alias,
                      target_key_id=self.key.key_id, opts=self._child)

        self.backup_bucket = self._create_bucket("backups", args.topology.backup_bucket, object_lock=False, protect=protect)
        self._create_backup_lifecycle()
        self.audit_bucket = self._create_bucket("audit", args.topology.audit_bucket, object_lock=True, protect=protect)
        self._create_audit_retention()

        self.register_outputs({
            "key_arn": self.key.arn,
            "backup_bucket": self.backup_bucket.bucket,
            "audit_bucket": self.audit_bucket.bucket,
        })

    def _create_bucket(self, purpose: str, bucket_name: str, object_lock: bool, protect: bool) -> aws.s3.Bucket:
        return create_private_bucket(f"{self._name}-{purpose}", bucket_name, self.key.arn, self._args.tags, self,
                                     purpose="audit-logs" if object_lock else "backups", object_lock=object_lock,
                                     protect=protect)

    def _create_backup_lifecycle(self) -> None:
        backups = self._args.settings.backups
        rule = aws.s3.BucketLifecycleConfigurationRuleArgs
        prefix = aws.s3.BucketLifecycleConfigurationRuleFilterArgs
        aws.s3.BucketLifecycleConfiguration(
            f"{self._name}-backups-lifecycle",
            bucket=self.backup_bucket.id,
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
                    abort_incomplete_multipart_upload=aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
                        days_after_initiation=ABORT_INCOMPLETE_UPLOAD_DAYS),
                ),
                rule(
                    id="archive-to-glacier",
                    status="Enabled",
                    filter=prefix(prefix=BackupLayout.ARCHIVE),
                    transitions=[aws.s3.BucketLifecycleConfigurationRuleTransitionArgs(
                        days=backups.archive_transition_days, storage_class="GLACIER")],
                ),
            ],
            opts=self._child,
        )

    def _create_audit_retention(self) -> None:
        years = self._args.settings.backups.audit_retention_years
        aws.s3.BucketObjectLockConfiguration(
            f"{self._name}-audit-object-lock",
            bucket=self.audit_bucket.id,
            rule=aws.s3.BucketObjectLockConfigurationRuleArgs(
                default_retention=aws.s3.BucketObjectLockConfigurationRuleDefaultRetentionArgs(mode="COMPLIANCE", years=years)),
            opts=self._child,
        )
        aws.s3.BucketLifecycleConfiguration(
            f"{self._name}-audit-lifecycle",
            bucket=self.audit_bucket.id,
            rules=[aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="audit-logs-deep-archive",
                status="Enabled",
                filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=""),
                transitions=[aws.s3.BucketLifecycleConfigurationRuleTransitionArgs(days=1, storage_class="DEEP_ARCHIVE")],
                # Object Lock keeps every version for the full term (+2 for leap days); expiry removes what it released.
                expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(days=years * DAYS_PER_YEAR + 2),
            )],
            opts=self._child,
        )
