"""The backup job on the PostgreSQL hosts as systemd runs it: two timers fire betting-pg-backup@.service,
whose ExecStart runs scripts/backup.py (installed verbatim) as postgres on Debian's /usr/bin/python3.

Without daemons, here: the units pass `systemd-analyze verify` and fire when the settings say
(`systemd-analyze calendar`); the scripts are installed verbatim and hold no stack value; the environment
file reads back the same in sh (the post_bootstrap script) and in backup.py; which node backs up, from
Patroni's /cluster; the service's ExecStart, run with the environment systemd gives it, as postgres, exits
0 doing nothing on a node that is not the designated one, and fails naming the step, metrics untouched,
when the repository is unreachable; bad arguments get one line; the metrics file is written atomically,
merged, and accepted by `promtool check metrics`.

What these tests cannot see: systemd itself firing the timer (a unit's ExecStart is run the way systemd
runs it), and real pgBackRest, PostgreSQL and S3: tests/postgres/test_backups_live.py runs those.
"""

from __future__ import annotations

import http.server
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from infra.hosts import host_specs
from infra.hosts.postgres import (
    BACKUP_ENV,
    BACKUP_SCRIPT,
    BACKUP_SCRIPT_SOURCE,
    BACKUP_SERVICE,
    FILES,
    backup_environment,
)
from infra.render.backup import TIMERS
from infra.sandbox.platform import SYSTEMD_PATH, expand_command, parse_unit
from infra.topology import Paths
from scripts import backup

ROOT = Path(__file__).resolve().parents[1]
POST_BOOTSTRAP_SOURCE = FILES / "betting-pg-post-bootstrap"
WEEKDAY = {"Mon": 0, "Tue": 1, "Wed": 2, "Thu": 3, "Fri": 4, "Sat": 5, "Sun": 6}


def _postgres_spec(settings, topology, index: int = 0):
    return next(s for s in host_specs(settings, topology) if s.host.name == topology.postgres[index].name)


def _file(spec, path):
    (file,) = [f for f in spec.files if f.path == path]
    return file


def _require(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if found is None:
        pytest.fail(f"{binary} is not installed: apt-get install -y {package} (make system-deps)")
    return found


def test_shellcheck_passes_on_the_post_bootstrap_script():
    result = subprocess.run([_require("shellcheck", "shellcheck"), "--shell=sh", "--severity=style", str(POST_BOOTSTRAP_SOURCE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_scripts_are_installed_verbatim_and_hold_no_stack_value(settings, topology):
    spec = _postgres_spec(settings, topology)
    script, post_bootstrap = _file(spec, BACKUP_SCRIPT), _file(spec, Paths.POST_BOOTSTRAP)
    assert script.content == BACKUP_SCRIPT_SOURCE.read_bytes()
    assert (script.mode, script.owner) == ("0644", "root:root")  # run by /usr/bin/python3, not executed
    assert post_bootstrap.content == POST_BOOTSTRAP_SOURCE.read_bytes()
    assert (post_bootstrap.mode, post_bootstrap.owner) == ("0755", "root:root")
    for content in (script.content.decode(), post_bootstrap.content.decode()):
        code = "\n".join(line for line in content.splitlines() if not line.lstrip().startswith("#"))
        for key, value in backup_environment(settings, topology, spec.host).items():
            assert value not in code, key  # every per-stack and per-host value comes from the environment file
    # Only the standard library at the top: boto3 (python3-boto3) is imported where S3 is needed.
    imports = re.findall(r"^(?:import|from) (\w+)", script.content.decode(), re.MULTILINE)
    assert set(imports) <= set(sys.stdlib_module_names) | {"__future__"}, imports


def test_the_environment_file_reads_back_the_same_in_sh_and_in_the_script(settings, topology, tmp_path):
    for index, node in enumerate(topology.postgres):
        env = tmp_path / f"{node.name}.env"
        env.write_bytes(_file(_postgres_spec(settings, topology, index), BACKUP_ENV).content)
        expected = backup_environment(settings, topology, node)
        script = f". {env}; " + "; ".join(f'printf "%s\\n" "${name}"' for name in expected)
        out = subprocess.run(["env", "-i", "/bin/sh", "-c", script], capture_output=True, text=True, check=True).stdout
        assert out.splitlines() == list(expected.values())
        assert backup.Config.load(str(env)).values == expected
        assert expected["NODE_NAME"] == node.name and expected["STANZA"] == topology.patroni_scope
    assert set(backup.CONFIG_KEYS) == set(expected)


# ---- the units -------------------------------------------------------------------------------------------
def _write_units(spec, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file in spec.files:
        if file.path.startswith("/etc/systemd/system/") and file.path.endswith((".service", ".timer")):
            (folder / Path(file.path).name).write_bytes(file.content)
    return folder


def test_the_units_pass_systemd_analyze_verify(settings, topology, tmp_path):
    analyze = _require("systemd-analyze", "systemd")
    units = _write_units(_postgres_spec(settings, topology), tmp_path / "units")
    names = [str(units / t) for t in TIMERS.values()] + [str(units / f"betting-pg-backup@{k}.service") for k in TIMERS]
    result = subprocess.run([analyze, "verify", *names], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # verify reads these very files: a schedule systemd cannot parse fails it.
    broken = units / TIMERS["full"]
    broken.write_text(broken.read_text().replace("OnCalendar=", "OnCalendar=Sundays "))
    result = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "Failed to parse calendar specification" in result.stdout + result.stderr


def _on_calendar(content: bytes) -> str:
    (value,) = re.findall(r"^OnCalendar=(.+)$", content.decode(), re.MULTILINE)
    return value


def test_a_full_backup_weekly_and_a_differential_on_every_other_day_at_the_set_time(settings, topology):
    analyze = _require("systemd-analyze", "systemd")
    spec = _postgres_spec(settings, topology)
    backups = settings.backups
    for kind, days in (("full", {backups.full_backup_day}), ("diff", set(WEEKDAY) - {backups.full_backup_day})):
        timer = _file(spec, f"/etc/systemd/system/{TIMERS[kind]}")
        assert f"\nUnit=betting-pg-backup@{kind}.service\n" in timer.content.decode()
        assert "\nPersistent=true\n" in timer.content.decode()
        out = subprocess.run([analyze, "calendar", "--iterations=14", _on_calendar(timer.content)],
                             capture_output=True, text=True, check=True).stdout
        elapses = re.findall(r"(?:Next elapse|Iter\. #\d+): (\w{3}) \d{4}-\d\d-\d\d (\d\d:\d\d):00 UTC", out)
        assert len(elapses) == 14, out
        assert {day for day, _ in elapses} == days, out
        assert {time for _, time in elapses} == {backups.backup_time}, out


def test_the_service_runs_the_installed_script_as_postgres_with_its_type(settings, topology):
    spec = _postgres_spec(settings, topology)
    text = _file(spec, BACKUP_SERVICE).content.decode()
    for kind in TIMERS:
        unit = parse_unit(f"betting-pg-backup@{kind}.service", [text], {"i": kind, "%": "%"})
        assert (unit.user, unit.group) == ("postgres", "postgres")
        assert expand_command(unit.exec_start, {}) == ["/usr/bin/python3", BACKUP_SCRIPT, "run", f"--type={kind}"]
    assert "\nType=oneshot\n" in text
    # A oneshot unit is killed after 90 s unless it says otherwise; a backup and its restore take hours.
    assert re.search(r"^TimeoutStartSec=\d+h$", text, re.MULTILINE)
    assert "cron" not in " ".join(spec.packages + spec.services)
    assert not [f for f in spec.files if f.path.startswith("/etc/cron")]
    assert set(TIMERS.values()) <= set(spec.services)


# ---- which node backs up ---------------------------------------------------------------------------------
def _member(name, role, state="running", lag=0, **extra):
    member = {"name": name, "role": role, "state": state, "host": f"{name}.x", "port": 5432, **extra}
    if role != "leader":
        member["lag"] = lag
    return member


@pytest.mark.parametrize(("members", "expected"), [
    ([_member("pg-1", "leader")], "pg-1"),
    ([_member("pg-1", "leader"), _member("pg-2", "sync_standby"), _member("pg-3", "replica")], "pg-3"),
    ([_member("pg-3", "leader"), _member("pg-1", "sync_standby"), _member("pg-2", "replica")], "pg-2"),
    # Between equals, by name; the synchronous standby only when no asynchronous replica is healthy.
    ([_member("pg-1", "leader"), _member("pg-3", "replica"), _member("pg-2", "replica")], "pg-2"),
    ([_member("pg-1", "leader"), _member("pg-2", "sync_standby"), _member("pg-3", "replica", state="stopped")], "pg-2"),
    ([_member("pg-1", "leader"), _member("pg-2", "replica", lag="unknown")], "pg-1"),
    ([_member("pg-1", "leader"), _member("pg-2", "replica", lag=backup.MAX_CANDIDATE_LAG_BYTES + 1)], "pg-1"),
    ([_member("pg-1", "leader"), _member("pg-2", "replica", tags={"nobackup": True})], "pg-1"),
    ([_member("pg-1", "leader"), _member("pg-2", "replica", state="streaming")], "pg-2"),  # Patroni >= 3.0.4's name
])
def test_the_designated_node_is_a_healthy_replica_else_the_leader(members, expected):
    assert backup.designated_member(members)["name"] == expected


def test_a_cluster_without_a_running_leader_backs_up_nowhere_and_says_so():
    with pytest.raises(backup.StepFailed, match="designate failed: the cluster has no running leader"):
        backup.designated_member([_member("pg-1", "leader", state="stopped"), _member("pg-2", "replica")])


# ---- the service's ExecStart, run as systemd runs it ----------------------------------------------------
class _Patroni(http.server.BaseHTTPRequestHandler):
    members: list[dict] = []
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).paths.append(self.path)
        body = json.dumps({"members": type(self).members}).encode() if self.path == "/cluster" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def patroni():
    handler = type("Handler", (_Patroni,), {"members": [], "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def host_dir():
    """A folder the postgres user can reach (pytest's tmp_path is root-only): the host's script and files."""
    if os.geteuid() != 0:
        pytest.fail("run the tests as root: the unit runs the job as postgres (User=postgres)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("no postgres user: apt-get install -y postgresql (make system-deps)")
    directory = Path(tempfile.mkdtemp(prefix="pg-backup-job-"))
    directory.chmod(0o755)
    shutil.chown(directory, "postgres", "postgres")  # as /var/lib/postgresql, where the scratch and its lock live
    yield directory
    shutil.rmtree(directory)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _run_service(settings, topology, host_dir: Path, patroni_url: str, kind: str = "diff"):
    """The rendered service's ExecStart, with systemd's environment for User=postgres, on a copy of the host's
    files under host_dir (the one addition to the environment: where that copy's env file is)."""
    spec = _postgres_spec(settings, topology)
    script = host_dir / "backup.py"
    script.write_bytes(_file(spec, BACKUP_SCRIPT).content)
    textfile = host_dir / "textfile"
    textfile.mkdir(exist_ok=True)
    shutil.chown(textfile, "postgres", "postgres")
    values = backup_environment(settings, topology, spec.host)
    values.update(PATRONI_URL=patroni_url, TEXTFILE_DIR=str(textfile), SCRATCH_DIR=str(host_dir / "scratch"),
                  S3_ENDPOINT=f"https://127.0.0.1:{_closed_port()}")
    env_file = host_dir / "pg-backup.env"
    env_file.write_text("".join(f'{k}="{v}"\n' for k, v in values.items()))
    unit = parse_unit(f"betting-pg-backup@{kind}.service", [_file(spec, BACKUP_SERVICE).content.decode()], {"i": kind})
    account = pwd.getpwnam(unit.user)
    environment = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "USER": unit.user, "LOGNAME": unit.user,
                   "HOME": account.pw_dir, "SHELL": account.pw_shell, backup.ENV_VARIABLE: str(env_file),
                   # No instance role here: credentials that S3 would refuse, so boto3 never looks for one.
                   "AWS_ACCESS_KEY_ID": "none", "AWS_SECRET_ACCESS_KEY": "none"}
    argv = [str(script) if word == BACKUP_SCRIPT else word for word in expand_command(unit.exec_start, environment)]
    return subprocess.run(["setpriv", f"--reuid={unit.user}", f"--regid={unit.group}", "--init-groups", "--", *argv],
                          env=environment, cwd="/", capture_output=True, text=True, timeout=120), textfile


def test_a_node_that_is_not_the_designated_one_exits_0_and_does_nothing(settings, topology, patroni, host_dir):
    handler, url = patroni
    me, others = topology.postgres[0].name, [h.name for h in topology.postgres[1:]]
    handler.members = [_member(me, "leader")] + [_member(name, "replica") for name in others]
    if not others:  # a single-node stack: its only node always backs up
        return
    result, textfile = _run_service(settings, topology, host_dir, url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"backup: designate: {others[0]} (replica) takes the backup; nothing to do on {me}"]
    assert handler.paths == ["/cluster"]
    assert list(textfile.iterdir()) == [] and not (host_dir / "scratch").exists()


def test_an_unreachable_repository_fails_the_run_naming_the_step_and_marks_nothing(settings, topology, patroni, host_dir):
    handler, url = patroni
    handler.members = [_member(h.name, "leader" if h == topology.postgres[0] else "replica", lag="unknown")
                       for h in topology.postgres]
    (host_dir / "textfile").mkdir()
    previous = 'backup_last_success_timestamp{cluster="x"} 1\n'
    (host_dir / "textfile" / backup.METRICS_FILE).write_text(previous)
    result, textfile = _run_service(settings, topology, host_dir, url)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("backup: repository failed: s3://") and "Could not connect to the endpoint URL" in line
    assert [p.name for p in textfile.iterdir()] == [backup.METRICS_FILE]
    assert (textfile / backup.METRICS_FILE).read_text() == previous


# ---- the script's own pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "message"), [
    (["verify", "yesterday"], "verify: LABEL must be a pgBackRest backup label"),
    (["restore", "--to", "2026-12-01 17:20"], "restore: --to needs a time zone"),
    (["restore", "--to", "noon"], "restore: --to must be an ISO 8601 time with a zone"),
    (["run", "--type", "incr"], "argument --type: invalid choice: 'incr'"),
    (["backup"], "argument command: invalid choice: 'backup'"),
    ([], "the following arguments are required: command"),
])
def test_bad_arguments_get_one_line_and_exit_2(argv, message, capsys):
    assert backup.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and message in err, err


def test_restore_refuses_the_live_data_directory_and_a_non_empty_target(settings, topology, tmp_path, capsys):
    values = backup_environment(settings, topology, topology.postgres[0])
    values.update(PGDATA=str(tmp_path / "live"), SCRATCH_DIR=str(tmp_path / "scratch"))
    env_file = tmp_path / "env"
    env_file.write_text("".join(f'{k}="{v}"\n' for k, v in values.items()))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "PG_VERSION").write_text("15\n")
    for target, message in ((tmp_path / "live", "must not be the live data directory"), (tmp_path / "full", "is not empty")):
        assert backup.main(["--env-file", str(env_file), "restore", "--to", "2026-12-01T17:20:00Z", "--target", str(target)]) == 2
        assert message in capsys.readouterr().err


def test_a_missing_setting_is_named(tmp_path, capsys):
    env_file = tmp_path / "env"
    env_file.write_text('STANZA="s"\n')
    assert backup.main(["--env-file", str(env_file), "list"]) == 1
    assert capsys.readouterr().err.startswith(f"backup: config failed: {env_file} does not set NODE_NAME, PATRONI_URL")


def test_the_reason_of_a_failed_command_is_its_error_line_not_a_retry_note():
    error = "ERROR: [029]: raised from local-1 protocol: zst error: [-20] Data corruption detected"
    lines = ["INFO: restore command begin", error, "       [FormatError] on retry after 0ms",
             "       [FormatError] on retry after 15000ms"]
    assert backup._reason(lines, 29) == f"{error} (exit 29)"
    assert backup._reason(["pg_amcheck: error: connection failed"], 2) == "pg_amcheck: error: connection failed (exit 2)"
    assert backup._reason([], 3) == "exited 3"


def test_metrics_are_written_atomically_merged_and_valid_for_node_exporter(tmp_path):
    cfg = backup.Config({"STANZA": "betting-prod", "TEXTFILE_DIR": str(tmp_path)})
    backup.write_metrics(cfg, {"backup_last_success_timestamp": 1796145518.25, "backup_last_verified_timestamp": 1796145519,
                               "backup_last_duration_seconds": 12.5, "backup_last_size_bytes": 23066339})
    backup.write_metrics(cfg, {"backup_last_verified_timestamp": 1796149999})  # a later `verify LABEL`
    assert [p.name for p in tmp_path.iterdir()] == [backup.METRICS_FILE]  # no temporary file left behind
    path = tmp_path / backup.METRICS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    samples = dict(line.rsplit(" ", 1) for line in path.read_text().splitlines() if not line.startswith("#"))
    assert samples == {
        'backup_last_success_timestamp{cluster="betting-prod"}': "1796145518.25",
        'backup_last_verified_timestamp{cluster="betting-prod"}': "1796149999",
        'backup_last_duration_seconds{cluster="betting-prod"}': "12.5",
        'backup_last_size_bytes{cluster="betting-prod"}': "23066339",
    }
    result = subprocess.run([_require("promtool", "prometheus"), "check", "metrics"], input=path.read_text(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_verification_record_is_keyed_under_the_verification_prefix_by_stanza_label_and_time(settings, topology):
    import datetime

    cfg = backup.Config(backup_environment(settings, topology, topology.postgres[0]))
    when = datetime.datetime(2026, 12, 1, 2, 0, 5, tzinfo=datetime.UTC)
    key = backup.record_key(cfg, "20261201-020000F", when)
    assert key == f"verification/{topology.patroni_scope}/20261201-020000F/20261201T020005Z.json"


def test_the_throw_away_copy_never_archives_listens_on_no_port_and_fetches_wal_itself(settings, topology):
    cfg = backup.Config(backup_environment(settings, topology, topology.postgres[0]))
    options = " ".join(backup.Scratch(cfg).options())
    for setting in ("-c listen_addresses=''", "-c archive_mode=off", "-c synchronous_standby_names=''",
                    f"-c unix_socket_directories={Paths.BACKUP_SCRATCH}/socket", "-c primary_conninfo=''"):
        assert setting in options
    # Synchronous archive-get: the spool's asynchronous queue belongs to the live server on this host.
    assert "--no-archive-async" in options and f"--pg1-path={Paths.BACKUP_SCRATCH}/data archive-get %f" in options
