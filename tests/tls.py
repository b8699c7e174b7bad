"""A TLS identity for a test's own daemon, made by the sandbox's code (infra/sandbox/platform.py): a CA and a
certificate it signed for 127.0.0.1 and localhost, laid out as infra/pki.py lays them out on a host."""

from __future__ import annotations

import shutil
from pathlib import Path

from infra import pki
from infra.sandbox.platform import ca_identity, signed_identity


def write_identity(root: Path, owner: str = "postgres", ca_name: str = "test CA") -> dict[str, Path]:
    """The host's three files under `root` (pki.ca_path(), key_path(), cert_path() below it), the key `owner`'s
    alone (PostgreSQL refuses a key others may read); returns them by name: ca, key, cert."""
    ca_cert, ca_key = ca_identity(ca_name)
    cert, key = signed_identity(ca_cert, ca_key, "test host")
    paths = {name: root / path.lstrip("/") for name, path in
             (("ca", pki.ca_path()), ("key", pki.key_path()), ("cert", pki.cert_path()))}
    for name, content in (("ca", ca_cert), ("key", key), ("cert", cert)):
        path = paths[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(0o400 if name == "key" else 0o444)
        shutil.chown(path, owner, owner)
    for folder in (paths["ca"].parent, *paths["ca"].parent.parents):
        if folder == root.parent:
            break
        folder.chmod(0o755)
    return paths
