"""Adding etcd members to a running cluster, with real etcd 3.4 processes and the agent's own code.

Each member is a host whose files live under its own root (the platform's `path`), applied from
its real bundle with only ports mapped to 127.0.0.1 (the sandbox's own mapping functions, without
its path mapping: the platform roots paths instead). The `etcd` unit is a real etcd started as
systemd starts Debian's unit: the variables of /lib/systemd/system/etcd.service, then its
EnvironmentFile (/etc/default/etcd), then each drop-in's EnvironmentFile in order, a later file
winning. Members and clients speak TLS with client certificates, each host's pair from the sandbox's own CA
(SecretStore, as the sandbox has them). A 3-member cluster boots from the rendered 3-member files; members 4 and 5 of the
5-member topology join it one at a time, twice over and concurrently; an original member restarts
with the 5-member files; a member whose volume is new rejoins. What it cannot see: systemd and
DNS themselves (the drop-in's EnvironmentFile order is systemd.exec's documented rule).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from infra.bundle import render_bundle
from infra.hostagent import agent, etcd, gates
from infra.hosts import host_specs
from infra.sandbox import mapping as m
from infra.sandbox.platform import SecretStore
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import stack_config
from tests.ports import port

pytestmark = pytest.mark.live

# Away from the sandbox range (25000-26999) and the monitoring tests (29000-29999): the clusters
# take 27401-27415, 27421-27435 and 27441-27455.
PORT_BASE = port(27400)
SECOND_PORT_BASE = port(27420)
DEV_PORT_BASE = port(27440)
ETCD_BIN = "/usr/bin/etcd"
ETCD_UNIT = "/lib/systemd/system/etcd.service"
TIMEOUT = 60.0  # an upper bound for each wait; nothing asserts how long anything took


def _settings(stack: str, members: int):
    config = stack_config(stack)
    section = json.loads(config["betting-platform:etcd"])
    section["members"] = members
    config["betting-platform:etcd"] = json.dumps(section)
    return load_settings(config, stack)


SETTINGS = {(stack, n): _settings(stack, n) for stack, n in (("prod", 3), ("prod", 5), ("dev", 1), ("dev", 3))}
TOPOLOGY = {key: build_topology(s) for key, s in SETTINGS.items()}


def _unit_environment() -> tuple[dict[str, str], list[str]]:
    """Debian's etcd unit: its Environment= values and EnvironmentFile= paths (%p is the unit's prefix)."""
    assert os.path.exists(ETCD_UNIT), f"{ETCD_UNIT} is missing: install etcd-server (make system-deps)"
    env, files = {}, []
    for line in Path(ETCD_UNIT).read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
        elif key == "EnvironmentFile":
            files.append(value.replace("%p", "etcd"))
    return env, files


class EtcdHost:
    """One etcd host for the agent: files under `root`, the etcd unit a real process."""

    def __init__(self, root: Path, name: str, port_base: int, members: int, stack: str = "prod"):
        self.root, self.name, self.port_base, self.stack = root, name, port_base, stack
        self.calls: list[str] = []
        self.units: set[str] = set()
        self.process: subprocess.Popen | None = None
        self.layout = m.Layout(root, port_base)
        self.members = members

    @property
    def host(self):
        return next(h for h in TOPOLOGY[(self.stack, 5 if self.stack == "prod" else 3)].etcd if h.name == self.name)

    @property
    def client_url(self) -> str:
        return f"https://{m.LOOPBACK}:{self.layout.etcd_client(self.host)}"

    @property
    def store(self) -> SecretStore:
        """The cluster's stand-in for SSM: one CA, every host's pair (beside the hosts' roots)."""
        return SecretStore(self.root.parent / "secrets", {})

    # ---- the platform the agent drives ----
    def path(self, path: str) -> str:
        return str(self.root) + path

    def install(self, packages):
        return []

    def mount(self, volume):
        os.makedirs(self.path(volume["mount"]), exist_ok=True)
        return False

    def chown(self, path, owner):
        os.chown(path, *agent._owner_ids(owner))

    def secret(self, parameter):
        return self.store.get(parameter)  # its TLS identity, the only secrets an etcd host reads

    def boot_command(self, command):
        self.calls.append(f"boot {command}")

    def daemon_reload(self):
        self.calls.append("daemon-reload")

    def active(self, unit):
        if unit == "etcd":
            return self.process is not None and self.process.poll() is None
        return unit in self.units

    def start(self, unit):
        self.calls.append(f"start {unit}")
        if unit != "etcd":
            self.units.add(unit)
            return
        env = self.environment()
        Path(self.path("/var/log")).mkdir(parents=True, exist_ok=True)
        with open(self.path("/var/log/etcd.log"), "ab") as log:
            self.process = subprocess.Popen([ETCD_BIN], env={"PATH": "/usr/bin:/bin", **env}, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def restart(self, unit):
        self.calls.append(f"restart {unit}")
        if unit == "etcd":
            self.stop()
            self.start(unit)

    def reload(self, unit):
        self.calls.append(f"reload {unit}")

    # ---- systemd's part, and the test's ----
    def environment(self) -> dict[str, str]:
        """As systemd builds it: Environment=, then every EnvironmentFile in order (the unit's, then each
        drop-in's, drop-ins in name order), a later assignment winning; `-` marks an optional file."""
        env, files = _unit_environment()
        drop_ins = Path(self.path("/etc/systemd/system/etcd.service.d"))
        for conf in sorted(drop_ins.glob("*.conf")) if drop_ins.is_dir() else []:
            files += [line.split("=", 1)[1] for line in conf.read_text().splitlines() if line.startswith("EnvironmentFile=")]
        for file in files:
            optional = file.startswith("-")
            path = self.path(file.lstrip("-"))
            if optional and not os.path.exists(path):
                continue
            env.update(etcd.read_env(path))
        for key in ("ETCD_DATA_DIR", *(k for k in env if k.endswith("_FILE"))):
            env[key] = self.path(env[key])  # the platform roots host paths
        return env

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def bundle(self) -> dict:
        """This host's bundle in the topology of `members` members, ports mapped to this cluster's."""
        topology, settings = TOPOLOGY[(self.stack, self.members)], SETTINGS[(self.stack, self.members)]
        (spec,) = [s for s in host_specs(settings, topology) if s.host.name == self.name]
        # Names and ports only (no root: the platform here roots paths itself).
        mapping = m.host_mapping(self.layout, topology, spec.host)
        document = json.loads(m.map_bytes(render_bundle(spec, settings, topology), mapping))
        for service in document["services"]:
            if service["unit"] != "etcd":
                service["gate"] = None  # node_exporter is not run here
        return document

    def gate(self) -> dict:
        """The etcd gate as the agent checks it on this host (its TLS files under the root)."""
        return agent._gate_on(next(s["gate"] for s in self.bundle()["services"] if s["unit"] == "etcd"), self)

    def write_files(self) -> None:
        """What the agent writes before a first start: the bundle's files and the host's TLS identity."""
        bundle = self.bundle()
        for file in bundle["files"]:
            agent.converge_file(self.path(file["path"]), file["content"].encode(), file["mode"], file["owner"])
        for secret in bundle["secret_files"]:
            agent.converge_file(self.path(secret["path"]), self.secret(secret["parameter"]).encode(), secret["mode"],
                                secret["owner"])

    def override(self) -> dict[str, str] | None:
        path = self.path(etcd.JOIN_ENV)
        return etcd.read_env(path) if os.path.exists(path) else None


# ---- the etcd v3 gateway, as a client ----
def _client_context(host: EtcdHost):
    """A client of the cluster with a certificate of its CA (host etcd-1's pair): etcd takes no other."""
    ca = host.store.ca_file()
    host.store.get("hosts/etcd-1/tls_cert")
    folder = host.store.folder / "hosts" / "etcd-1"
    return etcd.client_context(str(ca), str(folder / "tls_cert"), str(folder / "tls_key"))


def _post(url: str, body: dict, host: EtcdHost) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5, context=_client_context(host)) as response:
        return json.loads(response.read())


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def put(host: EtcdHost, key: str, value: str) -> None:
    _post(f"{host.client_url}/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, host)


def get_local(host: EtcdHost, key: str) -> str | None:
    """A serializable read: answered from this member's own copy of the data, not the leader's."""
    kvs = _post(f"{host.client_url}/v3/kv/range", {"key": _b64(key), "serializable": True}, host).get("kvs", [])
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def members(host: EtcdHost) -> list[etcd.Member]:
    etcd._tls["context"] = _client_context(host)  # the agent's own client, as prepare_join configures it
    return list(etcd.member_list(host.client_url).members)


def started(host: EtcdHost) -> list[str]:
    return sorted(mem.name for mem in members(host) if mem.started)


def wait_gate(host: EtcdHost) -> None:
    try:
        gates.wait(host.gate(), TIMEOUT)
    except gates.GateError as error:
        pytest.fail(f"{host.name}: {error}")


def adds(report: agent.Report) -> list[str]:
    return [a for a in report.actions if a.startswith("etcd member add")]


def _in_threads(*calls):
    """Run the calls at once (as hosts booting together do); re-raise the first failure."""
    results, errors = {}, []

    def run(index, call):
        try:
            results[index] = call()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(calls))]


def _free(port_base: int) -> None:
    from infra.sandbox.runner import port_open

    busy = [p for p in range(port_base + 1, port_base + 16) if port_open(p)]
    assert not busy, f"ports {busy} are in use: another etcd join test is running"


@pytest.fixture
def make_hosts(tmp_path):
    assert os.access(ETCD_BIN, os.X_OK), f"{ETCD_BIN} is missing: install etcd-server (make system-deps)"
    made: list[EtcdHost] = []

    def make(port_base: int, stack: str = "prod", first: int = 3, last: int = 5) -> dict[str, EtcdHost]:
        """The hosts of `last` members; the first `first` start with the bundles of a `first`-member topology."""
        _free(port_base)
        hosts = {h.name: EtcdHost(tmp_path / str(port_base) / h.name, h.name, port_base, last, stack)
                 for h in TOPOLOGY[(stack, last)].etcd}
        for host in hosts.values():
            host.members = first if host.host.index <= first else last
        made.extend(hosts.values())
        return hosts

    yield make
    for host in made:  # the data goes with tmp_path: no need to wait for each to hand its leadership over
        if host.process is not None and host.process.poll() is None:
            host.process.kill()
            host.process.wait()


def test_members_4_and_5_join_a_running_cluster_one_at_a_time(make_hosts):
    hosts = make_hosts(PORT_BASE)
    e1, e2, e3, e4, e5 = (hosts[f"etcd-{i}"] for i in range(1, 6))

    # First boot: the three original hosts apply their 3-member bundles at once, as they boot together.
    reports = _in_threads(*(lambda h=h: agent.apply(h.bundle(), h, gate_timeout=TIMEOUT) for h in (e1, e2, e3)))
    assert [adds(r) for r in reports] == [[], [], []]
    assert [h.override() for h in (e1, e2, e3)] == [None, None, None]  # started as rendered: state new
    assert started(e1) == ["etcd-1", "etcd-2", "etcd-3"]
    # The ids the agent computes for a bootstrap are the ones etcd gave (how it tells an original member).
    token = TOPOLOGY[("prod", 3)].patroni_scope
    ids = {mem.name: mem.id for mem in members(e1)}
    peers = {h.name: [f"https://{m.LOOPBACK}:{h.layout.etcd_peer(h.host)}"] for h in (e1, e2, e3)}
    assert ids == {name: etcd.member_id(urls, token) for name, urls in peers.items()}
    assert etcd.member_list(e1.client_url).cluster_id == etcd.cluster_id(list(ids.values()))
    for i in range(20):
        put(e1, f"/service/betting-prod/before-join/{i}", f"value {i}")

    # Member 4, from its 5-member bundle: added, then started `existing` with the 4 members there are.
    e4.write_files()
    join = etcd.prepare_join(e4.bundle()["etcd"], e4, TIMEOUT)
    assert join.kind == etcd.JOIN and len([a for a in join.actions if a.startswith("etcd member add etcd-4")]) == 1
    override = e4.override()
    assert override["ETCD_INITIAL_CLUSTER_STATE"] == "existing"
    assert sorted(etcd.parse_initial_cluster(override["ETCD_INITIAL_CLUSTER"])) == ["etcd-1", "etcd-2", "etcd-3", "etcd-4"]
    assert "daemon-reload" in e4.calls
    assert Path(e4.path(etcd.JOIN_DROP_IN)).read_text().endswith(f"[Service]\nEnvironmentFile={etcd.JOIN_ENV}\n")
    assert e4.environment()["ETCD_INITIAL_CLUSTER_STATE"] == "existing"  # the drop-in's file wins over /etc/default/etcd
    e4.start("etcd")
    join.wait_started(TIMEOUT)
    join.release()
    assert started(e1) == ["etcd-1", "etcd-2", "etcd-3", "etcd-4"]

    # Member 5, joined twice over: the second run (as after an agent that stopped before the start)
    # finds it added and not started, adds nothing, and writes the same override.
    e5.write_files()
    first = etcd.prepare_join(e5.bundle()["etcd"], e5, TIMEOUT)
    first.release()
    written = Path(e5.path(etcd.JOIN_ENV)).read_bytes()
    second = etcd.prepare_join(e5.bundle()["etcd"], e5, TIMEOUT)
    assert (first.kind, second.kind) == (etcd.JOIN, etcd.ADDED)
    assert not [a for a in second.actions if a.startswith("etcd member add")]
    assert len(members(e1)) == 5 and Path(e5.path(etcd.JOIN_ENV)).read_bytes() == written
    e5.start("etcd")
    second.wait_started(TIMEOUT)
    second.release()

    assert started(e1) == [f"etcd-{i}" for i in range(1, 6)] and len(members(e1)) == 5
    for host in (e4, e5):
        host.members = 5
    for host in hosts.values():
        assert all(mem.started for mem in members(host)), host.name
    for host in (e4, e5):
        wait_gate(host)  # the bundle's own gate: healthy, 5 of 5 members started
        assert [get_local(host, f"/service/betting-prod/before-join/{i}") for i in range(20)] == [
            f"value {i}" for i in range(20)]

    # The original members roll the 5-member bundle (only ETCD_INITIAL_CLUSTER differs): the file is
    # written and nothing restarts (initial-* lines are inert); a later restart with it (a reboot)
    # ignores initial-* and stays healthy in the same cluster.
    before = {mem.name: mem.id for mem in members(e1)}
    e1.members = 5
    report = agent.apply(e1.bundle(), e1, gate_timeout=TIMEOUT)
    assert report.changed == ["/etc/default/etcd"] and report.actions == []
    e1.restart("etcd")
    assert e1.environment()["ETCD_INITIAL_CLUSTER"].count("=") == 5 and e1.override() is None
    wait_gate(e1)
    # A stopped member with data (a reboot): started as it is, nothing added.
    e2.stop()
    e2.members = 5
    report = agent.apply(e2.bundle(), e2, gate_timeout=TIMEOUT)
    assert "start etcd" in report.actions and not adds(report) and e2.override() is None
    assert {mem.name: mem.id for mem in members(e3)} == before
    assert get_local(e1, "/service/betting-prod/before-join/7") == "value 7"

    # A host replaced with a new, empty volume: refused while another member is down, naming it ...
    e3.members = 5
    e2.stop()
    e3.stop()
    shutil.rmtree(e3.path("/var/lib/etcd/etcd-3"))
    with pytest.raises(agent.ApplyError) as refused:
        agent.apply(e3.bundle(), e3, gate_timeout=2)
    assert str(refused.value).startswith("etcd-3: etcd join failed: members of the running cluster are not all healthy")
    assert "etcd-2: " in str(refused.value) and e3.process is None
    # ... and once every other member runs, the old member is removed and the new one added.
    agent.apply(e2.bundle(), e2, gate_timeout=TIMEOUT)
    report = agent.apply(e3.bundle(), e3, gate_timeout=TIMEOUT)
    assert [a.split(" (")[0] for a in report.actions if a.startswith("etcd member")] == [
        "etcd member remove " + format(before["etcd-3"], "x"), "etcd member add etcd-3 " + peers["etcd-3"][0]]
    after = {mem.name: mem.id for mem in members(e1)}
    assert sorted(after) == sorted(before) and after["etcd-3"] != before["etcd-3"]
    assert {k: v for k, v in after.items() if k != "etcd-3"} == {k: v for k, v in before.items() if k != "etcd-3"}
    assert get_local(e3, "/service/betting-prod/before-join/19") == "value 19"
    for host in hosts.values():
        wait_gate(host)


def test_a_late_original_member_starts_as_rendered_and_new_hosts_booting_together_join_in_turn(make_hosts):
    hosts = make_hosts(SECOND_PORT_BASE)
    e1, e2, e3, e4, e5 = (hosts[f"etcd-{i}"] for i in range(1, 6))

    # etcd-1 and etcd-2 boot first: no other member answers either (one without quorum holds the
    # connection), so both start as rendered; the gate counts only started members, not etcd-3.
    for host in (e1, e2):
        host.write_files()
        assert etcd.prepare_join(host.bundle()["etcd"], host, TIMEOUT).kind == etcd.FIRST_BOOT
        host.start("etcd")
    gates.wait({**e1.gate(), "members": 2}, TIMEOUT)
    assert gates.check(e1.gate()) == (False, "etcd etcd-1: 2 of 3 members started (['etcd-1', 'etcd-2'])")
    # etcd-3 boots late: the running cluster knows it by its bootstrap id; it starts as rendered too.
    e3.write_files()
    late = etcd.prepare_join(e3.bundle()["etcd"], e3, TIMEOUT)
    assert late.kind == etcd.BOOTSTRAP and e3.override() is None
    e3.start("etcd")
    for host in (e1, e2, e3):
        wait_gate(host)
    put(e2, "/service/betting-prod/leader", "pg-1")

    # etcd-4 and etcd-5 boot together (one `pulumi up` creates both): their joins take turns under the
    # cluster's join lock, each gate waits for all 5, and each member is added exactly once.
    reports = _in_threads(*(lambda h=h: agent.apply(h.bundle(), h, gate_timeout=TIMEOUT) for h in (e4, e5)))
    assert [len(adds(r)) for r in reports] == [1, 1]
    assert started(e1) == [f"etcd-{i}" for i in range(1, 6)] and len(members(e1)) == 5
    sizes = sorted(len(etcd.parse_initial_cluster(h.override()["ETCD_INITIAL_CLUSTER"])) for h in (e4, e5))
    assert sizes == [4, 5]  # one joined 4 members, the other, after it, 5
    assert [get_local(h, "/service/betting-prod/leader") for h in (e4, e5)] == ["pg-1", "pg-1"]
    # The join lock is gone with its lease once both have started.
    lock = _post(f"{e1.client_url}/v3/kv/range", {"key": _b64(etcd.LOCK_NAME), "range_end": _b64(etcd.LOCK_NAME + "0")}, e1)
    assert lock.get("kvs", []) == []


def test_dev_grows_from_one_member_to_three_though_the_first_add_leaves_no_quorum(make_hosts):
    """1 -> 2 members is a quorum of 2 with 1 running: the DCS takes no write until the new member runs,
    so nothing between the add and the start may need the cluster, and a run that stopped there must
    still be able to start the member it added."""
    hosts = make_hosts(DEV_PORT_BASE, "dev", first=1, last=3)
    e1, e2, e3 = (hosts[f"etcd-{i}"] for i in range(1, 4))
    report = agent.apply(e1.bundle(), e1, gate_timeout=TIMEOUT)  # its bundle names no other member
    assert "start etcd" in report.actions and e1.override() is None and e1.bundle()["etcd"]["client_urls"] == {}
    put(e1, "/service/betting-dev/config", "dev")

    e2.write_files()
    first = etcd.prepare_join(e2.bundle()["etcd"], e2, TIMEOUT)
    assert first.kind == etcd.JOIN
    first.release()  # an agent that stopped before the start: the single member has no quorum now
    assert not gates.check({**e1.gate(), "members": 1})[0]
    second = etcd.prepare_join(e2.bundle()["etcd"], e2, TIMEOUT)
    assert second.kind == etcd.ADDED and second.lease is None
    e2.start("etcd")
    second.wait_started(TIMEOUT)

    report = agent.apply(e3.bundle(), e3, gate_timeout=TIMEOUT)
    assert len(adds(report)) == 1
    assert started(e1) == ["etcd-1", "etcd-2", "etcd-3"]
    for host in (e1, e2):
        host.members = 3
    for host in (e1, e2, e3):
        wait_gate(host)
    assert [get_local(h, "/service/betting-dev/config") for h in (e2, e3)] == ["dev", "dev"]
