"""Boot configuration: cloud-init carries every rendered file byte for byte, and the boot agent
does its steps in the order that keeps data and services safe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from infra.hostagent import bootstrap
from infra.render.cloudinit import AGENT_PATH, MANIFEST_PATH, render_cloud_init
from infra.services import host_specs


def _specs(settings, topology):
    return {spec.host.name: spec for spec in host_specs(settings, topology)}


def test_cloud_init_carries_every_file_exactly(settings, topology):
    for spec in host_specs(settings, topology):
        document = yaml.safe_load(render_cloud_init(spec, settings.environment, settings.region))
        written = {entry["path"]: entry["content"].encode() for entry in document["write_files"]}
        for file in spec.files:
            assert written[file.path] == file.content, (spec.host.name, file.path)
        assert document["runcmd"] == [[AGENT_PATH]]
        assert document["hostname"] == spec.host.name


def test_cloud_init_is_deterministic(settings, topology):
    for spec in host_specs(settings, topology):
        assert render_cloud_init(spec, settings.environment, settings.region) == render_cloud_init(
            spec, settings.environment, settings.region)


def test_files_owned_by_a_service_user_are_written_root_only_until_the_agent_hands_them_over(settings, topology):
    spec = _specs(settings, topology)["pg-1"]
    document = yaml.safe_load(render_cloud_init(spec, settings.environment, settings.region))
    modes = {entry["path"]: entry["permissions"] for entry in document["write_files"]}
    assert modes["/etc/patroni/config.yml"] == "0400"
    manifest = json.loads(next(e["content"] for e in document["write_files"] if e["path"] == MANIFEST_PATH))
    assert {"path": "/etc/patroni/config.yml", "owner": "postgres:postgres", "mode": "0600"} in manifest["ownership"]


def _dry_run(tmp_path, spec, settings, capsys) -> list[str]:
    document = yaml.safe_load(render_cloud_init(spec, settings.environment, settings.region))
    manifest = next(e["content"] for e in document["write_files"] if e["path"] == MANIFEST_PATH)
    path = tmp_path / "bootstrap.json"
    path.write_text(manifest)
    assert bootstrap.main(["--manifest", str(path), "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def _index(lines: list[str], prefix: str) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(prefix))


def test_agent_mounts_installs_fetches_secrets_then_starts(tmp_path, settings, topology, capsys):
    spec = _specs(settings, topology)["pg-1"]
    lines = _dry_run(tmp_path, spec, settings, capsys)
    mount = _index(lines, "RUN mount /var/lib/postgresql")
    no_autostart = _index(lines, "WRITE /usr/sbin/policy-rc.d")
    install = _index(lines, "RUN env DEBIAN_FRONTEND=noninteractive apt-get install")
    secrets = _index(lines, f"SSM /betting/{settings.environment}/postgres_")
    start = _index(lines, "RUN systemctl restart patroni")
    assert mount < no_autostart < install < secrets < start
    assert lines.index("RUN chown postgres:postgres /var/lib/postgresql") > install  # the user exists only after install
    assert "WRITE /etc/betting/secrets/patroni.env owner=postgres:postgres mode=0400" in lines
    assert lines[-2:] == ["RUN systemctl enable cron", "RUN systemctl restart cron"]


class RecordingRunner(bootstrap.Runner):
    """Runs nothing: records commands and answers the filesystem probe as told."""

    def __init__(self, has_filesystem: bool):
        super().__init__(dry_run=False)
        self.has_filesystem = has_filesystem
        self.commands: list[tuple[str, ...]] = []

    def run(self, *command, stdin=None):
        self.commands.append(command)
        return "1234-uuid\n" if command[0] == "blkid" else ""

    def probe(self, *command):
        self.commands.append(command)
        return self.has_filesystem


@pytest.mark.parametrize(("has_filesystem", "formats"), [(True, False), (False, True)])
def test_agent_formats_only_a_blank_volume_and_mounts_it_once(tmp_path, monkeypatch, has_filesystem, formats):
    monkeypatch.setattr(bootstrap, "data_device", lambda dry_run: "/dev/nvme1n1")
    fstab = tmp_path / "fstab"
    fstab.write_text("UUID=root / ext4 defaults 0 1\n")
    for _ in range(2):  # a reboot runs the agent's mount step again
        runner = RecordingRunner(has_filesystem)
        bootstrap.mount_volume(runner, {"mount": "/var/lib/postgresql", "owner": "postgres:postgres"}, str(fstab))
        assert (("mkfs.xfs", "/dev/nvme1n1") in runner.commands) is formats
        assert runner.commands[-1] == ("mount", "/var/lib/postgresql")
    assert fstab.read_text().splitlines() == [
        "UUID=root / ext4 defaults 0 1", "UUID=1234-uuid /var/lib/postgresql xfs defaults,nofail,noatime 0 2"]


@pytest.mark.parametrize("host", ["monitoring-1", "grafana-1", "etcd-1", "clickhouse-1"])
def test_agent_runs_for_every_role(tmp_path, settings, topology, capsys, host):
    spec = _specs(settings, topology)[host]
    lines = _dry_run(tmp_path, spec, settings, capsys)
    started = [line.removeprefix("RUN systemctl restart ") for line in lines if line.startswith("RUN systemctl restart ")]
    assert started == list(spec.services)


def test_agent_script_runs_on_a_bare_python(tmp_path, settings, topology):
    """It runs on the image's python3 before anything is installed: standard library only."""
    spec = _specs(settings, topology)["etcd-1"]
    document = yaml.safe_load(render_cloud_init(spec, settings.environment, settings.region))
    files = {e["path"]: e["content"] for e in document["write_files"]}
    (tmp_path / "agent.py").write_text(files[AGENT_PATH])
    (tmp_path / "manifest.json").write_text(files[MANIFEST_PATH])
    result = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "agent.py"), "--manifest",
                             str(tmp_path / "manifest.json"), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "RUN systemctl restart etcd" in result.stdout


def test_agent_waits_for_a_parameter_that_is_not_readable_yet(monkeypatch):
    """Right after `pulumi up`, the role's policy or the parameter can lag: the agent retries, then gives up."""
    monkeypatch.setattr(bootstrap.time, "sleep", lambda seconds: None)

    class FlakyRunner(bootstrap.Runner):
        def __init__(self, failures):
            super().__init__(dry_run=False)
            self.failures, self.calls = failures, 0

        def run(self, *command, stdin=None):
            self.calls += 1
            if self.calls <= self.failures:
                raise subprocess.CalledProcessError(254, command)
            return "s3cret\n"

    runner = FlakyRunner(failures=2)
    assert bootstrap.ssm_value(runner, "eu-west-1", "/betting/dev/x", attempts=5) == "s3cret"
    assert runner.calls == 3
    with pytest.raises(subprocess.CalledProcessError):
        bootstrap.ssm_value(FlakyRunner(failures=5), "eu-west-1", "/betting/dev/x", attempts=5)
