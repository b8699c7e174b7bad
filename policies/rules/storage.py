"""Storage: the Prometheus TSDB volume's size and class, and every disk encrypted on SSD."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from policies.rules.model import UNKNOWN, Finding, Resource, Rule, as_list, message

VOLUME = "aws:ebs/volume:Volume"
INSTANCE = "aws:ec2/instance:Instance"
SSD_TYPES = ["gp3", "gp2", "io1", "io2"]  # st1, sc1 (HDD) and standard (magnetic) are too slow for a database or TSDB
# EC2's CreateVolume uses gp2 when no type is given.
DEFAULT_VOLUME_TYPE = "gp2"


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
)
