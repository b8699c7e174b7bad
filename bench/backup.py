"""Backups on a generated database: pgbench's tables (scale 50, about 750 MB) in the prod sandbox, archived and
backed up by the real pgBackRest into the TLS S3 endpoint under the hosts' IAM policy (as
tests/postgres/test_backups_live.py runs it), the backup job run as systemd runs it.

    .venv/bin/python -m bench.backup                 # prod, pgbench -s 50, 60 s of writes for the archive lag
    .venv/bin/python -m bench.backup --scale 10 --writes 30

1. pgbench -i -s SCALE on the leader; every replica streaming again.
2. Archive lag: pgbench writes for --writes seconds, a WAL switch every --switch-every seconds, while a
   sampler notes when each segment is closed on the leader (pg_walfile_name of the current LSN changes,
   sampled every 0.1 s) and when it first appears in the repository (listed every 0.25 s).
3. A full backup through betting-pg-backup@full.service on every node (the designated standby takes it):
   pgBackRest's time, then the verification's (restore, recovery, pg_amcheck, canary, checksums).
4. A point-in-time restore (`backup.py restore --to`) to a moment between two writes, timed end to end.

The figures are this machine's (2 cores, one disk for every member, moto in the bench's own process):
moto's in-memory S3 and loopback TLS, not AWS. Last line:
`backup: full F MB in T s (R MB/s); verify V s; restore to a point in time P s; archive lag p95 A s`.
Ports 26000-26099 (the bench range; the endpoint is the base + 99).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from infra.sandbox.runner import Sandbox, wait_for
from infra.sandbox.s3 import backup_endpoint
from infra.stackfile import load_stack
from infra.topology import BackupLayout, Paths, SecretNames

PORT_BASE = 26000
VERIFY_CHECKS = ("restore", "recovery", "pg_amcheck", "canary", "checksums")


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def pgbench(sandbox: Sandbox, *args: str) -> None:
    leader = sandbox.leader()
    env = {**os.environ, "PGPASSWORD": sandbox.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD)}
    subprocess.run([f"{Paths.POSTGRES_BIN}/pgbench", "-h", "127.0.0.1", "-p", str(sandbox.layout.postgres(leader)),
                    "-U", "postgres", *args, "postgres"], env=env, check=True, capture_output=True, text=True)


def sql(sandbox: Sandbox, statement: str) -> list[tuple]:
    with psycopg.connect(sandbox.dsn(sandbox.leader()), autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else []


class ArchiveLag:
    """When each WAL segment is closed on the leader, and when it first shows in the repository."""

    def __init__(self, sandbox: Sandbox, endpoint, bucket: str, stanza: str):
        self.sandbox, self.s3, self.bucket = sandbox, endpoint.admin(), bucket
        self.prefix = f"{BackupLayout.REPOSITORY}archive/{stanza}/"
        self.closed: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()

    def _segments(self) -> set[str]:
        names = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            names |= {o["Key"].rsplit("/", 1)[-1].split("-", 1)[0] for o in page.get("Contents", [])}
        return names

    def _watch_leader(self) -> None:
        with psycopg.connect(self.sandbox.dsn(self.sandbox.leader()), autocommit=True) as conn:
            current = None
            while not self._stop.is_set():
                (name,) = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
                if current is not None and name != current:
                    self.closed[current] = time.monotonic()
                current = name
                time.sleep(0.1)

    def _watch_repository(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for name in self._segments() - set(self.seen):
                self.seen[name] = now
            time.sleep(0.25)

    def __enter__(self) -> ArchiveLag:
        self.seen = dict.fromkeys(self._segments(), 0.0)  # what was there before is not measured
        self._threads = [threading.Thread(target=t, daemon=True) for t in (self._watch_leader, self._watch_repository)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def lags(self) -> list[float]:
        return [self.seen[s] - closed for s, closed in self.closed.items() if self.seen.get(s, 0.0) > 0.0]


def _service(sandbox: Sandbox, node, kind: str) -> subprocess.CompletedProcess:
    return sandbox.platform(node).run_oneshot(f"betting-pg-backup@{kind}.service", timeout=7200)


def run(args: argparse.Namespace) -> int:
    settings, config, _ = load_stack(args.stack)
    state = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    state.chmod(0o755)  # the postgres user reaches the hosts' roots and the endpoint's CA file
    endpoint, keys, _ = backup_endpoint(state / "s3", args.port_base + 99, args.stack, config)
    sandbox = Sandbox(state / "sandbox", args.port_base, s3=endpoint.sandbox_s3(keys))
    try:
        started = time.monotonic()
        sandbox.up(settings, services=("postgres",))
        topology = sandbox.topology
        say(f"sandbox of {args.stack} up in {time.monotonic() - started:.1f} s")

        started = time.monotonic()
        pgbench(sandbox, "-i", "-s", str(args.scale), "-q")
        sandbox.wait_healthy(600)
        ((size,),) = sql(sandbox, "SELECT pg_database_size('postgres')")
        say(f"pgbench -i -s {args.scale}: {size / 2**20:.0f} MB in {time.monotonic() - started:.1f} s, replicas streaming")

        lag = ArchiveLag(sandbox, endpoint, topology.backup_bucket, topology.patroni_scope)
        with lag:
            # Segments closed every few seconds as well as when full: pgbench's writes alone fill one in minutes.
            done = threading.Event()

            def switch() -> None:
                while not done.wait(args.switch_every):
                    sql(sandbox, "SELECT pg_switch_wal()")

            switcher = threading.Thread(target=switch, daemon=True)
            switcher.start()
            pgbench(sandbox, "-T", str(args.writes), "-c", "2", "-j", "2", "-N")
            done.set()
            switcher.join()
            last = sql(sandbox, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
            wait_for(f"WAL segment {last} archived", lambda: lag.seen.get(last, 0.0) > 0.0, 300)
        lags = sorted(lag.lags())
        p95 = lags[max(0, int(round(0.95 * len(lags))) - 1)]
        say(f"archive lag over {len(lags)} segments: p50 {statistics.median(lags):.2f} s, p95 {p95:.2f} s, max {lags[-1]:.2f} s")

        results = {node.name: _service(sandbox, node, "full") for node in topology.postgres}
        failed = {name: r for name, r in results.items() if r.returncode != 0}
        if failed:
            for name, result in failed.items():
                print(f"{name}: {result.stdout[-2000:]}{result.stderr}", file=sys.stderr)
            return 1
        (taker, result), = [(n, r) for n, r in results.items() if "backup: done:" in r.stdout]
        label, mb, seconds = re.search(r"backup: backup: (\S+) \(full, ([\d.]+) MB\) in ([\d.]+) s", result.stdout).groups()
        record_keys = [o["Key"] for o in endpoint.admin().list_objects_v2(
            Bucket=topology.backup_bucket, Prefix=f"{BackupLayout.VERIFICATION}{topology.patroni_scope}/{label}/")["Contents"]]
        record = json.loads(endpoint.admin().get_object(Bucket=topology.backup_bucket, Key=record_keys[-1])["Body"].read())
        checks = {c["name"]: c["seconds"] for c in record["checks"]}
        verify = sum(checks[name] for name in VERIFY_CHECKS)
        say(f"full backup {label} on {taker}: {mb} MB in {seconds} s; verification "
            + ", ".join(f"{name} {checks[name]:.1f} s" for name in VERIFY_CHECKS))
        for check in record["checks"]:
            say(f"  {check['name']}: {check['result']}, {check.get('detail', '')}")

        sql(sandbox, "CREATE TABLE bench_pitr (what text); INSERT INTO bench_pitr VALUES ('before')")
        time.sleep(1)
        moment = datetime.datetime.now(datetime.UTC)
        time.sleep(1)
        sql(sandbox, "INSERT INTO bench_pitr VALUES ('after')")
        segment = sql(sandbox, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        wait_for(f"WAL segment {segment} archived", lambda: segment in lag._segments(), 300)
        node = sandbox.node(taker)
        target = sandbox.layout.host_path(node, "/var/lib/postgresql/bench-pitr")
        started = time.monotonic()
        restored = sandbox.platform(node).run_oneshot("betting-pg-backup@full.service", timeout=7200, arguments=[
            "restore", "--to", moment.isoformat(), "--target", str(target)])
        pitr = time.monotonic() - started
        if restored.returncode != 0:
            print(restored.stdout[-2000:] + restored.stderr, file=sys.stderr)
            return 1
        shutil.rmtree(target, ignore_errors=True)
        say(f"point-in-time restore to {moment.isoformat()} in {pitr:.1f} s")
        rate = float(mb) / float(seconds)
        print(f"backup: full {float(mb):.0f} MB in {float(seconds):.1f} s ({rate:.1f} MB/s); verify {verify:.1f} s; "
              f"restore to a point in time {pitr:.1f} s; archive lag p95 {p95:.2f} s", flush=True)
        return 0
    finally:
        sandbox.down()
        endpoint.relax()
        endpoint.stop()
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.backup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", default="prod")
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (50: about 750 MB)")
    parser.add_argument("--writes", type=int, default=60, help="seconds of pgbench writes for the archive lag")
    parser.add_argument("--switch-every", type=float, default=2.0, help="seconds between forced WAL switches while writing")
    parser.add_argument("--port-base", type=int, default=PORT_BASE)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
