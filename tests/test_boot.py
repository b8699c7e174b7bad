"""Boot: the user data is the stub and where to find the bundle, valid to the real cloud-init,
identical whatever the config; the agent runs on the image's own python3; the EBS step formats
only a blank volume; SSM reads are retried while a new parameter or policy is not visible yet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from infra.bundle import AGENT_COMMAND, AGENT_ROOT, digest_parameter_name, render_bundle
from infra.hostagent import agent
from infra.hosts import host_specs
from infra.render.cloudinit import HOST_CONFIG_PATH, STUB_PATH, render_cloud_init
from tests.test_delivery import EC2_USER_DATA_LIMIT

STUB = open(os.path.join(os.path.dirname(agent.__file__), "stub.py"), "rb").read()


def _user_data(host, settings, topology) -> bytes:
    return render_cloud_init(host, settings.environment, settings.region, topology.bundle_bucket)


def test_user_data_carries_the_stub_byte_for_byte_and_where_the_bundle_is(settings, topology):
    for host in topology.hosts:
        document = yaml.safe_load(_user_data(host, settings, topology))
        files = {entry["path"]: entry for entry in document["write_files"]}
        assert sorted(files) == sorted([HOST_CONFIG_PATH, STUB_PATH])
        assert files[STUB_PATH]["content"].encode() == STUB and files[STUB_PATH]["permissions"] == "0755"
        assert json.loads(files[HOST_CONFIG_PATH]["content"]) == {
            "host": host.name, "environment": settings.environment, "region": settings.region,
            "bucket": topology.bundle_bucket, "digest_parameter": digest_parameter_name(settings.environment, host.name)}
        assert document["runcmd"] == [[STUB_PATH]]
        assert (document["hostname"], document["fqdn"]) == (host.name, host.fqdn)
        assert len(_user_data(host, settings, topology)) < EC2_USER_DATA_LIMIT


def test_the_real_cloud_init_accepts_every_user_data(tmp_path, settings, topology):
    """cloud-init's own schema check (Debian 12's 22.4), as a host's first boot reads it."""
    assert shutil.which("cloud-init"), "cloud-init is not installed: run `make system-deps`"
    for host in topology.hosts:
        path = tmp_path / f"{host.name}.yaml"
        path.write_bytes(_user_data(host, settings, topology))
        result = subprocess.run(["cloud-init", "schema", "-c", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (host.name, result.stdout, result.stderr)


def test_the_agent_from_a_bundle_runs_on_the_images_python_with_nothing_installed(tmp_path, settings, topology):
    """/usr/bin/python3 in isolated mode (no site-packages, no venv): the standard library is all it has."""
    spec = next(s for s in host_specs(settings, topology) if s.host.role == "postgres")
    bundle = json.loads(render_bundle(spec, settings, topology))
    for file in bundle["files"]:
        if file["path"].startswith(AGENT_ROOT) or file["path"] == AGENT_COMMAND:
            target = tmp_path / file["path"].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file["content"])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / AGENT_ROOT.lstrip("/"))}
    result = subprocess.run(["/usr/bin/python3", "-S", "-m", "infra.hostagent.agent", "--help"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fetch-apply" in result.stdout
    launcher = (tmp_path / AGENT_COMMAND.lstrip("/")).read_text()
    assert f"PYTHONPATH={AGENT_ROOT}" in launcher and "exec /usr/bin/python3 -m infra.hostagent.agent" in launcher
    stub = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", STUB.decode().split("\ndef main")[0]],
                          capture_output=True, text=True)
    assert stub.returncode == 0, stub.stderr  # the stub, too, imports nothing outside the standard library


class RecordingHost(agent.DebianHost):
    """Runs nothing: records commands and answers the file-system probes as told."""

    def __init__(self, has_filesystem: bool, mounted: bool = False):
        super().__init__("eu-west-1")
        self.has_filesystem, self.mounted = has_filesystem, mounted
        self.commands: list[tuple[str, ...]] = []

    def run(self, *command):
        self.commands.append(command)
        return "1234-uuid\n" if command[0] == "blkid" else "/dev/nvme0n1p1\n"

    def succeeds(self, *command):
        self.commands.append(command)
        if command[0] == "findmnt":
            return self.mounted
        return self.has_filesystem

    def _data_device(self):
        return "/dev/nvme1n1"


@pytest.mark.parametrize(("has_filesystem", "formats"), [(True, False), (False, True)])
def test_the_volume_step_formats_only_a_blank_volume_and_mounts_it_once(tmp_path, monkeypatch, has_filesystem, formats):
    fstab = tmp_path / "fstab"
    fstab.write_text("UUID=root / ext4 defaults 0 1\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fstab if path == "/etc/fstab" else path, *a, **k))
    volume = {"mount": str(tmp_path / "data"), "owner": "postgres:postgres"}
    for _ in range(2):  # a second apply, or an apply after a reboot, finds the fstab line already there
        host = RecordingHost(has_filesystem)
        assert host.mount(volume) is True
        assert (("mkfs.xfs", "/dev/nvme1n1") in host.commands) is formats
        assert host.commands[-1] == ("mount", volume["mount"])
    assert fstab.read_text().splitlines() == [
        "UUID=root / ext4 defaults 0 1", f"UUID=1234-uuid {volume['mount']} xfs defaults,nofail,noatime 0 2"]
    mounted = RecordingHost(has_filesystem=True, mounted=True)
    assert mounted.mount(volume) is False and not any(c[0] in ("mkfs.xfs", "mount") for c in mounted.commands)


def test_a_secret_that_is_not_readable_yet_is_retried_then_given_up(monkeypatch):
    """Right after `pulumi up` the role's policy or the parameter can lag."""
    monkeypatch.setattr(agent.time, "sleep", lambda seconds: None)

    class Flaky(agent.DebianHost):
        def __init__(self, failures):
            super().__init__("eu-west-1")
            self.failures, self.calls = failures, 0

        def run(self, *command):
            self.calls += 1
            if self.calls <= self.failures:
                raise subprocess.CalledProcessError(254, command)
            return "s3cret\n"

    host = Flaky(failures=2)
    assert host.secret("/betting/dev/x", attempts=5) == "s3cret" and host.calls == 3
    with pytest.raises(subprocess.CalledProcessError):
        Flaky(failures=5).secret("/betting/dev/x", attempts=5)


def test_the_stub_and_the_agent_agree_on_where_things_are():
    """The stub cannot import the agent (it runs before the agent exists): the paths are checked here."""
    from infra.hostagent import stub

    assert (stub.HOST_CONFIG, stub.AGENT_ROOT, stub.AGENT_COMMAND) == (
        agent.HOST_CONFIG, agent.AGENT_ROOT, agent.AGENT_COMMAND)
    assert stub.BUNDLES == f"{agent.STATE_DIR}/bundles"
