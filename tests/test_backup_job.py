"""The nightly base backup job on the PostgreSQL nodes, run the way cron runs it.

The job is three rendered files: /etc/cron.d/betting-pg-backup (environment lines, then the
entry), the script /usr/local/sbin/betting-pg-backup (infra/hostagent/files/betting-pg-backup)
and its environment file /etc/betting/pg-backup.env. The seam test takes all three from the
rendered HostSpec and runs the cron entry's command with nothing but cron's environment, against
a fake Patroni REST API and a fake pgbackrest.

What these tests cannot see: the real cron daemon (that it reads the file, and when the schedule
fires; (c) only checks the schedule is the configured one), a real pgBackRest talking to a real
PostgreSQL and S3 (the fake only records how it was called), and Patroni's real /primary
(tests/postgres/test_cluster_live.py runs a real cluster).
"""

from __future__ import annotations

import http.server
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.hosts import host_specs
from infra.hosts.postgres import BACKUP_CRON, BACKUP_ENV, BACKUP_SCRIPT, backup_environment

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_SOURCE = ROOT / "infra" / "hostagent" / "files" / "betting-pg-backup"
# What cron(8) gives a job before the file's own environment lines (Debian's cron: crontab(5)).
CRON_DEFAULT_ENVIRONMENT = {"HOME": "/root", "LOGNAME": "root", "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin"}
_ENVIRONMENT_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class CronEntry:
    schedule: str
    user: str
    command: str


def parse_cron_d(content: bytes) -> tuple[dict[str, str], list[CronEntry]]:
    """An /etc/cron.d file as cron reads it: NAME=value lines, then `m h dom mon dow user command`."""
    environment: dict[str, str] = {}
    entries = []
    for line in content.decode().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENVIRONMENT_LINE.match(line)
        if match:  # an entry starts with a digit, * or @, never with a name
            name, value = match.groups()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            environment[name] = value
            continue
        fields = line.split(None, 6)
        assert len(fields) == 7, f"not a cron.d entry: {line!r}"
        entries.append(CronEntry(" ".join(fields[:5]), fields[5], fields[6]))
    return environment, entries


def _postgres_spec(settings, topology):
    return next(s for s in host_specs(settings, topology) if s.host.name == topology.postgres[0].name)


def _file(spec, path):
    (file,) = [f for f in spec.files if f.path == path]
    return file


def test_shellcheck_passes_on_the_backup_script():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck (make system-deps)")
    result = subprocess.run([shellcheck, "--shell=sh", "--severity=style", str(SCRIPT_SOURCE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_script_is_installed_verbatim_and_holds_no_stack_value(settings, topology):
    spec = _postgres_spec(settings, topology)
    script = _file(spec, BACKUP_SCRIPT)
    assert script.content == SCRIPT_SOURCE.read_bytes()
    assert (script.mode, script.owner) == ("0755", "root:root")
    assert script.content.startswith(b"#!/bin/sh\n")
    assert b"\nset -eu\n" in script.content
    code = "\n".join(line for line in script.content.decode().splitlines() if not line.lstrip().startswith("#"))
    for value in backup_environment(topology).values():
        assert value not in code  # every value comes from the environment file


def test_the_cron_schedule_is_the_configured_one_and_the_path_reaches_runuser(settings, topology):
    cron = _file(_postgres_spec(settings, topology), BACKUP_CRON)
    environment, entries = parse_cron_d(cron.content)
    assert entries == [CronEntry(settings.backups.full_backup_schedule, "root", f"{BACKUP_SCRIPT} full")]
    assert environment == {"SHELL": "/bin/sh", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def test_the_environment_file_reads_back_in_sh_as_rendered(settings, topology, tmp_path):
    env = tmp_path / "pg-backup.env"
    env.write_bytes(_file(_postgres_spec(settings, topology), BACKUP_ENV).content)
    expected = backup_environment(topology)
    script = f". {env}; " + "; ".join(f'printf "%s\\n" "${name}"' for name in expected)
    out = subprocess.run(["env", "-i", "/bin/sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == list(expected.values())
    assert expected["PATRONI_URL"] == "http://127.0.0.1:8008"
    assert expected["PGBACKREST"] == "/usr/bin/pgbackrest"
    assert expected["STANZA"] == topology.patroni_scope


# The seam: the cron entry's command, run with cron's environment only.


class _Patroni(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).paths.append(self.path)
        self.send_response(type(self).status if self.path == "/primary" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def patroni():
    """A Patroni REST API on 127.0.0.1 whose /primary answers `handler.status` (200 leader, 503 replica)."""
    handler = type("Handler", (_Patroni,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_bin():
    """A directory the postgres user can reach (pytest's tmp_path is root-only) for the fake pgbackrest."""
    if os.geteuid() != 0:
        # cron runs the job as root and runuser needs root: the test must run as root (CI does), never skip.
        pytest.fail("run the tests as root: the job runs as cron runs it, as root (runuser -u postgres)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("no postgres user: apt-get install -y postgresql (make system-deps)")
    directory = Path(tempfile.mkdtemp(prefix="pg-backup-fake-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def _fake_pgbackrest(directory: Path, fail_on: str | None = None) -> tuple[Path, Path]:
    """A pgbackrest that logs `<user>|<argv>` per call; exits 1 when `fail_on` is one of its arguments."""
    log = directory / "calls.log"
    log.touch()
    log.chmod(0o666)
    fail = f'case " $* " in *" {fail_on} "*) exit 1 ;; esac\n' if fail_on else ""
    binary = directory / "pgbackrest"
    binary.write_text(f'#!/bin/sh\nprintf \'%s|%s\\n\' "$(id -un)" "$*" >> {log}\n{fail}exit 0\n')
    binary.chmod(0o755)
    return binary, log


def _run_as_cron(settings, topology, tmp_path, patroni_url, pgbackrest):
    """Install the rendered script and environment file under tmp_path, then run the cron entry like cron."""
    spec = _postgres_spec(settings, topology)
    script = tmp_path / "betting-pg-backup"
    script.write_bytes(_file(spec, BACKUP_SCRIPT).content)
    script.chmod(int(_file(spec, BACKUP_SCRIPT).mode, 8))
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir(exist_ok=True)
    overrides = {"PATRONI_URL": patroni_url, "TEXTFILE_DIR": str(textfile_dir), "PGBACKREST": str(pgbackrest)}
    lines = []
    for line in _file(spec, BACKUP_ENV).content.decode().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f'{name}="{overrides[name]}"' if name in overrides else line)
    env_file = tmp_path / "pg-backup.env"
    env_file.write_text("\n".join(lines) + "\n")

    file_environment, (entry,) = parse_cron_d(_file(spec, BACKUP_CRON).content)
    assert entry.user == "root"
    assert "%" not in entry.command  # cron would turn it into a newline and feed the rest to stdin
    assert entry.command.startswith(BACKUP_SCRIPT + " ")
    command = str(script) + entry.command[len(BACKUP_SCRIPT):]
    environment = {**CRON_DEFAULT_ENVIRONMENT, **file_environment,
                   "BETTING_PG_BACKUP_ENV": str(env_file)}  # the one addition: where the test's env file is
    assert environment["SHELL"] == "/bin/sh"
    started = time.time()
    result = subprocess.run(["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()),
                             environment["SHELL"], "-c", command],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return result, textfile_dir, started


def test_a_replica_exits_0_and_calls_nothing(settings, topology, tmp_path, patroni, fake_bin):
    handler, url = patroni
    handler.status = 503
    pgbackrest, log = _fake_pgbackrest(fake_bin)
    result, textfile_dir, _ = _run_as_cron(settings, topology, tmp_path, url, pgbackrest)
    assert result.returncode == 0, result.stderr
    assert handler.paths == ["/primary"]
    assert log.read_text() == ""
    assert list(textfile_dir.iterdir()) == []


def test_the_leader_backs_up_as_postgres_and_records_the_time(settings, topology, tmp_path, patroni, fake_bin):
    handler, url = patroni
    pgbackrest, log = _fake_pgbackrest(fake_bin)
    result, textfile_dir, started = _run_as_cron(settings, topology, tmp_path, url, pgbackrest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert handler.paths == ["/primary"]
    stanza = topology.patroni_scope
    assert log.read_text().splitlines() == [
        f"postgres|--stanza={stanza} stanza-create",
        f"postgres|--stanza={stanza} --type=full backup",
    ]
    assert [p.name for p in textfile_dir.iterdir()] == ["pg_backup.prom"]  # no temporary file left behind
    metric = textfile_dir / "pg_backup.prom"
    assert stat.S_IMODE(metric.stat().st_mode) == 0o644
    help_line, type_line, sample = metric.read_text().splitlines()
    assert help_line == "# HELP backup_last_success_timestamp Unix time of the last successful base backup."
    assert type_line == "# TYPE backup_last_success_timestamp gauge"
    name, value = sample.rsplit(" ", 1)
    assert name == f'backup_last_success_timestamp{{cluster="{stanza}"}}'
    assert started - 2 <= int(value) <= time.time() + 2


def test_a_failed_backup_exits_non_zero_and_keeps_the_last_success(settings, topology, tmp_path, patroni, fake_bin):
    _, url = patroni
    pgbackrest, log = _fake_pgbackrest(fake_bin, fail_on="backup")
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    previous = 'backup_last_success_timestamp{cluster="x"} 1\n'
    (textfile_dir / "pg_backup.prom").write_text(previous)
    result, _, _ = _run_as_cron(settings, topology, tmp_path, url, pgbackrest)
    assert result.returncode != 0
    assert len(log.read_text().splitlines()) == 2  # stanza-create, then the failing backup
    assert (textfile_dir / "pg_backup.prom").read_text() == previous
    assert [p.name for p in textfile_dir.iterdir()] == ["pg_backup.prom"]
