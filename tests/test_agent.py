"""The host agent's apply on a real file system: idempotent, atomic, owners and modes, the least
action per changed file, a file changed by hand put back, a failed gate naming host and check.

The platform here writes under a temporary root and records service actions instead of calling
systemd; the file-system code and the decisions are the agent's own. What it cannot see: apt,
EBS, SSM and systemd themselves (the sandbox runs the same apply against real daemons).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.bundle import digest as bundle_digest
from infra.bundle import render_bundle
from infra.hostagent import agent
from infra.hosts import host_specs
from infra.sandbox.platform import SecretStore
from infra.settings import load_settings
from infra.topology import Paths, build_topology
from tests.conftest import stack_config


class RecordingPlatform:
    """Files under `root`; services and secrets in memory."""

    def __init__(self, root, secrets: dict[str, str] | None = None):
        self.root = str(root)
        self.secrets = secrets or {}
        self.active_units: set[str] = set()
        self.calls: list[str] = []

    def path(self, path: str) -> str:
        return self.root + path

    def install(self, packages):
        return []

    def mount(self, volume):
        os.makedirs(self.path(volume["mount"]), exist_ok=True)
        return False

    def secret(self, parameter):
        if parameter not in self.secrets and parameter.endswith(("/tls_ca_cert", "/tls_cert", "/tls_key")):
            # The host's TLS identity is read by the agent's own clients (etcd's join): real PEM, the sandbox's.
            return SecretStore(Path(self.root) / "ssm", {}).get(parameter)
        return self.secrets.get(parameter, f"secret-of-{parameter}")

    def chown(self, path, owner):
        os.chown(path, *agent._owner_ids(owner))

    def boot_command(self, command):
        self.calls.append(f"boot {command}")

    def daemon_reload(self):
        self.calls.append("daemon-reload")

    def active(self, unit):
        return unit in self.active_units

    def start(self, unit):
        self.active_units.add(unit)
        self.calls.append(f"start {unit}")

    def restart(self, unit):
        self.calls.append(f"restart {unit}")

    def reload(self, unit):
        self.calls.append(f"reload {unit}")


def _bundle(host: str, stack: str = "prod") -> dict:
    settings = load_settings(stack_config(stack), stack)
    topology = build_topology(settings)
    (spec,) = [s for s in host_specs(settings, topology) if s.host.name == host]
    document = json.loads(render_bundle(spec, settings, topology))
    for service in document["services"]:
        service["gate"] = None  # no daemons here; the gates are exercised below and in the sandbox
    document.pop("patroni", None)
    return document


def _file(bundle: dict, path: str) -> dict:
    return next(f for f in bundle["files"] if f["path"] == path)


def test_first_apply_writes_every_file_with_owner_and_mode_then_starts_in_order(tmp_path):
    bundle = _bundle("monitoring-1")
    platform = RecordingPlatform(tmp_path)
    report = agent.apply(bundle, platform)
    for file in bundle["files"]:
        path = platform.path(file["path"])
        expected = file["content"]
        for token, parameter in file.get("parameters", {}).items():  # prod's AMP workspace id in prometheus.yml
            assert token in expected, file["path"]
            expected = expected.replace(token, platform.secret(parameter))
        assert open(path).read() == expected, file["path"]
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == int(file["mode"], 8), file["path"]
        assert (info.st_uid, info.st_gid) == agent._owner_ids(file["owner"]), file["path"]
    assert [c for c in platform.calls if c.startswith("start")] == [f"start {s['unit']}" for s in bundle["services"]]
    assert len(report.changed) == len(bundle["files"]) + len(bundle["secret_files"]) + len(bundle["secret_environments"])


def test_a_second_apply_changes_nothing_and_restarts_nothing(tmp_path):
    bundle = _bundle("pg-1")
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    platform.calls.clear()
    report = agent.apply(bundle, platform)
    assert report.changed == [] and report.actions == []
    assert not [c for c in platform.calls if c.split()[0] in ("start", "restart", "reload", "daemon-reload")]


def test_a_file_changed_by_hand_is_put_back_with_its_least_action(tmp_path):
    bundle = _bundle("monitoring-1")
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    platform.calls.clear()
    rules = next(f for f in bundle["files"] if f["path"].startswith("/etc/prometheus/rules/"))
    with open(platform.path(rules["path"]), "a") as handle:
        handle.write("# edited by hand\n")
    os.chmod(platform.path("/etc/default/prometheus-redis-exporter"), 0o600)
    report = agent.apply(bundle, platform)
    assert sorted(report.changed) == sorted([rules["path"], "/etc/default/prometheus-redis-exporter"])
    assert open(platform.path(rules["path"])).read() == rules["content"]
    # Rules need a reload of Prometheus; the exporter's flags a restart of the exporter; nothing else moves.
    assert sorted(c for c in platform.calls if c.split()[0] in ("restart", "reload")) == [
        "reload prometheus", "restart prometheus-redis-exporter"]


def test_a_declared_folder_gets_its_owner_and_mode_and_keeps_them(tmp_path):
    """pg hosts: node_exporter's textfile folder (Debian's, root's 0755) is made writable for the backup job."""
    bundle = _bundle("pg-1")
    (folder,) = bundle["directories"]
    assert (folder["path"], folder["mode"], folder["owner"]) == ("/var/lib/prometheus/node-exporter", "1775", "root:postgres")
    platform = RecordingPlatform(tmp_path)
    os.makedirs(platform.path(folder["path"]), mode=0o755)  # as the package leaves it
    assert folder["path"] + "/" in agent.apply(bundle, platform).changed
    info = os.stat(platform.path(folder["path"]))
    assert stat.S_IMODE(info.st_mode) == 0o1775 and (info.st_uid, info.st_gid) == agent._owner_ids("root:postgres")
    assert agent.apply(bundle, platform).changed == []
    os.chmod(platform.path(folder["path"]), 0o755)  # a package upgrade or a hand
    assert agent.apply(bundle, platform).changed == [folder["path"] + "/"]


def test_the_strongest_action_wins_and_a_drop_in_reloads_systemd(tmp_path):
    bundle = _bundle("monitoring-1")
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    platform.calls.clear()
    _file(bundle, "/etc/prometheus/prometheus.yml")["content"] += "# new\n"  # reload
    _file(bundle, "/etc/default/prometheus")["content"] += "# new\n"  # restart
    drop_in = next(f for f in bundle["files"] if f["path"].endswith("betting-secrets.conf"))
    drop_in["content"] += "# new\n"
    agent.apply(bundle, platform)
    assert "daemon-reload" in platform.calls
    actions = [c for c in platform.calls if c.split()[0] in ("restart", "reload")]
    assert "restart prometheus" in actions and "reload prometheus" not in actions
    unit = drop_in["path"].split("/")[4].removesuffix(".service.d")
    assert f"restart {unit}" in actions


def test_a_rotated_secret_restarts_the_unit_that_reads_it(tmp_path):
    bundle = _bundle("pg-1")
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    environment = bundle["secret_environments"][0]
    platform.secrets[next(iter(environment["variables"].values()))] = "rotated"
    platform.calls.clear()
    agent.apply(bundle, platform)
    assert f"restart {environment['unit']}" in platform.calls
    assert oct(os.stat(platform.path(environment["path"])).st_mode & 0o777) == "0o400"


def test_a_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "etc" / "x.conf"
    agent.write_atomic(str(target), b"one\n", "0640", "root:root")
    inode = os.stat(target).st_ino
    assert agent.converge_file(str(target), b"two\n", "0640", "root:root")
    assert target.read_bytes() == b"two\n" and os.stat(target).st_ino != inode  # renamed over, never rewritten in place
    assert [p.name for p in target.parent.iterdir()] == ["x.conf"]


class _Status(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_gate_that_stays_red_fails_the_apply_naming_host_and_check(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bundle = _bundle("monitoring-1")
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        for service in bundle["services"]:
            if service["unit"] == "prometheus-node-exporter":
                service["gate"] = {"kind": "http", "url": url}
        _Status.status = 200
        agent.apply(bundle, RecordingPlatform(tmp_path / "ok"))
        _Status.status = 503
        with pytest.raises(agent.ApplyError) as failure:
            agent.apply(bundle, RecordingPlatform(tmp_path / "red"), gate_timeout=1.5)
        assert str(failure.value) == (f"monitoring-1: prometheus-node-exporter health (http) failed: "
                                      f"{url} answered 503")
    finally:
        server.shutdown()


class _Replica(BaseHTTPRequestHandler):
    """Patroni's /patroni as a running replica answers it (3.0.2's fields)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"state": "running", "role": "replica", "xlog": {"paused": False}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_check_and_handover_commands_read_the_last_applied_bundle(tmp_path, monkeypatch, capsys):
    """`betting-agent check` (what a roll waits on) and `handover` (before a host is replaced)."""
    gate_server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    patroni_server = ThreadingHTTPServer(("127.0.0.1", 0), _Replica)
    for server in (gate_server, patroni_server):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bundle = _bundle("pg-1")
        url = f"http://127.0.0.1:{gate_server.server_address[1]}/metrics"
        bundle["services"][1]["gate"] = {"kind": "http", "url": url}
        bundle["patroni"] = {"api": f"http://127.0.0.1:{patroni_server.server_address[1]}"}
        (tmp_path / "bundle.json").write_text(json.dumps(bundle))
        (tmp_path / "applied.json").write_text(json.dumps({"bundle": str(tmp_path / "bundle.json")}))
        (tmp_path / "host.json").write_text(json.dumps({"host": "pg-1", "region": "eu-west-1"}))
        monkeypatch.setattr(agent, "STATE_DIR", str(tmp_path))
        monkeypatch.setattr(agent, "HOST_CONFIG", str(tmp_path / "host.json"))
        _Status.status = 200
        assert agent.main(["check"]) == 0
        _Status.status = 503
        assert agent.main(["check"]) == 1
        assert capsys.readouterr().err == f"pg-1: {bundle['services'][1]['unit']}: {url} answered 503\n"
        assert agent.main(["handover"]) == 0
        assert "pg-1: not the leader; nothing to hand over" in capsys.readouterr().out
    finally:
        gate_server.shutdown()
        patroni_server.shutdown()


def test_an_etcd_member_list_change_is_written_without_a_restart_but_a_timing_change_restarts(tmp_path):
    """etcd reads ETCD_INITIAL_* only at its first start: adding members must not restart the others."""
    bundle = _bundle("etcd-1")
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    platform.calls.clear()
    env = _file(bundle, "/etc/default/etcd")
    assert env["inert_lines"] == ["ETCD_INITIAL_"]
    env["content"] = env["content"].replace("ETCD_INITIAL_CLUSTER=", "ETCD_INITIAL_CLUSTER=etcd-9=http://x:2380,")
    report = agent.apply(bundle, platform)
    assert report.changed == ["/etc/default/etcd"] and "ETCD_INITIAL_CLUSTER=etcd-9" in open(platform.path(env["path"])).read()
    assert not [c for c in platform.calls if c.split()[0] in ("restart", "reload")]
    env["content"] = env["content"].replace("ETCD_ELECTION_TIMEOUT=1500", "ETCD_ELECTION_TIMEOUT=1600")
    agent.apply(bundle, platform)
    assert "restart etcd" in platform.calls


def test_a_healthy_apply_says_in_node_exporters_textfile_which_bundle_the_host_runs(tmp_path):
    """betting_agent.prom (read by the rollouts dashboard): written atomically after each healthy apply, with the
    bundle's digest as infra/bundle.py computes it (its S3 key), the role, and the rollout that asked for it."""
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    (spec,) = [s for s in host_specs(settings, topology) if s.host.name == "monitoring-1"]
    assert agent.bundle_digest(json.loads(render_bundle(spec, settings, topology))) == bundle_digest(
        render_bundle(spec, settings, topology))
    assert agent.TEXTFILE_DIR == Paths.NODE_EXPORTER_TEXTFILE_DIR

    bundle = _bundle("monitoring-1")
    platform = RecordingPlatform(tmp_path)
    digests = '{"monitoring-1": "' + "a" * 64 + '"}'
    first = agent.apply(bundle, platform, rollout=agent.rollout_digest(digests))
    folder = platform.path(Paths.NODE_EXPORTER_TEXTFILE_DIR)
    assert os.listdir(folder) == ["betting_agent.prom"]  # no temporary file left beside it
    text = open(os.path.join(folder, "betting_agent.prom")).read()
    rollout = hashlib.sha256(digests.encode()).hexdigest()
    assert (f'betting_agent_bundle_info{{digest="{agent.bundle_digest(bundle)}",role="monitoring",rollout="{rollout}"}} 1'
            in text.splitlines())
    assert f"betting_agent_apply_changed_files {len(first.changed)}" in text.splitlines()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    # Applied again by hand: nothing changed, a newer time, no rollout label.
    agent.apply(bundle, platform)
    again = open(os.path.join(folder, "betting_agent.prom")).read()
    assert "betting_agent_apply_changed_files 0" in again.splitlines() and "rollout=" not in again
    applied_at = [float(line.split()[1]) for line in (text + again).splitlines()
                  if line.startswith("betting_agent_last_apply_timestamp_seconds ")]
    assert len(applied_at) == 2 and applied_at[1] >= applied_at[0]


def test_a_failed_apply_leaves_the_last_healthy_applys_metrics(tmp_path):
    bundle = _bundle("monitoring-1")
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    path = os.path.join(platform.path(Paths.NODE_EXPORTER_TEXTFILE_DIR), "betting_agent.prom")
    before = open(path).read()
    bundle["services"][0]["gate"] = {"kind": "http", "url": "http://127.0.0.1:9/never"}
    _file(bundle, bundle["files"][0]["path"])["content"] += "\n"
    with pytest.raises(agent.ApplyError):
        agent.apply(bundle, platform, gate_timeout=0.5)
    assert open(path).read() == before
