"""The real node_exporter 1.5, postgres_exporter 0.11.1 and redis_exporter 1.45 serving TLS with the rendered
settings: the exporter web config (infra.render.webconfig.exporter_web_config) for the first two, redis_exporter's
own rendered flags, each naming the exporters' copy of the host's pair.

The pair is signed by a CA of the test's (as the sandbox's SecretStore does) for 127.0.0.1, and the files' absolute
paths are rooted in a folder, as the sandbox roots a host's. What it cannot see: EC2's names in the certificate (the
FQDN a scrape verifies; tests/monitoring/test_exporter_tls.py checks the jobs target it), and the exporters' other
flags (textfile folder, queries, the Redis and PostgreSQL they read: nothing here for them to read).
Ports 27960-27962.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests
from cryptography import x509

from infra import pki
from infra.render.webconfig import exporter_server_flags, exporter_web_config, redis_exporter_tls_flags
from infra.sandbox.mapping import LOOPBACK, map_bytes
from infra.sandbox.platform import ca_identity, signed_identity
from infra.topology import Paths
from tests.monitoring.conftest import binary
from tests.ports import port

pytestmark = pytest.mark.live

NOWHERE = port(27963)  # nothing listens here: the exporters' PostgreSQL and Redis are down, their /metrics still serves


class Exporters:
    def __init__(self, root: Path):
        self.root = root
        self.secrets = root / Paths.SECRETS_DIR.lstrip("/")
        self.secrets.mkdir(parents=True)
        self.ca_cert, self.ca_key = ca_identity("exporters test CA")
        self.ca_file = root / "ca.crt"
        self.ca_file.write_text(self.ca_cert)
        self.ports = {"node": port(27960), "postgres": port(27961), "redis": port(27962)}
        self.processes: list[subprocess.Popen] = []

    def issue(self) -> int:
        """A new pair for 127.0.0.1 in the exporters' files (as the agent writes a renewed one); its serial."""
        cert, key = signed_identity(self.ca_cert, self.ca_key, LOOPBACK)
        (self.secrets / pki.EXPORTER_KEY).write_text(key)
        (self.secrets / pki.EXPORTER_CERT).write_text(cert)
        return x509.load_pem_x509_certificate(cert.encode()).serial_number

    def rooted(self, values: tuple[str, ...]) -> list[str]:
        return [map_bytes(v.encode(), {}, self.root).decode() for v in values]

    def start(self) -> None:
        web_config = self.root / Paths.EXPORTER_WEB_CONFIG.lstrip("/")
        web_config.parent.mkdir(parents=True)
        web_config.write_bytes(map_bytes(exporter_web_config().encode(), {}, self.root))
        listen = {name: f"--web.listen-address={LOOPBACK}:{number}" for name, number in self.ports.items()}
        commands = {
            "node": [binary("prometheus-node-exporter"), listen["node"], *self.rooted(exporter_server_flags())],
            "postgres": [binary("prometheus-postgres-exporter"), listen["postgres"], *self.rooted(exporter_server_flags())],
            "redis": [binary("prometheus-redis-exporter"), listen["redis"], f"--redis.addr=redis://{LOOPBACK}:{NOWHERE}",
                      *self.rooted(redis_exporter_tls_flags())],
        }
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "DATA_SOURCE_NAME": f"postgresql://nobody@{LOOPBACK}:{NOWHERE}/postgres?sslmode=disable"}
        for name, command in commands.items():
            log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process' life
            self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        for name, number in self.ports.items():
            deadline = time.monotonic() + 15
            while not _listening(number):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} exporter did not listen: {(self.root / f'{name}.log').read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(10)

    def url(self, name: str, scheme: str = "https") -> str:
        return f"{scheme}://{LOOPBACK}:{self.ports[name]}/metrics"


def _listening(number: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, number)) == 0


def _served_serial(number: int, ca_file: Path) -> int:
    """The serial of the certificate a new TLS connection is served, verified against the CA by 127.0.0.1."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((LOOPBACK, number), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=LOOPBACK) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


@pytest.fixture(scope="module")
def exporters(tmp_path_factory):
    running = Exporters(tmp_path_factory.mktemp("exporter-tls"))
    running.issue()
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("name, metric", [("node", "node_exporter_build_info"), ("postgres", "pg_up"),
                                          ("redis", "redis_up")])
def test_the_exporter_serves_its_metrics_over_tls_verified_by_the_ca(exporters, name, metric):
    response = requests.get(exporters.url(name), verify=str(exporters.ca_file), timeout=10)
    assert response.status_code == 200 and metric in response.text


@pytest.mark.parametrize("name", ["node", "postgres", "redis"])
def test_a_client_trusting_another_ca_is_refused_and_plain_http_gets_no_metrics(exporters, name, tmp_path):
    other_cert, _ = ca_identity("another CA")
    other = tmp_path / "other-ca.crt"
    other.write_text(other_cert)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(exporters.url(name), verify=str(other), timeout=10)
    # Go answers HTTP on a TLS port with a 400 and no metrics.
    plain = requests.get(exporters.url(name, "http"), timeout=10)
    assert plain.status_code == 400 and "# HELP" not in plain.text


def test_a_renewed_pair_is_served_at_the_next_connection_without_a_restart(exporters):
    """exporter-toolkit (node_exporter, postgres_exporter) and redis_exporter load the pair at every handshake: the
    agent writing a renewed one is enough (the copy's SecretFile reloads nothing)."""
    before = {name: _served_serial(number, exporters.ca_file) for name, number in exporters.ports.items()}
    renewed = exporters.issue()
    after = {name: _served_serial(number, exporters.ca_file) for name, number in exporters.ports.items()}
    assert set(before.values()) != {renewed}
    assert after == {name: renewed for name in exporters.ports}
    assert all(process.poll() is None for process in exporters.processes)
