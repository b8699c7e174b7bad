"""Alert-routing test: send synthetic alerts to an Alertmanager and show which receivers each reached.

    python scripts/alert_test.py --alertmanager https://monitoring-1.prod.betting.internal:9093
    python scripts/alert_test.py --alertmanager https://HOST:9093 --ca-file ca.crt --password-file pw --json

Alertmanager serves https with basic auth (scripts/monitoring_client.py: on a monitoring host the CA and the
password are found in the secrets folder).

Each run tags its alerts with a unique `alert_test_id` and lets them expire after a few minutes.
Cases: a critical (PagerDuty and Slack #alerts-critical), a warning (Slack #alerts-warnings), an
informational alert (the e-mail default), the Watchdog (dead-man receiver only, never PagerDuty),
and a critical/warning pair with the same alertname and instance (the warning is inhibited).
Receivers are read back from Alertmanager's API (/api/v2/alerts/groups), so the script checks the
live routing tree, not a copy of it. Exit status 1 when an alert did not reach what it should.

Note: the alerts are real: with the production config the critical case pages. Use --dry-run to print them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import requests

from infra.render.alertmanager import (
    RECEIVER_DEADMAN,
    RECEIVER_DEFAULT,
    RECEIVER_PAGERDUTY,
    RECEIVER_SLACK_CRITICAL,
    RECEIVER_SLACK_WARNINGS,
)
from scripts import monitoring_client


@dataclass(frozen=True)
class Case:
    name: str
    labels: dict[str, str]
    expected: tuple[str, ...]  # receivers, empty when the alert must be inhibited
    inhibited: bool = False


CASES = (
    Case("critical", {"alertname": "AlertTestCritical", "severity": "critical", "instance": "alert-test"},
         (RECEIVER_PAGERDUTY, RECEIVER_SLACK_CRITICAL)),
    Case("warning", {"alertname": "AlertTestWarning", "severity": "warning", "instance": "alert-test"},
         (RECEIVER_SLACK_WARNINGS,)),
    Case("other", {"alertname": "AlertTestInfo", "severity": "info", "instance": "alert-test"}, (RECEIVER_DEFAULT,)),
    Case("watchdog", {"alertname": "Watchdog", "severity": "none"}, (RECEIVER_DEADMAN,)),
    Case("inhibiting critical", {"alertname": "AlertTestInhibition", "severity": "critical", "instance": "alert-test"},
         (RECEIVER_PAGERDUTY, RECEIVER_SLACK_CRITICAL)),
    Case("inhibited warning twin", {"alertname": "AlertTestInhibition", "severity": "warning", "instance": "alert-test"},
         (RECEIVER_SLACK_WARNINGS,), inhibited=True),
)


@dataclass
class Result:
    case: Case
    receivers: list[str] = field(default_factory=list)
    state: str = "missing"

    @property
    def ok(self) -> bool:
        if self.case.inhibited:
            return self.state == "suppressed"
        return self.state == "active" and sorted(self.receivers) == sorted(self.case.expected)


def payload(test_id: str, cases=CASES, lifetime: timedelta = timedelta(minutes=5)) -> list[dict]:
    now = datetime.now(UTC)
    return [
        {
            "labels": {**case.labels, "alert_test_id": test_id},
            "annotations": {
                "summary": f"alert-test {test_id}: {case.name}",
                "description": "Synthetic alert from scripts/alert_test.py",
            },
            "startsAt": now.isoformat(),
            "endsAt": (now + lifetime).isoformat(),
            "generatorURL": "https://github.com/betting-platform/infra/blob/main/scripts/alert_test.py",
        }
        for case in cases
    ]


def send(alertmanager: str, alerts: list[dict], client: requests.Session | None = None) -> None:
    response = (client or requests).post(f"{alertmanager}/api/v2/alerts", json=alerts, timeout=10)
    response.raise_for_status()


def _key(labels: dict[str, str]) -> tuple[str, str]:
    return labels["alertname"], labels.get("severity", "")


def collect(alertmanager: str, test_id: str, cases=CASES, client: requests.Session | None = None) -> list[Result]:
    """Receivers per case from the alert groups, and each alert's state (active, suppressed)."""
    results = {_key(case.labels): Result(case) for case in cases}
    query = {"filter": f'alert_test_id="{test_id}"'}
    groups = (client or requests).get(f"{alertmanager}/api/v2/alerts/groups", params=query, timeout=10)
    groups.raise_for_status()
    for group in groups.json():
        for alert in group["alerts"]:
            result = results.get(_key(alert["labels"]))
            if result is not None and group["receiver"]["name"] not in result.receivers:
                result.receivers.append(group["receiver"]["name"])
    alerts = (client or requests).get(f"{alertmanager}/api/v2/alerts", params=query, timeout=10)
    alerts.raise_for_status()
    for alert in alerts.json():
        result = results.get(_key(alert["labels"]))
        if result is not None:
            result.state = alert["status"]["state"]
    return list(results.values())


def run(alertmanager: str, wait: float = 2.0, cases=CASES, client: requests.Session | None = None) -> tuple[str, list[Result]]:
    """`client`: a session with the CA and the monitoring credential (scripts/monitoring_client.py)."""
    test_id = uuid.uuid4().hex[:12]
    send(alertmanager, payload(test_id, cases), client)
    # Inhibition and grouping apply as soon as the alerts are stored; a short wait covers the API's view.
    deadline = time.monotonic() + wait
    while True:
        results = collect(alertmanager, test_id, cases, client)
        if all(r.ok for r in results) or time.monotonic() >= deadline:
            return test_id, results
        time.sleep(0.25)


def table(results: list[Result]) -> str:
    # An inhibited alert is still routed; "suppressed" means Alertmanager sends it nowhere.
    rows = [("case", "alertname", "severity", "expected", "routed to", "state", "")]
    for r in results:
        expected = "inhibited" if r.case.inhibited else ",".join(r.case.expected)
        rows.append((r.case.name, r.case.labels["alertname"], r.case.labels.get("severity", ""), expected,
                     ",".join(sorted(r.receivers)) or "-", r.state, "OK" if r.ok else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alertmanager", default="https://127.0.0.1:9093", help="Alertmanager base URL")
    monitoring_client.add_arguments(parser)
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to wait for every alert to show its receivers")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--dry-run", action="store_true", help="print the alerts that would be sent, send nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(json.dumps(payload("dry-run"), indent=2))
        return 0
    test_id, results = run(args.alertmanager.rstrip("/"), args.wait, client=monitoring_client.from_arguments(args))
    if args.json:
        print(json.dumps({
            "alert_test_id": test_id,
            "ok": all(r.ok for r in results),
            "results": [{"case": r.case.name, "labels": r.case.labels, "expected": list(r.case.expected),
                         "inhibited_expected": r.case.inhibited, "receivers": sorted(r.receivers), "state": r.state, "ok": r.ok}
                        for r in results],
        }, indent=2))
    else:
        print(f"alert_test_id={test_id}\n{table(results)}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
