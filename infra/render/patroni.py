"""patroni.yml for one PostgreSQL host: a pure function of the settings and the topology.

Passwords are not in the file: Patroni reads them from the environment variables in
`PASSWORD_ENV` (filled by the platform from the secret files named there), which its config
loader merges over `postgresql.authentication`; `EXPORTER_PASSWORD_ENV` in the same
environment sets the postgres_exporter role's password at bootstrap.
"""

from __future__ import annotations

import yaml

from infra import pki
from infra.render import pgbouncer
from infra.render.pgbackrest import PGBACKREST_BIN, stanza
from infra.render.tuning import LOCAL, stack_tuning
from infra.settings import StackSettings
from infra.topology import Host, Paths, Ports, SecretNames, Topology

SUPERUSER = "postgres"
REPLICATION_USER = "replicator"
REWIND_USER = "rewind_user"

# Patroni's own environment variables -> the secret file (under Paths.SECRETS_DIR) that fills each.
PASSWORD_ENV = {
    "PATRONI_SUPERUSER_PASSWORD": SecretNames.POSTGRES_SUPERUSER_PASSWORD,
    "PATRONI_REPLICATION_PASSWORD": SecretNames.POSTGRES_REPLICATION_PASSWORD,
    "PATRONI_REWIND_PASSWORD": SecretNames.POSTGRES_REWIND_PASSWORD,
}

# The REST API's login for its unsafe endpoints (POST /switchover, /restart, /reinitialize, PATCH /config...):
# Patroni reads it from these variables (its config loader fills restapi.authentication), never from this file.
RESTAPI_CREDENTIALS_ENV = {
    "PATRONI_RESTAPI_USERNAME": SecretNames.PATRONI_RESTAPI_USERNAME,
    "PATRONI_RESTAPI_PASSWORD": SecretNames.PATRONI_RESTAPI_PASSWORD,
}
RESTAPI_USERNAME = "patroni"  # the value of PATRONI_RESTAPI_USERNAME (infra/components/patroni.py stores it)

# postgres_exporter's login (pg_monitor), created by the post_bootstrap script with a password from the
# environment Patroni runs in, never from this file.
EXPORTER_ROLE = "postgres_exporter"
EXPORTER_PASSWORD_ENV = "POSTGRES_EXPORTER_PASSWORD"
# The extensions the monitoring reads (pg_stat_statements): post_bootstrap and the agent on the leader run it.
EXTENSIONS_SQL = "/etc/betting/pg-extensions.sql"
# Patroni runs post_bootstrap once, on the node that initialises the cluster, appending the superuser's
# connection URL: the script (infra/hostagent/files/betting-pg-post-bootstrap) creates the exporter role, the
# extensions, PgBouncer's auth function (the SQL files named) and the pgBackRest stanza, so WAL is archived from
# the first segment on. Its values come from the backup env file.
POST_BOOTSTRAP = f"{Paths.POST_BOOTSTRAP} {Paths.BACKUP_ENV} {EXTENSIONS_SQL} {Paths.PGBOUNCER_AUTH_SQL}"

# pgaudit (Debian's postgresql-15-pgaudit): session audit of DDL and of role and privilege changes
# on every member, and object audit of writes through the role below: pgaudit logs a statement
# on a table when this role holds the statement's privilege on it (infra/hostagent/files/pg-audit.sql
# grants them on the tables `betting.audit_tables` names).
AUDIT_ROLE = "betting_auditor"
AUDIT_TABLES_PARAMETER = "betting.audit_tables"
SHARED_PRELOAD_LIBRARIES = "pg_stat_statements,pgaudit"
# PostgreSQL's own log files, one per hour, outside the data directory (so neither in base backups nor
# removed by a replica's rebuild); the audit shipper uploads every file but the one being written.
LOG_DIRECTORY = "/var/lib/postgresql/log"
LOG_FILENAME = "postgresql-%Y-%m-%dT%H.log"

WATCHDOG_DEVICE = "/dev/watchdog"
UNIX_SOCKET_DIR = Paths.POSTGRES_SOCKET_DIR
PGPASS = "/var/lib/postgresql/.pgpass.patroni"


def _cluster_parameters(settings: StackSettings, node_count: int) -> dict:
    """Parameters Patroni keeps equal on every member (stored in the DCS at bootstrap)."""
    return {
        "max_connections": settings.patroni.max_connections,
        "wal_level": "replica",
        "hot_standby": "on",
        # pg_rewind needs hint bits in WAL (data checksums are on too, from initdb).
        "wal_log_hints": "on",
        # Every member may stream to every other, plus room for a pgBackRest backup and a rejoin.
        "max_wal_senders": node_count + 5,
        "max_replication_slots": node_count + 5,
        "wal_keep_size": "1GB",
        "max_slot_wal_keep_size": "20GB",
        **audit_parameters(settings),
    }


def audit_parameters(settings: StackSettings) -> dict:
    """pgaudit's settings. Cluster-wide, so a new leader audits as the old one did; loading the library
    needs a restart, which the agent rolls one member at a time after its PATCH /config."""
    return {
        "shared_preload_libraries": SHARED_PRELOAD_LIBRARIES,
        "pgaudit.log": "ddl, role",
        "pgaudit.role": AUDIT_ROLE,
        # Our own placeholder setting (any dotted name is one): the tables whose writes are audited.
        AUDIT_TABLES_PARAMETER: ",".join(settings.audit.tables),
    }


def _local_parameters(settings: StackSettings, topology: Topology) -> dict:
    archive = f"{PGBACKREST_BIN} --config={Paths.PGBACKREST_CONFIG} --stanza={stanza(topology)}"
    return {
        "unix_socket_directories": UNIX_SOCKET_DIR,
        "pg_stat_statements.track": "all",
        "pg_stat_statements.max": 10000,
        "track_io_timing": "on",
        "archive_mode": "on",
        "archive_command": f"{archive} archive-push %p",
        # Bounds the RPO of the backups when writes are rare: a segment is archived at least every minute.
        "archive_timeout": "60s",
        "log_min_duration_statement": "1s",
        "log_line_prefix": "%m [%p] %q%u@%d ",
        "logging_collector": "on",
        "log_directory": LOG_DIRECTORY,
        "log_filename": LOG_FILENAME,
        "log_rotation_age": "1h",
        # Time only: a size rotation would append to the hour's file, which may already be shipped.
        "log_rotation_size": 0,
        **tls_parameters(),
    }


def tls_parameters() -> dict:
    """TLS with the host's own identity (infra/pki.py). Local, not in the DCS: they name files this host's bundle
    delivers, and pg_hba's hostssl lines (also in this file) need `ssl` on, so the two change together. Every one
    is reloaded on SIGHUP (context sighup): a renewed certificate needs a Patroni reload, not a restart."""
    return {
        "ssl": "on",
        "ssl_cert_file": pki.cert_path(),
        "ssl_key_file": pki.key_path(),
        # Clients may present certificates signed by it (none need to: pg_hba asks passwords, not clientcert).
        "ssl_ca_file": pki.ca_path(),
        "ssl_min_protocol_version": "TLSv1.2",
    }


def client_tls() -> dict:
    """What every client of PostgreSQL on the network uses: TLS, the stack's CA, and the server's name checked
    against its certificate (libpq skips TLS on the Unix socket, so the same keys are harmless there)."""
    return {"sslmode": "verify-full", "sslrootcert": pki.ca_path()}


def _parameters(settings: StackSettings, topology: Topology) -> tuple[dict, dict]:
    """(DCS, local) parameters: the program's, then the derived ones and the stack's overrides (infra/render/tuning.py).

    A derived or overridden parameter goes where the program renders it: shared_buffers and huge_pages, and the
    program's own local ones, in this node's patroni.yml (Patroni lets a local value win over the DCS); the rest
    in the DCS."""
    cluster, local = _cluster_parameters(settings, len(topology.postgres)), _local_parameters(settings, topology)
    for name, value in stack_tuning(settings).parameters.items():
        (local if name in local or name in LOCAL else cluster)[name] = value
    return cluster, local


def _pg_hba(settings: StackSettings) -> list[str]:
    """Socket lines as they were; every network line `hostssl`: nothing reaches PostgreSQL over TCP in clear text
    (replication, pg_basebackup, pg_rewind, the backup job's canary, the health checks)."""
    vpc = settings.vpc_cidr
    return [
        f"local all {SUPERUSER} peer",
        # PgBouncer's auth_query login: only from the OS user PgBouncer runs as, so the role needs no password.
        f"local all {pgbouncer.AUTH_ROLE} peer map={pgbouncer.IDENT_MAP}",
        # PgBouncer's server connections come over the socket, with each client's own SCRAM keys.
        "local all all scram-sha-256",
        f"local replication {REPLICATION_USER} scram-sha-256",
        f"hostssl replication {REPLICATION_USER} 127.0.0.1/32 scram-sha-256",
        f"hostssl replication {REPLICATION_USER} {vpc} scram-sha-256",
        "hostssl all all 127.0.0.1/32 scram-sha-256",
        f"hostssl all all {vpc} scram-sha-256",
    ]


def restapi_url(node: Host) -> str:
    """The member's REST API as it advertises itself (api_url in /cluster): its FQDN, the name its certificate has."""
    return f"https://{node.fqdn}:{Ports.PATRONI_API}"


def _restapi(topology: Topology, node: Host) -> dict:
    """TLS with the host's identity. Patroni 3.0.2 applies `allowlist` and `authentication` to the unsafe
    endpoints only (its check_access decorator: PATCH/PUT /config, POST /reload, /restart, /reinitialize,
    /switchover, /failover, /failsafe, /sigterm, DELETE /restart, /switchover); GET /primary, /replica, /health,
    /metrics, /cluster stay open (HAProxy's checks and Prometheus read them), over TLS. The members call each
    other's unsafe endpoints (the leader's POST /failsafe while the DCS is down, with this login): by name here,
    resolved when Patroni loads the file, and from the DCS (allowlist_include_members) for a member added later."""
    return {
        "listen": f"0.0.0.0:{Ports.PATRONI_API}",
        "connect_address": f"{node.fqdn}:{Ports.PATRONI_API}",
        "certfile": pki.cert_path(),
        "keyfile": pki.key_path(),
        "cafile": pki.ca_path(),
        # The members (the agent and patronictl call a member by its name, so from the host's own address) and the
        # monitoring hosts.
        "allowlist": [*(h.fqdn for h in topology.postgres), *(h.fqdn for h in topology.monitoring)],
        "allowlist_include_members": True,
    }


def _etcd3(topology: Topology) -> dict:
    """etcd with client-certificate authentication: the host's own pair is its client certificate."""
    return {
        "hosts": [f"{member.fqdn}:{Ports.ETCD_CLIENT}" for member in topology.etcd],
        "protocol": "https",
        "cacert": pki.ca_path(),
        "cert": pki.cert_path(),
        "key": pki.key_path(),
    }


def _ctl() -> dict:
    """patronictl on the host (as postgres, which may read the key) over TLS; the login for its unsafe calls comes
    from the environment as Patroni's does (README: Security)."""
    return {"cacert": pki.ca_path(), "certfile": pki.cert_path(), "keyfile": pki.key_path()}


def patroni_config(settings: StackSettings, topology: Topology, node: Host) -> dict:
    """The patroni.yml of `node` as data (render_patroni serialises it)."""
    if node not in topology.postgres:
        raise ValueError(f"{node.name} is not a PostgreSQL host of this topology")
    patroni = settings.patroni
    backrest = f"{PGBACKREST_BIN} --config={Paths.PGBACKREST_CONFIG} --stanza={stanza(topology)}"
    cluster_parameters, local_parameters = _parameters(settings, topology)
    config: dict = {
        "scope": topology.patroni_scope,
        "namespace": "/service/",
        "name": node.name,
        "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
        "restapi": _restapi(topology, node),
        "ctl": _ctl(),
        "etcd3": _etcd3(topology),
        "bootstrap": {
            "dcs": {
                "ttl": patroni.ttl,
                "loop_wait": patroni.loop_wait,
                "retry_timeout": patroni.retry_timeout,
                "primary_start_timeout": patroni.primary_start_timeout,
                "maximum_lag_on_failover": patroni.maximum_lag_on_failover,
                "synchronous_mode": patroni.synchronous_mode,
                "synchronous_mode_strict": patroni.synchronous_mode_strict,
                # An etcd outage must not demote a leader that every other member can still reach.
                "failsafe_mode": True,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": cluster_parameters,
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
            "post_bootstrap": POST_BOOTSTRAP,
        },
        "postgresql": {
            "listen": f"0.0.0.0:{Ports.POSTGRES}",
            "connect_address": f"{node.fqdn}:{Ports.POSTGRES}",
            "data_dir": Paths.POSTGRES_DATA,
            "bin_dir": Paths.POSTGRES_BIN,
            "pgpass": PGPASS,
            "use_unix_socket": True,
            "use_unix_socket_repl": False,
            # Replication, pg_basebackup and pg_rewind connect to the leader's connect_address (its FQDN, which its
            # certificate names) and check it is the stack's CA's: a host that is not cannot stand in for the leader.
            "authentication": {
                "superuser": {"username": SUPERUSER, **client_tls()},
                "replication": {"username": REPLICATION_USER, **client_tls()},
                "rewind": {"username": REWIND_USER, **client_tls()},
            },
            "parameters": local_parameters,
            "recovery_conf": {"restore_command": f"{backrest} archive-get %f %p"},
            "pg_hba": _pg_hba(settings),
            "pg_ident": [f"{pgbouncer.IDENT_MAP} {pgbouncer.OS_USER} {pgbouncer.AUTH_ROLE}"],
            # A new replica restores from the S3 backups first (no load on the primary), else streams a base backup.
            "create_replica_methods": ["pgbackrest", "basebackup"],
            "pgbackrest": {"command": f"{backrest} --delta restore", "keep_data": True, "no_params": True},
            "basebackup": [{"checkpoint": "fast"}, {"max-rate": "200M"}],
        },
        "watchdog": {"mode": patroni.watchdog, "device": WATCHDOG_DEVICE, "safety_margin": 5},
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }
    return config


def render_patroni(settings: StackSettings, topology: Topology, node: Host) -> dict[str, bytes]:
    text = yaml.safe_dump(patroni_config(settings, topology, node), sort_keys=False, default_flow_style=False)
    return {f"patroni/{node.name}.yml": text.encode()}
