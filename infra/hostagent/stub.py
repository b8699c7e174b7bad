#!/usr/bin/python3
"""Boot stub: the whole of what an instance's user data runs, once, at first boot.

It never changes with a rendered file, a setting or a rule, so changing those never touches an
instance. It reads /etc/betting/host.json (host, region, bucket, digest parameter), installs
the SSM agent (Debian's images have none; the rollouts run through it) and the AWS CLI, reads
the digest of this host's current bundle from SSM, downloads the bundle from S3, checks its
sha256, puts the agent it carries in place and hands over to it. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request

HOST_CONFIG = "/etc/betting/host.json"
BUNDLES = "/var/lib/betting/bundles"
AGENT_ROOT = "/usr/local/lib/betting-agent"
AGENT_COMMAND = "/usr/local/sbin/betting-agent"
# AWS publishes the agent for Debian only as a .deb in a regional bucket (reached through the S3 endpoint).
SSM_AGENT_URL = "https://s3.{region}.amazonaws.com/amazon-ssm-{region}/latest/debian_amd64/amazon-ssm-agent.deb"
ATTEMPTS = 30


def run(*command: str) -> str:
    return subprocess.run(command, check=True, text=True, capture_output=True).stdout


def retry(what: str, action):
    """New parameters, role policies and the NAT route can take a while to become usable."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return action()
        except (OSError, subprocess.CalledProcessError) as error:
            if attempt == ATTEMPTS:
                raise SystemExit(f"betting-stub: {what} failed {ATTEMPTS} times: {error}") from None
            time.sleep(10)
    raise AssertionError("unreachable")


def install_ssm_agent(region: str) -> None:
    if os.path.exists("/usr/bin/amazon-ssm-agent"):
        return
    package = "/var/tmp/amazon-ssm-agent.deb"
    retry("downloading the SSM agent", lambda: urllib.request.urlretrieve(SSM_AGENT_URL.format(region=region), package))
    run("dpkg", "-i", package)
    run("systemctl", "enable", "--now", "amazon-ssm-agent")


def install_aws_cli() -> None:
    if os.path.exists("/usr/bin/aws"):
        return
    env = "DEBIAN_FRONTEND=noninteractive"
    retry("apt-get update", lambda: run("env", env, "apt-get", "update", "-q"))
    retry("installing awscli", lambda: run("env", env, "apt-get", "install", "-y", "-q", "awscli"))


def bundle_key(config: dict, digest: str) -> str:
    return f"bundles/{config['host']}/{digest}.json"


def fetch_bundle(config: dict) -> tuple[str, dict]:
    digest = retry("reading the bundle digest", lambda: run(
        "aws", "ssm", "get-parameter", "--region", config["region"], "--name", config["digest_parameter"],
        "--query", "Parameter.Value", "--output", "text").strip())
    os.makedirs(BUNDLES, exist_ok=True)
    path = f"{BUNDLES}/{digest}.json"
    key = bundle_key(config, digest)
    retry(f"downloading s3://{config['bucket']}/{key}", lambda: run(
        "aws", "s3api", "get-object", "--region", config["region"], "--bucket", config["bucket"], "--key", key, path))
    with open(path, "rb") as handle:
        content = handle.read()
    if hashlib.sha256(content).hexdigest() != digest:
        raise SystemExit(f"betting-stub: s3://{config['bucket']}/{key} does not match its sha256")
    return path, json.loads(content)


def install_agent(bundle: dict) -> None:
    for file in bundle["files"]:
        if file["path"].startswith(AGENT_ROOT + "/") or file["path"] == AGENT_COMMAND:
            os.makedirs(os.path.dirname(file["path"]), exist_ok=True)
            with open(file["path"], "w") as handle:
                handle.write(file["content"])
            os.chmod(file["path"], int(file["mode"], 8))


def main() -> int:
    with open(HOST_CONFIG) as handle:
        config = json.load(handle)
    install_ssm_agent(config["region"])
    install_aws_cli()
    path, bundle = fetch_bundle(config)
    install_agent(bundle)
    os.execv(AGENT_COMMAND, [AGENT_COMMAND, "apply", "--bundle", path])
    return 1


if __name__ == "__main__":
    sys.exit(main())
