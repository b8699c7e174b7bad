"""How the operator scripts reach the monitoring API: https, verifying the host against the stack's CA, with the
monitoring credential (infra/render/webconfig.py). On a monitoring host both files are in the secrets folder;
elsewhere pass the CA (the stack output `ca_certificate`) and a file holding the password (SSM
/betting/<env>/monitoring_password)."""

from __future__ import annotations

import argparse
from pathlib import Path

import requests

from infra import pki
from infra.render.webconfig import MONITORING_USER, password_path


def session(ca_file: str | Path | None, password: str | None, username: str = MONITORING_USER) -> requests.Session:
    client = requests.Session()
    # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (set on many machines, this one too) override a session's
    # `verify`: the stack's CA must win, so the environment is not consulted (no proxy reaches these hosts either).
    client.trust_env = False
    if ca_file:
        client.verify = str(ca_file)
    if password is not None:
        client.auth = (username, password)
    return client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-file", default=pki.ca_path(), help=f"the stack's CA certificate (default {pki.ca_path()})")
    parser.add_argument("--password-file", default=password_path(),
                        help=f"the monitoring password (user {MONITORING_USER}; default {password_path()})")


def from_arguments(args: argparse.Namespace) -> requests.Session:
    """The session the arguments describe; a missing file means none (plain http, or no credential)."""
    ca = args.ca_file if args.ca_file and Path(args.ca_file).exists() else None
    password_file = Path(args.password_file) if args.password_file else None
    password = password_file.read_text().strip() if password_file and password_file.exists() else None
    return session(ca, password)
