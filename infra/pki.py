"""The stack's private certificate authority, as pure data: which identity every host has, where its
files live on the host and in SSM, and how long certificates last.

One CA per stack (infra/components/pki.py makes it with pulumi-tls; the sandbox makes its own with the
same identities, infra/sandbox/platform.py). Every host has one key and one certificate signed by it, for
server and client authentication: PostgreSQL, PgBouncer, Patroni's REST API, etcd, Prometheus,
Alertmanager, Grafana and the exporters serve it, and the same pair is the host's client certificate towards etcd.
The CA certificate is on every host; the CA key is in SSM for the next `pulumi up` only, no host reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.topology import Host, Paths, Topology

# File names under Paths.SECRETS_DIR, the same on every host: rendered files name them, so the files of two
# hosts of a role stay byte-identical where they were.
CA_CERT = "tls_ca.crt"
HOST_KEY = "tls.key"
HOST_CERT = "tls.crt"
# The exporters (node_exporter everywhere, postgres_exporter, redis_exporter) run as prometheus, not as the role's
# daemon user who owns HOST_KEY: they serve a copy of the same pair, from the same SSM parameters, that is theirs.
EXPORTER_KEY = "exporter_tls.key"
EXPORTER_CERT = "exporter_tls.crt"
EXPORTER_OWNER = "prometheus:prometheus"
# SSM: the CA's (under /betting/<env>/) and each host's own (under /betting/<env>/hosts/<host>/).
CA_CERT_PARAMETER = "tls_ca_cert"
CA_KEY_PARAMETER = "tls_ca_key"
# Certificates last a year and are renewed by the first `pulumi up` in their last 30 days (the CA: ten years,
# renewed in its last year); the rollout carries a renewed one to its host (infra/components/rollout.py).
HOST_VALIDITY_HOURS = 365 * 24
HOST_EARLY_RENEWAL_HOURS = 30 * 24
CA_VALIDITY_HOURS = 10 * 365 * 24
CA_EARLY_RENEWAL_HOURS = 365 * 24
HOST_USES = ("digital_signature", "key_encipherment", "server_auth", "client_auth")
CA_USES = ("cert_signing", "crl_signing", "digital_signature")
# The OS user of the daemons that serve each role's identity: its key is theirs alone (mode 0400).
KEY_OWNERS = {
    "etcd": "etcd:etcd",
    "postgres": "postgres:postgres",  # PostgreSQL, Patroni, PgBouncer and pgBackRest all run as postgres
    "monitoring": "prometheus:prometheus",  # Prometheus and Alertmanager
    "grafana": "grafana:grafana",
}
# The roles whose hosts have an identity. A ClickHouse host's serves only its node_exporter (ClickHouse itself is
# reached only inside the VPC with a password: infra/render/clickhouse.py), so it has no KEY_OWNERS entry.
TLS_ROLES = (*KEY_OWNERS, "clickhouse")


def ca_path() -> str:
    return f"{Paths.SECRETS_DIR}/{CA_CERT}"


def key_path() -> str:
    return f"{Paths.SECRETS_DIR}/{HOST_KEY}"


def cert_path() -> str:
    return f"{Paths.SECRETS_DIR}/{HOST_CERT}"


def exporter_key_path() -> str:
    return f"{Paths.SECRETS_DIR}/{EXPORTER_KEY}"


def exporter_cert_path() -> str:
    return f"{Paths.SECRETS_DIR}/{EXPORTER_CERT}"


def host_parameter(host: Host, name: str) -> str:
    """A host's own secret, as a name under /betting/<env>/ (ssm_parameter_name adds the prefix)."""
    return f"hosts/{host.name}/{name}"


@dataclass(frozen=True)
class Identity:
    host: Host
    common_name: str
    dns_names: tuple[str, ...]  # every name a client may verify this host by (verify-full, https://)

    @property
    def key_parameter(self) -> str:
        return host_parameter(self.host, "tls_key")

    @property
    def cert_parameter(self) -> str:
        return host_parameter(self.host, "tls_cert")


def identity(topology: Topology, host: Host) -> Identity:
    names = [host.fqdn]
    if host.role == "postgres":
        # Clients reach every node's HAProxy, hence its PgBouncer, through the load balancer's names.
        names += [topology.postgres_primary_endpoint, topology.postgres_replica_endpoint]
    return Identity(host, host.fqdn, tuple(names))


def identities(topology: Topology) -> tuple[Identity, ...]:
    return tuple(identity(topology, host) for host in topology.hosts if host.role in TLS_ROLES)


def organization(environment: str) -> str:
    return f"betting {environment}"
