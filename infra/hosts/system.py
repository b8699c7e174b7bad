"""The host under the daemons: time, kernel and systemd settings that the role specs add.

- every host: chrony on the Amazon Time Sync Service (infra/hostagent/files/chrony.conf), started first;
- PostgreSQL hosts: the kernel settings derived with PostgreSQL's parameters (a file in /etc/sysctl.d that
  the agent applies at once by restarting systemd-sysctl, checked by its gate), transparent huge pages
  off (a oneshot unit), the OOM killer kept off Patroni and the postmaster;
- hosts with a data volume: their daemon never starts unless the volume is mounted where it belongs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from infra.hosts.spec import DataVolume, File, HostSpec
from infra.render.tuning import render_sysctl, stack_tuning
from infra.settings import StackSettings

FILES = Path(__file__).resolve().parents[1] / "hostagent" / "files"
SYSTEMD_DIR = "/etc/systemd/system"
CHRONY_CONFIG = "/etc/chrony/chrony.conf"
CHRONY_UNIT = "chrony"
SYSCTL_FILE = "/etc/sysctl.d/60-betting-postgres.conf"
SYSCTL_UNIT = "systemd-sysctl"  # systemd's own: a restart applies every /etc/sysctl.d file, as at boot
THP_UNIT = "betting-thp-off"
# Started in this order before Patroni: the kernel is set before PostgreSQL allocates its memory.
POSTGRES_HOST_UNITS = (THP_UNIT, SYSCTL_UNIT)


def with_time_sync(spec: HostSpec) -> HostSpec:
    """Every host keeps its clock on the Amazon Time Sync Service: chrony's config and unit, first of all."""
    return dataclasses.replace(spec, files=(*spec.files, File(CHRONY_CONFIG, (FILES / "chrony.conf").read_bytes())),
                               services=(CHRONY_UNIT, *spec.services))


def data_volume_drop_in(unit: str, volume: DataVolume) -> File:
    """`unit` waits for its data volume's mount and refuses to start on the root disk without it.

    The agent mounts the volume and adds it to /etc/fstab before any service starts, so at boot systemd
    orders the unit after that mount (RequiresMountsFor: a missing volume fails the mount and the unit with it);
    AssertPathIsMountPoint also covers a host whose fstab lost the line (then no mount unit exists to require)."""
    content = ("# The data volume (an EBS volume the host agent mounts, infra/hostagent/agent.py DebianHost.mount):\n"
               "# never run on the root disk.\n"
               f"[Unit]\nRequiresMountsFor={volume.mount}\nAssertPathIsMountPoint={volume.mount}\n")
    return File(f"{SYSTEMD_DIR}/{unit}.service.d/betting-data-volume.conf", content.encode())


def postgres_host_files(settings: StackSettings, volume: DataVolume) -> list[File]:
    return [
        File(SYSCTL_FILE, render_sysctl(stack_tuning(settings))),
        File(f"{SYSTEMD_DIR}/{THP_UNIT}.service", (FILES / f"{THP_UNIT}.service").read_bytes()),
        File(f"{SYSTEMD_DIR}/patroni.service.d/betting-oom.conf", (FILES / "patroni-oom.conf").read_bytes()),
        data_volume_drop_in("patroni", volume),
    ]
