"""A month of SLO aggregates through the real daemons: a Prometheus 2.42 (https, basic auth) holding a month of synthetic
SLI series (written by `promtool tsdb create-blocks-from openmetrics`), a PostgreSQL 15 with the rendered pg_hba and TLS,
its aggregates database and role made by the agent's own step (converge_aggregates, the bundle's SQL file), and the job
run as the monitoring host's unit runs it (its ExecStart and environment file, the installed files, Debian's python3 with
python3-psycopg2 and python3-requests) for every day of October 2026.

Checked: rows and monthly partitions; re-running a day leaves the same rows; a partition older than the months kept is
dropped; the role can write nowhere else; `slo_report` from Prometheus and from PostgreSQL give the same figures for the
month, and so does scripts/sql/monthly_slo_report.sql. Tolerance: the synthetic samples fall on every minute, the day
boundaries included, so no increase() is extrapolated and ratio and latency figures agree to float rounding (1e-9);
threshold SLOs count 1-minute subquery steps: the Prometheus month's [31d:1m] also holds the step at its first midnight,
which the table counts in September's last day, so their error ratios may differ by one step in 44641 (relative 1e-4).

Not seen here: PgBouncer and HAProxy on the way (tests/postgres/test_pgbouncer_live.py runs the client path), Patroni
electing the leader the agent's step runs on, systemd firing the timer. Ports 27960-27961.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from infra import aggregates, pki
from infra.hostagent import agent, patroni
from infra.hostagent.envfile import read_environment_file
from infra.hosts import host_specs
from infra.hosts.monitoring import AGGREGATES_ENV, AGGREGATES_LIB, AGGREGATES_UNIT
from infra.hosts.postgres import AGGREGATES_SQL
from infra.render.patroni import patroni_config
from infra.sandbox.platform import expand_command, parse_unit
from infra.topology import SecretNames
from scripts import slo_report
from tests.monitoring.harness import wait_ready, write_tls
from tests.peer_psql import PeerPsql, run_as
from tests.ports import port
from tests.tls import write_identity

pytestmark = pytest.mark.live

PG_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRES_PORT, PROMETHEUS_PORT = port(27960), port(27961)
ROOT = Path(__file__).resolve().parents[2]
MONTH = "2026-10"
FIRST, LAST = date(2026, 10, 1), date(2026, 10, 31)
TODAY = date(2026, 11, 5)  # the job's "today": October is within the months kept
START = datetime(2026, 9, 30, 22, tzinfo=UTC)  # two hours before the month: rate()'s and the gauges' lookback
END = datetime(2026, 11, 1, tzinfo=UTC)
# A sample every 2 minutes: every midnight has one (no increase() is extrapolated), rate()'s 5-minute windows hold two.
STEP_MINUTES = 2


def _minute(t: datetime) -> tuple[int, int]:
    return t.day, t.hour


def _series(t: datetime, state: dict) -> dict[str, float]:
    """Every synthetic series' value at minute `t`; counters advance in `state`. Bad spells on given days."""
    day, hour = _minute(t)
    october = t.month == 10
    inc = {}
    inc['http_requests_total{endpoint="/api/bets",status="200"}'] = 100 + (t.minute * 7) % 13
    inc['http_requests_total{endpoint="/api/bets",status="500"}'] = 20 if october and day == 10 and hour == 10 else (
        1 if t.minute == 0 else 0)
    inc['pg_stat_database_xact_commit{datname="betting"}'] = 500
    inc['pg_stat_database_xact_rollback{datname="betting"}'] = 1 if t.minute % 50 == 0 else 0
    inc['cache_requests_total{cache_name="bets",result="hit"}'] = 50 if october and day == 12 and hour == 4 else 90
    inc['cache_requests_total{cache_name="bets",result="miss"}'] = 50 if october and day == 12 and hour == 4 else 10
    slow = october and day == 15
    for name, per_bucket, label in (
        ("query_duration_seconds", {"0.0025": 50, "0.005": 40 if not slow else 10, "0.01": 2 if not slow else 35,
                                    "0.5": t.minute % 3, "+Inf": 1 if t.minute % 10 == 0 else 0}, 'query_name="query1"'),
        ("query_duration_seconds", {"0.0025": 10, "0.005": 5, "0.01": 3, "0.5": 1, "+Inf": 0}, 'query_name="query2"'),
        ("query_duration_seconds", {"0.0025": 0, "0.005": 0, "0.01": 1, "0.5": 8, "+Inf": 1}, 'query_name="clickhouse_bi"'),
        ("http_request_duration_seconds", {"0.025": 30, "0.05": 15, "0.1": 3, "+Inf": 1}, 'endpoint="/api/bets"'),
    ):
        cumulative = 0
        for le, count in per_bucket.items():
            cumulative += count
            inc[f'{name}_bucket{{{label},le="{le}"}}'] = cumulative
        inc[f"{name}_count{{{label}}}"] = cumulative
    # A restarted application: its counters start again from zero (increase() sees a reset).
    if october and day == 20 and hour == 12 and t.minute == 0:
        for key in [k for k in state if k.startswith("http_requests_total")]:
            state[key] = 0
    for key, value in inc.items():
        state[key] = state.get(key, 0) + value
    values = dict(state)
    values['pg_replication_lag_seconds{instance="pg-2"}'] = 3.0 if october and day == 5 and hour == 2 else 0.2
    # Backups at 01:00 daily, none on October 18th; ETL hourly, none 06:00-09:00 on the 22nd.
    last_backup = t.replace(hour=1, minute=0) if t.hour >= 1 else t.replace(hour=1, minute=0) - timedelta(days=1)
    while last_backup.month == 10 and last_backup.day == 18:
        last_backup -= timedelta(days=1)
    values['backup_last_success_timestamp{instance="pg-1"}'] = last_backup.timestamp()
    last_etl = t.replace(minute=5) if t.minute >= 5 else t.replace(minute=5) - timedelta(hours=1)
    while last_etl.month == 10 and last_etl.day == 22 and 6 <= last_etl.hour <= 9:
        last_etl -= timedelta(hours=1)
    values['etl_last_success_timestamp{instance="etl"}'] = last_etl.timestamp()
    return values


def _write_openmetrics(folder: Path) -> list[Path]:
    """One OpenMetrics file per UTC day (promtool 2.42 re-reads its whole input for every 2-hour block it writes: a
    month in one file takes 372 passes over it, 80 s here; a file a day, 12 passes over each, about 20 s)."""
    state: dict[str, float] = {}
    by_day: dict[datetime, dict[str, list[str]]] = {}
    t = START
    while t <= END:
        family_lines = by_day.setdefault(t.replace(hour=0, minute=0), {})
        for key, value in _series(t, state).items():
            family_lines.setdefault(key, []).append(f"{key} {value:.17g} {int(t.timestamp())}")
        t += timedelta(minutes=STEP_MINUTES)
    files = []
    for day, series in by_day.items():
        families: dict[str, list[str]] = {}
        for key, lines in series.items():
            families.setdefault(key.split("{")[0], []).extend(lines)
        path = folder / f"{day:%Y%m%d}.om"
        path.write_text("".join(f"# TYPE {name} gauge\n" + "\n".join(lines) + "\n" for name, lines in families.items())
                        + "# EOF\n")
        files.append(path)
    return files


_as = run_as


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = Path(tempfile.mkdtemp(prefix="aggregates-"))  # not under pytest's 0700 folder: postgres must reach it
    root.chmod(0o755)
    settings = _settings()
    topology = _topology(settings)
    processes = []
    data = root / "pgdata"
    try:
        # Prometheus on a month of backfilled data (promtool, one process per core).
        om = root / "om"
        om.mkdir()
        tsdb = root / "tsdb"
        files = _write_openmetrics(om)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda f: subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "-q",
                                                              str(f), str(tsdb)], capture_output=True, text=True), files))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode][:1]
        secrets = root / "monitoring-secrets"
        client = write_tls(secrets)
        (root / "prometheus.yml").write_text("global: {}\n")
        prometheus_url = f"https://127.0.0.1:{PROMETHEUS_PORT}"
        processes.append(subprocess.Popen(
            ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={tsdb}",
             "--storage.tsdb.retention.time=100y", "--storage.tsdb.max-block-duration=2h",  # no compaction meanwhile
             f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
             f"--web.config.file={secrets / SecretNames.MONITORING_WEB_CONFIG}"],
            stdout=(root / "prometheus.log").open("w"), stderr=subprocess.STDOUT))
        # PostgreSQL 15 with the rendered pg_hba, TLS on.
        socket_dir = root / "run"
        socket_dir.mkdir()
        shutil.chown(socket_dir, "postgres", "postgres")
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        tls = write_identity(root / "pg")
        _as("postgres", str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", check=True)
        config = patroni_config(settings, topology, topology.postgres[0])["postgresql"]
        for name in ("pg_hba", "pg_ident"):
            _as("postgres", "sh", "-c", f"cat > {data}/{name}.conf", input="\n".join(config[name]) + "\n", check=True)
        _as("postgres", str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(socket_dir / "postgres.log"), "-w", "-o",
            f"-p {POSTGRES_PORT} -c listen_addresses=127.0.0.1 -c unix_socket_directories={socket_dir} -c ssl=on "
            f"-c ssl_cert_file={tls['cert']} -c ssl_key_file={tls['key']}", "start")
        assert (data / "postmaster.pid").exists(), (socket_dir / "postgres.log").read_text()[-2000:]
        # The agent's step, as on the leader, with the postgres host's files.
        leader = PeerPsql(root, socket_dir, POSTGRES_PORT)
        postgres_files = {f.path: f for f in _spec(settings, topology, "postgres").files}
        sql = Path(leader.path(AGGREGATES_SQL))
        sql.parent.mkdir(parents=True, exist_ok=True)
        sql.write_bytes(postgres_files[AGGREGATES_SQL].content)
        password = random.randbytes(16).hex()
        password_file = Path(leader.path(f"/etc/betting/secrets/{SecretNames.METRICS_AGGREGATOR_PASSWORD}"))
        password_file.parent.mkdir(parents=True, exist_ok=True)
        password_file.write_text(password + "\n")
        shutil.chown(password_file, "postgres", "postgres")
        for folder in (sql.parent, password_file.parent):
            folder.chmod(0o755)
        spec = {"api": "http://leader", "aggregates": {
            "database": settings.aggregates.database, "role": aggregates.ROLE, "sql": AGGREGATES_SQL,
            "password_file": f"/etc/betting/secrets/{SecretNames.METRICS_AGGREGATOR_PASSWORD}"}}
        original = patroni.member
        patroni.member = lambda api: {"role": "primary"}
        try:
            agent.converge_aggregates("pg-1", spec, leader, agent.Report("pg-1"))
            agent.converge_aggregates("pg-1", spec, leader, agent.Report("pg-1"))  # idempotent
        finally:
            patroni.member = original
        wait_ready(prometheus_url, processes[0], timeout=60, client=client)
        # The monitoring host's job, installed from its files.
        monitoring_files = {f.path: f for f in _spec(settings, topology, "monitoring").files}
        lib = root / "lib"
        for path, file in monitoring_files.items():
            if path.startswith(AGGREGATES_LIB + "/"):
                target = lib / path.removeprefix(AGGREGATES_LIB + "/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.content)
        unit = parse_unit(f"{AGGREGATES_UNIT}.service",
                          [monitoring_files[f"/etc/systemd/system/{AGGREGATES_UNIT}.service"].content.decode()], {})
        environment = read_environment_file(monitoring_files[AGGREGATES_ENV].content.decode())
        db_password = root / "db_password"
        db_password.write_text(password + "\n")
        dsn = (f"host=127.0.0.1 port={POSTGRES_PORT} dbname={settings.aggregates.database} user={aggregates.ROLE} "
               f"sslmode=verify-full sslrootcert={tls['ca']}")
        environment.update(PROMETHEUS_URL=prometheus_url, CA_FILE=str(secrets / pki.CA_CERT),
                           MONITORING_PASSWORD_FILE=str(secrets / SecretNames.MONITORING_PASSWORD),
                           POSTGRES_DSN=dsn, DB_PASSWORD_FILE=str(db_password))
        command = [word.replace(AGGREGATES_LIB, str(lib)) for word in expand_command(unit.exec_start, environment)]
        yield {"command": command, "dsn": dsn, "password": password, "prometheus": prometheus_url, "client": client,
               "leader": leader, "settings": settings, "secrets": secrets}
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        if (data / "postmaster.pid").exists():
            _as("postgres", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _settings():
    from infra.settings import load_settings
    from tests.conftest import stack_config

    return load_settings(stack_config("prod"), "prod")


def _topology(settings):
    from infra.topology import build_topology

    return build_topology(settings)


def _spec(settings, topology, role: str):
    return next(spec for spec in host_specs(settings, topology) if spec.host.role == role)


def _job(world, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*world["command"], "--today", TODAY.isoformat(), "--backfill", "1", *args],
                          capture_output=True, text=True, timeout=300)


def _connect(world) -> psycopg.Connection:
    return psycopg.connect(world["dsn"], password=world["password"], autocommit=True)


def _rows(world, day: date | None = None) -> list[tuple]:
    with _connect(world) as connection:
        where = "WHERE day = %s" if day else ""
        return connection.execute(f"SELECT day, slo, component, le, value FROM aggregates.slo_daily {where} "
                                  "ORDER BY 1, 2, 3, 4", (day,) if day else ()).fetchall()


@pytest.fixture(scope="module")
def month(world):
    started = time.monotonic()
    result = _job(world, "--day", LAST.isoformat(), "--backfill", "31")
    assert result.returncode == 0, result.stderr
    print(f"\naggregated 31 days in {time.monotonic() - started:.1f}s")
    return result


def test_every_day_of_the_month_has_its_rows_in_a_monthly_partition(world, month):
    rows = _rows(world)
    assert {row[0] for row in rows} == {FIRST + timedelta(days=n) for n in range(31)}
    per_day = {row[0]: 0 for row in rows}
    for row in rows:
        per_day[row[0]] += 1
    # 2 ratio SLOs x 2, 4 latency SLOs x their buckets (5, 5, 5 and 4 with +Inf), 4 threshold SLOs x 3.
    assert set(per_day.values()) == {4 + 5 + 4 + 5 + 5 + 12}
    with _connect(world) as connection:
        partitions = connection.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'aggregates.slo_daily'::regclass").fetchall()
    assert partitions == [("slo_daily_2026_10", "FOR VALUES FROM ('2026-10-01') TO ('2026-11-01')")]


def test_rerunning_a_day_replaces_it_with_the_same_rows(world, month):
    before = _rows(world, date(2026, 10, 10))
    result = _job(world, "--day", "2026-10-10")
    assert result.returncode == 0 and result.stdout.startswith("2026-10-10: 35 rows"), result.stdout + result.stderr
    assert _rows(world, date(2026, 10, 10)) == before
    skipped = _job(world, "--day", "2026-10-10", "--if-missing")
    assert skipped.returncode == 0 and skipped.stdout == ""


def test_a_partition_older_than_the_months_kept_is_dropped(world, month):
    with _connect(world) as connection:  # as the role: it owns its schema
        connection.execute("CREATE TABLE aggregates.slo_daily_2025_10 PARTITION OF aggregates.slo_daily "
                           "FOR VALUES FROM ('2025-10-01') TO ('2025-11-01')")
        connection.execute("CREATE TABLE aggregates.slo_daily_2025_11 PARTITION OF aggregates.slo_daily "
                           "FOR VALUES FROM ('2025-11-01') TO ('2025-12-01')")
    result = _job(world, "--day", "2026-10-31")
    assert result.returncode == 0 and "dropped slo_daily_2025_10" in result.stdout, result.stdout + result.stderr
    with _connect(world) as connection:
        names = {row[0] for row in connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'aggregates'")}
    # November 2025 is 12 whole months before November 2026 (the job's today): kept.
    assert names == {"slo_daily", "slo_daily_2025_11", "slo_daily_2026_10"}


def test_the_role_writes_only_its_own_schema(world, month):
    with _connect(world) as connection:
        for statement in ("CREATE TABLE public.t (x int)", "CREATE SCHEMA other", "CREATE DATABASE other"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)
    postgres_dsn = world["dsn"].replace(f"dbname={world['settings'].aggregates.database}", "dbname=postgres")
    with psycopg.connect(postgres_dsn, password=world["password"], autocommit=True) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("CREATE TABLE public.t (x int)")
    # Nobody but the role (and the superuser) connects to its database.
    world["leader"].psql("postgres", "-c", "CREATE ROLE someone LOGIN PASSWORD 'x'")
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(world["dsn"].replace(f"user={aggregates.ROLE}", "user=someone"), password="x")


def test_slo_report_from_prometheus_and_from_postgres_agree_for_the_month(world, month):
    window, at = slo_report.month_window(MONTH)
    from_prometheus = slo_report.report(world["prometheus"], window, at, client=world["client"])
    from_postgres = slo_report.report_from_postgres(f"{world['dsn']} password={world['password']}", MONTH)
    statuses = {}
    for a, b in zip(from_prometheus, from_postgres, strict=True):
        assert (a.slo, a.status, a.policy) == (b.slo, b.status, b.policy), (a, b)
        tolerance = 1e-4 if a.kind == "threshold" else 1e-9
        assert a.error_ratio == pytest.approx(b.error_ratio, rel=tolerance, abs=1e-12), a.slo
        assert a.sli == pytest.approx(b.sli, rel=1e-9), a.slo
        statuses[a.slo] = a.status
    # The synthetic month breaks some objectives and keeps others: both paths see each.
    assert statuses["query1-latency"] == "PASS" and "FAIL" in statuses.values() and "NO DATA" not in statuses.values()


def test_the_requirements_sql_report_agrees(world, month):
    sql = ROOT / "scripts" / "sql" / "monthly_slo_report.sql"
    result = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-v", f"month={MONTH}", "--csv", "-f", str(sql),
                             world["dsn"]], capture_output=True, text=True, env={"PGPASSWORD": world["password"],
                                                                                   "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    header, values = result.stdout.strip().splitlines()
    report = dict(zip(header.split(","), values.split(","), strict=True))
    rows = {row.slo: row for row in slo_report.report_from_postgres(f"{world['dsn']} password={world['password']}", MONTH)}
    availability, query1 = rows["api-availability"], rows["query1-latency"]
    assert report["month"] == MONTH
    assert float(report["availability_pct"]) == pytest.approx(round(100 * availability.sli, 3))
    assert float(report["query1_p95_ms"]) == pytest.approx(round(query1.sli * 1000, 3))
    assert float(report["downtime_minutes"]) == pytest.approx(round(availability.downtime_minutes, 2))
    assert float(report["error_budget_pct"]) == pytest.approx(round(availability.budget_consumed_pct, 2))
    assert report["query1_slo"] == query1.status
    assert report["availability_slo"] == availability.status


def test_unreachable_endpoints_are_one_line_and_their_exit_code(world, month):
    down = _job(world, "--day", "2026-10-01", "--prometheus", "https://127.0.0.1:1")
    assert down.returncode == 3 and len(down.stderr.splitlines()) == 1 and "Traceback" not in down.stderr
    wrong = _job(world, "--day", "2026-10-01", "--db-password-file", str(world["secrets"] / SecretNames.MONITORING_PASSWORD))
    assert wrong.returncode == 4 and "password authentication failed" in wrong.stderr and len(wrong.stderr.splitlines()) == 1
