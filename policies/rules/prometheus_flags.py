"""The retention Prometheus really runs with, read from the host's boot configuration.

Prometheus 2.42 takes retention only as process flags (`--storage.tsdb.retention.time`,
`--storage.tsdb.retention.size`); Debian's unit passes `$ARGS` from /etc/default/prometheus, which
the instance's #cloud-config user data writes. Reading the flags from there (not from the stack
settings) checks the value the daemon will run with, so a template change cannot drift past the rule.
"""

from __future__ import annotations

import base64
import gzip
import json
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from infra.units import duration_seconds, size_bytes
from policies.rules.model import UNKNOWN

DEFAULTS_FILE = "/etc/default/prometheus"
TIME_FLAG = "--storage.tsdb.retention.time"
SIZE_FLAG = "--storage.tsdb.retention.size"
DEPRECATED_TIME_FLAG = "--storage.tsdb.retention"  # read by 2.42 when the .time flag is absent
# `prometheus --help` (2.42): with no retention flag at all, the retention time defaults to 15d.
DEFAULT_RETENTION = "15d"


@dataclass(frozen=True)
class Retention:
    """Retention as the daemon will apply it. time None = no time limit; size None = no size limit."""

    time: str | None
    time_seconds: float | None
    size: str | None
    size_bytes: int | None
    source: str  # what the values were read from, for messages


class FlagError(ValueError):
    """The defaults file holds a value Prometheus would refuse; the message says which."""


def write_files(user_data: Any) -> dict[str, str] | Any:
    """path -> content of a #cloud-config document's write_files; UNKNOWN if the user data is unknown."""
    if user_data is UNKNOWN:
        return UNKNOWN
    if not isinstance(user_data, str) or not user_data.lstrip().startswith("#cloud-config"):
        return {}
    try:
        document = yaml.safe_load(user_data)
    except yaml.YAMLError as error:
        raise FlagError(f"user data is not valid #cloud-config YAML ({error.__class__.__name__})") from None
    if not isinstance(document, dict):
        return {}
    files: dict[str, str] = {}
    for entry in document.get("write_files") or []:
        if not isinstance(entry, dict) or "path" not in entry:
            continue
        files[entry["path"]] = _decode(entry.get("content", ""), str(entry.get("encoding", "")).lower())
    return files


def _decode(content: Any, encoding: str) -> str:
    if isinstance(content, bytes):
        content = content.decode()
    content = str(content)
    # cloud-init's write_files encodings: b64 / base64, gz / gzip, and gz+b64 / gzip+base64.
    raw = content.encode()
    if "b64" in encoding or "base64" in encoding:
        raw = base64.b64decode(raw)
    if "gz" in encoding:
        raw = gzip.decompress(raw)
    return raw.decode()


def args_from_defaults(text: str) -> list[str]:
    """The tokens of the last ARGS= assignment in a shell-style defaults file (what systemd passes)."""
    tokens: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("ARGS="):
            continue
        (assignment,) = shlex.split(stripped, comments=True) or ["ARGS="]
        tokens = shlex.split(assignment.split("=", 1)[1])
    return tokens


def _flag_values(tokens: list[str]) -> dict[str, str]:
    """--flag=value and --flag value; the last occurrence wins."""
    values: dict[str, str] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--") and "=" in token:
            flag, value = token.split("=", 1)
            values[flag] = value
        elif token.startswith("--") and index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            values[token] = tokens[index + 1]
            index += 1
        index += 1
    return values


def retention_from_args(tokens: list[str], source: str) -> Retention:
    flags = _flag_values(tokens)
    time = flags.get(TIME_FLAG, flags.get(DEPRECATED_TIME_FLAG))
    size = flags.get(SIZE_FLAG)
    if time is None and size is None:
        time = DEFAULT_RETENTION
        source = f"{source} (no retention flag: Prometheus' default {DEFAULT_RETENTION})"
    try:
        # Prometheus reads a zero time as "no time limit" when a size limit is set.
        time_seconds = duration_seconds(time) if time is not None else None
        size_value = size_bytes(size) if size is not None else None
    except ValueError as error:
        raise FlagError(f"{source}: {error}") from None
    if time_seconds == 0 and size is not None:
        time, time_seconds = None, None
    return Retention(time=time, time_seconds=time_seconds, size=size, size_bytes=size_value, source=source)


def bundle_files(content: Any) -> dict[str, str] | Any:
    """path -> content of a host bundle (infra/bundle.py: JSON with a `files` list); {} if it is not one."""
    if content is UNKNOWN:
        return UNKNOWN
    try:
        document = json.loads(content) if isinstance(content, str) else None
    except ValueError:
        raise FlagError("the host bundle is not valid JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("files"), list):
        return {}
    return {f["path"]: str(f.get("content", "")) for f in document["files"] if isinstance(f, dict) and "path" in f}


def prometheus_retention(user_data: Any, bundle: Any = None) -> Retention | None | Any:
    """The retention of the Prometheus this host runs, from the files its user data and its bundle write
    (the bundle's win: the agent applies it after boot); None if neither writes the defaults file; UNKNOWN if unknown."""
    files = write_files(user_data)
    delivered = bundle_files(bundle) if bundle is not None else {}
    if files is UNKNOWN or delivered is UNKNOWN:
        return UNKNOWN
    files = {**files, **delivered}
    if DEFAULTS_FILE not in files:
        return None
    return retention_from_args(args_from_defaults(files[DEFAULTS_FILE]), f"{DEFAULTS_FILE} ARGS")
