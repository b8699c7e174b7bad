"""The tuned parameters in a real PostgreSQL 15, pg_stat_statements through the real postgres_exporter, and the
clock metrics of the real node_exporter.

- vm.nr_hugepages holds PostgreSQL's own figure for each stack's rendered parameters (`postgres -C
  shared_memory_size`, computed without starting a server), so `huge_pages=on` starts on the hosts.
- PostgreSQL starts with prod's rendered parameters, the hardware-derived ones computed for this machine's
  share: `derive()` called for 2 GiB and 2 vCPUs (prod's 32 GiB would not fit next to the other tests; huge
  pages are `off` at that size, and this machine reserves none). pg_settings shows every one from the
  configuration file, none pending a restart after a reload; the parameter catalog the settings check
  overrides against (infra/pg_catalog.py) equals this server's pg_settings.
- The postmaster keeps the unit's OOM score and its children get PG_OOM_ADJUST_VALUE from the drop-in's
  environment. This machine withholds CAP_SYS_RESOURCE even from root, so the unit's -1000 cannot be set:
  the postmaster is started at +500 instead, which shows the same mechanism (systemd-analyze accepts the
  -1000 itself, tests/test_tuning.py).
- The real post_bootstrap script creates pg_stat_statements (the agent's step for an existing cluster runs
  the same file, idempotently), and postgres_exporter 0.11 with the rendered queries exports the top
  statements: TOP_STATEMENTS series per metric, labelled by queryid only.

Ports 27900-27949 (this test's range). Not seen here: Patroni writing these parameters (the sandbox tests
run it), a host's kernel reserving the huge pages and systemd applying the drop-ins.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
import requests

from infra.bundle import bundle_document
from infra.hostagent import agent, patroni
from infra.hostagent.envfile import read_environment_file
from infra.hosts import host_specs
from infra.instance_types import Hardware
from infra.pg_catalog import SETTINGS
from infra.pg_parameters import in_unit
from infra.render.exporters import TOP_STATEMENTS
from infra.render.patroni import EXTENSIONS_SQL, patroni_config, tls_parameters
from infra.render.tuning import HUGE_PAGE_MIB, Volume, derive, stack_tuning
from infra.sandbox.mapping import SANDBOX_SHARED_BUFFERS
from infra.sandbox.platform import expand_command, parse_unit
from infra.sandbox.runner import Sandbox
from infra.settings import PROJECT, load_settings
from infra.topology import Paths, build_topology
from scripts.pg_settings_catalog import query_catalog
from tests.conftest import STACKS, stack_config
from tests.ports import port
from tests.tls import write_identity

pytestmark = pytest.mark.live

PG_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRES_PORT, EXPORTER_PORT, NODE_EXPORTER_PORT = port(27900), port(27901), port(27902)
# What only a host has: its socket folder, its log folder, WAL archiving to S3 (no pgBackRest or S3 here).
HOST_SPECIFIC = ("unix_socket_directories", "archive_mode", "archive_command", "log_directory")
SCALED = Hardware(vcpus=2, memory_mib=2048)
OOM_HERE = 500  # this machine's stand-in for the unit's -1000 (see the docstring)


def _as_postgres(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *command],
                          capture_output=True, text=True, check=True, **kwargs)


def _rendered(settings, node=None) -> dict:
    topology = build_topology(settings)
    config = patroni_config(settings, topology, node or topology.postgres[0])
    rendered = {**config["bootstrap"]["dcs"]["postgresql"]["parameters"], **config["postgresql"]["parameters"]}
    return {k: v for k, v in rendered.items() if k not in HOST_SPECIFIC}


def _conf_value(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


@pytest.fixture(scope="module")
def root():
    folder = Path(tempfile.mkdtemp(prefix="tuning-pg-", dir="/tmp"))  # the postgres user cannot enter pytest's tmp
    shutil.chown(folder, "postgres", "postgres")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(root):
    data = root / "data"
    _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    return data


@pytest.mark.parametrize("stack", STACKS)
def test_the_huge_pages_reserved_hold_postgresqls_own_shared_memory(data_dir, stack):
    settings = load_settings(stack_config(stack), stack)
    tuning = stack_tuning(settings)
    # Not the ssl_* ones: for a runtime-computed parameter, -C goes as far as loading the server's certificate
    # (PostgreSQL 15: FATAL "could not load server certificate file"), and the host's files are not here.
    options = [f"-c{name}={value}" for name, value in _rendered(settings).items()
               if name != "betting.audit_tables" and name not in tls_parameters()]
    size_mib, pages = (int(_as_postgres(str(PG_BIN / "postgres"), "-D", str(data_dir), "-C", what, *options).stdout)
                       for what in ("shared_memory_size", "shared_memory_size_in_huge_pages"))
    # The estimate is PostgreSQL's figure or a little more, never less (a shortfall keeps huge_pages=on from starting).
    assert size_mib <= tuning.shared_memory_mib <= size_mib * 1.01 + 16, (size_mib, tuning.shared_memory_mib)
    if tuning.parameters["huge_pages"] == "off":
        assert tuning.sysctl["vm.nr_hugepages"] == 0
    else:
        assert pages * HUGE_PAGE_MIB >= size_mib  # the 2 MiB pages PostgreSQL counts in
        assert pages <= tuning.sysctl["vm.nr_hugepages"] <= pages * 1.01 + 8, (pages, tuning.sysctl)


def _scaled_parameters() -> dict:
    """prod's rendered parameters with the hardware-derived ones computed for SCALED (prod's volume and connections)."""
    settings = load_settings(stack_config("prod"), "prod")
    disk = settings.patroni.data_volume
    scaled = derive(SCALED, Volume(disk.type, disk.size_gib, disk.iops, disk.throughput), settings.patroni.max_connections)
    return {**_rendered(settings), **scaled.parameters}


def _oom_unit():
    """Patroni's unit as systemd would run it: Debian's file and the bundle's OOM drop-in."""
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    (spec,) = [s for s in host_specs(settings, topology) if s.host == topology.postgres[0]]
    drop_in = next(f.content.decode() for f in spec.files if f.path.endswith("patroni.service.d/betting-oom.conf"))
    unit = parse_unit("patroni", [Path("/lib/systemd/system/patroni.service").read_text(), drop_in], {})
    (score,) = re.findall(r"^OOMScoreAdjust=(-?\d+)$", drop_in, re.MULTILINE)
    return unit, int(score), spec, settings, topology


@pytest.fixture(scope="module")
def tuned(root, data_dir):
    """PostgreSQL 15 started from a postgresql.conf holding the scaled parameters, the way the unit starts it."""
    # The host's TLS identity where the rendered ssl_* parameters name it, under the root (a host path).
    tls = write_identity(root)
    parameters = {**_scaled_parameters(), "ssl_ca_file": str(tls["ca"]), "ssl_cert_file": str(tls["cert"]),
                  "ssl_key_file": str(tls["key"])}
    local = {"port": POSTGRES_PORT, "listen_addresses": "127.0.0.1", "unix_socket_directories": str(root),
             "log_directory": str(root / "log")}
    conf = "".join(f"{key} = {_conf_value(value)}\n" for key, value in {**parameters, **local}.items())
    _as_postgres("sh", "-c", f"cat >> {data_dir}/postgresql.conf", input=conf)
    unit, _, *_ = _oom_unit()
    environment = [a for a in unit.environment if a.startswith("PG_OOM_")]
    assert len(environment) == 2, unit.environment
    subprocess.run(["choom", "-n", str(OOM_HERE), "--", "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                    "env", *environment, str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-l", str(root / "startup.log"),
                    "-w", "start"], check=True, capture_output=True, text=True)
    try:
        yield parameters
    finally:
        subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", str(PG_BIN / "pg_ctl"), "-D",
                        str(data_dir), "-m", "immediate", "stop"], capture_output=True)


def _connect(user: str = "postgres", **tls) -> psycopg.Connection:
    # Over TCP: the keepalive parameters read as 0 on a Unix socket.
    return psycopg.connect(host="127.0.0.1", port=POSTGRES_PORT, user=user, dbname="postgres", autocommit=True, **tls)


def _same(expected, setting: str, unit: str | None, vartype: str) -> bool:
    if vartype in ("integer", "real"):
        return abs(in_unit(expected, unit or "") - float(setting)) < 1e-9
    return str(expected).lower() == setting.lower() if vartype in ("bool", "enum") else str(expected) == setting


def test_postgresql_runs_every_tuned_parameter_from_the_file_and_none_waits_for_a_restart(tuned):
    placeholders = {name: value for name, value in tuned.items() if name not in SETTINGS}  # ours: pg_settings omits them
    assert list(placeholders) == ["betting.audit_tables"]
    with _connect() as conn:
        rows = {name: (setting, unit, vartype, source) for name, setting, unit, vartype, source in conn.execute(
            "SELECT name, setting, unit, vartype, source FROM pg_settings WHERE name = ANY(%s)", [list(tuned)])}
        assert set(rows) == set(tuned) - set(placeholders)
        assert conn.execute("SELECT current_setting('betting.audit_tables')").fetchone()[0] == placeholders[
            "betting.audit_tables"]
        tuned = {name: value for name, value in tuned.items() if name in rows}
        wrong = {name: (tuned[name], rows[name]) for name in tuned
                 if not _same(tuned[name], *rows[name][:3]) or rows[name][3] != "configuration file"}
        assert not wrong
        assert conn.execute("SHOW shared_buffers").fetchone()[0] == "512MB"  # a quarter of the 2 GiB it was tuned for
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(1)  # the reload is asynchronous: a new session then sees what the file says against what runs
    with _connect() as conn:
        assert conn.execute("SELECT array_agg(name) FROM pg_settings WHERE pending_restart").fetchone()[0] is None


def test_postgresql_serves_tls_12_or_newer_with_the_rendered_settings(tuned):
    """The rendered ssl_* parameters (the files' paths moved under the root): a verify-full client checks the
    server's certificate against the CA; a client that offers TLS 1.1 at most is refused by the server's
    ssl_min_protocol_version (this pg_hba is initdb's trust: hostssl is tests/postgres/test_pgbouncer_live.py's)."""
    with _connect(sslmode="verify-full", sslrootcert=tuned["ssl_ca_file"]) as conn:
        version = conn.execute("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
    assert version in ("TLSv1.2", "TLSv1.3")
    with _connect(sslmode="verify-full", sslrootcert=tuned["ssl_ca_file"], ssl_max_protocol_version="TLSv1.2") as conn:
        assert conn.execute("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] == "TLSv1.2"
    with pytest.raises(psycopg.OperationalError):
        _connect(sslmode="require", ssl_max_protocol_version="TLSv1.1").close()


def test_the_parameter_catalog_is_this_servers(tuned, root):
    """infra/pg_catalog.py, which the settings check overrides against: regenerate with scripts/pg_settings_catalog.py."""
    assert query_catalog(str(root), POSTGRES_PORT) == SETTINGS


def test_the_postmaster_keeps_the_units_oom_score_and_its_backends_are_reset(tuned, data_dir):
    _, score, *_ = _oom_unit()
    assert score == -1000
    postmaster = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    assert int(Path(f"/proc/{postmaster}/oom_score_adj").read_text()) == OOM_HERE
    with _connect() as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert int(Path(f"/proc/{backend}/oom_score_adj").read_text()) == 0


def _metrics(url: str, prefix: str, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            lines = [line for line in requests.get(url, timeout=5).text.splitlines() if line.startswith(prefix)]
            if lines or time.monotonic() > deadline:
                return lines
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)


def test_pg_stat_statements_is_created_and_its_top_statements_exported(tuned, root, monkeypatch):
    unit, _, spec, settings, topology = _oom_unit()
    bundle = bundle_document(spec, settings, topology)
    files = {f["path"]: f["content"] for f in bundle["files"]}
    sql = root / EXTENSIONS_SQL.lstrip("/")
    sql.parent.mkdir(parents=True, exist_ok=True)
    sql.write_text(files[EXTENSIONS_SQL])
    script = root / "post-bootstrap"
    script.write_text(files[Paths.POST_BOOTSTRAP])
    script.chmod(0o755)
    env_file = root / "pg-backup.env"  # what the script reads: no repository here, as in the sandbox
    env_file.write_text('STANZA="test"\nPGBACKREST="/bin/false"\nPGBACKREST_CONFIG="/dev/null"\n')
    # Patroni runs post_bootstrap with its arguments and the superuser's URL appended.
    arguments = expand_command(patroni_config(settings, topology, topology.postgres[0])["bootstrap"]["post_bootstrap"], {})
    assert arguments[1:] == [Paths.BACKUP_ENV, EXTENSIONS_SQL, Paths.PGBOUNCER_AUTH_SQL]
    auth_sql = root / Paths.PGBOUNCER_AUTH_SQL.lstrip("/")
    auth_sql.parent.mkdir(parents=True, exist_ok=True)
    auth_sql.write_text(files[Paths.PGBOUNCER_AUTH_SQL])
    run = _as_postgres("env", "POSTGRES_EXPORTER_PASSWORD=exporter", str(script), str(env_file), str(sql), str(auth_sql),
                       f"postgresql://postgres@127.0.0.1:{POSTGRES_PORT}/postgres")
    assert "the backup job will create stanza" in run.stderr

    class Local:  # the agent's platform for its leader step: psql to this server, files under root
        def path(self, path):
            return str(root / path.lstrip("/"))

        def psql(self, database, *args):
            return subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(POSTGRES_PORT),
                                   "-U", "postgres", "-d", database, *args], check=True, capture_output=True, text=True).stdout

    monkeypatch.setattr(patroni, "member", lambda api: {"role": "master"})
    agent.converge_extensions("pg-1", bundle["patroni"], Local(), agent.Report("pg-1"))  # again: changes nothing
    with _connect() as conn:
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()
        for width in range(1, TOP_STATEMENTS + 11):  # more distinct statements than the top keeps
            conn.execute("SELECT " + ", ".join(["1"] * width))

    queries = root / "queries.yaml"
    queries.write_text(next(f["content"] for f in bundle["files"] if f["path"] == Paths.POSTGRES_EXPORTER_QUERIES))
    environment = {"PATH": "/usr/bin:/bin",
                   "DATA_SOURCE_NAME": f"postgresql://postgres_exporter:exporter@127.0.0.1:{POSTGRES_PORT}/postgres?sslmode=disable"}
    exporter = subprocess.Popen(["prometheus-postgres-exporter", f"--web.listen-address=127.0.0.1:{EXPORTER_PORT}",
                                 f"--extend.query-path={queries}"], env=environment, stdout=subprocess.DEVNULL,
                                stderr=(root / "exporter.log").open("w"))
    try:
        lines = _metrics(f"http://127.0.0.1:{EXPORTER_PORT}/metrics", "pg_stat_statements_top_")
    finally:
        exporter.terminate()
        exporter.wait(10)
    series = {}
    for line in lines:
        name, labels = re.match(r"^(\w+)\{(.*)\} \S+$", line).groups()
        series.setdefault(name, []).append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    assert set(series) == {f"pg_stat_statements_top_{c}" for c in
                           ("calls", "exec_seconds", "rows", "shared_blks_read", "temp_blks_written")}, lines
    for name, label_sets in series.items():
        assert len(label_sets) == TOP_STATEMENTS, (name, len(label_sets))
        assert {key for labels in label_sets for key in labels} == {"queryid", "server"}, name
        assert len({labels["queryid"] for labels in label_sets}) == TOP_STATEMENTS


def test_node_exporter_exports_the_clock_state(root):
    """The clock-skew alert reads these (chrony keeps the kernel's clock; node_exporter's timex collector reports it)."""
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    (spec,) = [s for s in host_specs(settings, topology) if s.host == topology.postgres[0]]
    env = next(f.content.decode() for f in spec.files if f.path == "/etc/default/prometheus-node-exporter")
    arguments = read_environment_file(env)["ARGS"].split()  # Debian's unit: ExecStart=... $ARGS
    textfiles = root / "textfile"
    textfiles.mkdir(exist_ok=True)
    # Plain HTTP here: this test is about the clock collector; the rendered TLS web config is served in
    # tests/monitoring/test_exporter_tls_live.py.
    arguments = [f"--collector.textfile.directory={textfiles}" if a.startswith("--collector.textfile.directory=") else
                 f"--web.listen-address=127.0.0.1:{NODE_EXPORTER_PORT}" if a.startswith("--web.listen-address=") else a
                 for a in arguments if not a.startswith("--web.config.file=")]
    exporter = subprocess.Popen(["prometheus-node-exporter", *arguments], stdout=subprocess.DEVNULL,
                                stderr=(root / "node_exporter.log").open("w"))
    try:
        lines = _metrics(f"http://127.0.0.1:{NODE_EXPORTER_PORT}/metrics", "node_timex_")
    finally:
        exporter.terminate()
        exporter.wait(10)
    names = {line.split("{")[0].split(" ")[0] for line in lines}
    assert {"node_timex_offset_seconds", "node_timex_sync_status", "node_timex_maxerror_seconds",
            "node_timex_estimated_error_seconds"} <= names, sorted(names)


def _one_node_stack(**parameters):
    """staging's settings on one etcd member and one Patroni node (this test's ports; a member's own restart is the
    seam here, the 3-node roll is tests/postgres/test_rollout_live.py's)."""
    config = stack_config("staging")
    patroni_settings = {**json.loads(config[PROJECT + ":patroni"]), "nodes": 1, "synchronousMode": False,
                        "parameters": parameters}
    config[PROJECT + ":patroni"] = json.dumps(patroni_settings)
    config[PROJECT + ":etcd"] = json.dumps({**json.loads(config[PROJECT + ":etcd"]), "members": 1})
    return load_settings(config, "staging")


def test_patroni_runs_the_tuned_parameters_and_rolls_a_local_one_that_needs_a_restart():
    """The sandbox (etcd and Patroni only): Patroni bootstraps through the real post_bootstrap (pg_stat_statements
    created), runs the DCS and local parameters with none pending; a restart-needing parameter of patroni.yml
    (pg_stat_statements.max) rolled by the agent is in effect after its apply: the agent waits for Patroni's HA loop
    to apply the reload before it reads pending_restart (without that wait the apply ended healthy with the old
    value still running)."""
    settings = _one_node_stack()
    state = Path(tempfile.mkdtemp(prefix="tuning-sandbox-"))
    sandbox = Sandbox(state, POSTGRES_PORT)
    expected = stack_tuning(settings).cluster
    try:
        sandbox.up(settings, services=("postgres",))
        node = sandbox.topology.postgres[0]
        with psycopg.connect(sandbox.dsn(node), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()[0] == 1
            for name in ("autovacuum_max_workers", "wal_compression", "track_activity_query_size", "work_mem"):
                setting, unit = conn.execute("SELECT setting, unit FROM pg_settings WHERE name = %s", [name]).fetchone()
                assert _same(expected[name], setting, unit, SETTINGS[name][0]), name
            assert conn.execute("SHOW shared_buffers").fetchone()[0] == SANDBOX_SHARED_BUFFERS  # the declared exception
            assert conn.execute("SELECT count(*) FROM pg_settings WHERE pending_restart").fetchone()[0] == 0
        (report,) = [r for r in sandbox.roll(_one_node_stack(**{"pg_stat_statements.max": 5000}), gate_timeout=60)
                     if r.host == node.name]
        assert report.actions == ["reload patroni", "restart postgresql (pending restart)"]
        with psycopg.connect(sandbox.dsn(node), autocommit=True) as conn:
            assert conn.execute("SHOW pg_stat_statements.max").fetchone()[0] == "5000"
            assert conn.execute("SELECT count(*) FROM pg_settings WHERE pending_restart").fetchone()[0] == 0
    finally:
        sandbox.down()
        shutil.rmtree(state, ignore_errors=True)
