"""Data events: every read, write and delete of an object in the backup and audit-log buckets is on record.

A CloudTrail trail covers a bucket when one of its event selectors logs `AWS::S3::Object` data events
for every object of it, reads and writes: a basic selector (`eventSelectors`: the value
`arn:aws:s3:::BUCKET/`, or `arn:aws:s3` for every bucket, with readWriteType All) or an advanced one
(`advancedEventSelectors`: eventCategory Data, resources.type AWS::S3::Object, no readOnly or other
narrowing field, resources.ARN absent or a startsWith that every object of the bucket matches).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from policies.rules.model import UNKNOWN, Finding, Resource, Rule, as_list, by_type, dig, message

BUCKET = "aws:s3/bucket:Bucket"
TRAIL = "aws:cloudtrail/trail:Trail"
LOGGED_PURPOSES = ["backups", "audit-logs"]
OBJECT = "AWS::S3::Object"


def _object_prefix(bucket_name: str, value: str) -> str:
    """`arn:PARTITION:s3:::BUCKET/`, the partition taken from the selector's value."""
    partition = value.split(":")[1] if value.startswith("arn:") and value.count(":") >= 2 else "aws"
    return f"arn:{partition}:s3:::{bucket_name}/"


def _basic_coverage(selector: Any, bucket_name: str) -> bool | str | None | Any:
    """True: logs every object read and write; a str: why only part; None: not about this bucket; UNKNOWN."""
    if not isinstance(selector, Mapping):
        return UNKNOWN if selector is UNKNOWN else None
    read_write = selector.get("readWriteType")
    resources = selector.get("dataResources")
    if UNKNOWN in (read_write, resources):
        return UNKNOWN
    whole, partial, undetermined = False, None, False
    for data_resource in as_list(resources):
        kind, values = dig(data_resource, "type"), dig(data_resource, "values")
        if UNKNOWN in (data_resource, kind, values):
            undetermined = True
            continue
        if kind != OBJECT:
            continue
        for value in as_list(values):
            if value is UNKNOWN:
                undetermined = True
            elif isinstance(value, str):
                prefix = _object_prefix(bucket_name, value)
                if value in (prefix, prefix.split(":::")[0], prefix.split(":::")[0] + ":::"):
                    whole = True
                elif value.startswith(prefix):
                    partial = f"only objects under {value!r}"
    if whole:
        return True if read_write in (None, "All") else f"readWriteType {read_write!r}"  # the provider's default is All
    if undetermined:
        return UNKNOWN
    return partial


# The fields of an advanced selector that keep it to S3 object data events; any other narrows it.
_SELECTOR_FIELDS = ("eventCategory", "resources.type", "resources.ARN")


def _advanced_coverage(selector: Any, bucket_name: str) -> bool | str | None | Any:
    if not isinstance(selector, Mapping):
        return UNKNOWN if selector is UNKNOWN else None
    fields = selector.get("fieldSelectors")
    if fields is UNKNOWN or any(not isinstance(f, Mapping) for f in as_list(fields)):
        return UNKNOWN
    by_field: dict[str, list[Mapping[str, Any]]] = {}
    for field_selector in as_list(fields):
        name = field_selector.get("field")
        if name is UNKNOWN or any(v is UNKNOWN for v in field_selector.values()):
            return UNKNOWN
        by_field.setdefault(str(name), []).append(field_selector)
    if not any(OBJECT in as_list(f.get("equals")) for f in by_field.get("resources.type", [])) or \
            not any("Data" in as_list(f.get("equals")) for f in by_field.get("eventCategory", [])):
        return None
    narrowing = sorted(set(by_field) - set(_SELECTOR_FIELDS))
    for field_selector in by_field.get("resources.ARN", []):
        covered = _arn_selector_coverage(field_selector, bucket_name)
        if covered is not True:
            return covered
    if narrowing:
        return f"advanced selector {selector.get('name')!r} is narrowed by {', '.join(narrowing)}"
    return True


def _arn_selector_coverage(field_selector: Mapping[str, Any], bucket_name: str) -> bool | str | None:
    prefix = _object_prefix(bucket_name, next((v for vs in field_selector.values() for v in as_list(vs)
                                              if isinstance(v, str) and v.startswith("arn:")), "arn:aws"))
    starts = [v for v in as_list(field_selector.get("startsWith")) if isinstance(v, str)]
    if "startsWith" in field_selector and not any(prefix.startswith(v) for v in starts):
        partial = [v for v in starts if v.startswith(prefix)]
        return f"only objects under {partial!r}" if partial else None
    if field_selector.get("equals") is not None:
        equal = [v for v in as_list(field_selector["equals"]) if isinstance(v, str) and v.startswith(prefix)]
        return f"only the objects {equal!r}" if equal else None
    for operator in ("notStartsWith", "notEquals"):
        excluded = [v for v in as_list(field_selector.get(operator)) if isinstance(v, str)
                    and (v.startswith(prefix) or (operator == "notStartsWith" and prefix.startswith(v)))]
        if excluded:
            return f"resources.ARN {operator} {excluded!r}"
    for operator in ("endsWith", "notEndsWith"):
        if field_selector.get(operator) is not None:
            return f"resources.ARN {operator} {field_selector[operator]!r}"
    return True


def _coverage(trail: Resource, bucket_name: str) -> bool | str | None | Any:
    """Whether the trail logs every object read and write of the bucket (True), only part (why), not at all (None)."""
    verdicts = [_basic_coverage(s, bucket_name) for s in as_list(trail.get("eventSelectors"))] + \
        [_advanced_coverage(s, bucket_name) for s in as_list(trail.get("advancedEventSelectors"))]
    if True in verdicts:
        return True
    if UNKNOWN in verdicts:
        return UNKNOWN
    reasons = [v for v in verdicts if isinstance(v, str)]
    return "; ".join(reasons) if reasons else None


def _trail_problems(trail: Resource, bucket: Resource, bucket_names: set[str] | None) -> list[str]:
    problems = []
    key, validation, logging = trail.get("kmsKeyId"), trail.get("enableLogFileValidation"), trail.get("enableLogging")
    if key is not UNKNOWN and not key:
        problems.append("no kmsKeyId: its log files are not encrypted with a key of the stack's")
    if validation is not UNKNOWN and validation is not True:
        problems.append(f"enableLogFileValidation is {validation!r}: a changed or deleted log file goes unnoticed")
    if logging is False:
        problems.append("enableLogging is False: it records nothing")
    destination = trail.get("s3BucketName")
    if bucket_names is not None and destination is not UNKNOWN and destination not in bucket_names:
        problems.append(f"it delivers to {destination!r}, no bucket of this stack (where the bucket guardrails hold it)")
    multi_region = trail.get("isMultiRegionTrail")
    if bucket.tags.get("ReplicaOf") and multi_region is not UNKNOWN and multi_region is not True:
        problems.append(f"isMultiRegionTrail is {multi_region!r} while the replica {bucket.get('bucket')!r} is in another "
                        "region, whose data events a single-region trail never sees")
    return problems


def check_s3_data_events_logged(resources: Sequence[Resource], config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, purposes = "s3-data-events-logged", list(config["purposes"])
    requirement = (f"every bucket tagged Purpose {' or '.join(purposes)} (replicas too) is covered by a trail logging all its "
                   "AWS::S3::Object data events (reads and writes), with kmsKeyId and enableLogFileValidation, delivering to "
                   "a bucket of the stack, multi-region for a replica")
    buckets, trails = by_type(resources, BUCKET), by_type(resources, TRAIL)
    names = [b.get("bucket") for b in buckets]
    bucket_names = None if UNKNOWN in names else {n for n in names if isinstance(n, str)}
    failing: dict[str, tuple[Resource, list[str], list[str]]] = {}  # trail name -> (trail, buckets, problems)
    for bucket in buckets:
        tags = bucket.props.get("tags")
        if tags is UNKNOWN or bucket.tags.get("Purpose") is UNKNOWN:
            continue
        name = bucket.get("bucket")
        if bucket.tags.get("Purpose") not in purposes or not isinstance(name, str):
            continue
        verdicts = {trail.name: (trail, _coverage(trail, name)) for trail in trails}
        covering = [trail for trail, verdict in verdicts.values() if verdict is True]
        if not covering:
            if any(verdict is UNKNOWN for _, verdict in verdicts.values()):
                continue
            partial = "; ".join(f"trail {t.name!r}: {v}" for t, v in verdicts.values() if isinstance(v, str))
            found = "no trail logs all its AWS::S3::Object data events (reads and writes)" + (f" ({partial})" if partial else "")
            yield Finding(bucket, message(bucket, found, rule, requirement))
            continue
        problems = {trail.name: _trail_problems(trail, bucket, bucket_names) for trail in covering}
        if any(not p for p in problems.values()):
            continue
        for trail in covering:
            _, covered, found = failing.setdefault(trail.name, (trail, [], []))
            covered.append(name)
            found.extend(p for p in problems[trail.name] if p not in found)
    for trail, covered, found in failing.values():
        shown = ", ".join(map(repr, covered))
        yield Finding(trail, message(trail, f"logs the data events of {shown}, but {'; '.join(found)}", rule, requirement))


RULES = (
    Rule(
        name="s3-data-events-logged",
        category="security",
        description="Every read, write and delete in the backup and audit-log buckets is logged by an encrypted, "
                    "validated CloudTrail trail.",
        kind="stack",
        check=check_s3_data_events_logged,
        config_schema={"purposes": {"type": "array", "items": {"type": "string"}, "default": LOGGED_PURPOSES}},
    ),
)
