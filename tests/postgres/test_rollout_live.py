"""A stack change rolled through the live prod-shaped sandbox the way the SSM associations roll it
on AWS: the host agent applies each host's new bundle, one host at a time in rollout order
(etcd, then PostgreSQL), and returns only when that host's health gate is green.

What it cannot see: SSM's scheduling (max_concurrency 1 and max_errors 0 are the loop of
Sandbox.roll here) and systemd itself (the sandbox runs Debian's unit files as processes).
"""

from __future__ import annotations

import time

import psycopg
import pytest
import requests

from infra.hostagent import patroni
from infra.sandbox import cli
from infra.sandbox.runner import Sandbox
from infra.topology import SecretNames
from scripts.failover_drill import TABLE as DRILL_TABLE
from scripts.failover_drill import ClusterSampler, EtcdSampler, Writer
from tests.ports import port
from tests.postgres.conftest import running_sandbox

pytestmark = pytest.mark.live

# Its own sandbox, away from a user's (25000), the bench (26000), the shared live one (26500) and
# the Patroni rollout tests (26800).
PORT_BASE = port(27100)


def _changed(settings, **sections):
    return settings.model_copy(update={
        name: getattr(settings, name).model_copy(update=values) for name, values in sections.items()
    })


def _setting(sandbox: Sandbox, node, name: str) -> str:
    with psycopg.connect(sandbox.dsn(node), autocommit=True, connect_timeout=3) as conn:
        return conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        pairs = (item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        return {k.decode(): v.decode() for k, v in pairs}


@pytest.fixture(scope="module")
def sandbox(prod_settings):
    with running_sandbox(prod_settings, PORT_BASE, "rollout-", services=("postgres",)) as box:
        yield box


def test_a_restart_and_a_dcs_change_roll_through_etcd_and_patroni_one_member_at_a_time(sandbox, prod_settings):
    topology = sandbox.topology
    old_connections = prod_settings.patroni.max_connections
    target = _changed(
        prod_settings,
        etcd={"heartbeat_interval_ms": 150, "election_timeout_ms": 1800},  # each member restarts
        patroni={"max_connections": old_connections + 10,  # needs a PostgreSQL restart
                 "maximum_lag_on_failover": 2 * prod_settings.patroni.maximum_lag_on_failover},  # DCS only
    )
    urls = {node.name: sandbox.patroni_url(node) for node in topology.postgres}
    etcd_pids = {member.name: sandbox.running()[member.name].pid for member in topology.etcd}
    history = requests.get(f"{next(iter(urls.values()))}/history", timeout=3, verify=sandbox.ca_file).json()
    writer = Writer(list(urls.values()), sandbox.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD),
                    verify=sandbox.ca_file, tls=sandbox.client_tls())
    writer.ensure_table()
    writer.start()
    etcd_urls = [sandbox.etcd_url(m) for m in topology.etcd]
    started = time.monotonic()
    with (ClusterSampler(urls, verify=sandbox.ca_file) as patroni_sampler,
          EtcdSampler(etcd_urls, verify=sandbox.ca_file, cert=sandbox.etcd_client_cert()) as etcd_sampler):
        reports = sandbox.roll(target)
        time.sleep(1)
    took = time.monotonic() - started
    writer.stop()

    by_host = {r.host: r for r in reports}
    assert list(by_host) == [h.name for h in topology.etcd + topology.postgres]
    for member in topology.etcd:
        assert "restart etcd" in by_host[member.name].actions, by_host[member.name].actions
        pid = sandbox.running()[member.name].pid
        assert pid != etcd_pids[member.name]
        assert _environ(pid)["ETCD_HEARTBEAT_INTERVAL"] == "150"
    leader = sandbox.leader()
    for node in topology.postgres:
        assert _setting(sandbox, node, "max_connections") == str(old_connections + 10), node.name
        assert patroni.config(urls[node.name])["maximum_lag_on_failover"] == target.patroni.maximum_lag_on_failover
        assert not patroni.member(urls[node.name]).get("pending_restart"), node.name
    assert writer.missing(sandbox.dsn(leader)) == []
    assert etcd_sampler.most_down <= 1 and patroni_sampler.most_down <= 1
    switchovers = len(requests.get(f"{urls[leader.name]}/history", timeout=3, verify=sandbox.ca_file).json()) - len(history)
    assert switchovers <= 1
    gaps = [b.at - a.at for a, b in zip(writer.acks, writer.acks[1:], strict=False)]
    print(f"\nrolled 3 etcd members and 3 Patroni nodes in {took:.1f}s: {len(writer.acks)} writes acknowledged, "
          f"0 lost, longest write gap {max(gaps):.2f}s, at most {etcd_sampler.most_down} etcd member and "
          f"{patroni_sampler.most_down} Patroni member down at once, {switchovers} switchover")
    # Rolled again, nothing changes anywhere: the apply is idempotent across the whole cluster.
    again = sandbox.roll(target)
    assert [(r.host, r.changed, r.actions) for r in again] == [(r.host, [], []) for r in again]


def test_a_bundle_that_breaks_its_host_stops_the_rollout_there(sandbox, prod_settings, monkeypatch, capsys):
    """etcd-2's bundle gets a value etcd refuses (injected: no valid setting renders one); the
    change before it (etcd-1) is rolled, everything after it is untouched and healthy."""
    import infra.sandbox.runner as runner

    current = sandbox.settings
    change = _changed(current, etcd={"heartbeat_interval_ms": current.etcd.heartbeat_interval_ms + 10})
    original = runner.bundle_document

    def broken_on_etcd_2(spec, settings, topology):
        document = original(spec, settings, topology)
        if spec.host.name == "etcd-2":
            for file in document["files"]:
                if file["path"] == "/etc/default/etcd":
                    file["content"] = file["content"].replace("ETCD_ELECTION_TIMEOUT=", "ETCD_ELECTION_TIMEOUT=soon")
        return document

    monkeypatch.setattr(runner, "bundle_document", broken_on_etcd_2)
    monkeypatch.setattr(cli, "stack_settings", lambda stack: change)
    before = {name: proc.pid for name, proc in sandbox.running().items()}
    code = cli.main(["--state-dir", str(sandbox.layout.state_dir), "--port-base", str(PORT_BASE),
                     "roll", "prod", "--gate-timeout", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("infra sandbox: rollout stopped: etcd-2: etcd health (etcd) failed: "), err
    after = {name: proc.pid for name, proc in sandbox.running().items()}
    assert after["etcd-1"] != before["etcd-1"]  # rolled before the broken host
    assert "etcd-2" not in after  # etcd refused its bundle
    untouched = [name for name in before if name not in ("etcd-1", "etcd-2")]
    assert {name: after[name] for name in untouched} == {name: before[name] for name in untouched}
    # Two of three etcd members keep quorum: Patroni keeps its leader and every replica streams.
    leader = sandbox.wait_healthy(60)
    assert patroni.health(sandbox.patroni_url(leader))[0]

    monkeypatch.setattr(runner, "bundle_document", original)
    # The fix is a roll of a good bundle: etcd-2 comes back, and the roll goes on from there.
    reports = sandbox.roll(change)
    assert "start etcd" in {r.host: r for r in reports}["etcd-2"].actions
    sandbox.wait_healthy(60)


def test_adding_two_etcd_members_to_the_running_cluster(sandbox):
    """etcd.members 3 -> 5: the new members boot by themselves and join one after the other (the
    agent's member add under the cluster's join lock); the originals only get the new member list
    written, which etcd ignores once it has data, so none of them restarts."""
    current = sandbox.settings
    more = _changed(current, etcd={"members": 5})
    before = {m.name: sandbox.running()[m.name].pid for m in sandbox.topology.etcd}
    reports = {r.host: r for r in sandbox.roll(more)}
    for name in ("etcd-4", "etcd-5"):
        assert "start etcd" in reports[name].actions and any(a.startswith("etcd member add") for a in reports[name].actions)
    for name, pid in before.items():
        assert reports[name].changed == ["/etc/default/etcd"] and reports[name].actions == [], name
        assert sandbox.running()[name].pid == pid, name
    url = f"{sandbox.etcd_url(sandbox.topology.etcd[0])}/v3/cluster/member/list"
    members = requests.post(url, json={}, timeout=3, verify=sandbox.ca_file, cert=sandbox.etcd_client_cert()).json()["members"]
    assert sorted(m["name"] for m in members if m.get("clientURLs")) == [f"etcd-{i}" for i in range(1, 6)]
    sandbox.wait_healthy(60)


def test_adding_a_patroni_node_to_the_running_cluster(sandbox):
    """patroni.nodes 3 -> 4: the new host boots and clones while the others roll (more WAL senders
    and slots, a restart); their agents wait for it to join before restarting anyone."""
    current = sandbox.settings
    more = _changed(current, patroni={"nodes": current.patroni.nodes + 1})
    urls = {node.name: sandbox.patroni_url(node) for node in sandbox.topology.postgres}
    senders_before = patroni.config(next(iter(urls.values())))["postgresql"]["parameters"]["max_wal_senders"]
    writer = Writer(list(urls.values()), sandbox.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD),
                    verify=sandbox.ca_file, tls=sandbox.client_tls())
    writer.ensure_table()
    writer.start()
    with ClusterSampler(urls, verify=sandbox.ca_file) as sampler:
        reports = {r.host: r for r in sandbox.roll(more)}
        time.sleep(1)
    writer.stop()
    new = sandbox.topology.postgres[-1]
    assert new.name == f"pg-{current.patroni.nodes + 1}" and "start patroni" in reports[new.name].actions
    leader = sandbox.wait_healthy(60)
    members = {m["name"]: m for m in sandbox.cluster()["members"]}
    # A running member. The leader restarts last and hands over to a synchronous standby first, which may be
    # the new node: it can end up leading.
    assert members[new.name]["state"] == "running"
    assert members[new.name]["role"] in ("replica", "sync_standby") or new.name == leader.name, members
    senders = patroni.config(sandbox.patroni_url(leader))["postgresql"]["parameters"]["max_wal_senders"]
    assert int(senders) == int(senders_before) + 1  # one more node, one more WAL sender
    senders = str(senders)
    for node in sandbox.topology.postgres:
        assert _setting(sandbox, node, "max_wal_senders") == senders, node.name
    assert writer.missing(sandbox.dsn(leader)) == []
    # The new node has every acknowledged write (it cloned from, and streams from, the leader).
    with psycopg.connect(sandbox.dsn(new), autocommit=True, connect_timeout=3) as conn:
        rows = conn.execute(f"SELECT count(*) FROM {DRILL_TABLE} WHERE run = %s", (writer.run,)).fetchone()[0]
    assert rows >= len(writer.acks)
    assert sampler.most_down <= 1
