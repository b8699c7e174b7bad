"""pgbackrest.conf: WAL archive and base backups in the stack's S3 backup bucket.

Credentials come from the instance role (`repo1-s3-key-type=auto`): no key in the file.
"""

from __future__ import annotations

import configparser
import io

from infra.settings import StackSettings
from infra.topology import Paths, Ports, Topology

PGBACKREST_BIN = "/usr/bin/pgbackrest"


def stanza(topology: Topology) -> str:
    """One stanza per Patroni cluster, named after its scope."""
    return topology.patroni_scope


def pgbackrest_config(settings: StackSettings, topology: Topology) -> dict[str, dict[str, str]]:
    return {
        "global": {
            "repo1-type": "s3",
            "repo1-s3-bucket": topology.backup_bucket,
            "repo1-s3-region": settings.region,
            "repo1-s3-endpoint": f"s3.{settings.region}.amazonaws.com",
            "repo1-s3-key-type": "auto",
            "repo1-path": f"/{stanza(topology)}",
            "repo1-retention-full": str(settings.backups.full_backup_retention),
            "repo1-cipher-type": "none",  # the bucket is encrypted at rest with its KMS key
            "start-fast": "y",
            "process-max": "2",
            "compress-type": "zst",
            # Pushes WAL from a spool queue so a slow S3 call never stalls archive_command.
            "archive-async": "y",
            "spool-path": "/var/spool/pgbackrest",
            "log-level-console": "info",
            "log-level-file": "detail",
            "log-path": "/var/log/pgbackrest",
            "lock-path": "/tmp/pgbackrest",
        },
        stanza(topology): {
            "pg1-path": Paths.POSTGRES_DATA,
            "pg1-port": str(Ports.POSTGRES),
            "pg1-socket-path": "/var/run/postgresql",
            "pg1-user": "postgres",
        },
    }


def render_pgbackrest(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # option names are case-sensitive and kebab-case
    parser.read_dict(pgbackrest_config(settings, topology))
    out = io.StringIO()
    parser.write(out, space_around_delimiters=False)
    return {"pgbackrest/pgbackrest.conf": out.getvalue().encode()}
