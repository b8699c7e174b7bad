"""The exporters' TLS as rendered: the exporter web config promtool accepts, every host's copy of its pair for the
exporters (prometheus' own, from the host's SSM parameters), the flags each exporter serves it with, Prometheus'
https scrape jobs and the agent's https gates.

The real exporters serving these files are tests/monitoring/test_exporter_tls_live.py; the sandbox runs them on
every host it runs (tests/postgres/test_gates_live.py)."""

from __future__ import annotations

import shlex
import subprocess

import pytest
import yaml

from infra import pki
from infra.bundle import bundle_document
from infra.hosts import host_specs
from infra.render.prometheus import render_prometheus
from infra.render.webconfig import exporter_web_config
from infra.sandbox.mapping import map_bytes
from infra.sandbox.platform import ca_identity, signed_identity
from infra.topology import Paths, Ports, secret_path
from tests.monitoring.conftest import binary

EXPORTER_UNITS = {"prometheus-node-exporter": Ports.NODE_EXPORTER, "prometheus-postgres-exporter": Ports.POSTGRES_EXPORTER,
                  "prometheus-redis-exporter": Ports.REDIS_EXPORTER}


def _args(spec, path: str) -> list[str]:
    """The ARGS of an exporter's /etc/default file, as the unit's `$ARGS` splits them."""
    content = next(f.content for f in spec.files if f.path == path).decode()
    line = next(x for x in content.splitlines() if x.startswith("ARGS="))
    return shlex.split(shlex.split(line.removeprefix("ARGS="))[0])


def test_promtool_accepts_the_exporter_web_config_with_the_exporters_pair(tmp_path):
    """The web config names the copy by absolute paths: rooted in a folder here, as the sandbox roots a host's."""
    ca_cert, ca_key = ca_identity("test CA")
    cert, key = signed_identity(ca_cert, ca_key, "pg-1")
    secrets = tmp_path / Paths.SECRETS_DIR.lstrip("/")
    secrets.mkdir(parents=True)
    (secrets / pki.EXPORTER_CERT).write_text(cert)
    (secrets / pki.EXPORTER_KEY).write_text(key)
    config = tmp_path / "exporter-web.yml"
    config.write_bytes(map_bytes(exporter_web_config().encode(), {}, tmp_path))
    check = [binary("promtool"), "check", "web-config", str(config)]
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (secrets / pki.EXPORTER_KEY).unlink()  # the same file without its key is refused: the names are really read
    assert subprocess.run(check, capture_output=True, text=True).returncode != 0


def test_the_exporter_web_config_is_tls_only_and_holds_no_secret():
    document = yaml.safe_load(exporter_web_config())
    assert set(document) == {"tls_server_config"}
    assert document["tls_server_config"] == {"cert_file": pki.exporter_cert_path(), "key_file": pki.exporter_key_path(),
                                             "min_version": "TLS12"}


def test_every_host_has_the_exporters_copy_of_its_own_pair(settings, topology):
    """Same SSM parameters as the host's key and certificate (no new grant), other files, prometheus' alone."""
    for spec in host_specs(settings, topology):
        ident = pki.identity(topology, spec.host)
        secrets = {s.name: s for s in spec.secret_files}
        key, cert = secrets[pki.EXPORTER_KEY], secrets[pki.EXPORTER_CERT]
        assert (key.owner, key.mode, key.parameter_name) == ("prometheus:prometheus", "0400", ident.key_parameter)
        assert (cert.owner, cert.mode, cert.parameter_name) == ("prometheus:prometheus", "0444", ident.cert_parameter)
        # The exporters load the pair at every handshake: a renewed one needs no reload (the live test shows it).
        assert key.reloads == () and cert.reloads == ()
        if spec.host.role in pki.KEY_OWNERS:  # the role's daemons keep their own copy, as before
            assert secrets[pki.HOST_KEY].owner == pki.KEY_OWNERS[spec.host.role]
        else:
            assert spec.host.role == "clickhouse" and pki.HOST_KEY not in secrets
        assert spec.host.fqdn in ident.dns_names


def test_every_exporter_serves_tls_with_the_copy(settings, topology):
    for spec in host_specs(settings, topology):
        files = {f.path: f for f in spec.files}
        assert files[Paths.EXPORTER_WEB_CONFIG].content == exporter_web_config().encode()
        flag = f"--web.config.file={Paths.EXPORTER_WEB_CONFIG}"
        assert flag in _args(spec, "/etc/default/prometheus-node-exporter")
        if spec.host.role == "postgres":
            assert flag in _args(spec, "/etc/default/prometheus-postgres-exporter")
        if spec.host.role == "monitoring":
            args = _args(spec, "/etc/default/prometheus-redis-exporter")
            assert f"--tls-server-cert-file={pki.exporter_cert_path()}" in args
            assert f"--tls-server-key-file={pki.exporter_key_path()}" in args
        secrets = {secret_path(s.name) for s in spec.secret_files}
        assert {pki.exporter_cert_path(), pki.exporter_key_path()} <= secrets


def test_prometheus_scrapes_the_exporters_over_https_with_the_ca(settings, topology):
    spec = next(s for s in host_specs(settings, topology) if s.host.role == "monitoring")
    config = yaml.safe_load(render_prometheus(settings, topology)["prometheus/prometheus.yml"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    secrets = {secret_path(s.name) for s in spec.secret_files}
    for name in ("node", "postgres", "redis"):
        job = jobs[name]
        assert job["scheme"] == "https" and job["tls_config"] == {"ca_file": pki.ca_path()}, job
        assert job["tls_config"]["ca_file"] in secrets
        for entry in job["static_configs"]:  # by FQDN: the name the target's certificate has
            assert all(t.rsplit(":", 1)[0].endswith("." + topology.dns_zone) for t in entry["targets"])
    # The client path stays plain: HAProxy's stats port answers the load balancer's HTTP health checks too.
    assert "scheme" not in jobs["pgbouncer"] and "scheme" not in jobs["haproxy"]


@pytest.mark.parametrize("role", ["etcd", "postgres", "monitoring", "grafana", "clickhouse"])
def test_the_exporters_gates_ask_by_the_hosts_name_with_the_ca(settings, topology, role):
    spec = next(s for s in host_specs(settings, topology) if s.host.role == role)
    gates = {s["unit"]: s["gate"] for s in bundle_document(spec, settings, topology)["services"]}
    exporters = [u for u in gates if u in EXPORTER_UNITS]
    assert "prometheus-node-exporter" in exporters
    for unit in exporters:
        assert gates[unit] == {"kind": "http", "url": f"https://{spec.host.fqdn}:{EXPORTER_UNITS[unit]}/metrics",
                               "ca": pki.ca_path()}
