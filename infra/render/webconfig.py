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

The exporters (node_exporter, postgres_exporter) have a web config of their own, `exporter_web_config`: TLS with the
exporters' copy of the host's pair, no login (what they serve is what the security group lets Prometheus scrape);
it holds no secret, so it is an ordinary rendered file (Paths.EXPORTER_WEB_CONFIG). redis_exporter is not built on
exporter-toolkit: it takes the same pair by its own flags (`redis_exporter_tls_flags`).
"""

from __future__ import annotations

import yaml

from infra import pki
from infra.topology import Paths, SecretNames, secret_path

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



def exporter_web_config() -> str:
    """node_exporter's and postgres_exporter's web config: TLS only, with the exporters' copy of the host's pair
    (absolute names: the file is not in the secrets folder). exporter-toolkit reads it, and the pair, at every
    connection: a renewed certificate is served without a restart."""
    document = {"tls_server_config": {"cert_file": pki.exporter_cert_path(), "key_file": pki.exporter_key_path(),
                                      "min_version": MIN_TLS_VERSION}}
    return yaml.safe_dump(document, sort_keys=False)


def exporter_server_flags() -> tuple[str, ...]:
    return (f"--web.config.file={Paths.EXPORTER_WEB_CONFIG}",)


def redis_exporter_tls_flags() -> tuple[str, ...]:
    """redis_exporter 1.45's own TLS serving flags, with the same pair (it loads the pair at every handshake)."""
    return (f"--tls-server-cert-file={pki.exporter_cert_path()}", f"--tls-server-key-file={pki.exporter_key_path()}",
            "--tls-server-min-version=TLS1.2")


def exporter_client_config() -> dict:
    """What Prometheus scrapes an exporter with: https, the target's certificate verified against the stack's CA by
    the target's name (its FQDN, which the host certificate names)."""
    return {"scheme": "https", "tls_config": {"ca_file": pki.ca_path()}}
