"""Storage: the Prometheus TSDB volume's size and class, every disk encrypted on SSD, no bucket billing abandoned uploads."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from policies.rules.model import UNKNOWN, Finding, Resource, Rule, as_list, attached_to, by_type, dig, message

VOLUME = "aws:ebs/volume:Volume"
INSTANCE = "aws:ec2/instance:Instance"
BUCKET = "aws:s3/bucket:Bucket"
LIFECYCLE = "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"
SSD_TYPES = ["gp3", "gp2", "io1", "io2"]  # st1, sc1 (HDD) and standard (magnetic) are too slow for a database or TSDB
# EC2's CreateVolume uses gp2 when no type is given.
DEFAULT_VOLUME_TYPE = "gp2"
# A writer that dies mid-upload (a pgBackRest push, a log shipper) leaves parts S3 bills until they are aborted.
MAX_ABORT_DAYS = 7


def _type_finding(resource: Resource, where: str, volume_type: Any, ssd: list[str], rule: str,
                  requirement: str) -> Finding | None:
    if volume_type is UNKNOWN:
        return None
    effective = DEFAULT_VOLUME_TYPE if volume_type is None else volume_type
    if effective in ssd:
        return None
    return Finding(resource, message(resource, f"{where}type is {effective!r}", rule, requirement))


def check_prometheus_tsdb_volume(volume: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    if volume.tags.get("Role") != "prometheus-tsdb":
        return
    rule, min_gib, ssd = "prometheus-tsdb-volume", config["minSizeGiB"], list(config["ssdTypes"])
    requirement = f"a Prometheus TSDB volume has {min_gib} GiB or more on SSD ({', '.join(ssd)})"
    size = volume.get("size")
    if size is None:
        yield Finding(volume, message(volume, "no size (it would follow a snapshot's size)", rule, requirement))
    elif size is not UNKNOWN and size < min_gib:
        yield Finding(volume, message(volume, f"size is {size} GiB", rule, requirement))
    finding = _type_finding(volume, "", volume.get("type"), ssd, rule, requirement)
    if finding:
        yield finding


def check_data_volume_encrypted_ssd(resource: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, ssd = "data-volume-encrypted-ssd", list(config["ssdTypes"])
    requirement = f"every EBS volume is encrypted and SSD ({', '.join(ssd)})"
    if resource.type == VOLUME:
        disks = [("", resource.get("encrypted"), resource.get("type"))]
    else:
        root = resource.get("rootBlockDevice")
        disks = [("root block device ", UNKNOWN if root is UNKNOWN else (root or {}).get("encrypted"),
                  UNKNOWN if root is UNKNOWN else (root or {}).get("volumeType"))]
        for device in as_list(resource.get("ebsBlockDevices")):
            if device is UNKNOWN:
                continue
            disks.append((f"block device {device.get('deviceName', '?')} ", device.get("encrypted"), device.get("volumeType")))
    for where, encrypted, volume_type in disks:
        if encrypted is not UNKNOWN and encrypted is not True:
            yield Finding(resource, message(resource, f"{where}encrypted is {encrypted!r}", rule, requirement))
        finding = _type_finding(resource, where, volume_type, ssd, rule, requirement)
        if finding:
            yield finding


def _narrowing(rule: Any) -> dict[str, Any] | Any:
    """What limits a lifecycle rule to part of the bucket ({} for the whole bucket), UNKNOWN when unknown."""
    found: dict[str, Any] = {}
    legacy = dig(rule, "prefix")  # the rule-level prefix S3 still accepts
    if legacy is UNKNOWN:
        return UNKNOWN
    if legacy:
        found["prefix"] = legacy
    filter_ = dig(rule, "filter")
    if filter_ is UNKNOWN or dig(filter_, "and") is UNKNOWN:
        return UNKNOWN
    predicates = {**(filter_ or {}), **(dig(filter_, "and") or {})}
    predicates.pop("and", None)
    for key, value in predicates.items():
        if value is UNKNOWN:
            return UNKNOWN
        if value not in (None, "", {}, []):
            found[key] = value
    return found


def _abort_verdict(rule_id: Any, enabled: Any, days: Any, narrowing: Any, max_days: int) -> bool | str | Any:
    """True for a rule that aborts every stale upload in time, else why not; UNKNOWN when it cannot be told."""
    if UNKNOWN in (enabled, days) or narrowing is UNKNOWN:
        return UNKNOWN
    if not enabled:
        return f"rule {rule_id!r} is not enabled"
    if narrowing:
        return f"rule {rule_id!r} applies only to {narrowing!r}"
    if not isinstance(days, int) or days > max_days:
        return f"rule {rule_id!r} aborts after {days!r} days"
    return True


def check_s3_abort_incomplete_uploads(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, max_days = "s3-abort-incomplete-uploads", config["maxDaysAfterInitiation"]
    requirement = (f"every bucket's lifecycle has an Enabled rule for the whole bucket (no filter, or prefix \"\") that aborts "
                   f"incomplete multipart uploads within {max_days} days")
    for bucket in by_type(resources, BUCKET):
        configs = attached_to(bucket, resources, LIFECYCLE, "bucket")
        inline = bucket.get("lifecycleRules")  # the Bucket's own (deprecated) lifecycle rules
        if configs is UNKNOWN or inline is UNKNOWN:
            continue
        if not configs and not inline:
            yield Finding(bucket, message(bucket, "no lifecycle configuration: abandoned multipart uploads are billed forever",
                                          rule, requirement))
            continue
        verdicts: list[Any] = []
        for lifecycle in configs:
            rules = lifecycle.get("rules")
            if rules is UNKNOWN:
                verdicts.append(UNKNOWN)
                continue
            for item in as_list(rules):
                days = dig(item, "abortIncompleteMultipartUpload", "daysAfterInitiation")
                if days is None:
                    continue
                status = dig(item, "status")
                enabled = UNKNOWN if status is UNKNOWN else status == "Enabled"
                verdicts.append(_abort_verdict(dig(item, "id"), enabled, days, _narrowing(item), max_days))
        for item in as_list(inline):
            days = dig(item, "abortIncompleteMultipartUploadDays")
            if days is not None:
                verdicts.append(_abort_verdict(dig(item, "id"), dig(item, "enabled"), days, _narrowing(item), max_days))
        if True in verdicts or UNKNOWN in verdicts:
            continue
        found = "; ".join(v for v in verdicts if isinstance(v, str)) or "no lifecycle rule aborts incomplete multipart uploads"
        yield Finding(bucket, message(bucket, found, rule, requirement))


RULES = (
    Rule(
        name="prometheus-tsdb-volume",
        category="storage",
        description="Every Prometheus TSDB volume is 50 GiB or more and SSD (gp3, gp2, io1, io2), never st1, sc1 or standard.",
        kind="resource",
        check=check_prometheus_tsdb_volume,
        resource_types=(VOLUME,),
        config_schema={
            "minSizeGiB": {"type": "integer", "minimum": 1, "default": 50},
            "ssdTypes": {"type": "array", "items": {"type": "string"}, "default": SSD_TYPES},
        },
    ),
    Rule(
        name="data-volume-encrypted-ssd",
        category="storage",
        description="Every EBS volume (data volumes and instance disks) is encrypted and SSD.",
        kind="resource",
        check=check_data_volume_encrypted_ssd,
        resource_types=(VOLUME, INSTANCE),
        config_schema={"ssdTypes": {"type": "array", "items": {"type": "string"}, "default": SSD_TYPES}},
    ),
    Rule(
        name="s3-abort-incomplete-uploads",
        category="storage",
        description="Every S3 bucket's lifecycle aborts incomplete multipart uploads anywhere in the bucket within 7 days "
                    "(by default).",
        kind="stack",
        check=check_s3_abort_incomplete_uploads,
        config_schema={"maxDaysAfterInitiation": {"type": "integer", "minimum": 1, "default": MAX_ABORT_DAYS}},
        severity="low",
    ),
)
