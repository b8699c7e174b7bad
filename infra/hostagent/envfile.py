"""systemd's EnvironmentFile= format, read as systemd reads it (systemd.exec(5)): KEY=VALUE lines,
# or ; comments, surrounding quotes removed, backslash escapes inside double quotes.

One reader for the agent (etcd's join reads /etc/default/etcd) and the sandbox (which gives a
unit's process the environment systemd would). Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import re


def read_environment_file(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = re.sub(r"\\(.)", r"\1", value)
        values[key.strip()] = value
    return values
