"""betting-pgbouncer-exporter's exposition from SHOW rows, without PgBouncer (test_exporter_metrics.py runs
it against the real PgBouncer 1.18): columns read by name, a column a version lacks skipped, labels escaped,
the text accepted by promtool, and only pgbouncer_up 0 when PgBouncer does not answer."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import subprocess

from tests.monitoring.conftest import REPO, binary

SCRIPT = REPO / "infra" / "hostagent" / "files" / "betting-pgbouncer-exporter"


def _exporter():
    loader = importlib.machinery.SourceFileLoader("betting_pgbouncer_exporter", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


SHOWN = {
    "POOLS": [{"database": "betting", "user": "app", "cl_active": 40, "cl_waiting": 3, "sv_active": 20, "sv_idle": 0,
               "sv_used": 0, "sv_tested": 0, "sv_login": 0, "maxwait": 2, "maxwait_us": 250000, "pool_mode": "transaction"}],
    "DATABASES": [{"name": "betting", "pool_size": 20, "reserve_pool": 5, "max_connections": 0, "current_connections": 20}],
    "LISTS": [{"list": "used_clients", "items": 44}, {"list": "free_clients", "items": 56}],
    "STATS": [{"database": "betting", "total_xact_count": 1234567890123, "total_query_count": 5, "total_wait_time": 1500000}],
    "CONFIG": [{"key": "max_client_conn", "value": "1000", "default": "100", "changeable": "yes"},
               {"key": "listen_addr", "value": "*", "default": "", "changeable": "no"}],
}


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_rows_become_the_metrics_the_alerts_read():
    samples = _samples(_exporter().render(SHOWN))
    pool = '{database="betting",user="app"}'
    assert samples["pgbouncer_up"] == 1
    assert samples[f"pgbouncer_pools_client_waiting_connections{pool}"] == 3
    assert samples[f"pgbouncer_pools_server_active_connections{pool}"] == 20
    assert samples[f"pgbouncer_pools_client_maxwait_seconds{pool}"] == 2.25  # seconds plus the microseconds beyond
    assert samples['pgbouncer_databases_pool_size{database="betting"}'] == 20
    assert samples["pgbouncer_used_clients"] == 44
    assert samples["pgbouncer_config_max_client_connections"] == 1000
    assert samples['pgbouncer_stats_sql_transactions_pooled_total{database="betting"}'] == 1234567890123  # every digit
    assert samples['pgbouncer_stats_client_wait_seconds_total{database="betting"}'] == 1.5


def test_a_column_a_version_lacks_is_skipped_not_fatal():
    """Debian's exporter dies on the first missing column (total_requests); an older PgBouncer has no maxwait_us."""
    shown = {**SHOWN, "POOLS": [{k: v for k, v in SHOWN["POOLS"][0].items() if k not in ("maxwait_us", "sv_tested")}]}
    samples = _samples(_exporter().render(shown))
    assert samples['pgbouncer_pools_client_maxwait_seconds{database="betting",user="app"}'] == 2
    assert not any(k.startswith("pgbouncer_pools_server_testing_connections") for k in samples)


def test_labels_are_escaped_and_promtool_accepts_the_text():
    shown = {**SHOWN, "POOLS": [{**SHOWN["POOLS"][0], "database": 'we"ird\\db'}]}
    text = _exporter().render(shown)
    assert 'database="we\\"ird\\\\db"' in text
    check = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_pgbouncer_not_answering_is_pgbouncer_up_0_only():
    exporter = _exporter()
    assert _samples(exporter.render(None)) == {"pgbouncer_up": 0}
    # A closed port: the scrape still answers, and says why on stderr.
    result = subprocess.run(
        ["/usr/bin/python3", "-c", f"import importlib.machinery as m; e = m.SourceFileLoader('e', {str(SCRIPT)!r}).load_module();"
         " print(e.scrape('host=127.0.0.1 port=1 dbname=pgbouncer connect_timeout=1'), end='')"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert _samples(result.stdout) == {"pgbouncer_up": 0}
    assert "PgBouncer did not answer" in result.stderr



def test_systemd_accepts_the_unit(tmp_path):
    shutil.copy(SCRIPT.with_name("betting-pgbouncer-exporter.service"), tmp_path)
    result = subprocess.run([binary("systemd-analyze"), "verify", str(tmp_path / "betting-pgbouncer-exporter.service")],
                            capture_output=True, text=True)
    # verify also checks ExecStart's binary: the bundle installs it, it is not on this machine.
    installed = "/usr/local/sbin/betting-pgbouncer-exporter"
    problems = [line for line in result.stderr.splitlines() if installed not in line and line.strip()]
    assert not problems, result.stderr
