"""The monitoring endpoints' TLS and basic auth: Prometheus' and Alertmanager's web config (exporter-toolkit's
`--web.config.file`), and what their clients (Prometheus itself, Grafana, the agent's gates, the scripts) send.

One credential, user MONITORING_USER, for every client of the monitoring API (they are trusted alike: Grafana's
Alertmanager data source may silence, as an operator may). Its password is a pulumi-random RandomPassword in SSM
(SecretNames.MONITORING_PASSWORD, read by clients from its file); the servers check its bcrypt hash. A hash is
still a secret (it can be brute-forced offline), so it never enters a rendered file: `web_config` renders the whole
web config from the hash, and Pulumi stores that as its own SecureString (SecretNames.MONITORING_WEB_CONFIG),
delivered to the host like any secret file. Its file names are relative: exporter-toolkit resolves them against
the web config's own folder, the secrets folder that holds the host's key and certificate (infra/pki.py), on EC2
and in the sandbox alike. The file is read at every request: a renewed certificate or a new hash needs no reload.
"""

from __future__ import annotations

import yaml

from infra import pki
from infra.topology import SecretNames, secret_path

MONITORING_USER = "monitoring"
MIN_TLS_VERSION = "TLS12"


def web_config_path() -> str:
    return secret_path(SecretNames.MONITORING_WEB_CONFIG)


def password_path() -> str:
    return secret_path(SecretNames.MONITORING_PASSWORD)


def web_config(password_hash: str) -> str:
    """The web config of Prometheus and Alertmanager, for the bcrypt hash of MONITORING_USER's password."""
    if not password_hash.startswith(("$2a$", "$2b$", "$2y$")):
        raise ValueError("the monitoring web config needs a bcrypt hash ($2a$, $2b$ or $2y$)")
    document = {
        "tls_server_config": {
            # Beside this file in Paths.SECRETS_DIR (exporter-toolkit resolves relative names against its folder).
            "cert_file": pki.HOST_CERT,
            "key_file": pki.HOST_KEY,
            "min_version": MIN_TLS_VERSION,
        },
        "basic_auth_users": {MONITORING_USER: password_hash},
    }
    return yaml.safe_dump(document, sort_keys=False)


def client_http_config() -> dict:
    """What Prometheus sends to a monitoring endpoint (its own, its peer's, the Alertmanagers'): https, verifying the
    host's certificate against the stack's CA, with the monitoring credential read from its file."""
    return {
        "scheme": "https",
        "tls_config": {"ca_file": pki.ca_path()},
        "basic_auth": {"username": MONITORING_USER, "password_file": password_path()},
    }


def server_flags() -> tuple[str, ...]:
    """The flag Prometheus and Alertmanager serve their web config with."""
    return (f"--web.config.file={web_config_path()}",)

