"""HAProxy on every PostgreSQL node: the writer and reader ports. Pure: settings and topology in, bytes out.

Every node's HAProxy has every node's PgBouncer as a server and asks each node's Patroni which role
it has: the writer port (`primary`) forwards to the one whose `/primary` answers 200, the reader
port (`replicas`) to those whose `/replica?lag=` does. So any node forwards writes to the leader,
and the load balancer (infra/components/patroni.py) may send a client to any node's HAProxy: its
health check asks HAProxy whether it sees a primary (HEALTH_WRITER), and with no healthy target it
sends connections to every target, all of which forward to the leader or refuse them.

The proxy names `primary` and `replicas` are what HAProxy's Prometheus exporter labels its series with
(`haproxy_backend_active_servers{proxy="primary"}`), which the alert rules read.
"""

from __future__ import annotations

from infra import pki
from infra.settings import StackSettings
from infra.topology import Host, Ports, Topology

WRITER_PROXY = "primary"
READER_PROXY = "replicas"
STATS_PROXY = "stats"
METRICS_PATH = "/metrics"
# The load balancer's health checks: 200 while this HAProxy has a server up in that proxy, else 503.
HEALTH_WRITER = "/health/writer"
HEALTH_READER = "/health/reader"
LISTEN_ADDRESS = "0.0.0.0"
RESOLVERS = "vpc"
# Patroni's answer changes within a loop; these see it within about 1.25 s (first failed check within
# `inter`, then `fall - 1` checks `fastinter` apart) and see a new leader within about 0.75 s (servers that
# are down are checked every `downinter`, then `rise - 1` more `fastinter` apart).
CHECK_TIMING = "inter 1s fastinter 250ms downinter 500ms fall 2 rise 2"
# HAProxy's own connection slots beyond the two client ports: health checks, the stats page, the exporter.
HEADROOM_CONNECTIONS = 100


def per_node_connections(settings: StackSettings, topology: Topology) -> int:
    """Client connections each node's writer port (and reader port) accepts: one node's share of what a
    PgBouncer accepts, since every node's HAProxy sends its writers to the same PgBouncer."""
    return max(1, settings.client_path.max_client_connections // len(topology.postgres))


def server_address(node: Host) -> str:
    """A node's PgBouncer, health-checked on the same host's Patroni REST API (HAProxy names the check's
    port apart from the address)."""
    return f"{node.fqdn}:{Ports.PGBOUNCER} check port {Ports.PATRONI_API}"


# The checks speak TLS to Patroni and verify its certificate with the stack's CA (the forwarded traffic to
# PgBouncer stays as it is: `check-ssl` is the checks' alone).
CHECK_TLS = f"check-ssl verify required ca-file {pki.ca_path()}"


def check_name(node: Host) -> str:
    """The name the check verifies Patroni's certificate by: the node's, which its certificate has."""
    return f"verifyhost {node.fqdn}"


def _proxy(name: str, port: int, check: str, balance: str, topology: Topology, maxconn: int) -> str:
    servers = "\n".join(f"    server {node.name} {server_address(node)} {check_name(node)}" for node in topology.postgres)
    return f"""\
listen {name}
    bind {LISTEN_ADDRESS}:{port}
    maxconn {maxconn}
    balance {balance}
    option httpchk
    http-check send meth GET uri {check}
    http-check expect status 200
    # A server whose Patroni stops answering 200 loses its sessions at once: a demoted primary keeps no
    # writer, a promoted replica no reader.
    default-server {CHECK_TIMING} on-marked-down shutdown-sessions resolvers {RESOLVERS} init-addr last,libc,none {CHECK_TLS}
{servers}
"""


def render_haproxy(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    """The same haproxy.cfg on every PostgreSQL node."""
    maxconn = per_node_connections(settings, topology)
    lag = settings.client_path.reader_max_lag_bytes
    text = f"""\
# HAProxy on each PostgreSQL node of betting-{settings.environment}: the writer port ({Ports.HAPROXY_PRIMARY}) forwards
# to the Patroni leader's PgBouncer, the reader port ({Ports.HAPROXY_REPLICAS}) to the replicas' within
# {lag} bytes of WAL; {Ports.HAPROXY_STATS} serves {METRICS_PATH} and the load balancer's health checks.
global
    maxconn {2 * maxconn + HEADROOM_CONNECTIONS}
    # To the journal, through systemd: state changes of servers and backends, not every connection.
    log stdout format short local0 notice
    chroot /var/lib/haproxy
    user haproxy
    group haproxy

# The VPC's resolver (resolv.conf): nodes are found by name, again when an instance is replaced.
resolvers {RESOLVERS}
    parse-resolv-conf
    hold valid 10s

defaults
    mode tcp
    log global
    option dontlognull
    retries 2
    timeout connect 2s
    timeout check 1s
    # Idle sessions are kept half an hour; keepalives every minute hold them open through the load balancer
    # (whose TCP flows time out after 350 s idle).
    timeout client 30m
    timeout server 30m
    option clitcpka
    clitcpka-idle 60s
    clitcpka-intvl 10s
    clitcpka-cnt 6
    option srvtcpka
    srvtcpka-idle 60s
    srvtcpka-intvl 10s
    srvtcpka-cnt 6

frontend {STATS_PROXY}
    mode http
    bind {LISTEN_ADDRESS}:{Ports.HAPROXY_STATS}
    http-request use-service prometheus-exporter if {{ path {METRICS_PATH} }}
    acl writer_up nbsrv({WRITER_PROXY}) ge 1
    acl reader_up nbsrv({READER_PROXY}) ge 1
    http-request return status 200 content-type text/plain string "primary up" if {{ path {HEALTH_WRITER} }} writer_up
    http-request return status 503 content-type text/plain string "no primary" if {{ path {HEALTH_WRITER} }}
    http-request return status 200 content-type text/plain string "replica up" if {{ path {HEALTH_READER} }} reader_up
    http-request return status 503 content-type text/plain string "no replica" if {{ path {HEALTH_READER} }}
    http-request return status 404

{_proxy(WRITER_PROXY, Ports.HAPROXY_PRIMARY, "/primary", "first", topology, maxconn)}
{_proxy(READER_PROXY, Ports.HAPROXY_REPLICAS, f"/replica?lag={lag}", "leastconn", topology, maxconn)}"""
    return {"haproxy/haproxy.cfg": text.encode()}
