"""Compute: what EC2 accepts when it launches an instance (the user data's size)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping
from typing import Any

from policies.rules.model import UNKNOWN, Finding, Resource, Rule, message

INSTANCE = "aws:ec2/instance:Instance"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
# EC2 (RunInstances, CreateLaunchTemplate; "Run commands on your Linux instance at launch"): "User data is
# limited to 16 KB, in raw form, before it is base64-encoded." A fixed API limit, so no config can raise it.
MAX_USER_DATA_BYTES = 16 * 1024
# How the offline plan (`infra plan --json`, infra/engine.py SECRET_MASK) writes a secret: its size is not
# visible there (the pack, during preview and up, sees the plaintext and measures it).
PLAN_SECRET = "[secret]"


def _decode_base64(encoded: str) -> bytes:
    # As the provider's Go decoder (base64.StdEncoding): standard alphabet, padding required, line breaks skipped.
    return base64.b64decode(encoded.replace("\r", "").replace("\n", ""), validate=True)


def _user_data(resource: Resource) -> tuple[str, Any]:
    """(property, value) of the user data as the AWS provider reads it; value None when there is none.

    Instance: `userData` is raw text (the provider base64-encodes it for the API), `userDataBase64` is
    already encoded; the two conflict. LaunchTemplate: `userData` is already base64.
    """
    if resource.type == LAUNCH_TEMPLATE:
        return "userData", resource.get("userData")
    text = resource.get("userData")
    if text is not None:
        return "userData", text
    return "userDataBase64", resource.get("userDataBase64")


def check_user_data_size(resource: Resource, config: Mapping[str, Any]) -> Iterator[Finding]:
    rule, limit = "user-data-size", MAX_USER_DATA_BYTES
    requirement = f"EC2 accepts at most {limit:,} bytes of user data before base64"
    prop, value = _user_data(resource)
    if value is None or value is UNKNOWN or value == PLAN_SECRET or not isinstance(value, str):
        return
    if resource.type == INSTANCE and prop == "userData":
        # Counted as UTF-8 text. (The provider passes a userData that already parses as base64 through
        # unencoded, and EC2 then decodes it: counting the text is at worst stricter, never looser.)
        raw = value.encode()
        how = f" ({len(value):,} characters in UTF-8)" if len(raw) != len(value) else ""
    else:
        try:
            raw = _decode_base64(value)
        except (binascii.Error, ValueError) as error:
            yield Finding(resource, message(resource, f"{prop} is not valid base64 ({error})", rule, requirement))
            return
        how = f" (decoded from base64 {prop})"
    if len(raw) > limit:
        yield Finding(resource, message(resource, f"user data is {len(raw):,} bytes raw{how}", rule, requirement))


RULES = (
    Rule(
        name="user-data-size",
        category="compute",
        description="Every instance and launch template carries at most 16,384 bytes of user data (raw, before base64).",
        kind="resource",
        check=check_user_data_size,
        resource_types=(INSTANCE, LAUNCH_TEMPLATE),
    ),
)
