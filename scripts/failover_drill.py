"""Failover drill: break the Patroni leader of a running sandbox cluster, measure RTO and lost writes.

    .venv/bin/python -m scripts.failover_drill node-loss [--count 3] [--state-dir .sandbox] [--port-base 25000]

Scenarios:
  node-loss    SIGKILL the leader's Patroni and its postmaster (the host is gone)
  pg-crash     SIGKILL the leader's postmaster only (Patroni restarts it)
  switchover   planned switchover through Patroni's REST API
  split-brain  SIGKILL the leader's Patroni only: its postmaster lives on and still accepts writes

A writer inserts rows without pause straight into the node whose Patroni answers /primary with
200 and records every commit that returned OK. Where the sandbox runs the client path, a second
writer does the same through the writer endpoint as a client would (every node's HAProxy in
turn, as the load balancer spreads connections, then PgBouncer), logged in as an application
role, and a reader queries the reader endpoint all along. RTO is the time from the fault to the
first acknowledged write on a connection opened after the outage began (the first failed write
or connection after the fault); a write is lost when it was acknowledged and is not on the
primary afterwards, misrouted when the server that acknowledged it was a replica or the old
primary after the new one took writes. The killed node is restarted and must rejoin as a
streaming replica (pg_rewind) before the drill counts as done. Prints progress while it runs;
exits 1 if any acknowledged write was lost or misrouted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import requests
from psycopg import sql

from infra.render.haproxy import HEALTH_WRITER
from infra.sandbox import mapping as m
from infra.sandbox.runner import Sandbox, SandboxError, wait_for
from infra.topology import Host, SecretNames

SCENARIOS = ("node-loss", "pg-crash", "switchover", "split-brain")
TABLE = "failover_drill_writes"
# A commit that waits longer than this is abandoned (never counted as acknowledged): in
# synchronous mode an isolated old primary blocks commits until its sync standby returns.
WRITE_TIMEOUT_S = 2.0


# The application's kind of login for the client path: PgBouncer lets no superuser through.
CLIENT_ROLE = "failover_drill"


@dataclass
class Ack:
    id: int
    at: float  # time.monotonic() when the commit returned
    connected_at: float  # when the connection that carried it was opened
    member: str
    in_recovery: bool = False  # what the server that acknowledged it said in the same transaction
    via: int = 0  # the writer endpoint's port (a node's HAProxy) the connection went through


@dataclass
class Writer:
    """Inserts rows one after another through the current Patroni primary; records each OK."""

    api_urls: list[str]
    password: str
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    acks: list[Ack] = field(default_factory=list)
    errors: int = 0
    sync_cancel_warnings: int = 0
    verify: str | bool = True  # the CA file Patroni's REST API is verified with (requests' `verify`)
    renew_every: int = 0  # open a new connection after this many writes on one (0: keep it while it works)
    tls: dict[str, str] = field(default_factory=dict)  # libpq's sslmode and sslrootcert (Sandbox.client_tls)
    failures: list[float] = field(default_factory=list)  # when a write or a connection failed

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drill-writer", daemon=True)

    def primary(self) -> dict | None:
        """The member whose Patroni says it is the primary (200 on /primary)."""
        for url in self.api_urls:
            try:
                response = requests.get(f"{url}/primary", timeout=0.5, verify=self.verify)
            except requests.RequestException:
                continue
            if response.status_code == 200:
                # /primary answers with the node's status, not its connect address: /cluster has that.
                members = requests.get(f"{url}/cluster", timeout=0.5, verify=self.verify).json()["members"]
                me = next(m for m in members if m["api_url"].startswith(url + "/"))
                return {"name": me["name"], "host": me["host"], "port": me["port"]}
        return None

    def _connect(self):
        member = self.primary()
        if member is None:
            return None, None
        conn = psycopg.connect(host=member["host"], port=member["port"], user="postgres", password=self.password,
                               dbname="postgres", autocommit=True, connect_timeout=2, **self.tls)
        conn.add_notice_handler(self._notice)
        return conn, member["name"]

    def _notice(self, diagnostic) -> None:
        if "synchronous replication" in (diagnostic.message_primary or ""):
            self.sync_cancel_warnings += 1

    def ensure_table(self) -> None:
        conn, _ = self._connect()
        if conn is None:
            raise SandboxError("no primary to create the drill table on")
        with conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (run text, id bigint, at timestamptz DEFAULT now(), "
                         "PRIMARY KEY (run, id))")

    def _loop(self) -> None:
        conn, member, connected_at, next_id, on_connection = None, None, 0.0, 0, 0
        while not self._stop.is_set():
            if conn is None:
                try:
                    conn, member = self._connect()
                    connected_at, on_connection = time.monotonic(), 0
                except (psycopg.Error, requests.RequestException, OSError, StopIteration, KeyError):
                    conn = None
                if conn is None:
                    self.failures.append(time.monotonic())
                    time.sleep(0.05)
                    continue
            next_id += 1
            # Closing the socket from a timer is the only way to give up on a commit without the
            # server turning the cancel into a success (a cancelled sync-rep wait commits locally).
            timer = threading.Timer(WRITE_TIMEOUT_S, _shutdown_socket, (conn,))
            timer.start()
            try:
                ack = self._write(conn, next_id, member)
                ack.connected_at = connected_at
                self.acks.append(ack)
                on_connection += 1
                if self.renew_every and on_connection >= self.renew_every:
                    _close_quietly(conn)
                    conn = None
            except psycopg.Error:
                self.errors += 1
                self.failures.append(time.monotonic())
                _close_quietly(conn)
                conn = None
                time.sleep(0.02)
            finally:
                timer.cancel()
        if conn is not None:
            _close_quietly(conn)

    def _write(self, conn, row_id: int, member: str) -> Ack:
        conn.execute(f"INSERT INTO {TABLE} (run, id) VALUES (%s, %s)", (self.run, row_id))
        return Ack(row_id, time.monotonic(), 0.0, member)

    def start(self, first_ack_timeout: float = 30) -> None:
        self._thread.start()
        wait_for("the writer's first acknowledged write", lambda: self.acks, first_ack_timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WRITE_TIMEOUT_S + 5)

    def first_ack_after(self, since: float, not_member: str | None = None) -> Ack | None:
        """The first write acknowledged on a connection opened after the outage began: after the first failed
        write or connection since `since` (through PgBouncer a new client connection may still be served by
        a backend of the crashed server for a moment), or after `since` if none failed."""
        outage = next((t for t in list(self.failures) if t >= since), since)
        for ack in list(self.acks):
            if ack.connected_at >= outage and ack.at >= since and (not_member is None or ack.member != not_member):
                return ack
        return None

    def missing(self, dsn: str) -> list[int]:
        """Acknowledged ids that are not on the server at `dsn`."""
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
            present = {row[0] for row in conn.execute(f"SELECT id FROM {TABLE} WHERE run = %s", (self.run,))}
        return sorted({ack.id for ack in self.acks} - present)


@dataclass
class ClientLogin:
    """An application role's login to the client path: the writer and reader endpoints' ports (every node's
    HAProxy), the pooled database, and which server port is which member (to name who acknowledged)."""

    writer_ports: list[int]
    reader_ports: list[int]
    database: str
    user: str
    password: str
    members: dict[int, str]  # PostgreSQL port -> member name
    tls: dict[str, str] = field(default_factory=dict)  # libpq's sslmode and sslrootcert: TLS ends at PgBouncer


def prepare_client(sandbox: Sandbox, timeout: float = 30) -> ClientLogin:
    """The drill's application role (a fresh password each time) and its table in the first pooled database,
    made on the leader as an application's migration would; returns once every reader port logs it in
    (the replicas have replayed the role)."""
    layout, topology = sandbox.layout, sandbox.topology
    database, password = sandbox.settings.client_path.databases[0], secrets.token_urlsafe(18)
    leader = sandbox.wait_healthy()
    with psycopg.connect(sandbox.dsn(leader), autocommit=True, connect_timeout=3) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        verb = "ALTER" if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CLIENT_ROLE,)).fetchone() else "CREATE"
        conn.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(CLIENT_ROLE), sql.Literal(password)))
    with psycopg.connect(sandbox.dsn(leader, database), autocommit=True, connect_timeout=3) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (run text, id bigint, at timestamptz DEFAULT now(), "
                     "PRIMARY KEY (run, id))")
        conn.execute(sql.SQL(f"GRANT SELECT, INSERT ON {TABLE} TO {{}}").format(sql.Identifier(CLIENT_ROLE)))
    login = ClientLogin([layout.haproxy_primary(n) for n in topology.postgres],
                        [layout.haproxy_replicas(n) for n in topology.postgres], database, CLIENT_ROLE, password,
                        {layout.postgres(n): n.name for n in topology.postgres}, sandbox.client_tls())

    def every_reader_logs_in() -> bool:
        for port in login.reader_ports:
            client_connect(login, port).close()
        return True

    wait_for("the drill's role on every reader port", every_reader_logs_in, timeout, 0.2)
    return login


def client_connect(login: ClientLogin, port: int):
    """A client's connection through HAProxy and PgBouncer. No server-side prepared statements: PgBouncer 1.18
    in transaction mode cannot keep them (psycopg prepares a query it has run 5 times)."""
    return psycopg.connect(host=m.LOOPBACK, port=port, user=login.user, password=login.password, dbname=login.database,
                           autocommit=True, connect_timeout=2, prepare_threshold=None, **login.tls)


@dataclass
class EndpointWriter(Writer):
    """The Writer as a client of the writer endpoint: each new connection goes to the next node's HAProxy (as the
    load balancer spreads them, to the leader's and the others' alike), and a new one every `renew_every`
    writes, as many clients would; each write returns, in its own transaction, which server took it and
    whether that server was in recovery."""

    login: ClientLogin | None = None
    renew_every: int = 25

    def __post_init__(self):
        super().__post_init__()
        self._ports = itertools.cycle(self.login.writer_ports)

    def _connect(self):
        self._via = next(self._ports)
        return client_connect(self.login, self._via), "?"

    def ensure_table(self) -> None:
        """prepare_client made it."""

    def _write(self, conn, row_id: int, member: str) -> Ack:
        port, in_recovery = conn.execute(
            f"INSERT INTO {TABLE} (run, id) VALUES (%s, %s) RETURNING current_setting('port')::int, pg_is_in_recovery()",
            (self.run, row_id)).fetchone()
        return Ack(row_id, time.monotonic(), 0.0, self.login.members.get(port, str(port)), in_recovery, self._via)



class Sampler:
    """Calls `sample()` every `interval` seconds on a thread, from `with` to its end."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


class ClusterSampler(Sampler):
    """GET /cluster every 0.2 s from the first member that answers; records who is not running
    (members missing from /cluster included), so a rollout can show how many were down at once."""

    def __init__(self, urls: dict[str, str], interval: float = 0.2, verify: str | bool = True):
        super().__init__(interval)
        self.urls, self.names, self.verify = urls, list(urls), verify
        self.samples: list[tuple[float, list[str], str | None]] = []

    def sample(self) -> None:
        for url in self.urls.values():
            try:
                members = {m["name"]: m for m in requests.get(f"{url}/cluster", timeout=1, verify=self.verify).json()["members"]}
            except (requests.RequestException, ValueError, KeyError):
                continue
            down = [n for n in self.names if members.get(n, {}).get("state") != "running"]
            leader = next((n for n, m in members.items() if m["role"] == "leader"), None)
            self.samples.append((time.monotonic(), down, leader))
            break

    @property
    def most_down(self) -> int:
        return max((len(down) for _, down, _ in self.samples), default=0)


class ReaderSampler(Sampler):
    """A client of the reader endpoint: one query every `interval` on its connection, through the next node's
    HAProxy after a failure; records when each answered, and whether a replica (in recovery) answered."""

    def __init__(self, login: ClientLogin, interval: float = 0.1):
        super().__init__(interval)
        self.login, self._ports, self._conn = login, itertools.cycle(login.reader_ports), None
        self.samples: list[tuple[float, bool, bool]] = []  # (time, answered, by a replica)

    def sample(self) -> None:
        try:
            if self._conn is None:
                self._conn = client_connect(self.login, next(self._ports))
            (in_recovery,) = self._conn.execute("SELECT pg_is_in_recovery()").fetchone()
            self.samples.append((time.monotonic(), True, in_recovery))
        except (psycopg.Error, OSError):
            self.samples.append((time.monotonic(), False, False))
            if self._conn is not None:
                _close_quietly(self._conn)
            self._conn = None

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._conn is not None:
            _close_quietly(self._conn)

    def answered(self, since: float, until: float) -> int:
        return sum(ok for at, ok, _ in self.samples if since <= at <= until)

    def longest_gap(self) -> float:
        """The longest time between two answers."""
        times = [at for at, ok, _ in self.samples if ok]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


class EtcdSampler(Sampler):
    """How many etcd members do not answer /health as healthy, at most, while it runs."""

    def __init__(self, urls: list[str], interval: float = 0.2, verify: str | bool = True,
                 cert: tuple[str, str] | None = None):
        """`verify`, `cert`: the CA and the client certificate etcd asks every client for."""
        super().__init__(interval)
        self.urls, self.most_down = urls, 0
        self.verify, self.cert = verify, cert

    def _healthy(self, url: str) -> bool:
        try:
            return requests.get(f"{url}/health", timeout=0.5, verify=self.verify, cert=self.cert).json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def sample(self) -> None:
        self.most_down = max(self.most_down, sum(not self._healthy(url) for url in self.urls))


def _shutdown_socket(conn) -> None:
    try:
        socket.socket(fileno=os.dup(conn.pgconn.socket)).shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass


def _close_quietly(conn) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - the connection is already broken
        pass


@dataclass
class DrillResult:
    scenario: str
    old_leader: str
    new_leader: str | None
    rto_s: float | None
    acknowledged: int
    lost: int
    rejoined_s: float | None
    sync_cancel_warnings: int = 0
    acks_before_fault: int = 0
    acks_after_fault: int = 0
    acks_on_old_leader_after_fault: int = 0  # split brain: the orphan primary still acknowledging
    old_postmaster_alive_at_new_primary: bool = False
    # Through the writer endpoint (HAProxy + PgBouncer), when the sandbox runs it; None: it does not.
    endpoint_rto_s: float | None = None
    endpoint_acknowledged: int = 0
    endpoint_lost: int = 0
    endpoint_misrouted: int = 0  # acknowledged by a replica, or by the old primary once the new one took writes
    endpoint_acks_before_fault: int = 0
    endpoint_acks_after_fault: int = 0
    endpoint_members_after_fault: tuple[str, ...] = ()  # who acknowledged writes through the endpoint after the fault
    endpoint_ports_after_fault: tuple[int, ...] = ()  # the nodes' HAProxy ports those writes came through
    # The reader endpoint: answers while no primary took writes (fault to the first write on the new one).
    reads_without_primary: int = 0
    reads_failed: int = 0
    reads_by_primary: int = 0
    reader_longest_gap_s: float | None = None

    def line(self) -> str:
        rto = f"{self.rto_s:.1f}s" if self.rto_s is not None else "none"
        rejoin = f", old leader back as replica after {self.rejoined_s:.1f}s" if self.rejoined_s is not None else ""
        text = (f"{self.scenario}: {self.old_leader} -> {self.new_leader}, RTO {rto}, "
                f"{self.acknowledged} writes acknowledged, {self.lost} lost{rejoin}")
        if self.reader_longest_gap_s is not None:
            client = f"{self.endpoint_rto_s:.1f}s" if self.endpoint_rto_s is not None else "none"
            text += (f"; via the writer endpoint RTO {client}, {self.endpoint_acknowledged} acknowledged, "
                     f"{self.endpoint_lost} lost, {self.endpoint_misrouted} misrouted; the reader answered "
                     f"{self.reads_without_primary} times without a primary, longest gap {self.reader_longest_gap_s:.1f}s")
        return text


def _member_role(sandbox: Sandbox, node: Host) -> str | None:
    for member in sandbox.cluster().get("members", []):
        if member["name"] == node.name:
            return member.get("role")
    return None


def _every_haproxy_sees_a_primary(sandbox: Sandbox) -> bool:
    for node in sandbox.topology.postgres:
        if requests.get(f"http://{m.LOOPBACK}:{sandbox.layout.haproxy_stats(node)}{HEALTH_WRITER}", timeout=1).status_code != 200:
            return False
    return True


def run_drill(sandbox: Sandbox, scenario: str, progress: Callable[[str], None] = print,
              rto_timeout: float = 120, settle_s: float = 1.0) -> DrillResult:
    """One drill on a healthy sandbox cluster; leaves it healthy again (all members streaming)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    login = prepare_client(sandbox) if sandbox.client_path_running() else None
    old = sandbox.wait_healthy()
    writer = Writer([sandbox.patroni_url(n) for n in sandbox.topology.postgres],
                    sandbox.secret(SecretNames.POSTGRES_SUPERUSER_PASSWORD), verify=sandbox.ca_file, tls=sandbox.client_tls())
    writer.ensure_table()
    writer.start()
    client = reader = None
    if login is not None:
        client, reader = EndpointWriter([], "", login=login), ReaderSampler(login)
        client.start()
        reader.__enter__()

    def stop_writers() -> None:
        writer.stop()
        if client is not None:
            client.stop()
            reader.__exit__(None, None, None)

    # The fault lands at a random point of Patroni's loop, as a real one would: right after the
    # cluster turns healthy the leader has just refreshed its key, which would bias every RTO.
    time.sleep(settle_s + random.uniform(0, sandbox.settings.patroni.loop_wait))
    start = time.monotonic()

    def say(text: str) -> None:
        progress(f"  t+{time.monotonic() - start:5.1f}s {text}")

    patroni_pid, postmaster_pid = sandbox.patroni_pid(old), sandbox.postmaster_pid(old)
    if scenario in ("node-loss", "split-brain"):
        os.kill(patroni_pid, signal.SIGKILL)
        if scenario == "node-loss":
            os.kill(postmaster_pid, signal.SIGKILL)
            say(f"SIGKILL {old.name}: Patroni (pid {patroni_pid}) and postmaster (pid {postmaster_pid})")
        else:
            say(f"SIGKILL {old.name}: Patroni only (pid {patroni_pid}); its postmaster (pid {postmaster_pid}) lives on")
    elif scenario == "pg-crash":
        os.kill(postmaster_pid, signal.SIGKILL)
        say(f"SIGKILL {old.name}: postmaster (pid {postmaster_pid})")
    else:
        say(f"POST /switchover leader={old.name}")
        # An unsafe endpoint: Patroni asks for the REST API's login (the agent's, from the sandbox's secrets).
        response = requests.post(f"{sandbox.patroni_url(old)}/switchover", json={"leader": old.name}, timeout=60,
                                 verify=sandbox.ca_file, auth=sandbox.patroni_auth())
        say(f"Patroni answered {response.status_code}: {response.text.strip()}")
        if response.status_code != 200:
            stop_writers()
            raise SandboxError(f"switchover refused: {response.status_code} {response.text.strip()}")

    must_move = scenario != "pg-crash"
    ack = client_ack = None
    try:
        ack = wait_for("an acknowledged write on a new connection",
                       lambda: writer.first_ack_after(start, old.name if must_move else None), rto_timeout, 0.05)
        say(f"{ack.member} acknowledged a write: RTO {ack.at - start:.1f}s")
        if client is not None:
            client_ack = wait_for("an acknowledged write through the writer endpoint",
                                  lambda: client.first_ack_after(start, old.name if must_move else None), rto_timeout, 0.05)
            say(f"{client_ack.member} acknowledged a write through the writer endpoint: RTO {client_ack.at - start:.1f}s")
    except SandboxError as error:
        say(f"no write acknowledged: {error}")
    orphan_alive = scenario == "split-brain" and sandbox.postmaster_pid(old) == postmaster_pid
    if scenario == "split-brain":
        say(f"{old.name}'s postmaster is {'still running' if orphan_alive else 'gone'} while {ack and ack.member} is primary")
    time.sleep(settle_s)
    stop_writers()

    rejoined = None
    if scenario in ("node-loss", "split-brain"):
        sandbox.start_patroni(old)
        say(f"restarted Patroni on {old.name}")
    leader = sandbox.wait_healthy(timeout=180)
    if scenario != "pg-crash" or leader != old:
        wait_for(f"{old.name} to stream as a replica", lambda: _member_role(sandbox, old) in ("replica", "sync_standby"), 120)
    if scenario in ("node-loss", "split-brain"):
        rejoined = time.monotonic() - start
        say(f"{old.name} streams from {leader.name} again")
    missing = writer.missing(sandbox.dsn(leader))
    say(f"{len(writer.acks)} writes acknowledged, {len(missing)} missing on {leader.name}"
        + (f": {missing[:10]}" if missing else ""))
    result = DrillResult(
        scenario, old.name, ack.member if ack else None, ack.at - start if ack else None, len(writer.acks), len(missing),
        rejoined, writer.sync_cancel_warnings,
        acks_before_fault=sum(a.at < start for a in writer.acks),
        acks_after_fault=sum(a.at >= start for a in writer.acks),
        acks_on_old_leader_after_fault=sum(a.at >= start and a.member == old.name for a in writer.acks),
        old_postmaster_alive_at_new_primary=orphan_alive,
    )
    if client is not None:
        wait_for("every node's HAProxy to see the primary", lambda: _every_haproxy_sees_a_primary(sandbox), 30)
        client_missing = client.missing(sandbox.dsn(leader, login.database))
        # Once the new primary took a write (on either path), the old one must take none.
        moved = min((a.at for a in (ack, client_ack) if a is not None), default=None) if must_move else None
        misrouted = [a for a in client.acks
                     if a.in_recovery or (moved is not None and a.member == old.name and a.at > moved)]
        outage_end = moved if moved is not None else (ack.at if ack else time.monotonic())
        result.endpoint_rto_s = client_ack.at - start if client_ack else None
        result.endpoint_acknowledged, result.endpoint_lost = len(client.acks), len(client_missing)
        result.endpoint_misrouted = len(misrouted)
        result.endpoint_acks_before_fault = sum(a.at < start for a in client.acks)
        result.endpoint_acks_after_fault = sum(a.at >= start for a in client.acks)
        result.endpoint_members_after_fault = tuple(sorted({a.member for a in client.acks if a.at >= start}))
        result.endpoint_ports_after_fault = tuple(sorted({a.via for a in client.acks if a.at >= start}))
        result.reads_without_primary = reader.answered(start, outage_end)
        result.reads_failed = sum(not ok for _, ok, _ in reader.samples)
        result.reads_by_primary = sum(ok and not replica for _, ok, replica in reader.samples)
        result.reader_longest_gap_s = reader.longest_gap()
        say(f"writer endpoint: {len(client.acks)} writes acknowledged, {len(client_missing)} missing, "
            f"{len(misrouted)} misrouted; reader endpoint: {result.reads_without_primary} answers without a primary, "
            f"{result.reads_failed} failures, longest gap {result.reader_longest_gap_s:.1f}s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="failover_drill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("INFRA_SANDBOX_DIR", ".sandbox")))
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("INFRA_SANDBOX_PORT_BASE", 25000)))
    args = parser.parse_args(argv)
    sandbox = Sandbox(args.state_dir, args.port_base)
    if not sandbox.running():
        print(f"no sandbox running in {args.state_dir}: start one with `infra sandbox up STACK`", file=sys.stderr)
        return 2
    lost = 0
    for i in range(1, args.count + 1):
        print(f"drill {i}/{args.count}: {args.scenario}", flush=True)
        result = run_drill(sandbox, args.scenario, progress=lambda text: print(text, flush=True))
        print(result.line(), flush=True)
        lost += result.lost + result.endpoint_lost + result.endpoint_misrouted
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
