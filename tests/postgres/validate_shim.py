"""Run Debian's `patroni --validate-config FILE` for a config that names the stack's private DNS zone.

The validator resolves every DCS host and opens a TCP connection to it. The stack's names
only exist in the VPC's private zone, so this shim (run by /usr/bin/python3, Patroni's own
interpreter) sends connections for `*.ZONE:2379` to a live etcd on loopback; the config text
is validated unchanged, so the loopback string check on connect addresses still sees the
real DNS names. Listen addresses are checked against a closed loopback port (see below).

    python3 validate_shim.py ZONE ETCD_PORT CONFIG
"""

import socket
import sys

zone, etcd_port, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
_getaddrinfo = socket.getaddrinfo


def _local(host):
    return "127.0.0.1" if isinstance(host, str) and host.endswith("." + zone) else host


def getaddrinfo(host, *args, **kwargs):
    return _getaddrinfo(_local(host), *args, **kwargs)


# Bound, never listening: a connection to it is refused. The validator's "port already in use"
# check of the listen addresses asks about the validating machine (a local PostgreSQL on 5432),
# not about the config, so it is pointed here.
_closed = socket.socket()
_closed.bind(("127.0.0.1", 0))
CLOSED_PORT = _closed.getsockname()[1]


class ZoneSocket(socket.socket):
    def connect_ex(self, address):
        host, port = address[:2]
        if host.endswith("." + zone) and port == 2379:
            return super().connect_ex(("127.0.0.1", etcd_port))
        if host == "0.0.0.0":
            return super().connect_ex(("127.0.0.1", CLOSED_PORT))
        return super().connect_ex(address)


socket.getaddrinfo = getaddrinfo
socket.socket = ZoneSocket
sys.argv = ["patroni", "--validate-config", config]

from patroni.__main__ import main  # noqa: E402 - after the resolver shim

main()
