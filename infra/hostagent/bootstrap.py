#!/usr/bin/python3
"""First-boot agent of every host: runs from cloud-init, reads /etc/betting/bootstrap.json.

Standard library only (it runs on the image's python3 before anything is installed). Steps:
wait for the data volume and mount it, install packages without letting them start, fetch
secrets from SSM into files, fix ownership, run boot commands, then start the services.
`--dry-run` prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

MANIFEST = "/etc/betting/bootstrap.json"
NO_AUTOSTART = "/usr/sbin/policy-rc.d"  # exit 101: Debian packages must not start before config and volume are ready
VOLUME_WAIT_SECONDS = 600


class Runner:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, *command: str, stdin: str | None = None) -> str:
        if self.dry_run:
            print("RUN " + shlex.join(command))
            return ""
        return subprocess.run(command, input=stdin, check=True, text=True, capture_output=True).stdout

    def probe(self, *command: str) -> bool:
        """True when the command succeeds; a dry run assumes it does."""
        if self.dry_run:
            print("PROBE " + shlex.join(command))
            return True
        return subprocess.run(command, capture_output=True).returncode == 0

    def ensure_line(self, path: str, line: str) -> None:
        if self.dry_run:
            print(f"LINE {path}: {line}")
            return
        with open(path, "a+") as handle:
            handle.seek(0)
            if line not in handle.read().splitlines():
                handle.write(line + "\n")

    def write(self, path: str, content: str, owner: str, mode: str) -> None:
        if self.dry_run:
            print(f"WRITE {path} owner={owner} mode={mode}")
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        self.run("chown", owner, path)
        self.run("chmod", mode, path)


def data_device(dry_run: bool) -> str:
    """The one attached EBS volume that is not the root disk (attachment may lag the boot)."""
    if dry_run:
        return "/dev/nvme1n1"
    root = subprocess.run(["findmnt", "-no", "SOURCE", "/"], text=True, capture_output=True).stdout.strip()
    deadline = time.monotonic() + VOLUME_WAIT_SECONDS
    while time.monotonic() < deadline:
        for link in sorted(glob.glob("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_*")):
            device = os.path.realpath(link)
            if "-part" not in link and not root.startswith(device):
                return device
        time.sleep(5)
    raise SystemExit(f"no data volume attached after {VOLUME_WAIT_SECONDS}s")


def mount_volume(runner: Runner, volume: dict, fstab: str = "/etc/fstab") -> None:
    device = data_device(runner.dry_run)
    if not runner.probe("blkid", device):
        runner.run("mkfs.xfs", device)  # only a blank volume: a reattached one keeps its data
    uuid = runner.run("blkid", "-s", "UUID", "-o", "value", device).strip() or f"<uuid of {device}>"
    runner.run("mkdir", "-p", volume["mount"])
    runner.ensure_line(fstab, f"UUID={uuid} {volume['mount']} xfs defaults,nofail,noatime 0 2")
    runner.run("mount", volume["mount"])


def ssm_value(runner: Runner, region: str, parameter: str, attempts: int = 30) -> str:
    if runner.dry_run:
        print(f"SSM {parameter}")
        return "<secret>"
    for attempt in range(1, attempts + 1):
        try:
            return runner.run("aws", "ssm", "get-parameter", "--region", region, "--with-decryption", "--name", parameter,
                              "--query", "Parameter.Value", "--output", "text").rstrip("\n")
        except subprocess.CalledProcessError:
            # The role's policy and the parameter can take a while to become visible after creation.
            if attempt == attempts:
                raise
            time.sleep(10)
    raise AssertionError("unreachable")


def bootstrap(manifest: dict, runner: Runner) -> None:
    volume = manifest["volume"]
    if volume:
        mount_volume(runner, volume)
    runner.write(NO_AUTOSTART, "#!/bin/sh\nexit 101\n", "root:root", "0755")
    env = "DEBIAN_FRONTEND=noninteractive"
    runner.run("env", env, "apt-get", "update", "-q")
    runner.run("env", env, "apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", *manifest["packages"])
    runner.run("rm", "-f", NO_AUTOSTART)
    if volume:
        runner.run("chown", volume["owner"], volume["mount"])
    region = manifest["region"]
    for secret in manifest["secret_files"]:
        runner.write(secret["path"], ssm_value(runner, region, secret["parameter"]), secret["owner"], secret["mode"])
    for environment in manifest["secret_environments"]:
        lines = []
        for variable, parameter in sorted(environment["variables"].items()):
            value = ssm_value(runner, region, parameter).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{variable}="{value}"\n')
        runner.write(environment["path"], "".join(lines), environment["owner"], "0400")
    for item in manifest["ownership"]:
        runner.run("chown", item["owner"], item["path"])
        runner.run("chmod", item["mode"], item["path"])
    for command in manifest["boot_commands"]:
        runner.run("sh", "-c", command)
    runner.run("systemctl", "daemon-reload")
    for service in manifest["services"]:
        runner.run("systemctl", "enable", service)
        runner.run("systemctl", "restart", service)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", default=MANIFEST)
    parser.add_argument("--dry-run", action="store_true", help="print the steps instead of running them")
    args = parser.parse_args(argv)
    with open(args.manifest) as handle:
        bootstrap(json.load(handle), Runner(args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
