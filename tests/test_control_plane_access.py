"""Patroni's REST API and etcd as their clients are told to reach them: over TLS by the names the certificates
have, with the login only where Patroni asks for it. The live proofs (401 without the login, etcd refusing a
client without a certificate, HAProxy's TLS checks finding the leader) are in tests/postgres/test_cluster_live.py."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import yaml

from infra import pki
from infra.bundle import bundle_document
from infra.hostagent import patroni
from infra.hosts import host_specs
from infra.render.haproxy import render_haproxy
from infra.render.patroni import RESTAPI_CREDENTIALS_ENV
from infra.render.prometheus import render_prometheus
from infra.sandbox import mapping as m
from infra.sandbox.platform import ca_identity
from infra.topology import Ports, SecretNames


def test_the_agent_sends_the_login_on_unsafe_calls_only_and_verifies_with_the_ca(monkeypatch, tmp_path):
    seen = []

    class Answer:
        status = 200

        def read(self):
            return b"{}"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(request, timeout, context=None):
        seen.append((request.get_method(), request.get_header("Authorization"), context))
        return Answer()

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(patroni, "_access", {"context": None, "authorization": None})
    ca = tmp_path / "ca.crt"
    ca.write_text(ca_identity("test CA")[0])
    patroni.configure(str(ca), "patroni", "s3cret")
    patroni._call("GET", "https://pg-1.prod.betting.internal:8008/cluster")
    patroni._call("POST", "https://pg-1.prod.betting.internal:8008/switchover", {"leader": "pg-1"})
    (get_method, get_auth, get_context), (post_method, post_auth, post_context) = seen
    assert (get_method, get_auth) == ("GET", None)
    assert post_method == "POST" and post_auth == "Basic cGF0cm9uaTpzM2NyZXQ="  # patroni:s3cret
    assert get_context is post_context is not None


def test_haproxys_checks_verify_patroni_by_the_nodes_name_and_the_sandbox_by_loopback(settings, topology):
    (config,) = render_haproxy(settings, topology).values()
    text = config.decode()
    assert text.count(f"check-ssl verify required ca-file {pki.ca_path()}") == 2  # each proxy's default-server
    for node in topology.postgres:
        assert f"server {node.name} {node.fqdn}:{Ports.PGBOUNCER} check port {Ports.PATRONI_API} verifyhost {node.fqdn}" in text
    layout = m.Layout(Path("/tmp/state"), 25000)
    node = topology.postgres[0]
    mapped = m.map_file(layout, topology, node, "/etc/haproxy/haproxy.cfg", config).decode()
    assert "verifyhost 127.0.0.1" in mapped and ".betting.internal" not in mapped
    assert f"ca-file {layout.host_path(node, pki.ca_path())}" in mapped


def test_bundles_reach_patroni_and_etcd_by_name_over_tls_and_carry_the_login_only_as_a_secret(settings, topology):
    for spec in host_specs(settings, topology):
        document = bundle_document(spec, settings, topology)
        gates = {s["unit"]: s["gate"] for s in document["services"]}
        if spec.host.role == "postgres":
            api = f"https://{spec.host.fqdn}:{Ports.PATRONI_API}"
            assert document["patroni"]["api"] == gates["patroni"]["api"] == api
            assert document["patroni"]["ca_file"] == gates["patroni"]["ca_file"] == pki.ca_path()
            (env,) = [e for e in document["secret_environments"] if e["unit"] == "patroni"]
            assert document["patroni"]["credentials"] == env["path"]
            assert set(RESTAPI_CREDENTIALS_ENV) <= set(env["variables"])
            assert {SecretNames.PATRONI_RESTAPI_USERNAME, SecretNames.PATRONI_RESTAPI_PASSWORD} <= set(spec.secret_names)
            backup = next(f for f in document["files"] if f["path"] == "/etc/betting/pg-backup.env")["content"]
            assert f'PATRONI_URL="{api}"' in backup
        if spec.host.role == "etcd":
            assert gates["etcd"]["url"] == document["etcd"]["url"] == f"https://{spec.host.fqdn}:{Ports.ETCD_CLIENT}"
            tls = {"ca_file": pki.ca_path(), "cert": pki.cert_path(), "key": pki.key_path()}
            assert gates["etcd"]["tls"] == document["etcd"]["tls"] == tls
            assert all(url.startswith("https://") for url in document["etcd"]["client_urls"].values())
            exporters = {pki.exporter_key_path(), pki.exporter_cert_path()}  # the exporters load theirs per handshake
            assert all(s["reloads"] == [["etcd", "restart"]] for s in document["secret_files"] if s["path"] not in exporters)


def test_prometheus_scrapes_patroni_and_etcd_over_tls_with_its_client_certificate_for_etcd(settings, topology):
    config = yaml.safe_load(render_prometheus(settings, topology)["prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["patroni"]["scheme"] == jobs["etcd"]["scheme"] == "https"
    assert jobs["patroni"]["tls_config"] == {"ca_file": pki.ca_path()}
    assert jobs["etcd"]["tls_config"] == {"ca_file": pki.ca_path(), "cert_file": pki.cert_path(), "key_file": pki.key_path()}
