"""PgBouncer on every PostgreSQL node: pgbouncer.ini, its HBA file and its user list. Pure: settings in, bytes out.

Clients never reach PgBouncer directly: HAProxy (infra/render/haproxy.py) on any node forwards the
writer port to the leader's PgBouncer and the reader port to a replica's. Each PgBouncer pools in
front of its own node's PostgreSQL, over the local socket, in transaction mode.

TLS: HAProxy passes TCP through, so a client's TLS session ends at PgBouncer, which serves the host's
identity (infra/pki.py: it names the load balancer's pg-primary/pg-replicas names, so `sslmode=verify-full`
against them works) and refuses a client without TLS. Towards PostgreSQL it needs none: the local socket
never leaves the host, the kernel says who the peer is (the auth role's peer login needs it), and there is
no handshake per server connection.

No password is in a file, and PgBouncer has none:
- clients log in with SCRAM-SHA-256 against PostgreSQL's own verifiers, which PgBouncer reads with
  `auth_query` through `pgbouncer.get_auth` (infra/hostagent/files/pgbouncer-auth.sql: SECURITY
  DEFINER, owned by the superuser, executable only by AUTH_ROLE; it returns no superuser or
  replication role, so those cannot come through the pooler);
- PgBouncer runs that query logged in as AUTH_ROLE, a role without a password that pg_hba admits
  only over the socket, by peer authentication of the OS user PgBouncer runs as (pg_ident map
  IDENT_MAP; infra/render/patroni.py);
- the server connections log in with the client's own SCRAM keys (PgBouncer's SCRAM pass-through);
- the exporter reads the admin console over the socket by peer authentication. PgBouncer 1.18
  queues a console login that is not in `auth_file` behind an `auth_query` on the console's
  database, which never answers: the user list names STATS_USER, with no password.
"""

from __future__ import annotations

from infra import aggregates, pki
from infra.settings import AGGREGATES_POOL_SIZE, AUTH_CONNECTIONS_PER_DATABASE, StackSettings
from infra.topology import Paths, Ports

UNIX_SOCKET_DIR = Paths.POSTGRES_SOCKET_DIR

# Debian's pgbouncer.service runs PgBouncer as postgres: pg_ident maps that OS user to AUTH_ROLE.
OS_USER = "postgres"
AUTH_ROLE = "pgbouncer_auth"
AUTH_SCHEMA = "pgbouncer"
AUTH_QUERY = f"SELECT username, password FROM {AUTH_SCHEMA}.get_auth($1)"
IDENT_MAP = "pgbouncer"
# The exporter (betting-pgbouncer-exporter.service runs as postgres) reads SHOW commands as this console user.
STATS_USER = "postgres"
CONSOLE_DATABASE = "pgbouncer"
LISTEN_ADDRESS = "0.0.0.0"
# A PostgreSQL that restarts (a switchover, a crash) is tried again after 1 s instead of PgBouncer's 15 s,
# during which its clients would get errors at once.
SERVER_LOGIN_RETRY_S = 1


def socket_address(port: int) -> str:
    """A libpq/PgBouncer connection string's host and port for a server on the local socket directory."""
    return f"host={UNIX_SOCKET_DIR} port={port}"


def socket_query(port: int) -> str:
    """The same server as a URL's query, with the URL's address left empty (`postgresql://user@/db?host=...&port=...`,
    postgres_exporter's URI): lib/pq sorts a URL's parameters and the last `host` wins, so with an address as well
    `host=127.0.0.1` would beat `host=/var/run/...` (seen with the exporter 0.11)."""
    return f"host={UNIX_SOCKET_DIR}&port={port}"


def max_db_connections(settings: StackSettings) -> int:
    """What a database's pools may hold open together: the pool and the login's connection (auth_query)."""
    return settings.client_path.pool_size + AUTH_CONNECTIONS_PER_DATABASE


def _ini(settings: StackSettings) -> str:
    pool = settings.client_path
    databases = "\n".join(
        f"{name} = {socket_address(Ports.POSTGRES)} dbname={name} max_db_connections={max_db_connections(settings)}"
        for name in pool.databases)
    # The daily SLO aggregates (scripts/aggregate_metrics.py): one writer, a small pool of its own.
    aggregates_database = settings.aggregates.database
    databases += (f"\n{aggregates_database} = {socket_address(Ports.POSTGRES)} dbname={aggregates_database} "
                  f"pool_size={AGGREGATES_POOL_SIZE} "
                  f"max_db_connections={AGGREGATES_POOL_SIZE + AUTH_CONNECTIONS_PER_DATABASE}")
    return f"""\
; PgBouncer on each PostgreSQL node (betting-{settings.environment}), in front of the node's own PostgreSQL.
; Only these databases are pooled; each holds at most max_db_connections server connections.
[databases]
{databases}

[pgbouncer]
listen_addr = {LISTEN_ADDRESS}
listen_port = {Ports.PGBOUNCER}
unix_socket_dir = {UNIX_SOCKET_DIR}
; Transaction pooling: a server connection is a client's for one transaction only (see README, Connecting).
pool_mode = transaction
default_pool_size = {pool.pool_size}
max_client_conn = {pool.max_client_connections}
auth_type = hba
auth_hba_file = {Paths.PGBOUNCER_HBA}
auth_file = {Paths.PGBOUNCER_USERS}
auth_user = {AUTH_ROLE}
auth_query = {AUTH_QUERY}
stats_users = {STATS_USER}
server_login_retry = {SERVER_LOGIN_RETRY_S}
; JDBC sends it at every login; PgBouncer would refuse the login otherwise.
ignore_startup_parameters = extra_float_digits
; TLS to clients only (PostgreSQL is on the socket): a client without it is refused; TLS 1.2 or newer.
client_tls_sslmode = require
client_tls_protocols = secure
client_tls_key_file = {pki.key_path()}
client_tls_cert_file = {pki.cert_path()}
client_tls_ca_file = {pki.ca_path()}
; Connections come and go with every client's pool: the journal keeps the errors only.
log_connections = 0
log_disconnections = 0
"""


def _hba(settings: StackSettings) -> str:
    vpc = settings.vpc_cidr
    return f"""\
# Who may log in to PgBouncer, and how (PgBouncer's own HBA file; first match wins).
# The admin console, over the socket only: the exporter's SHOW commands (the OS user it runs as).
local {CONSOLE_DATABASE} {STATS_USER} peer
# Neither the console user nor the login role ever comes in over the network.
host all {STATS_USER},{AUTH_ROLE} 127.0.0.1/32 reject
host all {STATS_USER},{AUTH_ROLE} {vpc} reject
# The SLO aggregator reaches its own database only.
hostssl {settings.aggregates.database} {aggregates.ROLE} 127.0.0.1/32 scram-sha-256
hostssl {settings.aggregates.database} {aggregates.ROLE} {vpc} scram-sha-256
host all {aggregates.ROLE} 127.0.0.1/32 reject
host all {aggregates.ROLE} {vpc} reject
# Clients, through HAProxy on this or another node, over TLS only: SCRAM against PostgreSQL's verifiers (auth_query).
hostssl all all 127.0.0.1/32 scram-sha-256
hostssl all all {vpc} scram-sha-256
"""


def render_pgbouncer(settings: StackSettings) -> dict[str, bytes]:
    """The same files on every PostgreSQL node: each PgBouncer serves its own node's PostgreSQL."""
    return {
        "pgbouncer/pgbouncer.ini": _ini(settings).encode(),
        "pgbouncer/pgbouncer_hba.conf": _hba(settings).encode(),
        # Names only, no password: a console login must be listed (see above); its password is empty, which
        # SCRAM never accepts.
        "pgbouncer/userlist.txt": f'"{STATS_USER}" ""\n'.encode(),
    }
