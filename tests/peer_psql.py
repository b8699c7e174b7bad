"""The agent's platform for its SQL steps on a test's own PostgreSQL, as on a host (DebianHost.psql): psql as the OS
user postgres over the socket, peer authentication; files under the test's root."""

from __future__ import annotations

import subprocess
from pathlib import Path


def run_as(user: str, *command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *command],
                          capture_output=True, text=True, **kwargs)


class PeerPsql:
    def __init__(self, root: Path, socket_dir: Path, port: int):
        self.root, self.socket_dir, self.port = root, socket_dir, port

    def path(self, path: str) -> str:
        return str(self.root / path.lstrip("/"))

    def psql(self, database: str, *args: str) -> str:
        result = run_as("postgres", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                        "-p", str(self.port), "-d", database, *args)
        if result.returncode:
            raise subprocess.CalledProcessError(result.returncode, "psql", result.stdout, result.stderr)
        return result.stdout

    def sql(self, database: str, statement: str) -> str:
        return self.psql(database, "-At", "-c", statement).strip()
