"""health_checks' verdicts without daemons: not deployed, down, timeouts, exit codes."""

from __future__ import annotations

import socket

from scripts import health_checks as hc


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_services_the_target_does_not_run_are_not_deployed_never_healthy():
    results = hc.run_checks(hc.Targets(), timeout=1)
    assert {r.check for r in results} == {"patroni", "postgres", "redis", "clickhouse", "prometheus", "alertmanager", "grafana"}
    assert {r.status for r in results} == {hc.NOT_DEPLOYED}


def test_a_dead_cache_degrades_a_dead_database_is_down():
    port = _closed_port()
    redis_down = hc.run_checks(hc.Targets(redis=("127.0.0.1", port)), timeout=1)
    assert {r.check: r.status for r in redis_down}["redis"] == hc.DOWN
    assert hc.overall(redis_down) == hc.DEGRADED
    db_down = hc.run_checks(hc.Targets(patroni_urls=(f"http://127.0.0.1:{port}",)), timeout=1)
    assert {r.check: r.status for r in db_down}["patroni"] == hc.DOWN
    assert hc.overall(db_down) == hc.DOWN
    assert hc.EXIT_CODES[hc.overall(db_down)] == 2


def test_a_service_that_never_answers_is_down_within_its_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections (kernel backlog) and never answers
        port = silent.getsockname()[1]
        results = hc.run_checks(hc.Targets(grafana_url=f"http://127.0.0.1:{port}", redis=("127.0.0.1", port)), timeout=0.5)
    by_check = {r.check: r for r in results}
    assert by_check["grafana"].status == hc.DOWN and "Timeout" in by_check["grafana"].detail
    assert by_check["redis"].status == hc.DOWN and "timed out" in by_check["redis"].detail


def test_table_has_one_line_per_check_and_the_verdict():
    results = hc.run_checks(hc.Targets(redis=("127.0.0.1", _closed_port())), timeout=1)
    lines = hc.format_table(results, hc.overall(results)).splitlines()
    assert len(lines) == len(results) + 2
    assert any(line.startswith("redis") and " down " in line for line in lines)
    assert lines[-1] == "overall: degraded"
