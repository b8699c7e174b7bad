"""The agent's health gates against the real daemons of the live prod-shaped sandbox.

Each gate is the one in the host's real bundle; only the sandbox's mapping of 127.0.0.1 ports and
host paths is applied (Sandbox.host_bundle, what the sandbox's agent applies), so the fields a gate reads are the
ones etcd 3.4, Patroni 3.0.2, Prometheus 2.42 and Alertmanager 0.25 really answer with. What it
cannot see: the same daemons under systemd on EC2 (identical binaries and configs otherwise).
"""

from __future__ import annotations

import pytest

from infra.hostagent import gates

pytestmark = pytest.mark.live


def _gates(sandbox, host_name: str) -> dict[str, dict]:
    """The gates of the host's real bundle as the sandbox's agent waits on them (mapped ports and paths)."""
    bundle = sandbox.host_bundle(sandbox.host(host_name))
    return {s["unit"]: s["gate"] for s in bundle["services"] if s["gate"] is not None}


def test_every_gate_of_the_running_hosts_turns_green(cluster):
    """As the agent waits: a fresh Alertmanager reports its cluster "settling" for a while first."""
    checked = []
    for host in cluster.topology.etcd + cluster.topology.postgres + cluster.topology.monitoring:
        for unit, gate in _gates(cluster, host.name).items():
            try:
                gates.wait(gate, 120)
            except gates.GateError as error:
                pytest.fail(f"{host.name} {unit}: {error}")
            checked.append(gate["kind"])
    assert {"etcd", "patroni", "prometheus", "alertmanager", "http", "tcp"} <= set(checked)


def test_gates_name_what_is_wrong(cluster):
    etcd = _gates(cluster, "etcd-1")["etcd"]
    ok, reason = gates.check({**etcd, "name": "etcd-9"})
    assert not ok and reason.startswith("etcd etcd-9: not a started member of the cluster")
    ok, reason = gates.check({**etcd, "members": 5})
    assert not ok and reason == "etcd etcd-1: 3 of 5 members started (['etcd-1', 'etcd-2', 'etcd-3'])"
    prometheus = _gates(cluster, "monitoring-1")["prometheus"]
    ok, reason = gates.check({**prometheus, "rule_files": [*prometheus["rule_files"], "/etc/prometheus/rules/gone.yml"]})
    assert not ok and reason == "prometheus: rule files not loaded: ['/etc/prometheus/rules/gone.yml']"
    pgbouncer = _gates(cluster, "pg-1")["pgbouncer"]
    ok, reason = gates.check({**pgbouncer, "address": "127.0.0.1:1"})
    assert not ok and reason.startswith("tcp: [Errno 111] Connection refused")
    alertmanager = _gates(cluster, "monitoring-1")["prometheus-alertmanager"]
    gates.wait(alertmanager, 120)
    ok, reason = gates.check({**alertmanager, "peers": 3})
    assert not ok and reason == "alertmanager: cluster ready with 2 of 3 peers"


def test_exporter_gates_ask_over_tls_by_the_stacks_ca(cluster, tmp_path):
    """node_exporter, postgres_exporter and redis_exporter serve TLS: their gates pass with the stack's CA (above),
    fail with another CA, and plain http gets a 400."""
    from infra.sandbox.platform import ca_identity

    other = tmp_path / "other-ca.crt"
    other.write_text(ca_identity("another CA")[0])
    for host, unit in (("etcd-1", "prometheus-node-exporter"), ("pg-1", "prometheus-postgres-exporter"),
                       ("monitoring-1", "prometheus-redis-exporter")):
        gate = _gates(cluster, host)[unit]
        assert gate["url"].startswith("https://127.0.0.1:") and gates.check(gate)[0], (host, unit, gate)
        ok, reason = gates.check({**gate, "ca": str(other)})
        assert not ok and "CERTIFICATE_VERIFY_FAILED" in reason, reason
        ok, reason = gates.check({"kind": "http", "url": gate["url"].replace("https://", "http://")})
        assert not ok and reason.endswith("answered 400"), reason
