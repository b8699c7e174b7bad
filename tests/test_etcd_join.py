"""The etcd join's decisions without a cluster: which first start a member makes from what the others
answer, the ETCD_INITIAL_CLUSTER and drop-in it writes, the bootstrap ids it computes (checked
against ids etcd 3.4.23 gave), what the bundle carries for it, and the agent's side on a real file
system. The live run of all of it is tests/postgres/test_etcd_join_live.py."""

from __future__ import annotations

import json
import os
import socket

import pytest

from infra.bundle import AGENT_MODULES, AGENT_ROOT, render_bundle
from infra.hostagent import agent, etcd
from infra.hosts import host_specs
from infra.topology import Paths
from tests.test_agent import RecordingPlatform, _bundle

TOKEN = "betting-prod"


def _local(name="etcd-4", members=5, token=TOKEN) -> etcd.Local:
    cluster = ",".join(f"etcd-{i}=http://etcd-{i}:2380" for i in range(1, members + 1))
    return etcd.Local.from_env({
        "ETCD_NAME": name, "ETCD_DATA_DIR": f"/var/lib/etcd/{name}", "ETCD_INITIAL_CLUSTER": cluster,
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": f"http://{name}:2380", "ETCD_ADVERTISE_CLIENT_URLS": f"http://{name}:2379",
        "ETCD_INITIAL_CLUSTER_TOKEN": token})


def _member(index: int, started=True, id_=None, name=None) -> etcd.Member:
    peer = f"http://etcd-{index}:2380"
    return etcd.Member(id_ if id_ is not None else etcd.member_id([peer], TOKEN),
                       name if name is not None else (f"etcd-{index}" if started else ""),
                       (peer,), (f"http://etcd-{index}:2379",) if started else ())


def _view(*members: etcd.Member, cluster_id=None) -> etcd.View:
    if cluster_id is None:
        cluster_id = etcd.cluster_id([etcd.member_id([f"http://etcd-{i}:2380"], TOKEN) for i in (1, 2, 3)])
    return etcd.View("http://etcd-1:2379", cluster_id, members)


ORIGINAL = (_member(1), _member(2), _member(3))


def test_bootstrap_ids_are_the_ones_etcd_gives():
    """Measured on etcd 3.4.23: e1..e3 on 127.0.0.1:27411-27413, --initial-cluster-token tok."""
    ids = [etcd.member_id([f"http://127.0.0.1:2741{i}"], "tok") for i in (1, 2, 3)]
    assert ids == [9029852391406342857, 5105079803234391883, 684356458047680281]
    assert etcd.cluster_id(ids) == 13557367406213951684
    assert etcd.cluster_id(list(reversed(ids))) == etcd.cluster_id(ids)


@pytest.mark.parametrize(("view", "override", "kind"), [
    (None, False, etcd.FIRST_BOOT),  # nobody answers: the cluster's first boot
    (_view(*ORIGINAL), False, etcd.JOIN),  # a running cluster without this member
    (_view(*ORIGINAL, _member(4, started=False, id_=0x1234)), False, etcd.ADDED),  # added, never started
    (_view(*ORIGINAL, _member(4, started=False, id_=0x1234)), True, etcd.ADDED),
    (_view(*ORIGINAL, _member(4)), False, etcd.REPLACE),  # started before, its data dir is empty now
])
def test_what_a_member_with_an_empty_data_dir_does(view, override, kind):
    assert etcd.decide(_local(), view, override) == kind


def test_an_original_member_that_never_started_starts_as_rendered():
    local = _local("etcd-3", members=3)
    bootstrap = _member(3, started=False, name="etcd-3")  # the bootstrap list names it; no client URLs
    assert etcd.decide(local, _view(_member(1), _member(2), bootstrap), False) == etcd.BOOTSTRAP
    # The cluster still forming (another original member not started yet) is no reason to refuse.
    assert etcd.decide(local, _view(_member(1), _member(2, started=False), bootstrap), False) == etcd.BOOTSTRAP
    # Rendered for 5 members now: the cluster was bootstrapped from another list, so `new` would not
    # match its id; it starts `existing` with the members there are.
    assert etcd.decide(_local("etcd-3", members=5), _view(_member(1), _member(2), bootstrap), False) == etcd.ADDED


def test_a_join_is_refused_while_another_member_has_not_started_but_only_under_the_lock():
    view = _view(*ORIGINAL, _member(5, started=False, id_=0xABC))
    assert etcd.decide(_local(), view, False, locked=False) == etcd.JOIN  # it may be joining right now
    with pytest.raises(etcd.JoinError, match=r"member abc \['http://etcd-5:2380'\] is in the cluster but has not "
                                              r"started: one member joins at a time"):
        etcd.decide(_local(), view, False)


def test_no_answer_after_an_earlier_run_found_the_cluster_is_refused():
    with pytest.raises(etcd.JoinError, match="no other member answers now: a first boot would start a second cluster"):
        etcd.decide(_local(), None, True)


def test_a_started_member_with_this_hosts_peer_url_under_another_name_is_refused():
    with pytest.raises(etcd.JoinError, match="the cluster's member etcd-9 .* has this host's peer URL"):
        etcd.decide(_local(), _view(*ORIGINAL, _member(4, name="etcd-9")), False)


def test_the_initial_cluster_is_the_clusters_members_with_this_one_named():
    local = _local()
    added = etcd.Member(0x77, "", ("http://etcd-4:2380",), ())
    two_urls = etcd.Member(9, "etcd-2", ("http://etcd-2:2380", "http://10.0.0.2:2380"), ("http://etcd-2:2379",))
    assert etcd.initial_cluster(local, (added, _member(3), two_urls, _member(1))) == (
        "etcd-1=http://etcd-1:2380,etcd-2=http://10.0.0.2:2380,etcd-2=http://etcd-2:2380,"
        "etcd-3=http://etcd-3:2380,etcd-4=http://etcd-4:2380")
    with pytest.raises(etcd.JoinError, match="has not started: cannot name it"):
        etcd.initial_cluster(local, (*ORIGINAL, added, etcd.Member(0x88, "", ("http://etcd-5:2380",), ())))


def test_the_override_is_a_drop_in_whose_environment_file_sets_state_and_list():
    files = etcd.override_files(_local(), (*ORIGINAL, etcd.Member(0x77, "", ("http://etcd-4:2380",), ())))
    assert sorted(files) == [etcd.JOIN_ENV, etcd.JOIN_DROP_IN]
    assert etcd.JOIN_DROP_IN == "/etc/systemd/system/etcd.service.d/betting-join.conf"
    drop_in = files[etcd.JOIN_DROP_IN].decode()
    assert drop_in.endswith(f"[Service]\nEnvironmentFile={etcd.JOIN_ENV}\n")
    assert [line for line in files[etcd.JOIN_ENV].decode().splitlines() if not line.startswith("#")] == [
        "ETCD_INITIAL_CLUSTER_STATE=existing",
        "ETCD_INITIAL_CLUSTER=etcd-1=http://etcd-1:2380,etcd-2=http://etcd-2:2380,etcd-3=http://etcd-3:2380,"
        "etcd-4=http://etcd-4:2380"]
    with pytest.raises(etcd.JoinError, match="unquoted"):
        etcd.override_files(_local(), (etcd.Member(1, "bad name", ("http://etcd-1:2380",), ("x",)),))


def test_a_data_dir_has_a_member_only_with_a_wal(tmp_path):
    wal = tmp_path / "member" / "wal"
    assert not etcd.has_member(str(wal))
    (tmp_path / "member" / "snap").mkdir(parents=True)
    (tmp_path / "member" / "snap" / "db").write_bytes(b"")  # what a failed `existing` start leaves
    assert not etcd.has_member(str(wal))
    wal.mkdir()
    (wal / "0000000000000000-0000000000000000.wal").write_bytes(b"")
    assert etcd.has_member(str(wal))


def test_the_rendered_environment_file_reads_as_systemd_reads_it(tmp_path):
    path = tmp_path / "etcd"
    path.write_text('# comment\nA=1\nB="quoted \\"value\\""\nETCD_INITIAL_CLUSTER=a=http://a:2380,b=http://b:2380\n')
    assert etcd.read_env(str(path)) == {"A": "1", "B": 'quoted "value"',
                                        "ETCD_INITIAL_CLUSTER": "a=http://a:2380,b=http://b:2380"}


def test_each_etcd_bundle_carries_the_join_section_and_the_module(settings, topology):
    assert "etcd.py" in AGENT_MODULES
    for spec in host_specs(settings, topology):
        document = json.loads(render_bundle(spec, settings, topology))
        paths = {f["path"] for f in document["files"]}
        assert f"{AGENT_ROOT}/infra/hostagent/etcd.py" in paths
        if spec.host.role != "etcd":
            assert "etcd" not in document
            continue
        section = document["etcd"]
        assert section["env_file"] == Paths.ETCD_CONFIG and Paths.ETCD_CONFIG in paths
        gate = next(s["gate"] for s in document["services"] if s["unit"] == "etcd")
        assert section["url"] == gate["url"]
        others = [m for m in topology.etcd if m != spec.host]
        assert section["client_urls"] == {m.name: f"https://{m.fqdn}:2379" for m in others}
        # The join's own files are written by the agent at the join, never by a bundle.
        assert not paths & {etcd.JOIN_DROP_IN, etcd.JOIN_ENV}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _etcd_bundle() -> dict:
    bundle = _bundle("etcd-1")
    port = _closed_port()
    bundle["etcd"]["client_urls"] = {name: f"http://127.0.0.1:{port}" for name in bundle["etcd"]["client_urls"]}
    return bundle


def test_the_agent_starts_a_first_boot_as_rendered(tmp_path):
    bundle = _etcd_bundle()
    platform = RecordingPlatform(tmp_path)
    report = agent.apply(bundle, platform)
    assert "start etcd" in report.actions and not [a for a in report.actions if a.startswith("etcd member")]
    assert not os.path.exists(platform.path(etcd.JOIN_DROP_IN))


def test_the_agent_refuses_a_first_boot_after_an_earlier_join_found_the_cluster(tmp_path):
    bundle = _etcd_bundle()
    platform = RecordingPlatform(tmp_path)
    os.makedirs(os.path.dirname(platform.path(etcd.JOIN_DROP_IN)))
    with open(platform.path(etcd.JOIN_DROP_IN), "w") as handle:
        handle.write(f"[Service]\nEnvironmentFile={etcd.JOIN_ENV}\n")
    with pytest.raises(agent.ApplyError) as failure:
        agent.apply(bundle, platform)
    assert str(failure.value).startswith("etcd-1: etcd join failed: an earlier run found a running cluster")
    assert "start etcd" not in platform.calls


def test_a_member_with_data_starts_without_asking_anyone(tmp_path, monkeypatch):
    def survey(client_urls):
        raise AssertionError("a member with a WAL asked the cluster")

    monkeypatch.setattr(etcd, "survey", survey)
    bundle = _etcd_bundle()
    platform = RecordingPlatform(tmp_path)
    wal = platform.path("/var/lib/etcd/etcd-1/member/wal")
    os.makedirs(wal)
    open(f"{wal}/0000000000000000-0000000000000000.wal", "wb").close()
    report = agent.apply(bundle, platform)
    # The one daemon-reload is for the bundle's own drop-in (the data volume); the join writes none.
    assert "start etcd" in report.actions and platform.calls.count("daemon-reload") == 1
    assert not os.path.exists(platform.path(etcd.JOIN_DROP_IN))
