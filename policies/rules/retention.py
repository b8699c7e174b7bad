"""Retention: how long metrics, backup verification records and audit logs are kept."""

from __future__ import annotations

import base64
import gzip
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from policies.rules.model import UNKNOWN, Finding, Resource, Rule, as_list, attached_to, by_type, dig, message
from policies.rules.prometheus_flags import FlagError, prometheus_retention

INSTANCE = "aws:ec2/instance:Instance"
VOLUME = "aws:ebs/volume:Volume"
ATTACHMENT = "aws:ec2/volumeAttachment:VolumeAttachment"
BUCKET = "aws:s3/bucket:Bucket"
LIFECYCLE = "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"
OBJECT_LOCK = "aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration"
BUCKET_OBJECT = "aws:s3/bucketObjectv2:BucketObjectv2"
REPLICATION = "aws:s3/bucketReplicationConfig:BucketReplicationConfig"

TSDB_VOLUME_ROLE = "prometheus-tsdb"
BACKUPS_PURPOSE = "backups"
AUDIT_PURPOSE = "audit-logs"
GIB = 2**30
DAYS_PER_YEAR = 365


def _user_data(instance: Resource) -> Any:
    """The #cloud-config text, whichever of userData / userDataBase64 carries it (gzip allowed)."""
    text = instance.get("userData")
    if text is not None:
        return text
    encoded = instance.get("userDataBase64")
    if encoded is None or encoded is UNKNOWN:
        return encoded
    raw = base64.b64decode(encoded)
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()


def _bundle(instance: Resource, resources: Sequence[Resource]) -> Any:
    """The content of the host bundle published for this host (tagged with its Host), if any."""
    host = instance.tags.get("Host")
    for obj in by_type(resources, BUCKET_OBJECT):
        if isinstance(host, str) and obj.tags.get("Host") == host and str(obj.get("key") or "").startswith("bundles/"):
            return obj.get("content")
    return None


def _tsdb_volumes(instance: Resource, resources: Sequence[Resource]) -> list[Resource] | Any:
    """The TSDB volumes of this host: tagged for its Host, or attached to it."""
    host = instance.tags.get("Host")
    tagged = [
        v for v in by_type(resources, VOLUME)
        if v.tags.get("Role") == TSDB_VOLUME_ROLE and isinstance(host, str) and v.tags.get("Host") == host
    ]
    if tagged:
        return tagged
    attachments = attached_to(instance, resources, ATTACHMENT, "instanceId")
    if attachments is UNKNOWN:
        return UNKNOWN
    volumes = []
    for volume in by_type(resources, VOLUME):
        if volume.tags.get("Role") != TSDB_VOLUME_ROLE:
            continue
        linked = attached_to(volume, attachments, ATTACHMENT, "volumeId")
        if linked is UNKNOWN:
            return UNKNOWN
        if linked:
            volumes.append(volume)
    if not volumes and any(v.props.get("tags") is UNKNOWN or UNKNOWN in (v.tags.get("Role"), v.tags.get("Host"))
                           for v in by_type(resources, VOLUME)):
        return UNKNOWN  # a volume whose tags are still unknown may be this host's
    return volumes


def check_prometheus_retention(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule = "prometheus-retention"
    min_days = config["minRetentionDays"]
    share = config["maxSizeShareOfVolume"]
    requirement = (f"Prometheus keeps at least {min_days}d by --storage.tsdb.retention.time and a "
                   f"--storage.tsdb.retention.size of at most {share:.0%} of its TSDB volume")
    for instance in by_type(resources, INSTANCE):
        user_data = _user_data(instance)
        try:
            retention = prometheus_retention(user_data, _bundle(instance, resources))
        except FlagError as error:
            yield Finding(instance, message(instance, str(error), rule, requirement))
            continue
        if retention is UNKNOWN:
            continue  # user data computed from values known only after the update
        if retention is None:
            if instance.tags.get("Role") == "monitoring":
                yield Finding(instance, message(
                    instance, "a monitoring host whose user data and bundle write no /etc/default/prometheus, so Prometheus "
                    "runs with its default retention of 15d and no size limit", rule, requirement))
            continue
        if retention.time_seconds is None:
            yield Finding(instance, message(
                instance, f"no time retention in {retention.source} (size {retention.size} only): no window of "
                f"{min_days}d is kept for sure", rule, requirement))
        elif retention.time_seconds < min_days * 86400:
            yield Finding(instance, message(
                instance, f"retention time {retention.time} (from {retention.source})", rule, requirement))
        volumes = _tsdb_volumes(instance, resources)
        if volumes is UNKNOWN:
            continue
        if not volumes:
            yield Finding(instance, message(
                instance, f"no {TSDB_VOLUME_ROLE} volume for host {instance.tags.get('Host', instance.name)!r}: the TSDB "
                "would fill the root disk", rule, requirement))
            continue
        for volume in volumes:
            size_gib = volume.get("size")
            if retention.size_bytes is None:
                yield Finding(instance, message(
                    instance, f"no --storage.tsdb.retention.size in {retention.source}: nothing keeps the TSDB within "
                    f"volume {volume.name!r} ({size_gib} GiB)", rule, requirement))
                continue
            if not isinstance(size_gib, int | float):
                continue  # unknown until the update
            limit = share * size_gib * GIB
            if retention.size_bytes > limit:
                yield Finding(instance, message(
                    instance, f"retention size {retention.size} (= {retention.size_bytes / GIB:g} GiB; Prometheus reads GB as "
                    f"GiB) on volume {volume.name!r} of {size_gib} GiB, above {share:.0%} ({limit / GIB:g} GiB), "
                    "leaving no room for the WAL and compaction", rule, requirement))


def _lifecycle_rules(bucket: Resource, resources: Sequence[Resource]) -> list[dict] | Any:
    configs = attached_to(bucket, resources, LIFECYCLE, "bucket")
    if configs is UNKNOWN:
        return UNKNOWN
    rules: list[Any] = []
    for lifecycle in configs:
        value = lifecycle.get("rules")
        if value is UNKNOWN:
            return UNKNOWN
        rules.extend(as_list(value))
    return rules


def _prefix(rule: Any) -> Any:
    for path in (("filter", "prefix"), ("filter", "and", "prefix"), ("prefix",)):
        value = dig(rule, *path)
        if value is not None:
            return value
    return ""


def _applies_to(rule: Any, prefix: str) -> bool | Any:
    """Whether an enabled rule covers objects under `prefix` (its own prefix is equal or broader)."""
    if rule is UNKNOWN or dig(rule, "status") is UNKNOWN or _prefix(rule) is UNKNOWN:
        return UNKNOWN
    return dig(rule, "status") == "Enabled" and isinstance(_prefix(rule), str) and prefix.startswith(_prefix(rule))


def _expiry(rules: list[Any], prefix: str) -> tuple[int | None, str | None] | Any:
    """The earliest expiration (days) that applies to objects under `prefix`, and a fixed date if one is used."""
    days, date = None, None
    for rule in rules:
        applies = _applies_to(rule, prefix)
        if applies is UNKNOWN:
            return UNKNOWN
        if not applies:
            continue
        rule_days, rule_date = dig(rule, "expiration", "days"), dig(rule, "expiration", "date")
        if rule_days is UNKNOWN or rule_date is UNKNOWN:
            return UNKNOWN
        if isinstance(rule_days, int) and (days is None or rule_days < days):
            days = rule_days
        if isinstance(rule_date, str):
            date = rule_date
    return days, date


def _buckets(resources: Sequence[Resource], purpose: str) -> list[Resource]:
    return [b for b in by_type(resources, BUCKET) if b.tags.get("Purpose") == purpose]


def check_backup_verification_retention(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, prefix, min_days = "backup-verification-retention", config["prefix"], config["minDays"]
    requirement = f"objects under {prefix!r} in the backups bucket expire after {min_days} days or more, never sooner"
    for bucket in _buckets(resources, BACKUPS_PURPOSE):
        rules = _lifecycle_rules(bucket, resources)
        if rules is UNKNOWN:
            continue
        expiry = _expiry(rules, prefix)
        if expiry is UNKNOWN:
            continue
        days, date = expiry
        if date is not None:
            found = f"a lifecycle rule expires {prefix!r} on a fixed date {date}"
            yield Finding(bucket, message(bucket, found, rule, requirement))
        if days is None and date is None:
            yield Finding(bucket, message(bucket, f"no lifecycle expiration for {prefix!r}: verification records pile up "
                                          "forever", rule, requirement))
        elif days is not None and days < min_days:
            yield Finding(bucket, message(bucket, f"{prefix!r} expires after {days} days", rule, requirement))


def check_backup_archive_glacier(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, prefix, classes = "backup-archive-glacier", config["prefix"], tuple(config["storageClasses"])
    requirement = f"objects under {prefix!r} in the backups bucket transition to Glacier ({', '.join(classes)})"
    for bucket in _buckets(resources, BACKUPS_PURPOSE):
        rules = _lifecycle_rules(bucket, resources)
        if rules is UNKNOWN:
            continue
        found: list[Any] = []
        undetermined = False
        for lifecycle_rule in rules:
            applies = _applies_to(lifecycle_rule, prefix)
            if applies is UNKNOWN:
                undetermined = True
                continue
            if applies:
                found.extend(dig(t, "storageClass") for t in as_list(dig(lifecycle_rule, "transitions")))
        if undetermined or UNKNOWN in found:
            continue
        if not any(storage_class in classes for storage_class in found):
            shown = ", ".join(sorted(map(str, found))) if found else "no transition"
            yield Finding(bucket, message(bucket, f"{prefix!r} lifecycle transitions: {shown}", rule, requirement))


def check_audit_log_retention(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, years = "audit-log-retention", config["minYears"]
    requirement = (f"the audit-log bucket has Object Lock in COMPLIANCE mode for {years} years or more and no lifecycle "
                   f"expiration before {years} years")
    for bucket in _buckets(resources, AUDIT_PURPOSE):
        enabled = bucket.get("objectLockEnabled")
        if enabled is not UNKNOWN and enabled is not True:
            yield Finding(bucket, message(bucket, f"objectLockEnabled is {enabled!r}", rule, requirement))
        locks = attached_to(bucket, resources, OBJECT_LOCK, "bucket")
        if locks is not UNKNOWN:
            yield from _check_lock(bucket, locks, years, rule, requirement)
        rules = _lifecycle_rules(bucket, resources)
        if rules is UNKNOWN:
            continue
        expiry = _expiry(rules, "")
        if expiry is UNKNOWN:
            continue
        days, date = expiry
        if date is not None:
            found = f"a lifecycle rule expires audit logs on a fixed date {date}"
            yield Finding(bucket, message(bucket, found, rule, requirement))
        if days is not None and days < years * DAYS_PER_YEAR:
            yield Finding(bucket, message(bucket, f"audit logs expire after {days} days (< {years * DAYS_PER_YEAR})",
                                          rule, requirement))


def _check_lock(bucket: Resource, locks: list[Resource], years: int, rule: str, requirement: str) -> Iterator[Finding]:
    if not locks:
        yield Finding(bucket, message(bucket, "no BucketObjectLockConfiguration: objects can be deleted at any time",
                                      rule, requirement))
        return
    for lock in locks:
        retention = lock.get("rule", "defaultRetention")
        if retention is UNKNOWN:
            continue
        mode, lock_years, lock_days = dig(retention, "mode"), dig(retention, "years"), dig(retention, "days")
        if UNKNOWN in (mode, lock_years, lock_days):
            continue
        if mode != "COMPLIANCE":
            yield Finding(lock, message(lock, f"Object Lock mode {mode!r} (GOVERNANCE can be bypassed)", rule, requirement))
        kept_days = (lock_years or 0) * DAYS_PER_YEAR + (lock_days or 0)
        if kept_days < years * DAYS_PER_YEAR:
            shown = f"{lock_years} years" if lock_years else f"{lock_days} days"
            yield Finding(lock, message(lock, f"default retention {shown}", rule, requirement))


def _replica_of(rule: Any, bucket: Resource, resources: Sequence[Resource]) -> Resource | None | Any:
    """The stack's bucket a replication rule writes to, if it is tagged as this bucket's replica."""
    destination = dig(rule, "destination", "bucket")
    if destination is UNKNOWN:
        return UNKNOWN
    name = str(destination).removeprefix("arn:aws:s3:::")
    for candidate in by_type(resources, BUCKET):
        if candidate.get("bucket") == name and candidate.tags.get("ReplicaOf") == bucket.get("bucket"):
            return candidate
    return None


def check_backup_replication(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule = "backup-replication"
    environments = tuple(config["environments"])
    requirement = (f"in {', '.join(environments)}, the backups and audit-log buckets replicate every SSE-KMS object to their "
                   "replica bucket (another region, its own KMS key; Object Lock for audit logs), delete markers decided "
                   "explicitly")
    for bucket in _buckets(resources, BACKUPS_PURPOSE) + _buckets(resources, AUDIT_PURPOSE):
        tags = bucket.props.get("tags")
        if tags is UNKNOWN or UNKNOWN in (bucket.tags.get("Environment"), bucket.tags.get("ReplicaOf")):
            continue
        if bucket.tags.get("Environment") not in environments or bucket.tags.get("ReplicaOf"):
            continue  # another environment, or a replica itself
        configs = attached_to(bucket, resources, REPLICATION, "bucket")
        if configs is UNKNOWN:
            continue
        if not configs:
            yield Finding(bucket, message(bucket, "no BucketReplicationConfig: the only copy is in this region", rule,
                                          requirement))
            continue
        problems: list[str] = []
        good = False
        for replication in configs:
            for replication_rule in as_list(replication.get("rules")):
                if replication_rule is UNKNOWN or UNKNOWN in (dig(replication_rule, "status"),
                                                            dig(replication_rule, "destination")):
                    good = True  # cannot be judged before the update
                    continue
                if dig(replication_rule, "status") != "Enabled":
                    continue
                replica = _replica_of(replication_rule, bucket, resources)
                sse = dig(replication_rule, "sourceSelectionCriteria", "sseKmsEncryptedObjects", "status")
                key = dig(replication_rule, "destination", "encryptionConfiguration", "replicaKmsKeyId")
                markers = dig(replication_rule, "deleteMarkerReplication", "status")
                found = []
                if replica is None:
                    found.append(f"destination {dig(replication_rule, 'destination', 'bucket')!r} is no bucket of this stack "
                                 f"tagged ReplicaOf={bucket.get('bucket')!r}")
                elif replica is not UNKNOWN and bucket.get("objectLockEnabled") is True and \
                        replica.get("objectLockEnabled") not in (True, UNKNOWN):
                    found.append(f"replica {replica.name!r} has no Object Lock")
                if sse not in ("Enabled", UNKNOWN):
                    found.append(f"sourceSelectionCriteria.sseKmsEncryptedObjects is {sse!r}: SSE-KMS objects are not "
                                 "replicated")
                if key is None:
                    found.append("no destination.encryptionConfiguration.replicaKmsKeyId")
                if markers is None:
                    found.append("deleteMarkerReplication is not set")
                if found:
                    problems.extend(found)
                else:
                    good = True
        if not good:
            shown = "; ".join(problems) or "no enabled replication rule"
            yield Finding(bucket, message(bucket, shown, rule, requirement))


RULES = (
    Rule(
        name="prometheus-retention",
        category="retention",
        description="Every Prometheus keeps 30 days or more by time, and its size retention stays below its TSDB volume.",
        kind="stack",
        check=check_prometheus_retention,
        config_schema={
            "minRetentionDays": {"type": "integer", "minimum": 1, "default": 30},
            "maxSizeShareOfVolume": {"type": "number", "minimum": 0.05, "maximum": 1, "default": 0.85},
        },
    ),
    Rule(
        name="backup-verification-retention",
        category="retention",
        description="Backup-verification records in the backups bucket expire after 90 days, not sooner.",
        kind="stack",
        check=check_backup_verification_retention,
        config_schema={
            "minDays": {"type": "integer", "minimum": 1, "default": 90},
            "prefix": {"type": "string", "default": "verification/"},
        },
    ),
    Rule(
        name="backup-archive-glacier",
        category="retention",
        description="The backups bucket's archive prefix transitions to Glacier.",
        kind="stack",
        check=check_backup_archive_glacier,
        config_schema={
            "prefix": {"type": "string", "default": "archive/"},
            "storageClasses": {"type": "array", "items": {"type": "string"}, "default": ["GLACIER", "DEEP_ARCHIVE"]},
        },
        severity="medium",
    ),
    Rule(
        name="audit-log-retention",
        category="retention",
        description="The audit-log bucket keeps objects 7 years or more, under Object Lock in compliance mode.",
        kind="stack",
        check=check_audit_log_retention,
        config_schema={"minYears": {"type": "integer", "minimum": 1, "default": 7}},
        severity="critical",
    ),
    Rule(
        name="backup-replication",
        category="retention",
        description="In prod, the backups and audit-log buckets replicate to replica buckets in another region.",
        kind="stack",
        check=check_backup_replication,
        config_schema={
            "environments": {"type": "array", "items": {"type": "string"}, "default": ["prod"]},
        },
    ),
)
