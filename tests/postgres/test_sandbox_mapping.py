"""The sandbox changes hosts, ports and paths in the rendered files, and not one other byte."""

from __future__ import annotations

import re

import yaml

from infra.sandbox import mapping as m
from infra.sandbox import monitoring
from infra.sandbox.runner import Sandbox

# Services the sandbox does not run keep their DNS names (their scrape jobs report "not deployed").
NOT_IN_SANDBOX = ("grafana-", "clickhouse-", "api.")


def _files(settings, tmp_path):
    sandbox = Sandbox(tmp_path / "state", 25000, settings=settings)
    return sandbox, sandbox.rendered_files()


def test_every_file_differs_from_the_rendered_one_only_in_mapped_tokens(settings, tmp_path):
    _, files = _files(settings, tmp_path)
    assert any(path.startswith("patroni/") for path in files) and any(path.startswith("etcd/") for path in files)
    for path, (content, mapping) in files.items():
        mapped = m.map_bytes(content, mapping)
        between_rendered = m.unmapped_parts(content, [key for key in mapping if key in content]) if any(
            key in content for key in mapping) else [content]
        used = {value for key, value in mapping.items() if key in content}
        between_mapped = m.unmapped_parts(mapped, used) if used else [mapped]
        assert between_rendered == between_mapped, path
        # The mapping did something wherever the file names a host, a port or a path of ours.
        if any(key in content for key in mapping):
            assert mapped != content, path


def test_sandbox_files_listen_and_connect_on_loopback_only(settings, tmp_path):
    sandbox, files = _files(settings, tmp_path)
    zone = settings.dns_zone.encode()
    for path, (content, mapping) in files.items():
        mapped = m.map_bytes(content, mapping)
        assert b"0.0.0.0" not in mapped, path
        for name in re.findall(rb"[a-z0-9.-]+\." + re.escape(zone), mapped):
            assert name.decode().startswith(NOT_IN_SANDBOX), (path, name)
        ports = {int(p) for p in re.findall(rb"127\.0\.0\.1:(\d+)", mapped)}
        assert ports <= set(sandbox.layout.ports(sandbox.topology)), (path, ports)


def test_only_declared_non_address_changes(settings, tmp_path):
    """Besides hosts/ports/paths, only the pgBackRest binary (no S3) and a required watchdog (no device) change."""
    sandbox, files = _files(settings, tmp_path)
    for node in sandbox.topology.postgres:
        content, mapping = files[f"patroni/{node.name}.yml"]
        mapped = m.map_bytes(content, mapping).decode()
        assert "/usr/bin/pgbackrest" not in mapped and f"{m.NO_S3_BIN} --config=" in mapped
        config = yaml.safe_load(mapped)
        expected = "automatic" if settings.patroni.watchdog == "required" else settings.patroni.watchdog
        assert config["watchdog"]["mode"] == expected
        assert config["postgresql"]["data_dir"] == str(sandbox.layout.data_dir(node))


def test_map_bytes_replaces_longest_token_first():
    mapping = {b"/var/lib/prometheus": b"/s/prom", b"/var/lib/prometheus/alertmanager": b"/s/am"}
    assert m.map_bytes(b"a /var/lib/prometheus/alertmanager b /var/lib/prometheus/x", mapping) == b"a /s/am b /s/prom/x"


def test_monitoring_flags_are_mapped(settings, tmp_path):
    assert monitoring.available()
    sandbox, _ = _files(settings, tmp_path)
    for host in sandbox.topology.monitoring:
        prometheus, alertmanager = monitoring.flags(sandbox, host)
        joined = " ".join(prometheus + alertmanager)
        assert "0.0.0.0" not in joined and "/etc/prometheus" not in joined and "/var/lib/prometheus" not in joined
        assert f"--web.listen-address=127.0.0.1:{sandbox.layout.prometheus(host)}" in prometheus
        assert any(f"--storage.tsdb.retention.time={settings.monitoring.prometheus.retention_time}" == a for a in prometheus)
