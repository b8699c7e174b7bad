"""Health checks of the platform (the requirements' health-checks.sh), as a table or JSON.

    .venv/bin/python -m scripts.health_checks --sandbox [--state-dir .sandbox] [--port-base 25000] [--json]
    .venv/bin/python -m scripts.health_checks --stack prod [--json]      # from a host inside the VPC

Checks: the Patroni cluster (a leader, every member running and streaming, replication lag),
PostgreSQL `SELECT 1` on the primary, Redis PING, ClickHouse /ping, Prometheus ready and its
targets up, Alertmanager ready, Grafana /api/health. Each check has its own timeout. A
service the target does not run is "not deployed", never healthy.

Exit status: 0 healthy, 1 degraded (something is impaired, the database still takes writes),
2 down (no Patroni leader or the primary does not answer).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
import requests

HEALTHY, DEGRADED, DOWN, NOT_DEPLOYED = "healthy", "degraded", "down", "not deployed"
EXIT_CODES = {HEALTHY: 0, DEGRADED: 1, DOWN: 2}
# The requirements' PostgreSQLReplicationLag alert fires above 10 MB.
MAX_LAG_BYTES = 10 * 1024 * 1024
# Without these the database is not serving: their failure makes the platform down.
CRITICAL = ("patroni", "postgres")


@dataclass(frozen=True)
class Targets:
    """Where each service answers; None means the target does not run it."""

    patroni_urls: tuple[str, ...] = ()
    ca_file: str | None = None  # the stack's CA: Patroni's REST API is TLS (None: the system's trust store)
    postgres_user: str = "postgres"
    postgres_password: str | None = None
    redis: tuple[str, int] | None = None
    redis_password: str | None = None
    clickhouse_url: str | None = None
    prometheus_url: str | None = None
    alertmanager_url: str | None = None
    grafana_url: str | None = None
    # The monitoring endpoints (Prometheus, Alertmanager, Grafana) serve https: the CA their certificates chain to,
    # and the monitoring credential's password (scripts/monitoring_client.py).
    monitoring_ca_file: str | None = None
    monitoring_password: str | None = None
    # Prometheus jobs whose targets the target does not run (reported as not deployed, not down).
    absent_jobs: tuple[str, ...] = ()
    absent_hosts: tuple[str, ...] = ()  # hosts not deployed (the sandbox runs no ClickHouse or Grafana host)


@dataclass
class Result:
    check: str
    status: str
    detail: str
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


def _get(url: str, timeout: float, client: requests.Session | None = None, verify: str | bool = True) -> requests.Response:
    """`client`: a session with its own CA and login (the monitoring endpoints); else `verify` is the CA file."""
    if client is not None:
        return client.get(url, timeout=timeout)
    return requests.get(url, timeout=timeout, verify=verify)


def _monitoring(targets: Targets) -> requests.Session:
    from scripts.monitoring_client import session

    return session(targets.monitoring_ca_file, targets.monitoring_password)


def _patroni_get(targets: Targets, url: str, timeout: float) -> requests.Response:
    return _get(url, timeout, verify=targets.ca_file or True)


def check_patroni(targets: Targets, timeout: float) -> Result:
    if not targets.patroni_urls:
        return Result("patroni", NOT_DEPLOYED, "no Patroni nodes in this target")
    cluster, errors = None, []
    for url in targets.patroni_urls:
        try:
            cluster = _patroni_get(targets, f"{url}/cluster", timeout).json()
            break
        except (requests.RequestException, ValueError) as error:
            errors.append(f"{url}: {type(error).__name__}")
    if cluster is None:
        return Result("patroni", DOWN, "no Patroni REST API answers: " + "; ".join(errors))
    members = cluster.get("members", [])
    leaders = [m for m in members if m.get("role") in ("leader", "standby_leader") and m.get("state") == "running"]
    if not leaders:
        return Result("patroni", DOWN, f"no leader among {len(members)} members", data={"members": members})
    leader = leaders[0]
    problems = []
    expected = len(targets.patroni_urls)
    if len(members) < expected:
        problems.append(f"{len(members)}/{expected} members registered")
    replicas = [m for m in members if m is not leader]
    for member in replicas:
        if member.get("state") not in ("running", "streaming"):
            problems.append(f"{member['name']} is {member.get('state')}")
        lag = member.get("lag")
        if not isinstance(lag, int):
            problems.append(f"{member['name']} lag unknown ({lag})")
        elif lag > MAX_LAG_BYTES:
            problems.append(f"{member['name']} lags {lag} bytes")
    try:
        status = _patroni_get(targets, leader["api_url"], timeout).json()
        streaming = sorted(r["application_name"] for r in status.get("replication", []) if r.get("state") == "streaming")
    except (requests.RequestException, ValueError, KeyError) as error:
        streaming = []
        problems.append(f"leader status unreadable ({type(error).__name__})")
    not_streaming = sorted({m["name"] for m in replicas} - set(streaming))
    if not_streaming:
        problems.append(f"not streaming from {leader['name']}: {', '.join(not_streaming)}")
    if len(replicas) + 1 < expected and not problems:
        problems.append("replica missing")
    lags = {m["name"]: m.get("lag") for m in replicas}
    detail = f"leader {leader['name']}, {len(streaming)} streaming, lag {lags}"
    data = {"leader": leader["name"], "streaming": streaming, "lag": lags, "members": len(members)}
    if problems:
        return Result("patroni", DEGRADED, f"{detail}; " + "; ".join(problems), data=data)
    return Result("patroni", HEALTHY, detail, data=data)


def check_postgres(targets: Targets, timeout: float) -> Result:
    if not targets.patroni_urls:
        return Result("postgres", NOT_DEPLOYED, "no PostgreSQL in this target")
    for url in targets.patroni_urls:
        try:
            if _patroni_get(targets, f"{url}/primary", timeout).status_code != 200:
                continue
            members = _patroni_get(targets, f"{url}/cluster", timeout).json()["members"]
            me = next(m for m in members if m["api_url"].startswith(url + "/"))
        except (requests.RequestException, ValueError, KeyError, StopIteration):
            continue
        try:
            with psycopg.connect(host=me["host"], port=me["port"], user=targets.postgres_user, password=targets.postgres_password,
                                 dbname="postgres", connect_timeout=max(2, int(timeout)),
                                 sslmode="verify-full", sslrootcert=targets.ca_file) as conn:
                conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
                value = conn.execute("SELECT 1").fetchone()[0]
                in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        except psycopg.Error as error:
            return Result("postgres", DOWN, f"SELECT 1 on {me['name']} failed: {str(error).strip().splitlines()[0]}")
        if value != 1 or in_recovery:
            return Result("postgres", DOWN, f"{me['name']} answered {value}, in recovery {in_recovery}")
        return Result("postgres", HEALTHY, f"SELECT 1 on primary {me['name']} ({me['host']}:{me['port']})")
    return Result("postgres", DOWN, "no node answers 200 on Patroni's /primary")


def check_redis(targets: Targets, timeout: float) -> Result:
    if targets.redis is None:
        return Result("redis", NOT_DEPLOYED, "no Redis in this target")
    host, port = targets.redis
    auth = f"AUTH {targets.redis_password}\r\n" if targets.redis_password else ""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(f"{auth}PING\r\n".encode())
            reply = b""
            while b"PONG" not in reply and b"-" not in reply:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError as error:
        return Result("redis", DOWN, f"{host}:{port}: {error}")
    if b"+PONG" in reply:
        return Result("redis", HEALTHY, f"PING {host}:{port} -> PONG")
    return Result("redis", DOWN, f"PING {host}:{port} -> {reply.decode(errors='replace').strip()!r}")


def _http_check(name: str, url: str | None, path: str, timeout: float, expect: Callable[[requests.Response], bool],
                client: requests.Session | None = None) -> Result:
    if url is None:
        return Result(name, NOT_DEPLOYED, f"no {name} in this target")
    try:
        response = _get(f"{url}{path}", timeout, client)
    except requests.RequestException as error:
        return Result(name, DOWN, f"{url}{path}: {type(error).__name__}")
    if expect(response):
        return Result(name, HEALTHY, f"{url}{path} -> {response.status_code} {response.text.strip()[:60]}")
    return Result(name, DOWN, f"{url}{path} -> {response.status_code} {response.text.strip()[:60]}")


def check_clickhouse(targets: Targets, timeout: float) -> Result:
    return _http_check("clickhouse", targets.clickhouse_url, "/ping", timeout, lambda r: r.status_code == 200 and "Ok" in r.text)


def check_prometheus(targets: Targets, timeout: float) -> Result:
    client = _monitoring(targets)
    ready = _http_check("prometheus", targets.prometheus_url, "/-/ready", timeout, lambda r: r.status_code == 200, client)
    if ready.status != HEALTHY:
        return ready
    try:
        active = _get(f"{targets.prometheus_url}/api/v1/targets?state=active", timeout, client).json()["data"]["activeTargets"]
    except (requests.RequestException, ValueError, KeyError) as error:
        return Result("prometheus", DEGRADED, f"ready, but targets unreadable ({type(error).__name__})")
    def not_deployed(target: dict) -> bool:
        host = target["labels"].get("instance", "").split(":")[0].split(".")[0]
        return target["labels"].get("job") in targets.absent_jobs or host in targets.absent_hosts

    absent = [t for t in active if not_deployed(t)]
    present = [t for t in active if t not in absent]
    down = sorted(f"{t['labels'].get('job')}/{t['labels'].get('instance')}" for t in present if t.get("health") != "up")
    data = {"targets": len(present), "down": down, "not_deployed": len(absent)}
    note = f", {len(absent)} not deployed ({', '.join(sorted({t['labels']['job'] for t in absent}))})" if absent else ""
    if not present:
        return Result("prometheus", DEGRADED, f"ready, but no target discovered yet{note}", data=data)
    if down:
        return Result("prometheus", DEGRADED, f"ready, {len(down)}/{len(present)} targets not up: {', '.join(down)}{note}",
                      data=data)
    return Result("prometheus", HEALTHY, f"ready, {len(present)} targets up{note}", data=data)


def check_alertmanager(targets: Targets, timeout: float) -> Result:
    return _http_check("alertmanager", targets.alertmanager_url, "/-/ready", timeout, lambda r: r.status_code == 200,
                       _monitoring(targets))


def check_grafana(targets: Targets, timeout: float) -> Result:
    def ok(response):
        try:
            return response.status_code == 200 and response.json().get("database") == "ok"
        except ValueError:
            return False

    return _http_check("grafana", targets.grafana_url, "/api/health", timeout, ok, _monitoring(targets))


CHECKS = (check_patroni, check_postgres, check_redis, check_clickhouse, check_prometheus, check_alertmanager, check_grafana)


def run_checks(targets: Targets, timeout: float = 3.0) -> list[Result]:
    """Every check in parallel; one that overruns its timeout is down, whatever it was doing."""
    results = []
    with ThreadPoolExecutor(max_workers=len(CHECKS)) as pool:
        started = time.monotonic()
        futures = [(check.__name__.removeprefix("check_"), pool.submit(_timed, check, targets, timeout)) for check in CHECKS]
        for name, future in futures:
            # Patroni's check makes a few sequential calls: give each check a few timeouts' worth.
            remaining = max(0.1, started + 4 * timeout - time.monotonic())
            try:
                results.append(future.result(timeout=remaining))
            except FutureTimeout:
                results.append(Result(name, DOWN, f"no answer within {4 * timeout:.0f}s"))
            except Exception as error:  # noqa: BLE001 - a crashing check is a failed check, not a crashed report
                results.append(Result(name, DOWN, f"check failed: {type(error).__name__}: {error}"))
    return results


def _timed(check, targets: Targets, timeout: float) -> Result:
    started = time.monotonic()
    result = check(targets, timeout)
    result.seconds = round(time.monotonic() - started, 3)
    return result


def overall(results: list[Result]) -> str:
    if any(r.status == DOWN and r.check in CRITICAL for r in results):
        return DOWN
    if any(r.status in (DOWN, DEGRADED) for r in results):
        return DEGRADED
    return HEALTHY


def sandbox_targets(state_dir: Path, port_base: int) -> Targets:
    from infra.sandbox.mapping import LOOPBACK, SANDBOX_ROLES
    from infra.sandbox.runner import Sandbox
    from infra.topology import SecretNames

    sandbox = Sandbox(state_dir, port_base)
    layout, services = sandbox.layout, sandbox.services
    if not services:
        raise SystemExit(f"no sandbox in {state_dir}: start one with `infra sandbox up STACK`")
    pg = "postgres" in services
    monitoring = "monitoring" in services and sandbox.topology.monitoring
    host = sandbox.topology.monitoring[0] if monitoring else None
    # The sandbox never runs Grafana, ClickHouse or the application.
    absent = {"grafana", "clickhouse", "app"}
    if "exporters" not in services:
        absent |= {"postgres", "node", "redis"}
    if not pg:
        absent |= {"postgres", "patroni"}
    return Targets(
        patroni_urls=tuple(sandbox.patroni_url(n) for n in sandbox.topology.postgres) if pg else (),
        ca_file=sandbox.ca_file if pg else None,
        postgres_password=sandbox.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD) if pg else None,
        redis=(LOOPBACK, layout.redis) if "redis" in services else None,
        prometheus_url=f"https://{LOOPBACK}:{layout.prometheus(host)}" if host else None,
        alertmanager_url=f"https://{LOOPBACK}:{layout.alertmanager(host)}" if host else None,
        monitoring_ca_file=sandbox.ca_file if host else None,
        monitoring_password=sandbox.secret(SecretNames.MONITORING_PASSWORD) if host else None,
        absent_jobs=tuple(sorted(absent)),
        absent_hosts=tuple(h.name for h in sandbox.topology.hosts if h.role not in SANDBOX_ROLES),
    )


def stack_targets(stack: str) -> Targets:
    """A deployed stack, by its private DNS names (run from a host inside the VPC)."""
    from infra.pki import ca_path
    from infra.render.patroni import restapi_url
    from infra.sandbox.cli import stack_settings
    from infra.topology import Ports, SecretNames, build_topology, secret_path

    topology = build_topology(stack_settings(stack))

    def secret(name: str) -> str | None:
        try:
            return Path(secret_path(name)).read_text().strip()
        except OSError:
            return None

    return Targets(
        patroni_urls=tuple(restapi_url(h) for h in topology.postgres),
        ca_file=ca_path(),  # a host of the stack has it
        postgres_user="postgres_exporter",
        postgres_password=secret(SecretNames.POSTGRES_EXPORTER_PASSWORD),
        redis=(topology.redis_endpoint, Ports.REDIS),
        redis_password=secret(SecretNames.REDIS_AUTH_TOKEN),
        clickhouse_url=f"http://{topology.clickhouse[0].fqdn}:{Ports.CLICKHOUSE_HTTP}" if topology.clickhouse else None,
        prometheus_url=f"https://{topology.monitoring[0].fqdn}:{Ports.PROMETHEUS}" if topology.monitoring else None,
        alertmanager_url=f"https://{topology.monitoring[0].fqdn}:{Ports.ALERTMANAGER}" if topology.monitoring else None,
        grafana_url=f"https://{topology.grafana[0].fqdn}:{Ports.GRAFANA}" if topology.grafana else None,
        monitoring_ca_file=ca_path(),
        monitoring_password=secret(SecretNames.MONITORING_PASSWORD),
    )


def format_table(results: list[Result], status: str) -> str:
    width = max(len(r.check) for r in results)
    lines = [f"{'check':<{width}}  {'status':<12}  {'time':>6}  detail"]
    lines += [f"{r.check:<{width}}  {r.status:<12}  {r.seconds:>5.2f}s  {r.detail}" for r in results]
    lines.append(f"overall: {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="health_checks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sandbox", action="store_true", help="the local sandbox (infra sandbox up)")
    where.add_argument("--stack", help="a deployed stack, by its private DNS names")
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("INFRA_SANDBOX_DIR", ".sandbox")))
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("INFRA_SANDBOX_PORT_BASE", 25000)))
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per request (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    targets = sandbox_targets(args.state_dir, args.port_base) if args.sandbox else stack_targets(args.stack)
    results = run_checks(targets, args.timeout)
    status = overall(results)
    if args.json:
        print(json.dumps({"status": status, "checks": [asdict(r) for r in results]}, indent=2))
    else:
        print(format_table(results, status))
    return EXIT_CODES[status]


if __name__ == "__main__":
    sys.exit(main())
