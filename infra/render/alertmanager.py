"""Alertmanager: alertmanager.yml and its command-line flags. Pure: settings + topology in, bytes out.

Routing is the requirements document's: critical to PagerDuty (continue) and then Slack
#alerts-critical, warning to Slack #alerts-warnings, everything else to the e-mail default. The
Watchdog goes first to the dead-man receiver and stops there, so it never pages. Keys and webhooks
are read from files under Paths.SECRETS_DIR: this file holds no secret.
"""

from __future__ import annotations

import yaml

from infra.render.prometheus import cluster_name
from infra.render.webconfig import server_flags
from infra.settings import StackSettings
from infra.topology import Host, Paths, Ports, SecretNames, Topology, secret_path

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
# Opsgenie heartbeats expect a ping at least every interval and page when they stop; the heartbeat
# name is not secret, the API key travels in a credentials file.
DEADMAN_HEARTBEAT_URL = "https://api.opsgenie.com/v2/heartbeats/{cluster}-watchdog/ping"
DEADMAN_REPEAT_INTERVAL = "1m"

RECEIVER_DEFAULT = "default"
RECEIVER_PAGERDUTY = "pagerduty-critical"
RECEIVER_SLACK_CRITICAL = "slack-critical"
RECEIVER_SLACK_WARNINGS = "slack-warnings"
RECEIVER_DEADMAN = "deadman"


def alertmanager_config(settings: StackSettings, topology: Topology) -> dict:
    alerting = settings.alerting
    cluster = cluster_name(settings)
    slack_text = "{{ range .Alerts }}{{ .Annotations.description }}\n{{ end }}"
    return {
        "global": {
            "resolve_timeout": "5m",
            "pagerduty_url": PAGERDUTY_EVENTS_URL,
            "smtp_smarthost": alerting.smtp_smarthost,
            "smtp_from": alerting.email_from,
            "smtp_require_tls": True,
            **({"smtp_auth_username": alerting.smtp_auth_username,
                "smtp_auth_password_file": secret_path(SecretNames.SMTP_AUTH_PASSWORD)}
               if alerting.smtp_auth_username else {}),
        },
        "route": {
            "receiver": RECEIVER_DEFAULT,
            "group_by": ["alertname", "cluster"],
            "group_wait": "10s",
            "group_interval": "10s",
            "repeat_interval": "12h",
            "routes": [
                {
                    "receiver": RECEIVER_DEADMAN,
                    "matchers": ['alertname="Watchdog"'],
                    "group_wait": "0s",
                    "group_interval": DEADMAN_REPEAT_INTERVAL,
                    "repeat_interval": DEADMAN_REPEAT_INTERVAL,
                },
                {"receiver": RECEIVER_PAGERDUTY, "matchers": ['severity="critical"'], "continue": True},
                {"receiver": RECEIVER_SLACK_CRITICAL, "matchers": ['severity="critical"']},
                {"receiver": RECEIVER_SLACK_WARNINGS, "matchers": ['severity="warning"']},
            ],
        },
        "inhibit_rules": [
            {
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity="warning"'],
                "equal": ["alertname", "instance"],
            }
        ],
        "receivers": [
            {"name": RECEIVER_DEFAULT, "email_configs": [{"to": alerting.email_to, "send_resolved": True}]},
            {
                "name": RECEIVER_PAGERDUTY,
                "pagerduty_configs": [
                    {
                        "routing_key_file": secret_path(SecretNames.PAGERDUTY_ROUTING_KEY),
                        "description": "{{ .GroupLabels.alertname }} - {{ .CommonAnnotations.summary }}",
                        "details": {
                            "firing": "{{ .Alerts.Firing | len }}",
                            "resolved": "{{ .Alerts.Resolved | len }}",
                            "runbook": "{{ .CommonAnnotations.runbook_url }}",
                        },
                    }
                ],
            },
            {
                "name": RECEIVER_SLACK_CRITICAL,
                "slack_configs": [
                    {
                        "api_url_file": secret_path(SecretNames.SLACK_CRITICAL_WEBHOOK),
                        "channel": alerting.slack_critical_channel,
                        "title": "CRITICAL: {{ .GroupLabels.alertname }}",
                        "text": slack_text,
                        "color": "danger",
                        "send_resolved": True,
                    }
                ],
            },
            {
                "name": RECEIVER_SLACK_WARNINGS,
                "slack_configs": [
                    {
                        "api_url_file": secret_path(SecretNames.SLACK_WARNINGS_WEBHOOK),
                        "channel": alerting.slack_warnings_channel,
                        "title": "WARNING: {{ .GroupLabels.alertname }}",
                        "text": slack_text,
                        "color": "warning",
                        "send_resolved": True,
                    }
                ],
            },
            {
                "name": RECEIVER_DEADMAN,
                "webhook_configs": [
                    {
                        "url": DEADMAN_HEARTBEAT_URL.format(cluster=cluster),
                        "send_resolved": False,
                        "http_config": {
                            "authorization": {
                                "type": "GenieKey",
                                "credentials_file": secret_path(SecretNames.DEADMAN_HEARTBEAT_KEY),
                            }
                        },
                    }
                ],
            },
        ],
    }


def render_alertmanager(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    document = alertmanager_config(settings, topology)
    return {"alertmanager/alertmanager.yml": yaml.safe_dump(document, sort_keys=False, width=140).encode()}


def alertmanager_args(settings: StackSettings, topology: Topology, host: Host) -> tuple[str, ...]:
    """Flags for the Alertmanager on `host`: gossip with the other monitoring hosts, or none when alone."""
    args = [
        f"--config.file={Paths.ALERTMANAGER_CONFIG}",
        f"--storage.path={Paths.ALERTMANAGER_DATA}",
        f"--web.listen-address=0.0.0.0:{Ports.ALERTMANAGER}",
        *server_flags(),
    ]
    peers = [h for h in topology.monitoring if h.name != host.name]
    if peers:
        args.append(f"--cluster.listen-address=0.0.0.0:{Ports.ALERTMANAGER_CLUSTER}")
        args.extend(f"--cluster.peer={peer.fqdn}:{Ports.ALERTMANAGER_CLUSTER}" for peer in peers)
    else:
        # An empty address turns clustering off: a lone Alertmanager binds no gossip port.
        args.append("--cluster.listen-address=")
    return tuple(args)
