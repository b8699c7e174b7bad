"""Durations and sizes in the notations the daemons use (pure, no Pulumi)."""

from __future__ import annotations

import re

# Prometheus' duration notation: one or more <number><unit>, largest unit first ("1h30m", "30d").
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")

# Prometheus parses --storage.tsdb.retention.size with base-2 units: "45GB" is 45 GiB.
_SIZE_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "PB": 2**50}
_SIZE = re.compile(r"^(\d+)(B|KB|MB|GB|TB|PB)$")

GIB = 2**30


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration; ValueError names the accepted form."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not text or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration like 15s, 5m, 1h30m or 30d")
    units = ("y", "w", "d", "h", "m", "s", "ms")
    return sum(int(value) * _DURATION_UNITS[unit] for value, unit in zip(match.groups(), units, strict=True) if value)


def size_bytes(text: str) -> int:
    """Bytes in a Prometheus size (base 2); ValueError names the accepted form."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a size like 512MB or 40GB (units B, KB, MB, GB, TB, PB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
