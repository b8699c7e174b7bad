"""The stack's certificate authority: what the program declares with pulumi-tls, what each host may read, how a
renewal reaches a host, and the sandbox's own CA checked by the real `openssl verify`.

What these tests cannot see: pulumi-tls itself (no provider runs under the mock engine, so no real certificate
is signed here and the replacement of a certificate inside its early-renewal window is the provider's documented
behaviour, not observed) and SSM's versioning of a changed parameter. The sandbox's certificates are made with
`cryptography` to the same identities (infra/pki.py) and are served by the real daemons in the live tests.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from infra import pki
from infra.components.rollout import SECRETS_PATTERN, secrets_parameter, secrets_revision
from infra.hostagent import agent
from infra.sandbox.platform import SecretStore
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import stack_config
from tests.test_agent import RecordingPlatform, _bundle
from tests.test_program import named, of_type, plan


def _topology(stack: str):
    return build_topology(load_settings(stack_config(stack), stack))


def test_one_ca_per_stack_and_one_signed_pair_per_tls_host():
    topology = _topology("prod")
    ca = named("prod", "pki-ca-cert")
    assert ca.type == "tls:index/selfSignedCert:SelfSignedCert"
    assert ca.props["isCaCertificate"] is True
    assert set(ca.props["allowedUses"]) == set(pki.CA_USES)
    signed = {r.name: r for r in of_type("prod", "tls:index/locallySignedCert:LocallySignedCert")}
    tls_hosts = [h for h in topology.hosts if h.role in pki.TLS_ROLES]
    assert set(signed) == {f"pki-{h.name}-cert" for h in tls_hosts}
    # A ClickHouse host's pair serves only its node_exporter.
    assert all(f"pki-{h.name}-cert" in signed for h in topology.clickhouse) and topology.clickhouse
    for host in tls_hosts:
        request = named("prod", f"pki-{host.name}-request")
        assert request.props["subject"]["commonName"] == host.fqdn
        assert request.props["dnsNames"] == list(pki.identity(topology, host).dns_names)
        cert = signed[f"pki-{host.name}-cert"]
        assert {"server_auth", "client_auth"} <= set(cert.props["allowedUses"])
        assert cert.props["earlyRenewalHours"] < cert.props["validityPeriodHours"]


def test_postgres_certificates_name_the_load_balancer_names_clients_verify():
    topology = _topology("prod")
    request = named("prod", "pki-pg-2-request")
    assert set(request.props["dnsNames"]) == {"pg-2.prod.betting.internal", topology.postgres_primary_endpoint,
                                               topology.postgres_replica_endpoint}
    assert named("prod", "pki-etcd-1-request").props["dnsNames"] == ["etcd-1.prod.betting.internal"]


def test_every_key_is_a_secure_string_and_no_host_may_read_the_ca_key_or_another_hosts_pair():
    parameters = {p.props["name"]: p for p in of_type("prod", "ssm/parameter:Parameter")}
    for name in ["/betting/prod/tls_ca_key", *(n for n in parameters if n.endswith("/tls_key"))]:
        assert parameters[name].props["type"] == "SecureString"
        assert parameters[name].props["value"] == "[secret]"
    readable: dict[str, set[str]] = {}
    for policy in of_type("prod", "iam/rolePolicy:RolePolicy"):
        for statement in json.loads(policy.props["policy"])["Statement"]:
            if statement.get("Sid") == "ReadOwnSecrets":
                readable[policy.name] = {r.rsplit("parameter", 1)[1] for r in statement["Resource"]}
    assert not any("/betting/prod/tls_ca_key" in names for names in readable.values())
    for policy, names in readable.items():
        pairs = {n.split("/")[4] for n in names if "/hosts/" in n}
        host = policy.rsplit("-access", 1)[0].split("-", 1)[1]  # "postgres-pg-1-access" -> "pg-1"
        assert pairs <= {host}, (policy, pairs)


def test_the_stack_exports_the_ca_certificate():
    assert "ca_certificate" in plan("prod").outputs


def test_a_renewal_changes_the_rollout_parameter_and_nothing_else():
    """A renewed certificate is a new parameter version: the role's `secrets` parameter changes, so State Manager
    runs the association again; the digests (the bundles) stay."""
    pair = {"tls_ca_cert": 1, "hosts/pg-1/tls_key": 1, "hosts/pg-1/tls_cert": 1}
    before = [secrets_revision(pair), secrets_revision(pair)]
    after = [secrets_revision(pair), secrets_revision({**pair, "hosts/pg-1/tls_cert": 2})]
    assert secrets_parameter(before) != secrets_parameter(after)
    for association in of_type("prod", "ssm/association:Association"):
        parameters = association.props["parameters"]
        assert set(parameters) == {"digests", "secrets"}
        assert re.match(SECRETS_PATTERN, parameters["secrets"]), association.name
    document = json.loads(of_type("prod", "ssm/document:Document")[0].props["content"])
    assert "--secrets '{{ secrets }}'" in document["mainSteps"][0]["inputs"]["runCommand"][0]
    assert "secrets" in document["parameters"]


def test_a_renewed_certificate_is_rewritten_and_reloads_what_serves_it(tmp_path):
    bundle = _bundle("pg-1")
    cert = next(s for s in bundle["secret_files"] if s["path"].endswith("/" + pki.HOST_CERT))
    assert cert["parameter"] == "/betting/prod/hosts/pg-1/tls_cert"
    cert["reloads"] = [["patroni", "reload"]]  # as a role declares it (tls_files(reloads=...))
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    platform.calls.clear()
    platform.secrets[cert["parameter"]] = "renewed certificate"
    report = agent.apply(bundle, platform)
    # The exporters' copy is the same parameter: it is rewritten too (and reloads nothing, tests/monitoring/test_exporter_tls.py).
    assert sorted(report.changed) == sorted([cert["path"], pki.exporter_cert_path()])
    assert "reload patroni" in platform.calls
    assert open(platform.path(cert["path"])).read() == "renewed certificate"


def test_key_files_are_their_daemons_alone_and_the_ca_is_everyones():
    bundle = _bundle("etcd-1")
    files = {s["path"].rsplit("/", 1)[1]: s for s in bundle["secret_files"]}
    assert (files[pki.HOST_KEY]["owner"], files[pki.HOST_KEY]["mode"]) == ("etcd:etcd", "0400")
    assert files[pki.CA_CERT]["mode"] == "0444"
    assert files[pki.CA_CERT]["parameter"] == "/betting/prod/tls_ca_cert"


@pytest.fixture
def store(tmp_path):
    return SecretStore(tmp_path / "secrets", {})


def _openssl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True)


def test_the_sandbox_ca_signs_each_hosts_pair_for_the_loopback_names(store, tmp_path):
    key = store.get("/betting/prod/hosts/pg-1/tls_key")
    cert = store.get("/betting/prod/hosts/pg-1/tls_cert")
    other = store.get("/betting/prod/hosts/pg-2/tls_cert")
    assert cert != other
    (tmp_path / "host.crt").write_text(cert)
    verified = _openssl("verify", "-CAfile", str(store.ca_file()), "-purpose", "sslserver", str(tmp_path / "host.crt"))
    assert verified.returncode == 0, verified.stderr
    assert _openssl("verify", "-CAfile", str(store.ca_file()), "-purpose", "sslclient",
                    str(tmp_path / "host.crt")).returncode == 0
    text = _openssl("x509", "-noout", "-ext", "subjectAltName", stdin=cert).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    # The key is the certificate's.
    assert _openssl("pkey", "-pubout", stdin=key).stdout == _openssl("x509", "-noout", "-pubkey", stdin=cert).stdout


def test_a_certificate_from_another_ca_does_not_verify(store, tmp_path):
    other = SecretStore(tmp_path / "elsewhere", {})
    (tmp_path / "foreign.crt").write_text(other.get("hosts/pg-1/tls_cert"))
    assert _openssl("verify", "-CAfile", str(store.ca_file()), str(tmp_path / "foreign.crt")).returncode != 0


def test_every_secret_a_host_reads_is_made_by_the_program_so_its_version_reaches_the_rollout():
    """secret_revision (infra/program.py) digests the versions of the parameters a host reads, as components register
    them through create_secret_parameter: a secret made elsewhere would rotate without rolling. Under the mock engine
    no version ever changes; that SSM gives a changed value a new version is AWS's documented behaviour."""
    from infra.hosts import host_specs

    settings = load_settings(stack_config("prod"), "prod")
    made = {p.props["name"] for p in of_type("prod", "ssm/parameter:Parameter")}
    for spec in host_specs(settings, build_topology(settings)):
        for name in spec.secret_names:
            assert f"/betting/prod/{name}" in made, (spec.host.name, name)
    assert secrets_revision({"a": 1, "b": 2}) == secrets_revision({"b": 2, "a": 1}) != secrets_revision({"a": 1, "b": 3})
