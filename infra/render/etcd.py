"""The environment file of Debian's etcd unit (/etc/default/etcd) for one member."""

from __future__ import annotations

from infra import pki
from infra.settings import StackSettings
from infra.topology import Host, Paths, Ports, Topology

QUOTA_BACKEND_BYTES = 2 * 1024**3


def etcd_environment(settings: StackSettings, topology: Topology, member: Host) -> dict[str, str]:
    if member not in topology.etcd:
        raise ValueError(f"{member.name} is not an etcd member of this topology")
    return {
        "ETCD_NAME": member.name,
        # Clients and peers alike present a certificate of the stack's CA (client-certificate authentication):
        # Patroni and the agents with their host's pair, Prometheus with the monitoring host's.
        "ETCD_CLIENT_CERT_AUTH": "true",
        "ETCD_TRUSTED_CA_FILE": pki.ca_path(),
        "ETCD_CERT_FILE": pki.cert_path(),
        "ETCD_KEY_FILE": pki.key_path(),
        "ETCD_PEER_CLIENT_CERT_AUTH": "true",
        "ETCD_PEER_TRUSTED_CA_FILE": pki.ca_path(),
        "ETCD_PEER_CERT_FILE": pki.cert_path(),
        "ETCD_PEER_KEY_FILE": pki.key_path(),
        "ETCD_DATA_DIR": f"{Paths.ETCD_DATA}/{member.name}",
        "ETCD_LISTEN_PEER_URLS": f"https://0.0.0.0:{Ports.ETCD_PEER}",
        "ETCD_LISTEN_CLIENT_URLS": f"https://0.0.0.0:{Ports.ETCD_CLIENT}",
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": f"https://{member.fqdn}:{Ports.ETCD_PEER}",
        "ETCD_ADVERTISE_CLIENT_URLS": f"https://{member.fqdn}:{Ports.ETCD_CLIENT}",
        "ETCD_INITIAL_CLUSTER": ",".join(f"{m.name}=https://{m.fqdn}:{Ports.ETCD_PEER}" for m in topology.etcd),
        "ETCD_INITIAL_CLUSTER_STATE": "new",
        "ETCD_INITIAL_CLUSTER_TOKEN": topology.patroni_scope,
        # Defaults 100 ms / 1500 ms: etcd's own suit one data centre; members in different AZs see a
        # few ms of RTT, still well inside them, so only the election timeout gets a margin.
        "ETCD_HEARTBEAT_INTERVAL": str(settings.etcd.heartbeat_interval_ms),
        "ETCD_ELECTION_TIMEOUT": str(settings.etcd.election_timeout_ms),
        "ETCD_AUTO_COMPACTION_MODE": "periodic",
        "ETCD_AUTO_COMPACTION_RETENTION": "1h",
        "ETCD_QUOTA_BACKEND_BYTES": str(QUOTA_BACKEND_BYTES),
        # Patroni talks v3 (its etcd3 module); the v2 API stays off.
        "ETCD_ENABLE_V2": "false",
        # /metrics on the client port is what Prometheus scrapes.
        "ETCD_METRICS": "basic",
    }


def render_etcd(settings: StackSettings, topology: Topology, member: Host) -> dict[str, bytes]:
    lines = [f"{key}={value}" for key, value in etcd_environment(settings, topology, member).items()]
    return {f"etcd/{member.name}.env": ("\n".join(lines) + "\n").encode()}
