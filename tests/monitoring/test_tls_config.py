"""The monitoring endpoints' TLS and credentials as rendered: the web config promtool accepts, the clients
(Prometheus' jobs and alerting, Grafana's data sources, the agent's gates) pointing at files their host really
has, no secret and no hash in a rendered file; ClickHouse's users.d.

The real Prometheus and Alertmanager serving these are tests/monitoring/test_tls_live.py. Grafana and ClickHouse
have no Debian package here: their files are checked as data; what that cannot see is said per test."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET

import bcrypt
import pytest
import yaml

from infra import pki
from infra.bundle import bundle_document
from infra.hosts import host_specs
from infra.render.alertmanager import alertmanager_args
from infra.render.clickhouse import DEFAULT_PASSWORD_ENV, render_clickhouse
from infra.render.grafana import render_grafana
from infra.render.prometheus import prometheus_args, render_prometheus
from infra.render.webconfig import MONITORING_USER, password_path, web_config, web_config_path
from infra.sandbox.platform import ca_identity, signed_identity
from infra.topology import Paths, Ports, SecretNames, secret_path
from tests.monitoring.conftest import binary


def _spec(settings, topology, role: str):
    return next(s for s in host_specs(settings, topology) if s.host.role == role)


def test_promtool_accepts_the_web_config_beside_the_hosts_identity(tmp_path):
    """promtool resolves the relative cert and key names against the web config's folder, as the servers do."""
    ca_cert, ca_key = ca_identity("test CA")
    cert, key = signed_identity(ca_cert, ca_key, "monitoring-1")
    (tmp_path / pki.HOST_CERT).write_text(cert)
    (tmp_path / pki.HOST_KEY).write_text(key)
    config = tmp_path / SecretNames.MONITORING_WEB_CONFIG
    config.write_text(web_config(bcrypt.hashpw(b"pw", bcrypt.gensalt(10)).decode()))
    result = subprocess.run([binary("promtool"), "check", "web-config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / pki.HOST_KEY).unlink()  # without the key beside it the same file is refused: the names are resolved
    result = subprocess.run([binary("promtool"), "check", "web-config", str(config)], capture_output=True, text=True)
    assert result.returncode != 0


def test_web_config_needs_a_bcrypt_hash():
    with pytest.raises(ValueError, match="bcrypt"):
        web_config("plain-password")


def test_prometheus_and_alertmanager_serve_the_web_config(settings, topology):
    host = topology.monitoring[0]
    flag = f"--web.config.file={web_config_path()}"
    assert flag in prometheus_args(settings) and flag in alertmanager_args(settings, topology, host)
    spec = _spec(settings, topology, "monitoring")
    secrets = {s.name: s for s in spec.secret_files}
    for name in (SecretNames.MONITORING_WEB_CONFIG, SecretNames.MONITORING_PASSWORD, pki.HOST_KEY):
        assert (secrets[name].owner, secrets[name].mode) == ("prometheus:prometheus", "0400"), name


def test_prometheus_reaches_the_monitoring_endpoints_over_https_with_the_credential(settings, topology):
    config = yaml.safe_load(render_prometheus(settings, topology)["prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    client = {"scheme": "https", "tls_config": {"ca_file": pki.ca_path()},
              "basic_auth": {"username": MONITORING_USER, "password_file": password_path()}}
    for job in ("prometheus", "alertmanager"):
        assert {k: jobs[job][k] for k in client} == client, job
    assert jobs["grafana"]["scheme"] == "https" and jobs["grafana"]["tls_config"] == {"ca_file": pki.ca_path()}
    alerting = config["alerting"]["alertmanagers"][0]
    assert {k: alerting[k] for k in client} == client
    # The names Prometheus connects by are names the servers' certificates carry.
    for job in ("prometheus", "alertmanager", "grafana"):
        for target in (t for group in jobs[job]["static_configs"] for t in group["targets"]):
            name = target.rsplit(":", 1)[0]
            host = next(h for h in topology.hosts if h.fqdn == name)
            assert name in pki.identity(topology, host).dns_names


def test_grafana_serves_https_and_its_data_sources_verify_and_authenticate(settings, topology):
    """What it cannot see: a running Grafana expanding $__file{} (none here); the references are checked against
    the files the Grafana host really gets, owned by the grafana user that reads them."""
    files = render_grafana(settings, topology)
    ini = files["grafana/grafana.ini"].decode()
    for line in ("protocol = https", f"cert_file = {pki.cert_path()}", f"cert_key = {pki.key_path()}",
                 f"http_port = {Ports.GRAFANA}"):
        assert line in ini.splitlines(), line
    assert "admin_password =" not in ini
    spec = _spec(settings, topology, "grafana")
    readable = {secret_path(s.name): s for s in spec.secret_files}
    for source in yaml.safe_load(files["grafana/provisioning/datasources/datasources.yml"])["datasources"]:
        if source["uid"] == "amp":  # AWS's endpoint, SigV4 (tests/monitoring/test_managed_prometheus.py)
            continue
        assert source["url"].startswith("https://") and source["basicAuth"] is True
        assert source["basicAuthUser"] == MONITORING_USER and source["jsonData"]["tlsAuthWithCACert"] is True
        for value in source["secureJsonData"].values():
            path = value.removeprefix("$__file{").removesuffix("}")
            assert path in readable, value
            assert readable[path].owner.startswith("grafana:") or readable[path].mode == "0444"
        assert source["secureJsonData"]["basicAuthPassword"] == f"$__file{{{password_path()}}}"
    assert [f.path for f in spec.files if f.path == Paths.GRAFANA_CONFIG]
    # A renewed certificate needs a restart: Grafana reads it at start.
    assert {s.name: s.reloads for s in spec.secret_files}[pki.HOST_CERT] == (("grafana-server", "restart"),)


def test_no_rendered_file_holds_a_password_or_a_hash(settings, topology):
    """Every host's bundle (rendered files, gates): no bcrypt hash, no basic_auth_users; the web config is a secret."""
    for spec in host_specs(settings, topology):
        document = bundle_document(spec, settings, topology)
        text = yaml.safe_dump(document)
        assert "$2a$" not in text and "$2b$" not in text and "basic_auth_users" not in text, spec.host.name


def test_gates_ask_by_the_hosts_name_with_the_ca_and_the_credential(settings, topology):
    for role, units in (("monitoring", ("prometheus", "prometheus-alertmanager")), ("grafana", ("grafana-server",))):
        spec = _spec(settings, topology, role)
        gates = {s["unit"]: s["gate"] for s in bundle_document(spec, settings, topology)["services"]}
        secrets = {secret_path(s.name) for s in spec.secret_files}
        for unit in units:
            gate = gates[unit]
            assert gate["url"].startswith(f"https://{spec.host.fqdn}:"), gate
            assert spec.host.fqdn in pki.identity(topology, spec.host).dns_names
            assert gate["ca"] in secrets
            if role == "monitoring":
                assert gate["password_file"] in secrets and gate["username"] == MONITORING_USER


def test_clickhouse_default_user_takes_its_password_from_the_environment_and_only_the_vpc(settings, topology):
    """Structure only: ClickHouse (no Debian package here) is not run. What this cannot see: the server's merge of
    users.d over users.xml (`replace`) and its `from_env` substitution (documented for config and users files
    alike), i.e. that a login with the password works and one without is refused."""
    root = ET.fromstring(render_clickhouse(settings, topology)["clickhouse/users.d/default.xml"])
    default = root.find("users/default")
    password = default.find("password")
    assert password.attrib == {"from_env": DEFAULT_PASSWORD_ENV, "replace": "replace"} and not (password.text or "").strip()
    networks = default.find("networks")
    assert networks.get("replace") == "replace"
    assert [ip.text for ip in networks] == [settings.vpc_cidr]
    spec = _spec(settings, topology, "clickhouse")
    environment = {e.unit: dict(e.variables) for e in spec.secret_environments}
    assert environment["clickhouse-server"] == {DEFAULT_PASSWORD_ENV: SecretNames.CLICKHOUSE_DEFAULT_PASSWORD}
    assert f"{Paths.CLICKHOUSE_USERS_D}/default.xml" in [f.path for f in spec.files]
