"""A host's user data: the boot stub and where to find its bundle; nothing that a change touches.

EC2 keeps user data to 16 KB and never re-runs it when it changes, so it carries only what is
fixed for the life of the instance: its names, its region, the bundle bucket and the SSM
parameter that holds the digest of its current bundle. Everything else arrives as the bundle
(infra/bundle.py), applied by the agent the stub installs.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from infra.bundle import digest_parameter_name
from infra.hostagent.agent import HOST_CONFIG
from infra.topology import Host

STUB_PATH = "/usr/local/sbin/betting-stub"
HOST_CONFIG_PATH = HOST_CONFIG  # read by the stub and the agent
_STUB = (Path(__file__).resolve().parents[1] / "hostagent" / "stub.py").read_text()


class _Literal(str):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|"))


def host_config(host: Host, environment: str, region: str, bundle_bucket: str) -> bytes:
    config = {"host": host.name, "environment": environment, "region": region, "bucket": bundle_bucket,
              "digest_parameter": digest_parameter_name(environment, host.name)}
    return (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()


def render_cloud_init(host: Host, environment: str, region: str, bundle_bucket: str) -> bytes:
    document = {
        "hostname": host.name,
        "fqdn": host.fqdn,
        "write_files": [
            {"path": HOST_CONFIG_PATH, "permissions": "0644", "owner": "root:root",
             "content": _Literal(host_config(host, environment, region, bundle_bucket).decode())},
            {"path": STUB_PATH, "permissions": "0755", "owner": "root:root", "content": _Literal(_STUB)},
        ],
        "runcmd": [[STUB_PATH]],
    }
    return b"#cloud-config\n" + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000).encode()
