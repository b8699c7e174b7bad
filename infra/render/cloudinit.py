"""A host's boot configuration (#cloud-config user data): its files, the boot agent and its manifest.

Every file is written verbatim by cloud-init; the agent (infra/hostagent/bootstrap.py) then
mounts the data volume, installs packages, fetches secrets and starts the services.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from infra.services import HostSpec, bootstrap_manifest

AGENT_PATH = "/usr/local/sbin/betting-bootstrap"
MANIFEST_PATH = "/etc/betting/bootstrap.json"
_AGENT = (Path(__file__).resolve().parents[1] / "hostagent" / "bootstrap.py").read_bytes()


class _Literal(str):
    pass


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def _entry(path: str, content: bytes, mode: str) -> dict:
    text = content.decode()
    # A literal block keeps the bytes exact when the text ends in one newline and has no tabs or trailing spaces.
    exact = text.endswith("\n") and not text.endswith("\n\n") and all(
        line == line.rstrip() and "\t" not in line for line in text.splitlines()
    )
    return {"path": path, "permissions": mode, "owner": "root:root", "content": _Literal(text) if exact else text}


def render_cloud_init(spec: HostSpec, environment: str, region: str) -> bytes:
    files = [_entry(f.path, f.content, "0400" if f.owner != "root:root" else f.mode) for f in spec.files]
    for env in spec.secret_environments:
        drop_in = f"[Service]\nEnvironmentFile={env.path}\n".encode()
        files.append(_entry(f"/etc/systemd/system/{env.unit}.service.d/betting-secrets.conf", drop_in, "0644"))
    files.append(_entry(MANIFEST_PATH, bootstrap_manifest(spec, environment, region), "0644"))
    files.append(_entry(AGENT_PATH, _AGENT, "0755"))
    document = {
        "hostname": spec.host.name,
        "fqdn": spec.host.fqdn,
        "write_files": files,
        "runcmd": [[AGENT_PATH]],
    }
    return b"#cloud-config\n" + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000).encode()
