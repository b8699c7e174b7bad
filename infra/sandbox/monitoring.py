"""Secrets of the monitoring hosts that the sandbox cannot have: notification receivers' keys.

The sandbox's stand-ins: notifications to PagerDuty, Slack, e-mail and the dead-man heartbeat
fail (no internet, no credentials) while the routing and the alerts run as rendered. Every other
secret is generated once per sandbox (infra/sandbox/platform.py SecretStore).
"""

from __future__ import annotations

from infra.sandbox import mapping as m
from infra.topology import SecretNames

PLACEHOLDER_SECRETS = {
    SecretNames.PAGERDUTY_ROUTING_KEY: "sandbox-placeholder",
    # A loopback port where nothing listens: a notification fails at once, never leaves the machine.
    SecretNames.SLACK_CRITICAL_WEBHOOK: f"http://{m.LOOPBACK}:9/sandbox-slack-critical",
    SecretNames.SLACK_WARNINGS_WEBHOOK: f"http://{m.LOOPBACK}:9/sandbox-slack-warnings",
    SecretNames.DEADMAN_HEARTBEAT_KEY: "sandbox-placeholder",
    SecretNames.SMTP_AUTH_PASSWORD: "sandbox-placeholder",
    # The sandbox's redis-server has no AUTH (ElastiCache has): redis_exporter sends none.
    SecretNames.REDIS_AUTH_TOKEN: "",
}
