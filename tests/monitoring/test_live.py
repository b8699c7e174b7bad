"""The real Prometheus and Alertmanager, started from the rendered files on loopback.

Mapped for the test: targets (a local exporter exposing a breaching `pg_up 0` as job postgres,
instance pg-1), secrets and receivers' URLs (a local webhook), ports and paths. To stay short, the
global scrape and evaluation intervals and every rule group's interval are 1 s here; every `for`,
route, group_wait and inhibition rule is as rendered (PostgreSQLDown keeps its 30 s).
"""

from __future__ import annotations

import json
import time

import pytest

from infra.render.grafana import dashboard_queries
from infra.settings import load_settings
from infra.topology import build_topology
from scripts import alert_test
from tests.conftest import stack_config
from tests.monitoring.conftest import binary, render_all
from tests.monitoring.harness import MetricsTarget, Webhook, map_rule_intervals, mentions, query, start_stack, wait_scraped

pytestmark = pytest.mark.live

TEST_INTERVALS = {"scrape_interval": "1s", "evaluation_interval": "1s"}
# PostgreSQLDown: for 30 s + group_wait 10 s + a few 1 s scrape/evaluation cycles and start-up.
ALERT_TIMEOUT = 75


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    settings = load_settings(stack_config("dev"), "dev")
    files = map_rule_intervals(render_all(settings, build_topology(settings)), "1s")
    webhook = Webhook()
    target = MetricsTarget({"pg_up": 0, "pg_settings_max_connections": 200})
    stack = start_stack(
        tmp_path_factory.mktemp("live"), files, {"postgres": [(target.address, "pg-1")]}, webhook, TEST_INTERVALS,
        prometheus_bin=binary("prometheus"), alertmanager_bin=binary("prometheus-alertmanager"),
        plain_jobs=("postgres",),  # the stand-in exporter serves plain HTTP
    )
    started = time.monotonic()
    try:
        yield {"stack": stack, "webhook": webhook, "files": files, "started": started}
    finally:
        stack.stop()
        target.stop()
        webhook.close()


def test_every_dashboard_query_is_accepted(live):
    stack = live["stack"]
    wait_scraped(stack.prometheus_url, 'up{job="postgres"}', client=stack.client)
    checked = 0
    for path, content in live["files"].items():
        if path.startswith("grafana/dashboards/"):
            for expr in dashboard_queries(json.loads(content)):
                answer = query(stack.prometheus_url, expr, stack.client)
                assert answer.get("status") == "success", f"{path}: {expr}: {answer}"
                checked += 1
    assert checked >= 40


def test_inhibition_and_routes_through_the_live_alertmanager(live):
    """Synthetic alerts (scripts/alert_test.py): each reaches its receivers; the warning twin of a
    firing critical with the same alertname and instance is suppressed and never delivered."""
    stack, webhook = live["stack"], live["webhook"]
    test_id, results = alert_test.run(stack.alertmanager_url, wait=5, client=stack.client)
    assert all(r.ok for r in results), alert_test.table(results)
    # Delivered through the expected routes (group_wait 10 s).
    assert webhook.wait_for(lambda n: n.path == "/slack-warnings" and mentions(n, "AlertTestWarning"), 30), "warning lost"
    assert webhook.wait_for(lambda n: n.path == "/pagerduty" and mentions(n, "AlertTestInhibition"), 30), "critical not paged"
    assert webhook.wait_for(lambda n: n.path == "/slack-critical" and mentions(n, "AlertTestInhibition"), 30)
    # The twin shared the warning's group_wait: had it not been inhibited, it would have arrived with it.
    time.sleep(2)
    leaked = [n for n in webhook.received if n.path == "/slack-warnings" and mentions(n, "AlertTestInhibition")]
    assert not leaked, leaked
    assert not [n for n in webhook.received if n.path == "/pagerduty" and mentions(n, "Watchdog")]


def test_breaching_metric_pages_through_the_critical_routes(live):
    stack, webhook = live["stack"], live["webhook"]
    remaining = ALERT_TIMEOUT - (time.monotonic() - live["started"])
    paged = webhook.wait_for(lambda n: n.path == "/pagerduty" and mentions(n, "PostgreSQLDown"), max(remaining, 1))
    assert paged, f"PostgreSQLDown never reached PagerDuty\n{stack.log_tail()}"
    assert paged.body["routing_key"] == "test-routing-key"  # read from routing_key_file
    slack = webhook.wait_for(lambda n: n.path == "/slack-critical" and mentions(n, "PostgreSQLDown"), 15)
    assert slack and slack.body["channel"] == "#alerts-critical"
    assert not [n for n in webhook.received if n.path in ("/slack-warnings", "/default") and mentions(n, "PostgreSQLDown")]
    # The Watchdog reached the dead-man receiver, and nothing else.
    assert webhook.wait_for(lambda n: n.path == "/deadman" and mentions(n, "Watchdog"), 15)
    alerts = stack.client.get(f"{stack.prometheus_url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    down = [a for a in alerts if a["labels"]["alertname"] == "PostgreSQLDown"]
    assert down and down[0]["labels"]["instance"] == "pg-1" and down[0]["state"] == "firing"


def test_rules_evaluate_without_errors(live):
    stack = live["stack"]
    groups = stack.client.get(f"{stack.prometheus_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert len(groups) >= 8
    errors = [(g["name"], r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") == "err"]
    assert not errors, errors
