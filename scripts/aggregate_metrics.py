"""The daily SLO aggregates: reads each SLO's daily components (infra/aggregates.py) from Prometheus at the day's end
and writes them to PostgreSQL, one row per (day, slo, component, le), in a table partitioned by month.

    aggregate_metrics.py --prometheus URL --dsn 'host=... dbname=metrics user=metrics_aggregator' [--day YYYY-MM-DD]
    aggregate_metrics.py ... --backfill 30             # the 30 days ending with --day (default: yesterday, UTC)
    aggregate_metrics.py ... --backfill 3 --if-missing # only the days not stored yet

The job creates its table and the partitions it writes, and drops the partitions whose month is older than
--months-kept whole months. A day is replaced in one transaction (DELETE + INSERT), under an advisory lock, so a re-run,
or the other monitoring host's run, leaves the same rows. On a monitoring host systemd runs it daily
(betting-aggregate-metrics.timer) with the arguments of /etc/default/betting-aggregate-metrics.

Runs on Debian's python3 with python3-requests and python3-psycopg2 (the monitoring host's packages).
Exit codes: 0 done; 2 bad arguments; 3 Prometheus unreachable or refused a query; 4 PostgreSQL unreachable or refused
a statement. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from infra import aggregates
from infra.slo import SLOS

EXIT_ARGUMENTS, EXIT_PROMETHEUS, EXIT_POSTGRES = 2, 3, 4
LOCK_KEY = 0x61677267  # pg_advisory_xact_lock: one writer of a day at a time (both monitoring hosts run the job)


class Failure(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Prometheus:
    def __init__(self, url: str, ca_file: str | None, user: str, password: str | None):
        try:
            import requests
        except ImportError:
            raise Failure(EXIT_PROMETHEUS, "prometheus: no requests (Debian's python3-requests)") from None

        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False  # the stack's CA, not REQUESTS_CA_BUNDLE; no proxy reaches these hosts
        if ca_file:
            self.session.verify = ca_file
        if password is not None:
            self.session.auth = (user, password)

    def query(self, expr: str, at: float) -> list[dict]:
        import requests

        try:
            response = self.session.get(f"{self.url}/api/v1/query", params={"query": expr, "time": f"{at:.3f}"}, timeout=120)
            body = response.json()
        except (requests.RequestException, ValueError) as error:
            raise Failure(EXIT_PROMETHEUS, f"prometheus {self.url}: {type(error).__name__}: {error}") from None
        if body.get("status") != "success":
            raise Failure(EXIT_PROMETHEUS, f"prometheus {self.url}: {expr}: {body.get('error', response.status_code)}")
        return body["data"]["result"]


def day_rows(prometheus: Prometheus, day: date) -> list[tuple[date, str, str, str, float]]:
    """Every SLO's components for `day`, as table rows; a component with no sample that day has no row."""
    at = aggregates.day_end(day)
    rows = []
    for slo in SLOS:
        for component in aggregates.components(slo):
            for sample in prometheus.query(component.expr, at):
                value = float(sample["value"][1])
                if value != value:  # NaN: nothing to count that day
                    continue
                le = sample["metric"].get("le", "") if component.by_le else ""
                rows.append((day, slo.id, component.name, le, value))
    return rows


SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS {aggregates.SCHEMA}.{aggregates.TABLE} (
    day date NOT NULL,
    slo text NOT NULL,
    component text NOT NULL,
    le text NOT NULL DEFAULT '',
    value double precision NOT NULL,
    PRIMARY KEY (day, slo, component, le)
) PARTITION BY RANGE (day)
"""


class Store:
    def __init__(self, dsn: str, password: str | None):
        try:
            import psycopg2
        except ImportError:
            raise Failure(EXIT_POSTGRES, "postgresql: no psycopg2 (Debian's python3-psycopg2)") from None

        self.errors = psycopg2.Error
        try:
            self.connection = psycopg2.connect(dsn, password=password) if password is not None else psycopg2.connect(dsn)
        except psycopg2.Error as error:
            raise Failure(EXIT_POSTGRES, f"postgresql: {_first_line(error)}") from None

    def run(self, work):
        """`work(cursor)` in one transaction; a PostgreSQL error is a Failure."""
        try:
            with self.connection, self.connection.cursor() as cursor:
                return work(cursor)
        except self.errors as error:
            raise Failure(EXIT_POSTGRES, f"postgresql: {_first_line(error)}") from None

    def ensure_schema(self) -> None:
        self.run(lambda cursor: cursor.execute(SCHEMA_SQL))

    def ensure_partition(self, month: date) -> None:
        name = aggregates.partition_name(month)
        end = aggregates.add_months(month, 1)
        self.run(lambda cursor: cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {aggregates.SCHEMA}.{name} PARTITION OF {aggregates.SCHEMA}.{aggregates.TABLE} "
            f"FOR VALUES FROM ('{month.isoformat()}') TO ('{end.isoformat()}')"))

    def stored_days(self, days: list[date]) -> set[date]:
        def work(cursor):
            cursor.execute(f"SELECT DISTINCT day FROM {aggregates.SCHEMA}.{aggregates.TABLE} WHERE day = ANY(%s)", (days,))
            return {row[0] for row in cursor.fetchall()}

        return self.run(work)

    def replace_day(self, day: date, rows: list[tuple]) -> None:
        def work(cursor):
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            cursor.execute(f"DELETE FROM {aggregates.SCHEMA}.{aggregates.TABLE} WHERE day = %s", (day,))
            cursor.executemany(
                f"INSERT INTO {aggregates.SCHEMA}.{aggregates.TABLE} (day, slo, component, le, value) "
                "VALUES (%s, %s, %s, %s, %s)", rows)

        self.run(work)

    def drop_expired(self, today: date, months_kept: int) -> list[str]:
        def work(cursor):
            cursor.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = %s::regclass", (f"{aggregates.SCHEMA}.{aggregates.TABLE}",))
            names = aggregates.expired([row[0] for row in cursor.fetchall()], today, months_kept)
            for name in names:
                cursor.execute(f"DROP TABLE {aggregates.SCHEMA}.{name}")
            return names

        return self.run(work)


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day YYYY-MM-DD: {text!r}") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of days, 1 or more: {text!r}")
    return int(text)


def _months(text: str) -> int:
    if not text.isdigit() or int(text) < aggregates.MONTHS_KEPT_MINIMUM:
        raise argparse.ArgumentTypeError(f"must be a whole number of months, at least {aggregates.MONTHS_KEPT_MINIMUM} "
                                         f"(the requirements keep aggregates 1 year): {text!r}")
    return int(text)


def _secret(path: str | None, what: str) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as error:
        raise Failure(EXIT_ARGUMENTS, f"{what} {path}: {error.strerror}") from None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write a day's SLO aggregates from Prometheus to PostgreSQL")
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL (https)")
    parser.add_argument("--ca-file", help="CA certificate that signed Prometheus' certificate")
    parser.add_argument("--monitoring-user", default="monitoring", help="basic-auth user of the monitoring API")
    parser.add_argument("--monitoring-password-file", help="file holding the monitoring API's password")
    parser.add_argument("--dsn", required=True, help="libpq connection string of the aggregates database (no password)")
    parser.add_argument("--db-password-file", help="file holding the aggregator role's password")
    parser.add_argument("--day", type=_day, help="the (last) day to aggregate, YYYY-MM-DD (default: yesterday, UTC)")
    parser.add_argument("--backfill", type=_positive, default=1, help="aggregate this many days ending with --day")
    parser.add_argument("--if-missing", action="store_true", help="skip the days already stored")
    parser.add_argument("--months-kept", type=_months, default=aggregates.MONTHS_KEPT_MINIMUM,
                        help="whole months kept before the current one; older partitions are dropped")
    parser.add_argument("--today", type=_day, help=argparse.SUPPRESS)  # tests: the date partitions expire against
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[str]:
    today = args.today or datetime.now(UTC).date()
    last = args.day or today - timedelta(days=1)
    if last >= today:
        raise Failure(EXIT_ARGUMENTS, f"--day {last} has not ended yet (today is {today}, UTC)")
    wanted = aggregates.days(last, args.backfill)
    oldest = aggregates.oldest_kept_month(today, args.months_kept)
    if wanted[0] < oldest:
        raise Failure(EXIT_ARGUMENTS, f"{wanted[0]} is before {oldest}, the oldest month kept (--months-kept "
                                      f"{args.months_kept}): it would be dropped at once")
    prometheus = Prometheus(args.prometheus, args.ca_file, args.monitoring_user,
                            _secret(args.monitoring_password_file, "--monitoring-password-file"))
    store = Store(args.dsn, _secret(args.db_password_file, "--db-password-file"))
    store.ensure_schema()
    done = []
    skipped = store.stored_days(wanted) if args.if_missing else set()
    for day in wanted:
        if day in skipped:
            continue
        rows = day_rows(prometheus, day)
        store.ensure_partition(aggregates.month_start(day))
        store.replace_day(day, rows)
        done.append(f"{day}: {len(rows)} rows")
    dropped = store.drop_expired(today, args.months_kept)
    return done + [f"dropped {name}" for name in dropped]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        for line in run(args):
            print(line)
    except Failure as failure:
        print(f"aggregate_metrics: {failure}", file=sys.stderr)
        return failure.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
