#!/usr/bin/python3
"""backup.py: pgBackRest backups of this host's Patroni cluster, each proven by a restore.

    backup.py run [--type full|diff]             the scheduled backup, then its verification (designated node only)
    backup.py verify LABEL                       restore an existing backup into a scratch directory and check it
    backup.py restore --to TIME [--target DIR]   point-in-time recovery into DIR (stopped afterwards)
    backup.py list [--json]                      the backups in the repository

Installed on the PostgreSQL hosts as /usr/local/lib/betting-pg-backup/backup.py and run as postgres by
/usr/bin/python3 (Debian's, with python3-boto3; the standard library otherwise), from
betting-pg-backup@full.service and @diff.service or by hand: `sudo -u postgres python3 .../backup.py list`.
Every per-host value comes from the environment file /etc/betting/pg-backup.env (--env-file or
$BETTING_PG_BACKUP_ENV name another one).

A verification restores the backup with pgBackRest into SCRATCH_DIR (archive_mode off: the copy never
archives into the repository), starts a throw-away PostgreSQL on a private socket, runs pg_amcheck, compares
the canary table with what was written just before the backup (recorded in the backup's annotations), stops
it and runs pg_checksums. It writes a JSON record under the bucket's verification prefix (SSE-KMS), and only
then the node_exporter textfile metrics, atomically.

Exit status: 0 done (or, for `run`, not the designated node: nothing to do); 1 a step failed, with one line
`backup: STEP failed: WHY` on stderr and nothing marked as a success; 2 bad arguments, one line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

DEFAULT_ENV = "/etc/betting/pg-backup.env"
ENV_VARIABLE = "BETTING_PG_BACKUP_ENV"
PROGRESS_SECONDS = 30.0
# A replica further behind than this would make the backup wait for its replay: it is not a candidate.
MAX_CANDIDATE_LAG_BYTES = 64 * 2**20
RECOVERY_TIMEOUT_SECONDS = 12 * 3600
STARTUP_GRACE_SECONDS = 10.0
METRICS_FILE = "pg_backup.prom"
LABEL = re.compile(r"^\d{8}-\d{6}F(_\d{8}-\d{6}[DI])?$")
CANARY_SQL = """
CREATE SCHEMA IF NOT EXISTS betting_backup;
CREATE TABLE IF NOT EXISTS betting_backup.canary (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    written_at timestamptz NOT NULL DEFAULT now(),
    node text NOT NULL,
    token text NOT NULL UNIQUE
);
INSERT INTO betting_backup.canary (node, token) VALUES (:'node', :'token');
"""
# Row count and a checksum over every row: equal in the restored copy only if no row is missing or altered.
CANARY_SUMMARY_SQL = ("SELECT count(*), coalesce(md5(string_agg(id || ':' || token, ',' ORDER BY id)), '') "
                      "FROM betting_backup.canary;")
METRICS = {
    "backup_last_success_timestamp": "Unix time of the last base backup that was taken and then verified by a restore.",
    "backup_last_verified_timestamp": "Unix time of the last successful verification (restore, pg_amcheck, canary, checksums).",
    "backup_last_duration_seconds": "Seconds the last successful base backup took (pgBackRest, without its verification).",
    "backup_last_size_bytes": "Size of the database the last successful base backup covers.",
}
CONFIG_KEYS = (
    "STANZA", "NODE_NAME", "PATRONI_URL", "PATRONI_CA_FILE", "PGBACKREST", "PGBACKREST_CONFIG", "PGBACKREST_LOCK_PATH",
    "POSTGRES_BIN", "PGDATA", "PGHOST", "PGPORT", "SUPERUSER_PASSWORD_FILE", "SSL_ROOT_CERT", "SCRATCH_DIR", "TEXTFILE_DIR",
    "BUCKET", "REGION", "S3_ENDPOINT", "REPOSITORY_PREFIX", "VERIFICATION_PREFIX", "KMS_KEY",
)


class StepFailed(Exception):
    def __init__(self, step: str, reason: str):
        self.step, self.reason = step, " ".join(reason.split()) or "no reason given"
        super().__init__(f"{step} failed: {self.reason}")


class UsageError(Exception):
    pass


def say(message: str) -> None:
    print(f"backup: {message}", flush=True)


# ---- configuration -----------------------------------------------------------------------------------
def read_env_file(text: str) -> dict[str, str]:
    """KEY="value" lines (systemd's EnvironmentFile quoting, which `sh .` reads the same way)."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = re.sub(r"\\(.)", r"\1", value[1:-1]) if value[0] == '"' else value[1:-1]
        values[key.strip()] = value
    return values


@dataclass(frozen=True)
class Config:
    values: dict[str, str]

    def __getattr__(self, name: str) -> str:
        try:
            return self.values[name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def load(cls, path: str) -> Config:
        try:
            with open(path) as handle:
                values = read_env_file(handle.read())
        except OSError as error:
            raise StepFailed("config", f"cannot read {path}: {error.strerror}") from None
        missing = [key for key in CONFIG_KEYS if not values.get(key)]
        if missing:
            raise StepFailed("config", f"{path} does not set {', '.join(missing)}")
        return cls(values)

    def pgbackrest(self, *args: str) -> list[str]:
        return [self.pgbackrest_path, f"--config={self.pgbackrest_config}", f"--stanza={self.stanza}", *args]

    @property
    def pgbackrest_path(self) -> str:
        return self.values["PGBACKREST"]

    def binary(self, name: str) -> str:
        return os.path.join(self.postgres_bin, name)


# ---- running things ------------------------------------------------------------------------------------
def _reason(lines: list[str], returncode: int) -> str:
    """The line that says why: pgBackRest's ERROR (not its retry notes), PostgreSQL's FATAL, a tool's error."""
    for pattern in (r"\bERROR\b|\bFATAL\b|\bPANIC\b", r"(?i)error|corrupt|invalid|fail"):
        found = [line.strip() for line in lines if re.search(pattern, line)]
        if found:
            return f"{found[0] if 'ERROR' in found[0] else found[-1]} (exit {returncode})"
    return f"{lines[-1].strip()} (exit {returncode})" if lines else f"exited {returncode}"


def run(step: str, argv: list[str], env: dict[str, str] | None = None, stdin: str | None = None,
        progress: Callable[[], str] | None = None, quiet: bool = False) -> str:
    """Run `argv`, echoing its output (unless quiet) and a progress line every PROGRESS_SECONDS; StepFailed if it fails."""
    started = time.monotonic()
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **(env or {})})
    except OSError as error:
        raise StepFailed(step, f"cannot run {argv[0]}: {error.strerror}") from None
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(PROGRESS_SECONDS):
            extra = ""
            if progress is not None:
                with contextlib.suppress(Exception):
                    extra = f", {progress()}"
            say(f"{step}: still running after {time.monotonic() - started:.0f} s{extra}")

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    if stdin is not None:
        assert process.stdin is not None
        # A client that gave up at once (e.g. psql while the server still starts) closes its end first.
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(stdin)
            process.stdin.close()
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        del lines[:-50]
        if not quiet:
            print(f"  {line.rstrip()}", flush=True)
    returncode = process.wait()
    done.set()
    if returncode != 0:
        raise StepFailed(step, _reason(lines, returncode))
    return "\n".join(lines)


def psql(step: str, cfg: Config, sql: str, conninfo: str, variables: dict[str, str] | None = None,
         password: str | None = None) -> list[list[str]]:
    """Rows of the last statements' output (unaligned, tuples only); the password only in psql's environment."""
    argv = [cfg.binary("psql"), "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-d", conninfo]
    for name, value in (variables or {}).items():
        argv += ["-v", f"{name}={value}"]
    env = {"PGOPTIONS": "-c client_min_messages=warning"}  # no NOTICE lines among the rows
    if password:
        env["PGPASSWORD"] = password
    out = run(step, argv, env=env, stdin=sql, quiet=True)
    return [line.split("\t") for line in out.splitlines() if line]


def _du(path: str) -> int:
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _mb(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


# ---- Patroni: which node backs up -------------------------------------------------------------------------
def cluster_members(cfg: Config) -> list[dict]:
    try:
        # The REST API is TLS with the stack's CA (GET /cluster needs no login).
        https = cfg.patroni_url.startswith("https://")
        context = ssl.create_default_context(cafile=cfg.patroni_ca_file) if https else None
        with urllib.request.urlopen(f"{cfg.patroni_url}/cluster", timeout=10, context=context) as response:
            return json.load(response).get("members", [])
    except (OSError, ValueError) as error:
        raise StepFailed("designate", f"Patroni's REST API at {cfg.patroni_url} did not answer: {error}") from None


def _lag(member: dict) -> int | None:
    lag = member.get("lag", 0)
    return lag if isinstance(lag, int) else None


def designated_member(members: list[dict]) -> dict:
    """The node that backs up: a healthy replica (an asynchronous one before the synchronous standby, which
    acknowledges every commit; by name among equals), else the leader. Every node computes the same answer
    from the same DCS view, so exactly one of them runs the job, and a failover moves it."""
    leaders = [m for m in members if m.get("role") == "leader" and m.get("state") == "running"]
    if not leaders:
        raise StepFailed("designate", "the cluster has no running leader")
    candidates = [m for m in members if m.get("role") in ("replica", "sync_standby")
                  and m.get("state") in ("running", "streaming")
                  and _lag(m) is not None and _lag(m) <= MAX_CANDIDATE_LAG_BYTES
                  and not (m.get("tags") or {}).get("nobackup")]
    if candidates:
        return sorted(candidates, key=lambda m: (m.get("role") == "sync_standby", m.get("name", "")))[0]
    return leaders[0]


def leader_of(members: list[dict]) -> dict:
    return next(m for m in members if m.get("role") == "leader")


# ---- pgBackRest -----------------------------------------------------------------------------------------
def backups(cfg: Config, step: str = "info") -> list[dict]:
    out = run(step, cfg.pgbackrest("--output=json", "info"), quiet=True)
    try:
        (stanza,) = [s for s in json.loads(out) if s.get("name") == cfg.stanza]
    except (ValueError, TypeError):
        raise StepFailed(step, f"pgbackrest info printed no stanza {cfg.stanza}: {out[:200]}") from None
    return stanza.get("backup", [])


def find_backup(cfg: Config, label: str, step: str) -> dict:
    for backup in backups(cfg, step):
        if backup["label"] == label:
            return backup
    raise StepFailed(step, f"no backup {label} in the repository of stanza {cfg.stanza} (backup.py list shows them)")


def backup_progress(cfg: Config) -> str:
    """pgBackRest keeps the percentage done in its backup lock file (pctCplt, hundredths of a percent)."""
    with open(os.path.join(cfg.pgbackrest_lock_path, f"{cfg.stanza}-backup.lock")) as handle:
        return f"{json.load(handle)['pctCplt'] / 100:.1f}% copied"


# ---- S3 -------------------------------------------------------------------------------------------------
def s3_client(cfg: Config, step: str):
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError:
        raise StepFailed(step, "boto3 is not installed (Debian: python3-boto3)") from None
    # Short timeouts and few retries: an unreachable endpoint fails the run in seconds, not after minutes.
    return boto3.session.Session().client("s3", region_name=cfg.region, endpoint_url=cfg.s3_endpoint, config=BotoConfig(
        connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}))


def check_repository(cfg: Config) -> None:
    """One listing under the repository prefix (what the host's grant allows), before anything is changed."""
    prefix = f"{cfg.repository_prefix}backup/{cfg.stanza}/"
    try:
        s3_client(cfg, "repository").list_objects_v2(Bucket=cfg.bucket, Prefix=prefix, MaxKeys=1)
    except Exception as error:  # noqa: BLE001 - botocore's errors have no common base worth naming
        raise StepFailed("repository", f"s3://{cfg.bucket}/{prefix} at {cfg.s3_endpoint}: {error}") from None


def record_key(cfg: Config, label: str, when: datetime.datetime) -> str:
    return f"{cfg.verification_prefix}{cfg.stanza}/{label}/{when.strftime('%Y%m%dT%H%M%SZ')}.json"


def write_record(cfg: Config, record: dict) -> str:
    key = record_key(cfg, record["label"], datetime.datetime.fromisoformat(record["finished"]))
    body = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
    try:
        s3_client(cfg, "record").put_object(Bucket=cfg.bucket, Key=key, Body=body, ContentType="application/json",
                                            ServerSideEncryption="aws:kms", SSEKMSKeyId=cfg.kms_key)
    except StepFailed:
        raise
    except Exception as error:  # noqa: BLE001
        raise StepFailed("record", f"s3://{cfg.bucket}/{key}: {error}") from None
    return key


# ---- metrics --------------------------------------------------------------------------------------------
def read_metrics(path: str) -> dict[str, str]:
    values = {}
    with contextlib.suppress(OSError):
        with open(path) as handle:
            for line in handle:
                match = re.match(r"^(\w+)\{[^}]*\} (\S+)$", line.strip())
                if match and match.group(1) in METRICS:
                    values[match.group(1)] = match.group(2)
    return values


def metrics_text(stanza: str, values: dict[str, str]) -> str:
    lines = []
    for name, help_text in METRICS.items():
        if name in values:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f'{name}{{cluster="{stanza}"}} {values[name]}']
    return "\n".join(lines) + "\n"


def write_metrics(cfg: Config, updates: dict[str, float]) -> None:
    """Merge `updates` into node_exporter's textfile: written beside it, then renamed (never half a file)."""
    path = os.path.join(cfg.textfile_dir, METRICS_FILE)
    values = read_metrics(path)
    values.update({name: f"{value:.3f}".rstrip("0").rstrip(".") for name, value in updates.items()})
    tmp = os.path.join(cfg.textfile_dir, f".{METRICS_FILE}.{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(metrics_text(cfg.stanza, values))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StepFailed("metrics", f"{path}: {error.strerror}") from None


# ---- the throw-away PostgreSQL ----------------------------------------------------------------------------
@dataclass
class Scratch:
    """A restored copy under SCRATCH_DIR: data/, socket/ and the server's log."""

    cfg: Config
    data: str = ""
    socket: str = ""
    log: str = ""

    def __post_init__(self) -> None:
        self.data = os.path.join(self.cfg.scratch_dir, "data")
        self.socket = os.path.join(self.cfg.scratch_dir, "socket")
        self.log = os.path.join(self.cfg.scratch_dir, "postgres.log")

    def prepare(self, need_bytes: int) -> None:
        self.remove()
        os.makedirs(self.socket, mode=0o700)
        os.makedirs(self.data, mode=0o700)
        free = shutil.disk_usage(self.cfg.scratch_dir).free
        if free < need_bytes:
            raise StepFailed("restore", f"{self.cfg.scratch_dir} has {_mb(free)} free; the restore needs {_mb(need_bytes)}")

    def remove(self) -> None:
        self.stop(quiet=True)
        shutil.rmtree(self.cfg.scratch_dir, ignore_errors=True)

    def conninfo(self) -> str:
        return f"host={self.socket} port={self.cfg.pgport} dbname=postgres"

    def options(self) -> list[str]:
        """Overrides of the restored postgresql.conf (Patroni's) and of what pgBackRest wrote in
        postgresql.auto.conf: a private socket, no TCP, no archiving, no synchronous standby to wait for,
        Patroni's files in the copy, little memory and no huge pages."""
        settings = {
            "port": self.cfg.pgport,
            "listen_addresses": "",
            "unix_socket_directories": self.socket,
            "archive_mode": "off",
            "synchronous_standby_names": "",
            "primary_conninfo": "",
            "primary_slot_name": "",
            "hba_file": os.path.join(self.data, "pg_hba.conf"),
            "ident_file": os.path.join(self.data, "pg_ident.conf"),
            "shared_buffers": "128MB",
            # The live server holds the huge pages the kernel reserves (vm.nr_hugepages): none are left for the copy.
            "huge_pages": "off",
            "logging_collector": "off",
            "cluster_name": "betting-backup-verify",
            # pgBackRest's own, but synchronous: the asynchronous queue in the spool is the live server's.
            "restore_command": shlex.join(self.cfg.pgbackrest("--no-archive-async", f"--pg1-path={self.data}"))
                               + ' archive-get %f "%p"',
        }
        return [f"-c {name}={shlex.quote(value)}" for name, value in settings.items()]

    def start(self, step: str) -> None:
        run(step, [self.cfg.binary("pg_ctl"), "start", "-W", "-D", self.data, "-l", self.log,
                   "-o", " ".join(self.options())], quiet=True)

    def running(self) -> bool:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as handle:
                pid = int(handle.readline())
            os.kill(pid, 0)
            return True
        except (OSError, ValueError):
            return False

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(self.log) as handle:
            lines = [line.strip() for line in handle if line.strip()]
            fatal = [line for line in lines if "FATAL" in line or "PANIC" in line]
            return (fatal or lines or ["(empty log)"])[-1]
        return "(no log)"

    def query(self, step: str, sql: str) -> list[list[str]]:
        return psql(step, self.cfg, sql, self.conninfo())

    def wait_promoted(self, step: str, timeout: float = RECOVERY_TIMEOUT_SECONDS) -> None:
        """Until recovery has reached its target and the copy is promoted (or PostgreSQL gave up)."""
        started = last_report = time.monotonic()
        while time.monotonic() - started < timeout:
            # pg_ctl start -W returns before the postmaster has written its pid file.
            if not self.running() and time.monotonic() - started > STARTUP_GRACE_SECONDS:
                raise StepFailed(step, f"PostgreSQL stopped during recovery: {self.log_tail()}")
            with contextlib.suppress(StepFailed):
                ((in_recovery, replayed),) = self.query(step, "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn();")
                if in_recovery == "f":
                    return
                if time.monotonic() - last_report >= PROGRESS_SECONDS:
                    say(f"{step}: replayed WAL up to {replayed or '?'} after {time.monotonic() - started:.0f} s")
                    last_report = time.monotonic()
            time.sleep(0.5)
        raise StepFailed(step, f"not promoted after {timeout:.0f} s: {self.log_tail()}")

    def stop(self, quiet: bool = False) -> None:
        if not self.running():
            return
        try:
            run("stop", [self.cfg.binary("pg_ctl"), "stop", "-D", self.data, "-m", "fast", "-w", "-t", "600"], quiet=True)
        except StepFailed:
            if not quiet:
                raise


# ---- verification -----------------------------------------------------------------------------------------
@dataclass
class Verification:
    cfg: Config
    backup: dict
    checks: list[dict] = field(default_factory=list)
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[dict]:
        say(f"{name}: started")
        entry: dict = {"name": name, "result": "failed"}
        self.checks.append(entry)
        started = time.monotonic()
        try:
            yield entry
            entry["result"] = entry.get("result_override", "passed")
            entry.pop("result_override", None)
        except StepFailed as error:
            entry["detail"] = error.reason
            raise
        except Exception as error:  # noqa: BLE001 - anything unexpected still names the step
            entry["detail"] = str(error)
            raise StepFailed(name, str(error)) from None
        finally:
            entry["seconds"] = round(time.monotonic() - started, 3)
        say(f"{name}: {entry['result']} in {entry['seconds']:.1f} s" + (f" ({entry['detail']})" if entry.get("detail") else ""))

    def run(self) -> None:
        cfg, label = self.cfg, self.backup["label"]
        scratch = Scratch(cfg)
        size = int(self.backup.get("info", {}).get("size", 0))
        try:
            with self.check("restore") as entry:
                scratch.prepare(int(size * 1.05) + 256 * 2**20)
                run("restore", cfg.pgbackrest(f"--set={label}", "--type=immediate", "--target-action=promote",
                                              "--archive-mode=off", f"--pg1-path={scratch.data}",
                                              "--log-level-console=info", "restore"),
                    progress=lambda: f"{_mb(_du(scratch.data))} of {_mb(size)} restored")
                entry["detail"] = f"{_mb(_du(scratch.data))} restored into {scratch.data}"
            with self.check("recovery") as entry:
                scratch.start("recovery")
                scratch.wait_promoted("recovery")
                entry["detail"] = "consistent and promoted on a private socket"
            with self.check("pg_amcheck") as entry:
                run("pg_amcheck", [cfg.binary("pg_amcheck"), "--host", scratch.socket, "--port", cfg.pgport,
                                   "--username", "postgres", "--all", "--install-missing", "--progress"], quiet=True)
                entry["detail"] = "every table and B-tree index of every database"
            with self.check("canary") as entry:
                self._check_canary(scratch, entry)
            scratch.stop()
            with self.check("checksums") as entry:
                out = run("checksums", [cfg.binary("pg_checksums"), "--check", "-D", scratch.data], quiet=True)
                scanned = re.search(r"Blocks scanned:\s+(\d+)", out)
                entry["detail"] = f"{scanned.group(1) if scanned else '?'} blocks, no bad checksum"
        finally:
            scratch.remove()

    def _check_canary(self, scratch: Scratch, entry: dict) -> None:
        annotation = self.backup.get("annotation") or {}
        if "canary-rows" not in annotation:
            entry["result_override"] = "skipped"
            entry["detail"] = "the backup carries no canary annotation (not taken by backup.py run)"
            return
        expected = [annotation["canary-rows"], annotation["canary-md5"]]
        try:
            (found,) = scratch.query("canary", CANARY_SUMMARY_SQL)
        except StepFailed as error:
            raise StepFailed("canary", f"betting_backup.canary unreadable in the restored copy: {error.reason}") from None
        entry["expected"], entry["found"] = expected, found
        if found != expected:
            raise StepFailed("canary", f"restored copy has {found[0]} canary rows with md5 {found[1]}; "
                                       f"{expected[0]} rows with md5 {expected[1]} were written before the backup")
        entry["detail"] = f"{found[0]} rows, md5 {found[1]}"

    def record(self, result: str, error: StepFailed | None) -> dict:
        backup = self.backup
        info = backup.get("info", {})
        return {
            "format": 1,
            "stanza": self.cfg.stanza,
            "label": backup["label"],
            "node": self.cfg.node_name,
            "result": result,
            "failed_step": error.step if error else None,
            "error": error.reason if error else None,
            "started": self.started.isoformat(),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(),
            "backup": {
                "type": backup.get("type"),
                "prior": backup.get("prior"),
                "started": backup.get("timestamp", {}).get("start"),
                "stopped": backup.get("timestamp", {}).get("stop"),
                "size_bytes": info.get("size"),
                "delta_bytes": info.get("delta"),
                "repository_size_bytes": info.get("repository", {}).get("size"),
                "repository_delta_bytes": info.get("repository", {}).get("delta"),
                "wal": backup.get("archive"),
                "lsn": backup.get("lsn"),
                "annotation": backup.get("annotation"),
            },
            "checks": self.checks,
        }


def verify(cfg: Config, backup: dict, extra_checks: list[dict] | None = None) -> tuple[Verification, str]:
    """Verify `backup` and write its record, passed or failed; raises the first failed step after the record."""
    verification = Verification(cfg, backup, checks=list(extra_checks or []))
    try:
        verification.run()
    except StepFailed as error:
        with contextlib.suppress(StepFailed):
            key = write_record(cfg, verification.record("failed", error))
            say(f"record: failed verification written to s3://{cfg.bucket}/{key}")
        raise
    key = write_record(cfg, verification.record("passed", None))
    say(f"record: s3://{cfg.bucket}/{key}")
    return verification, key


# ---- commands ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exclusive(cfg: Config) -> Iterator[None]:
    """One run, verify or restore at a time on a host: they share the scratch directory and the disk."""
    path = cfg.scratch_dir.rstrip("/") + ".lock"
    try:
        handle = open(path, "a")
    except OSError as error:
        raise StepFailed("lock", f"{path}: {error.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StepFailed("lock", f"another backup.py run, verify or restore holds {path}") from None
        yield


def write_canary(cfg: Config, members: list[dict], token: str) -> list[str]:
    """A new canary row on the leader; returns [rows, md5] of the table right after it (what the backup must hold)."""
    leader = leader_of(members)
    if leader.get("name") == cfg.node_name:  # the local socket, peer authentication (the port Patroni runs it on)
        conninfo, password = f"host={cfg.pghost} port={leader['port']} dbname=postgres", None
    else:
        # Over TCP: TLS, the leader's certificate checked against the stack's CA and the name Patroni gives for it.
        conninfo = (f"host={leader['host']} port={leader['port']} dbname=postgres user=postgres connect_timeout=10 "
                    f"sslmode=verify-full sslrootcert={cfg.ssl_root_cert}")
        try:
            with open(cfg.superuser_password_file) as handle:
                password = handle.read().strip()
        except OSError as error:
            raise StepFailed("canary", f"{cfg.superuser_password_file}: {error.strerror}") from None
    rows = psql("canary", cfg, CANARY_SQL + CANARY_SUMMARY_SQL, conninfo, {"node": cfg.node_name, "token": token}, password)
    return rows[-1]


def command_run(cfg: Config, kind: str) -> int:
    members = cluster_members(cfg)
    chosen = designated_member(members)
    if chosen.get("name") != cfg.node_name:
        say(f"designate: {chosen.get('name')} ({chosen.get('role')}) takes the backup; nothing to do on {cfg.node_name}")
        return 0
    standby = chosen.get("role") != "leader"
    say(f"designate: {cfg.node_name} ({chosen.get('role')}) takes the {kind} backup"
        + ("" if standby else " (no healthy replica: from the leader itself)"))
    with exclusive(cfg):
        check_repository(cfg)
        say("repository: reachable")
        # Idempotent; from the local pg_control (--no-online): no member that is down can hold it up for minutes.
        run("stanza-create", cfg.pgbackrest("--log-level-console=warn", "--no-online", "stanza-create"))
        token = secrets.token_hex(8)
        rows, digest = write_canary(cfg, members, token)
        say(f"canary: row {token} written on the leader ({rows} rows, md5 {digest})")
        started = time.monotonic()
        run("backup", cfg.pgbackrest(
            f"--type={kind}", "--backup-standby" if standby else "--no-backup-standby",
            f"--annotation=canary-rows={rows}", f"--annotation=canary-md5={digest}", f"--annotation=canary-token={token}",
            f"--annotation=node={cfg.node_name}", "--log-level-console=info", "backup"),
            progress=lambda: backup_progress(cfg))
        duration = time.monotonic() - started
        taken = [b for b in backups(cfg, "backup") if (b.get("annotation") or {}).get("canary-token") == token]
        if not taken:
            raise StepFailed("backup", f"pgbackrest reported success but no backup carries canary token {token}")
        backup = taken[-1]
        size = int(backup.get("info", {}).get("size", 0))
        say(f"backup: {backup['label']} ({backup['type']}, {_mb(size)}) in {duration:.1f} s")
        taken_check = {"name": "backup", "result": "passed", "seconds": round(duration, 3),
                       "detail": f"{backup['type']} from {'a standby' if standby else 'the leader'}"}
        verify(cfg, backup, [taken_check])
        now = time.time()
        write_metrics(cfg, {"backup_last_success_timestamp": now, "backup_last_verified_timestamp": now,
                            "backup_last_duration_seconds": duration, "backup_last_size_bytes": size})
        say(f"done: {backup['label']} taken and verified; metrics in {os.path.join(cfg.textfile_dir, METRICS_FILE)}")
    return 0


def command_verify(cfg: Config, label: str) -> int:
    with exclusive(cfg):
        backup = find_backup(cfg, label, "verify")
        verify(cfg, backup)
        write_metrics(cfg, {"backup_last_verified_timestamp": time.time()})
        say(f"done: {label} verified")
    return 0


def parse_time(text: str) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError("restore: --to must be an ISO 8601 time with a zone, e.g. 2026-12-01T17:20:00Z; "
                         f"found {text!r}") from None
    if when.tzinfo is None:
        raise UsageError(f"restore: --to needs a time zone (Z or +HH:MM), e.g. 2026-12-01T17:20:00Z; found {text!r}")
    return when.astimezone(datetime.UTC)


def command_restore(cfg: Config, when: datetime.datetime, target: str | None) -> int:
    target = os.path.abspath(target or os.path.join(os.path.dirname(cfg.scratch_dir.rstrip("/")),
                                                    f"restore-{when.strftime('%Y%m%dT%H%M%SZ')}"))
    if os.path.realpath(target) == os.path.realpath(cfg.pgdata):
        raise UsageError(f"restore: --target must not be the live data directory {cfg.pgdata}")
    if os.path.exists(target) and os.listdir(target):
        raise UsageError(f"restore: --target {target} exists and is not empty")
    moment = when.isoformat(sep=" ")
    with exclusive(cfg):
        os.makedirs(target, mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)
        say(f"restore: recovering the cluster as of {moment} into {target}")
        run("restore", cfg.pgbackrest("--type=time", f"--target={moment}", "--target-action=promote",
                                      "--archive-mode=off", f"--pg1-path={target}", "--log-level-console=info",
                                      "restore"), progress=lambda: f"{_mb(_du(target))} restored")
        scratch = Scratch(cfg)
        scratch.data, scratch.log = target, target.rstrip("/") + ".log"
        scratch.socket = os.path.join(cfg.scratch_dir, "socket")
        shutil.rmtree(cfg.scratch_dir, ignore_errors=True)
        os.makedirs(scratch.socket, mode=0o700)
        try:
            scratch.start("recovery")
            scratch.wait_promoted("recovery")
            ((replayed,),) = scratch.query("recovery", "SELECT coalesce(pg_last_xact_replay_timestamp()::text, 'none');")
            scratch.stop()
        finally:
            scratch.stop(quiet=True)
            shutil.rmtree(cfg.scratch_dir, ignore_errors=True)
    say(f"done: {target} holds the cluster as of {moment} (last transaction replayed: {replayed}); it is stopped, "
        f"archive_mode off. Look at it with: {cfg.binary('pg_ctl')} start -D {target} -o "
        f"\"-c port=5499 -c listen_addresses='' -c unix_socket_directories=/tmp -c synchronous_standby_names=''\"")
    return 0


def command_list(cfg: Config, as_json: bool) -> int:
    found = backups(cfg, "list")
    if as_json:
        print(json.dumps(found, indent=1, sort_keys=True))
        return 0
    print(f"{'label':<34} {'type':<5} {'started (UTC)':<20} {'seconds':>8} {'database':>12} {'repository':>12}  node")
    for backup in found:
        stamp = backup.get("timestamp", {})
        start = datetime.datetime.fromtimestamp(stamp.get("start", 0), datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        info = backup.get("info", {})
        print(f"{backup['label']:<34} {backup['type']:<5} {start:<20} {stamp.get('stop', 0) - stamp.get('start', 0):>8} "
              f"{_mb(info.get('size', 0)):>12} {_mb(info.get('repository', {}).get('delta', 0)):>12}  "
              f"{(backup.get('annotation') or {}).get('node', '-')}")
    if not found:
        print(f"(no backups of stanza {cfg.stanza} yet)")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="backup.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", default=os.environ.get(ENV_VARIABLE, DEFAULT_ENV),
                        help=f"per-host settings (default {DEFAULT_ENV}, or ${ENV_VARIABLE})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run_parser = sub.add_parser("run", help="take the scheduled backup on the designated node, then verify it")
    run_parser.add_argument("--type", choices=("full", "diff"), default="diff")
    verify_parser = sub.add_parser("verify", help="restore an existing backup into a scratch directory and check it")
    verify_parser.add_argument("label")
    restore_parser = sub.add_parser("restore", help="point-in-time recovery into a new directory")
    restore_parser.add_argument("--to", required=True, help="ISO 8601 time with a zone, e.g. 2026-12-01T17:20:00Z")
    restore_parser.add_argument("--target", help="an empty or new directory (default beside SCRATCH_DIR)")
    list_parser = sub.add_parser("list", help="the backups in the repository")
    list_parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "verify" and not LABEL.match(args.label):
        raise UsageError(f"verify: LABEL must be a pgBackRest backup label like 20261201-020000F or "
                         f"20261201-020000F_20261202-020000D; found {args.label!r}")
    if args.command == "restore":
        args.to = parse_time(args.to)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as error:
        print(f"backup: {error}", file=sys.stderr)
        return 2
    try:
        cfg = Config.load(args.env_file)
        if args.command == "run":
            return command_run(cfg, args.type)
        if args.command == "verify":
            return command_verify(cfg, args.label)
        if args.command == "restore":
            return command_restore(cfg, args.to, args.target)
        return command_list(cfg, args.json)
    except UsageError as error:
        print(f"backup: {error}", file=sys.stderr)
        return 2
    except StepFailed as error:
        print(f"backup: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("backup: interrupted: nothing marked as a success", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
