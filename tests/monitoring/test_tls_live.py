"""The real Prometheus 2.42 and Alertmanager 0.25 serving the rendered web config: TLS with a CA-signed certificate
and basic auth, the credential checked against the bcrypt hash the Monitoring component stores.

The web config is the one `infra.render.webconfig.web_config` renders (the sandbox's bcrypt hash in place of
pulumi-random's), the scrape and alerting settings (https, CA, password_file) are the rendered prometheus.yml's;
only addresses and the secrets folder are mapped (tests/monitoring/harness.py). What it cannot see: EC2's DNS
names in the certificate (the test's names 127.0.0.1, as the sandbox's do), and pulumi-random's own hash (same
bcrypt format, cost 10).
"""

from __future__ import annotations

import time

import pytest
import requests

from infra.render.webconfig import MONITORING_USER
from infra.sandbox.platform import monitoring_web_config
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import stack_config
from tests.monitoring.conftest import binary, render_all
from tests.monitoring.harness import Webhook, start_stack

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    settings = load_settings(stack_config("prod"), "prod")
    files = render_all(settings, build_topology(settings))
    webhook = Webhook()
    stack = start_stack(tmp_path_factory.mktemp("tls"), files, {}, webhook,
                        {"scrape_interval": "1s", "evaluation_interval": "1s"}, prometheus_bin=binary("prometheus"),
                        alertmanager_bin=binary("prometheus-alertmanager"), self_scrape=True)
    try:
        yield stack
    finally:
        stack.stop()
        webhook.close()


def _plain(stack) -> requests.Session:
    """A client that trusts the stack's CA but sends no credential."""
    client = requests.Session()
    client.trust_env = False
    client.verify = str(stack.ca_file)
    return client


def _silence() -> dict:
    now = time.time()
    return {"matchers": [{"name": "alertname", "value": "TlsLiveTest", "isRegex": False}],
            "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 300)),
            "createdBy": "test_tls_live", "comment": "refused without credentials"}


def test_alertmanager_refuses_a_silence_without_credentials_and_takes_it_with_them(tls_stack):
    url = f"{tls_stack.alertmanager_url}/api/v2/silences"
    refused = _plain(tls_stack).post(url, json=_silence(), timeout=5)
    assert refused.status_code == 401, refused.text
    wrong = _plain(tls_stack).post(url, json=_silence(), auth=(MONITORING_USER, "not-the-password"), timeout=5)
    assert wrong.status_code == 401
    accepted = tls_stack.client.post(url, json=_silence(), timeout=5)
    assert accepted.status_code == 200, accepted.text
    silence_id = accepted.json()["silenceID"]
    listed = tls_stack.client.get(url, timeout=5).json()
    assert silence_id in [s["id"] for s in listed]


def test_prometheus_refuses_an_unauthenticated_query(tls_stack):
    url = f"{tls_stack.prometheus_url}/api/v1/query"
    assert _plain(tls_stack).get(url, params={"query": "up"}, timeout=5).status_code == 401
    assert tls_stack.client.get(url, params={"query": "up"}, timeout=5).json()["status"] == "success"


def test_plain_http_and_an_unknown_ca_get_nothing(tls_stack):
    """TLS is not optional: plain HTTP is answered with a 400 (Go's reply to HTTP on a TLS port, no data), and a
    client that does not trust the stack's CA fails the handshake."""
    plain = requests.get(tls_stack.prometheus_url.replace("https://", "http://") + "/api/v1/query",
                         params={"query": "up"}, timeout=5)
    assert plain.status_code == 400 and "success" not in plain.text
    untrusting = requests.Session()
    untrusting.trust_env = False  # the system's bundle, which does not hold the stack's CA
    with pytest.raises(requests.exceptions.SSLError):
        untrusting.get(f"{tls_stack.prometheus_url}/-/ready", timeout=5)


def test_prometheus_scrapes_itself_and_the_alertmanager_over_tls_with_basic_auth(tls_stack):
    """The rendered jobs (https, the CA, password_file) against the servers' web config: both targets up, and the
    alerting path (same settings) has discovered the Alertmanager."""
    deadline = time.monotonic() + 15
    while True:
        targets = tls_stack.client.get(f"{tls_stack.prometheus_url}/api/v1/targets", timeout=5).json()["data"]
        health = {t["labels"]["job"]: (t["health"], t["scrapeUrl"], t["lastError"]) for t in targets["activeTargets"]}
        if {"prometheus", "alertmanager"} <= set(health) and all(health[j][0] == "up" for j in ("prometheus", "alertmanager")):
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert all(health[j][1].startswith("https://") for j in ("prometheus", "alertmanager"))
    alertmanagers = tls_stack.client.get(f"{tls_stack.prometheus_url}/api/v1/alertmanagers", timeout=5).json()["data"]
    assert [a["url"] for a in alertmanagers["activeAlertmanagers"]] == [f"{tls_stack.alertmanager_url}/api/v2/alerts"]


def test_a_new_web_config_applies_without_a_restart(tls_stack):
    """exporter-toolkit reads the web config at every request: a rotated password (a new hash) is in force at once,
    which is why the monitoring role's secret files declare no reload."""
    original = tls_stack.web_config.read_text()
    try:
        tls_stack.web_config.write_text(monitoring_web_config("rotated-password"))
        old = tls_stack.client.get(f"{tls_stack.alertmanager_url}/api/v2/status", timeout=5)
        new = _plain(tls_stack).get(f"{tls_stack.alertmanager_url}/api/v2/status",
                                    auth=(MONITORING_USER, "rotated-password"), timeout=5)
        assert (old.status_code, new.status_code) == (401, 200)
    finally:
        tls_stack.web_config.write_text(original)
