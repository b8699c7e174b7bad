"""infra/hostagent/patroni.py against the rendered prod configs running as a live 3-node cluster:
dynamic configuration reaches every member, a restart-needing parameter rolls through the
cluster one member at a time without losing an acknowledged write, and health names a member
whose Patroni is gone."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest
import requests

from infra.hostagent import patroni
from infra.sandbox.runner import wait_for
from infra.topology import SecretNames
from scripts.failover_drill import ClusterSampler, Writer
from tests.ports import port
from tests.postgres.conftest import running_sandbox

pytestmark = pytest.mark.live

# Its own sandbox, away from a user's (25000), the bench (26000) and the shared live one (26500).
PORT_BASE = port(26800)


@pytest.fixture(scope="module")
def sandbox(prod_settings):
    with running_sandbox(prod_settings, PORT_BASE, "pg-rollout-", services=("postgres",)) as box:
        yield box


@pytest.fixture
def healthy(sandbox, prod_settings):
    sandbox.up(prod_settings, services=("postgres",))
    sandbox.wait_healthy()
    for node in sandbox.topology.postgres:
        patroni.wait_healthy(sandbox.patroni_url(node), 60)
    return sandbox


def _urls(sandbox) -> dict[str, str]:
    return {node.name: sandbox.patroni_url(node) for node in sandbox.topology.postgres}


def _leader_name(sandbox) -> str:
    return wait_for("a leader", lambda: sandbox.leader(), 30).name


def _setting(sandbox, node, name: str) -> str:
    with psycopg.connect(sandbox.dsn(node), autocommit=True, connect_timeout=3) as conn:
        return conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]


def test_dynamic_config_reaches_every_member_and_converges(healthy):
    urls = _urls(healthy)
    api = urls[_leader_name(healthy)]
    before = patroni.config(api)
    desired = {"loop_wait": before["loop_wait"] + 1, "maximum_lag_on_failover": 2 * before["maximum_lag_on_failover"]}
    try:
        assert patroni.apply_dynamic_config(api, desired) == desired
        for name, url in urls.items():
            seen = patroni.config(url)
            assert {k: seen[k] for k in desired} == desired, name
        assert patroni.apply_dynamic_config(api, desired) == {}
        # As strings (what a template might produce): the same values, nothing to patch.
        assert patroni.apply_dynamic_config(api, {k: str(v) for k, v in desired.items()}) == {}
    finally:
        restore = {k: before[k] for k in desired}
        assert patroni.apply_dynamic_config(api, restore) == restore
    for url in urls.values():
        patroni.reload(url)  # re-reads an unchanged patroni.yml: nothing moves
        patroni.wait_healthy(url, 30)


def _rollout(sandbox, order: list[str], new_value: int) -> dict:
    """PATCH max_connections, then restart_if_pending on every member in `order`, under writes."""
    urls = _urls(sandbox)
    history = requests.get(f"{urls[order[0]]}/history", timeout=3, verify=sandbox.ca_file).json()
    writer = Writer(list(urls.values()), sandbox.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD),
                    verify=sandbox.ca_file, tls=sandbox.client_tls())
    writer.ensure_table()
    writer.start()
    with ClusterSampler(_urls(sandbox), verify=sandbox.ca_file) as sampler:
        patch = patroni.apply_dynamic_config(urls[order[0]], {"postgresql": {"parameters": {"max_connections": new_value}}})
        assert patch == {"postgresql": {"parameters": {"max_connections": new_value}}}
        for name, url in urls.items():
            assert patroni.member(url).get("pending_restart") is True, name
            assert not patroni.health(url)[0]
        start = time.monotonic()
        restarted = [name for name in order if patroni.restart_if_pending(urls[name], expected_members=len(urls))]
        took = time.monotonic() - start
        for url in urls.values():
            patroni.wait_healthy(url, 60)
        time.sleep(1)
    writer.stop()
    leader = sandbox.leader()
    gaps = [(b.at - a.at, a.at - start) for a, b in zip(writer.acks, writer.acks[1:], strict=False) if b.at >= start]
    return {
        "restarted": restarted, "took": took, "sampler": sampler, "writer": writer, "leader": leader.name,
        "switchovers": len(requests.get(f"{urls[leader.name]}/history", timeout=3, verify=sandbox.ca_file).json()) - len(history),
        "lost": writer.missing(sandbox.dsn(leader)), "gap": max(gaps), "acks": len(writer.acks),
        "pauses": ", ".join(f"{g:.2f}s@t+{t:.1f}" for g, t in gaps if g > 0.3),
    }


def test_restart_rolls_through_in_topology_order_with_the_leader_not_last(healthy):
    urls, order = _urls(healthy), [n.name for n in healthy.topology.postgres]
    if _leader_name(healthy) == order[-1]:
        # Put the leader first or in the middle (the order that could cost two switchovers).
        assert patroni.handover_if_leader(urls[order[-1]]) in order[:-1]
    old_leader = _leader_name(healthy)
    assert order.index(old_leader) < len(order) - 1
    old_value = int(_setting(healthy, healthy.node(old_leader), "max_connections"))

    result = _rollout(healthy, order, old_value + 10)

    for node in healthy.topology.postgres:
        assert _setting(healthy, node, "max_connections") == str(old_value + 10), node.name
        assert not patroni.member(urls[node.name]).get("pending_restart"), node.name
    # The leader's call restarts the pending replicas first, then hands over once.
    assert result["switchovers"] == 1 and result["leader"] != old_leader
    assert result["restarted"] == order[:order.index(old_leader) + 1]  # nothing left for the ones after it
    assert result["lost"] == []
    assert result["sampler"].most_down <= 1
    assert result["gap"][0] < 15
    print(f"\ntopology order {order}, leader {old_leader} -> {result['leader']}: rollout {result['took']:.1f}s, "
          f"{result['acks']} writes acknowledged, 0 lost, longest write gap {result['gap'][0]:.2f}s "
          f"at t+{result['gap'][1]:.1f}s, at most {result['sampler'].most_down} member not running "
          f"({len(result['sampler'].samples)} samples); write pauses > 0.3 s: {result['pauses']}")


def test_restart_replicas_first_then_leader(healthy):
    urls, leader = _urls(healthy), _leader_name(healthy)
    order = [n for n in urls if n != leader] + [leader]
    old_value = int(_setting(healthy, healthy.node(leader), "max_connections"))

    result = _rollout(healthy, order, old_value + 10)

    for node in healthy.topology.postgres:
        assert _setting(healthy, node, "max_connections") == str(old_value + 10), node.name
    assert result["restarted"] == order
    assert result["switchovers"] == 1 and result["lost"] == [] and result["sampler"].most_down <= 1
    print(f"\nreplicas first {order}: rollout {result['took']:.1f}s, {result['acks']} writes, 0 lost, "
          f"longest write gap {result['gap'][0]:.2f}s at t+{result['gap'][1]:.1f}s; pauses > 0.3 s: {result['pauses']}")


def test_wait_healthy_names_a_replica_whose_patroni_stopped(healthy):
    urls, leader = _urls(healthy), _leader_name(healthy)
    replica = next(name for name in urls if name != leader)
    healthy.signal_process(replica, signal.SIGTERM)
    try:
        wait_for(f"{replica}'s Patroni to exit", lambda: replica not in healthy.running(), 30)
        with pytest.raises(patroni.PatroniError, match=f"^{replica}: Patroni not answering"):
            patroni.wait_healthy(urls[replica], 3, name=replica)
        with pytest.raises(patroni.PatroniError, match="Patroni not answering"):
            patroni.wait_healthy(urls[replica], 1)  # without a name it says which URL
        for name, url in urls.items():
            if name != replica:
                patroni.wait_healthy(url, 30)  # the other replica takes the sync role
        # A rollout stops here: with a member gone no other one may restart.
        other = next(name for name in urls if name not in (replica, leader))
        patroni.apply_dynamic_config(urls[leader], {"postgresql": {"parameters": {"max_connections": 500}}})
        with pytest.raises(patroni.PatroniError, match=f"{replica}|of {len(urls)} members"):
            patroni.restart_if_pending(urls[other], timeout=5, expected_members=len(urls))
    finally:
        healthy.start_patroni(healthy.node(replica))
    patroni.wait_healthy(urls[replica], 90, allow_pending=True)
    for name in [n for n in urls if n != leader] + [leader]:
        patroni.restart_if_pending(urls[name], expected_members=len(urls))
    for url in urls.values():
        patroni.wait_healthy(url, 60)


def test_the_agent_rolls_a_bundle_change_through_the_cluster(healthy, prod_settings):
    """The host agent's own Patroni step (agent.converge_patroni, then its health gate), run host by
    host as the SSM association runs it, with the prod bundle's dynamic configuration changed in a
    restart-needing parameter and a DCS setting. What it cannot see: SSM's scheduling and systemd."""
    from infra.bundle import bundle_document
    from infra.hostagent import agent, gates
    from infra.hosts import host_specs

    urls, order = _urls(healthy), [n.name for n in healthy.topology.postgres]
    old = int(_setting(healthy, healthy.node(order[0]), "max_connections"))
    specs = {s.host.name: s for s in host_specs(prod_settings, healthy.topology) if s.host.role == "postgres"}
    history = requests.get(f"{urls[order[0]]}/history", timeout=3, verify=healthy.ca_file).json()
    writer = Writer(list(urls.values()), healthy.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD),
                    verify=healthy.ca_file, tls=healthy.client_tls())
    writer.ensure_table()
    writer.start()
    with ClusterSampler(_urls(healthy), verify=healthy.ca_file) as sampler:
        for name in order:
            section = bundle_document(specs[name], prod_settings, healthy.topology)["patroni"]
            section["api"] = urls[name]  # the sandbox's port for 127.0.0.1:8008: the only mapped part
            section["dynamic"]["postgresql"]["parameters"]["max_connections"] = old + 10
            section["dynamic"]["maximum_lag_on_failover"] = 2097152
            report = agent.Report(name)
            agent.converge_patroni(name, section, report, 300)
            gates.wait({"kind": "patroni", "api": urls[name], "name": name}, 120)
        time.sleep(1)
    writer.stop()
    leader = healthy.leader()
    for node in healthy.topology.postgres:
        assert _setting(healthy, node, "max_connections") == str(old + 10), node.name
        assert patroni.config(urls[node.name])["maximum_lag_on_failover"] == 2097152, node.name
    assert writer.missing(healthy.dsn(leader)) == []
    assert sampler.most_down <= 1
    assert len(requests.get(f"{urls[leader.name]}/history", timeout=3, verify=healthy.ca_file).json()) - len(history) <= 1
