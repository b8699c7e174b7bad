"""pgbackrest.conf of one PostgreSQL host: WAL archive and base backups in the stack's S3 backup bucket.

Credentials come from the instance role (`repo1-s3-key-type=auto`): no key in the file. The repository
is the bucket's BackupLayout.REPOSITORY prefix, the one the host's IAM grant names.

With more than one member, pg1 is this host and pg2.. are the others, reached through their pgBackRest
TLS servers (Debian's pgbackrest.service, `pgbackrest server`): a backup taken on a standby copies the
files from that standby and only starts and stops the backup on the primary. pgBackRest finds out
which member is the primary itself; every member's file is written the same way, with itself as pg1.
"""

from __future__ import annotations

import configparser
import io

from infra.settings import StackSettings
from infra.topology import BackupLayout, Host, Paths, Ports, SecretNames, Topology, secret_path

PGBACKREST_BIN = "/usr/bin/pgbackrest"
# The CN of the hosts' shared TLS certificate; each TLS server lets exactly it use the stanza.
TLS_CLIENT_CN = "pgbackrest"
TLS_SERVER_ADDRESS = "0.0.0.0"  # the security group lets only the PostgreSQL hosts reach it


def stanza(topology: Topology) -> str:
    """One stanza per Patroni cluster, named after its scope."""
    return topology.patroni_scope


def members(topology: Topology, host: Host) -> list[tuple[int, Host]]:
    """pgBackRest's pg index of every member in `host`'s file: itself first (local), then the others in order."""
    others = [h for h in topology.postgres if h.name != host.name]
    return [(1, host), *((index, other) for index, other in enumerate(others, start=2))]


def uses_tls_server(topology: Topology) -> bool:
    """A standby can only be backed up with the primary reachable: only clusters with a standby need the servers."""
    return len(topology.postgres) > 1


def pgbackrest_config(settings: StackSettings, topology: Topology, host: Host) -> dict[str, dict[str, str]]:
    if host not in topology.postgres:
        raise ValueError(f"{host.name} is not a PostgreSQL host of this topology")
    backups = settings.backups
    cert, key = secret_path(SecretNames.PGBACKREST_TLS_CERT), secret_path(SecretNames.PGBACKREST_TLS_KEY)
    general = {
        "repo1-type": "s3",
        "repo1-s3-bucket": topology.backup_bucket,
        "repo1-s3-region": settings.region,
        "repo1-s3-endpoint": f"s3.{settings.region}.amazonaws.com",
        "repo1-s3-key-type": "auto",
        "repo1-path": BackupLayout.repository_path(),
        # Every object pgBackRest writes names the backups' key (the bucket's default is the same key).
        "repo1-s3-kms-key-id": topology.backup_key_alias,
        # Days, not a count: keeps every backup and WAL segment a point-in-time restore within the window needs.
        "repo1-retention-full-type": "time",
        "repo1-retention-full": str(backups.retention_days),
        "repo1-cipher-type": "none",  # the bucket is encrypted at rest with its KMS key
        "start-fast": "y",
        "process-max": "2",
        "compress-type": "zst",
        # Pushes WAL from a spool queue so a slow S3 call never stalls archive_command.
        "archive-async": "y",
        "spool-path": Paths.PGBACKREST_SPOOL,
        # A repository that stays unreachable must not fill pg_wal (and the data volume): past this much
        # unarchived WAL pgBackRest reports segments archived and drops them, which the WAL-archiving alert shows.
        "archive-push-queue-max": f"{backups.archive_push_queue_max_gib}GiB",
        "log-level-console": "info",
        "log-level-file": "detail",
        "log-path": "/var/log/pgbackrest",
        "lock-path": Paths.PGBACKREST_LOCKS,
    }
    if uses_tls_server(topology):
        general.update({
            # The backup job runs on a standby when there is a healthy one; scripts/backup.py turns it off on a leader alone.
            "backup-standby": "y",
            "tls-server-address": TLS_SERVER_ADDRESS,
            "tls-server-port": str(Ports.PGBACKREST_TLS),
            "tls-server-cert-file": cert,
            "tls-server-key-file": key,
            "tls-server-ca-file": cert,  # self-signed: the certificate is its own authority
            "tls-server-auth": f"{TLS_CLIENT_CN}={stanza(topology)}",
        })
    cluster: dict[str, str] = {}
    for index, member in members(topology, host):
        pg = f"pg{index}"
        if member.name != host.name:
            cluster.update({
                f"{pg}-host": member.fqdn,
                f"{pg}-host-type": "tls",
                f"{pg}-host-port": str(Ports.PGBACKREST_TLS),
                f"{pg}-host-cert-file": cert,
                f"{pg}-host-key-file": key,
                f"{pg}-host-ca-file": cert,
            })
        cluster.update({
            f"{pg}-path": Paths.POSTGRES_DATA,
            f"{pg}-port": str(Ports.POSTGRES),
            f"{pg}-socket-path": "/var/run/postgresql",
            f"{pg}-user": "postgres",
        })
    return {"global": general, stanza(topology): cluster}


def render_pgbackrest(settings: StackSettings, topology: Topology, host: Host) -> dict[str, bytes]:
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # option names are case-sensitive and kebab-case
    parser.read_dict(pgbackrest_config(settings, topology, host))
    out = io.StringIO()
    parser.write(out, space_around_delimiters=False)
    return {f"pgbackrest/{host.name}.conf": out.getvalue().encode()}
