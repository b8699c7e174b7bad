"""Rendered rules pass promtool, and every alert has unit tests that fire it and hold it back."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.monitoring.conftest import HERE, REPO, binary

RULE_TESTS = sorted(HERE.glob("*_test.yml"))
DOCUMENT_ALERTS = (
    "QueryLatencyHigh", "PostgreSQLDown", "ReplicationLagHigh", "BackupFailed", "ConnectionPoolNearLimit", "DiskSpaceLow",
    "CacheHitRateLow", "RedisDown", "RedisMemoryHigh", "ErrorRateHigh", "AvailabilitySLOBreach",
)
# Always firing by design: it has no quiet case to test.
ALWAYS_FIRING = {"Watchdog"}


def _rules_by_file(rendered: Path) -> list[tuple[str, str, str, dict]]:
    """(alertname, severity, rule file as the test files name it, rule) for every alerting rule."""
    rules = []
    for path in sorted((rendered / "prometheus" / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rules.append((rule["alert"], rule["labels"]["severity"], f"rules/{path.name}", rule))
    return rules


def _cases() -> list[tuple[str, str, list[dict], list[str]]]:
    """(test name, alertname, expected alerts, rule files loaded) for every alert_rule_test of every file."""
    cases = []
    for path in RULE_TESTS:
        document = yaml.safe_load(path.read_text())
        for test in document["tests"]:
            for check in test.get("alert_rule_test", []):
                cases.append((test["name"], check["alertname"], check.get("exp_alerts") or [], document["rule_files"]))
    return cases


def test_promtool_check_rules(rendered):
    rules = sorted(str(p) for p in (rendered / "prometheus" / "rules").glob("*.yml"))
    assert len(rules) >= 5
    result = subprocess.run([binary("promtool"), "check", "rules", *rules], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(rendered):
    result = subprocess.run(
        [binary("promtool"), "check", "config", "--syntax-only", str(rendered / "prometheus" / "prometheus.yml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _tests_for(rendered: Path) -> list[Path]:
    """The unit test files whose rule files the stack renders (synchronous-replication.yml only in synchronous mode)."""
    rules = rendered / "prometheus"
    return [p for p in RULE_TESTS if all((rules / f).is_file() for f in yaml.safe_load(p.read_text())["rule_files"])]


def test_promtool_unit_tests_pass(rendered, tmp_path):
    """The unit test files run against the rendered rules (copied beside them as rules/)."""
    workdir = tmp_path / "promtool"
    shutil.copytree(rendered / "prometheus" / "rules", workdir / "rules")
    tests = _tests_for(rendered)
    for path in tests:
        shutil.copy(path, workdir / path.name)
    result = subprocess.run(
        [binary("promtool"), "test", "rules", *(p.name for p in tests)], cwd=workdir, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(tests)


def test_no_synchronous_standby_alert_only_in_synchronous_mode(settings, rendered):
    """Patroni 3.0.2 exports patroni_sync_standby 0 everywhere when synchronous_mode is off: the rule file exists
    only for stacks in synchronous mode, and every other test file runs on every stack."""
    synchronous = rendered / "prometheus" / "rules" / "synchronous-replication.yml"
    assert synchronous.is_file() == settings.patroni.synchronous_mode
    skipped = {p.name for p in RULE_TESTS} - {p.name for p in _tests_for(rendered)}
    assert skipped == (set() if settings.patroni.synchronous_mode else {"synchronous_replication_test.yml"})


def test_every_rule_file_is_under_test(rendered):
    tested = {f for path in RULE_TESTS for f in yaml.safe_load(path.read_text())["rule_files"]}
    rendered_files = {f"rules/{p.name}" for p in (rendered / "prometheus" / "rules").glob("*.yml")}
    assert rendered_files <= tested, f"rule files without unit tests: {sorted(rendered_files - tested)}"


def test_every_alert_has_firing_and_quiet_cases(rendered):
    """Coverage from the rendered rules: per alerting rule, a firing case, a case just under the
    threshold, and (when it has a `for`) a breach shorter than `for`. Rules that share a name
    (BackupFailed's document rule and its absent() guard) live in different files: a case counts
    for the rule whose file its test file loads."""
    cases = _cases()
    rules = _rules_by_file(rendered)
    missing = []
    for name, severity, rule_file, rule in sorted(rules, key=lambda r: r[:3]):
        shared = sum(1 for n, s, _, _ in rules if (n, s) == (name, severity)) > 1
        label = f"{name}/{severity}" + (f" ({rule_file})" if shared else "")
        mine = [(title, [a for a in expected if a["exp_labels"].get("severity") == severity])
                for title, alertname, expected, files in cases
                if alertname == name and (not shared or rule_file in files)]
        if not any(fired for _, fired in mine):
            missing.append(f"{label}: no firing case")
        if name in ALWAYS_FIRING:
            continue
        if not any(not fired and "just under the" in title for title, fired in mine):
            missing.append(f"{label}: no case just under the threshold")
        if rule.get("for") and not any(not fired and "shorter than for" in title for title, fired in mine):
            missing.append(f"{label}: no case of a breach shorter than for ({rule['for']})")
    assert not missing, "\n".join(missing)


def test_document_alerts_keep_names_thresholds_for_severity_team(rendered):
    """The requirements document's 11 alerts, as it defines them (expressions corrected, not their limits)."""
    expected = {
        "QueryLatencyHigh": ("5m", "critical", "dbre", "0.005"),
        "PostgreSQLDown": ("30s", "critical", "dbre", "== 0"),
        "ReplicationLagHigh": ("2m", "warning", "dbre", "> 10485760"),
        "BackupFailed": ("1h", "critical", "dbre", "> 90000"),
        "ConnectionPoolNearLimit": ("5m", "warning", "dbre", "> 0.8"),
        "DiskSpaceLow": ("10m", "warning", "dbre", "< 0.15"),
        "CacheHitRateLow": ("10m", "warning", "dbre", "< 0.8"),
        "RedisDown": ("1m", "critical", "dbre", "== 0"),
        "RedisMemoryHigh": ("5m", "warning", "dbre", "> 0.9"),
        "ErrorRateHigh": ("2m", "critical", "backend", "> 0.01"),
        "AvailabilitySLOBreach": ("5m", "critical", "backend", "< 0.999"),
    }
    # The document's own rules; rules/backups.yml adds BackupFailed's absent() guard under the same name.
    alerts: dict[str, dict] = {}
    for name, severity, rule_file, rule in _rules_by_file(rendered):
        if rule_file != "rules/backups.yml":
            alerts.setdefault(name, {})[severity] = rule
    assert set(DOCUMENT_ALERTS) == set(expected)
    for name, (for_, severity, team, threshold) in expected.items():
        rule = alerts[name][severity]
        assert rule["for"] == for_, name
        assert rule["labels"]["team"] == team, name
        assert threshold in rule["expr"], name


def test_ratios_aggregate_both_sides(rendered):
    """No bare rate()/rate() in any alert: numerator and denominator aggregate with the same labels."""
    for name, _, _, rule in _rules_by_file(rendered):
        assert not re.search(r"^\s*rate\(", rule["expr"]), name
        for by_clause in re.findall(r"sum by \(([^)]*)\) \(rate", rule["expr"]):
            assert rule["expr"].count(f"sum by ({by_clause})") >= 2, f"{name}: only one side aggregates by ({by_clause})"


def test_every_alert_links_an_existing_runbook(rendered):
    for name, _, _, rule in _rules_by_file(rendered):
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        url = annotations["runbook_url"]
        assert url.endswith(f"docs/runbooks/{name}.md"), url
        page = REPO / "docs" / "runbooks" / f"{name}.md"
        assert page.is_file(), f"{url} does not resolve to {page}"
        text = page.read_text()
        for section in ("## What it means", "## Diagnosis", "## Mitigation", "## Escalation"):
            assert section in text, f"{page.name} lacks {section}"


def test_backup_pipeline_alerts_route_like_backup_failed(rendered):
    """Issue 9: the backup pipeline's alerts page the DBRE on call, as BackupFailed does (routing is by severity)."""
    by_file = {(name, rule_file): rule for name, _, rule_file, rule in _rules_by_file(rendered)}
    document = by_file[("BackupFailed", "rules/database.yml")]
    guard = by_file[("BackupFailed", "rules/backups.yml")]
    assert guard["expr"] == "absent(backup_last_success_timestamp)"
    assert guard["for"] == "26h"  # a new cluster's first day: 25 h + the document rule's 1 h, as for a stale backup
    for name in ("BackupFailed", "WalArchivingFailing", "BackupNotVerified"):
        rule = by_file[(name, "rules/backups.yml")]
        assert rule["labels"] == document["labels"], name
    assert "pg_replication_is_replica) == 0" in by_file[("WalArchivingFailing", "rules/backups.yml")]["expr"]


def test_no_rule_looks_back_with_offset():
    """An `offset` sees nothing on a Prometheus younger than it (a new stack, a replaced monitoring
    host): PatroniTimelineSwitch stayed silent after a real failover that way. Windows instead."""
    from infra.render.prometheus import render_prometheus
    from infra.settings import load_settings
    from infra.topology import build_topology
    from tests.conftest import stack_config

    for stack in ("dev", "staging", "prod"):
        settings = load_settings(stack_config(stack), stack)
        for path, content in render_prometheus(settings, build_topology(settings)).items():
            if path.startswith("prometheus/rules/"):
                for group in yaml.safe_load(content)["groups"]:
                    for rule in group["rules"]:
                        assert not re.search(r"\boffset\b", rule["expr"]), (stack, rule.get("alert") or rule.get("record"))
