"""The IAM check of recorded S3 requests against a rendered policy, and (from infra/sandbox/s3.py) the backup
bucket as the program declares it: shared by the backup tests."""

from __future__ import annotations

import fnmatch
import json
import xml.etree.ElementTree as ElementTree
from urllib.parse import parse_qs, unquote

from infra.sandbox.s3 import REGION, bucket_config, declare_bucket, host_policy  # noqa: F401 - the tests' imports


# ---- what a request asks of IAM, and whether a policy allows it ---------------------------------------------
def authorizations(request) -> list[tuple[str, str, dict[str, str]]]:
    """(action, resource ARN, condition context) that S3 checks for one recorded path-style request."""
    bucket, _, key = request.path.lstrip("/").partition("/")
    key = unquote(key)
    query = parse_qs(request.query, keep_blank_values=True)
    bucket_arn = f"arn:aws:s3:::{bucket}"
    object_arn = f"{bucket_arn}/{key}"
    method = request.method
    if not key:
        if method == "POST" and "delete" in query:  # multi-object delete: DeleteObject on every key named
            root = ElementTree.fromstring(request.body)
            keys = [e.text or "" for e in root.iter() if e.tag.endswith("Key")]
            return [("s3:DeleteObject", f"{bucket_arn}/{k}", {}) for k in keys]
        if method in ("GET", "HEAD") and not (set(query) - {"list-type", "prefix", "delimiter", "max-keys",
                                                            "continuation-token", "start-after", "encoding-type"}):
            return [("s3:ListBucket", bucket_arn, {"s3:prefix": query.get("prefix", [""])[0]})]
        raise AssertionError(f"a bucket request the check does not know: {method} {request.path}?{request.query}")
    if method in ("GET", "HEAD"):
        return [("s3:ListMultipartUploadParts" if "uploadId" in query else "s3:GetObject", object_arn, {})]
    if method in ("PUT", "POST"):
        return [("s3:PutObject", object_arn, {})]  # a simple put, or a multipart upload's start, part or completion
    if method == "DELETE":
        return [("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject", object_arn, {})]
    raise AssertionError(f"a request the check does not know: {method} {request.path}")


def _matches(patterns, value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in ([patterns] if isinstance(patterns, str) else patterns))


def _conditions_hold(condition: dict, context: dict[str, str]) -> bool:
    for operator, clauses in condition.items():
        for key, expected in clauses.items():
            if key not in context:
                return False  # AWS: a condition on a key the request does not carry does not match
            if operator == "StringLike" and not _matches(expected, context[key]):
                return False
            if operator == "StringEquals" and context[key] not in ([expected] if isinstance(expected, str) else expected):
                return False
            if operator not in ("StringLike", "StringEquals"):
                raise AssertionError(f"the check does not evaluate {operator}")
    return True


def allowed(policy: str, action: str, resource: str, context: dict[str, str]) -> bool:
    """An identity policy of Allow statements only (what the program renders): does one allow this?"""
    for statement in json.loads(policy)["Statement"]:
        assert statement["Effect"] == "Allow", statement  # a Deny would need the full evaluation order
        if (_matches(statement["Action"], action) and _matches(statement["Resource"], resource)
                and _conditions_hold(statement.get("Condition", {}), context)):
            return True
    return False
