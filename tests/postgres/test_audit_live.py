"""pgaudit in a real PostgreSQL 15 started with the rendered parameters, and the agent's audit step
run from the real bundle: DDL, a GRANT and writes to the tables the stack names give AUDIT lines in
PostgreSQL's hourly log file (the file the shipper uploads); writes elsewhere give none.

Only what is host-specific is changed: port, listen address, socket folder, log folder, and WAL
archiving (pgBackRest and S3 are not here). A missing postgresql-15-pgaudit fails the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from infra.bundle import bundle_document
from infra.hostagent import agent, patroni
from infra.hosts import host_specs
from infra.render.patroni import AUDIT_ROLE, LOG_DIRECTORY, patroni_config
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import stack_config
from tests.monitoring.harness import free_port

pytestmark = pytest.mark.live

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PGAUDIT = Path("/usr/lib/postgresql/15/lib/pgaudit.so")
# The host's memory too: prod's shared_buffers and huge pages need prod's memory and its kernel's reservation
# (tests/postgres/test_tuning_live.py starts the tuned parameters scaled to this machine).
HOST_SPECIFIC = ("unix_socket_directories", "archive_mode", "archive_command", "log_directory", "shared_buffers", "huge_pages",
                 # The host's TLS files (tests/postgres/test_tuning_live.py runs them): auditing is the same without.
                 "ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file")


def _as_postgres(*command: str) -> str:
    wrapped = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *command]
    return subprocess.run(wrapped, capture_output=True, text=True, check=True).stdout


def _conf_value(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


class LocalPostgres:
    """The agent's platform for its audit step: psql as the superuser, to this server; files under a root."""

    def __init__(self, port: int, root: Path):
        self.port, self.root = port, root

    def path(self, path: str) -> str:
        return str(self.root / path.lstrip("/"))

    def psql(self, database: str, *args: str) -> str:
        command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                   "-d", database, *args]
        return subprocess.run(command, check=True, text=True, capture_output=True).stdout

    def sql(self, database: str, statement: str, user: str = "postgres") -> str:
        return subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port), "-U", user,
                               "-d", database, "-c", statement], check=True, text=True, capture_output=True).stdout.strip()


@pytest.fixture
def audited(monkeypatch):
    if not PGAUDIT.exists():
        pytest.fail(f"{PGAUDIT} is missing: apt-get install -y postgresql-15-pgaudit (the Makefile's SYSTEM_PACKAGES)")
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    node = topology.postgres[0]
    config = patroni_config(settings, topology, node)
    parameters = {**config["bootstrap"]["dcs"]["postgresql"]["parameters"], **config["postgresql"]["parameters"]}
    spec = next(s for s in host_specs(settings, topology) if s.host.name == node.name)
    bundle = bundle_document(spec, settings, topology)

    root = Path(tempfile.mkdtemp(prefix="audit-pg-", dir="/tmp"))  # the postgres user cannot enter pytest's tmp
    shutil.chown(root, "postgres", "postgres")
    data, logs = root / "data", root / LOG_DIRECTORY.lstrip("/")
    port = free_port()
    _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    rendered = {k: v for k, v in parameters.items() if k not in HOST_SPECIFIC}
    rendered.update(unix_socket_directories=str(root), log_directory=str(logs), port=port, listen_addresses="127.0.0.1")
    conf = "".join(f"{key} = {_conf_value(value)}\n" for key, value in rendered.items())
    subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "sh", "-c",
                    f"cat >> {data}/postgresql.conf"], input=conf, text=True, check=True)
    # The agent writes the bundle's files; here only the one its audit step reads.
    for file in bundle["files"]:
        if file["path"] == bundle["patroni"]["audit"]["sql"]:
            target = root / file["path"].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file["content"])
    # On a host the log folder's parent is the data volume's mount point, owned by postgres.
    _as_postgres("mkdir", "-p", str(logs.parent))
    _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "startup.log"), "-w", "start")
    # The audit step asks Patroni whether this member leads; this server is the only one.
    monkeypatch.setattr(patroni, "member", lambda api: {"role": "master", "state": "running"})
    try:
        yield settings, bundle, LocalPostgres(port, root), logs
    finally:
        subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", str(PG_BIN / "pg_ctl"), "-D",
                        str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _audit_lines(logs: Path) -> list[str]:
    files = sorted(logs.glob("*.log"))
    assert files, f"no log file in {logs}: logging_collector, log_directory or log_filename are not in effect"
    assert all(re.fullmatch(r"postgresql-\d{4}-\d\d-\d\dT\d\d\.log", f.name) for f in files), files
    return [line for f in files for line in f.read_text().splitlines() if "AUDIT: " in line]


def test_pgaudit_logs_ddl_grants_and_writes_to_the_named_tables(audited):
    settings, bundle, server, logs = audited
    database = settings.audit.database
    assert "pgaudit" in server.sql("postgres", "SHOW shared_preload_libraries").split(",")
    assert server.sql("postgres", "SHOW pgaudit.log") == "ddl, role"
    assert server.sql("postgres", "SHOW pgaudit.role") == AUDIT_ROLE
    assert set(server.sql("postgres", "SHOW betting.audit_tables").split(",")) == set(settings.audit.tables)

    # The application's database, one named table created before the agent's apply and one after it.
    server.sql("postgres", f"CREATE DATABASE {database}")
    server.sql(database, "CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app")
    server.sql(database, "CREATE TABLE public.transactions (id int, amount numeric)", user="app")
    report = agent.Report("pg-1")
    agent.converge_audit("pg-1", bundle["patroni"], server, report)
    server.sql(database, "CREATE TABLE public.bets (id int, stake numeric); CREATE TABLE public.unaudited (id int)", user="app")
    server.sql(database, "GRANT SELECT ON public.bets TO pg_monitor", user="app")
    for table in ("bets", "transactions", "unaudited"):
        server.sql(database, f"INSERT INTO public.{table} VALUES (1, 2)" if table != "unaudited"
                   else "INSERT INTO public.unaudited VALUES (1)", user="app")
    server.sql(database, "UPDATE public.bets SET stake = 3; DELETE FROM public.transactions", user="app")

    lines = _audit_lines(logs)
    assert any(",DDL,CREATE TABLE," in line and "public.bets" in line for line in lines), lines
    assert any(",ROLE,GRANT," in line and "pg_monitor" in line for line in lines), lines
    writes = {(m.group(1), m.group(2)) for line in lines
              if (m := re.search(r"AUDIT: OBJECT,\d+,\d+,WRITE,(\w+),TABLE,([\w.]+),", line))}
    assert writes == {("INSERT", "public.bets"), ("UPDATE", "public.bets"), ("INSERT", "public.transactions"),
                      ("DELETE", "public.transactions")}, lines


def test_the_audit_step_is_idempotent_and_follows_the_setting(audited):
    settings, bundle, server, logs = audited
    database = settings.audit.database
    server.sql("postgres", f"CREATE DATABASE {database}")
    server.sql(database, "CREATE TABLE public.bets (id int); CREATE TABLE public.transactions (id int)")
    for _ in range(2):
        agent.converge_audit("pg-1", bundle["patroni"], server, agent.Report("pg-1"))
    grants = [line for line in _audit_lines(logs) if ",ROLE,GRANT," in line]
    assert len(grants) == 2, grants  # one per table: the second apply changed nothing

    # A table dropped from the setting (a DCS change, reloaded) is no longer audited after the next apply.
    server.sql("postgres", "ALTER SYSTEM SET betting.audit_tables = 'public.bets'")
    server.sql("postgres", "SELECT pg_reload_conf()")
    agent.converge_audit("pg-1", bundle["patroni"], server, agent.Report("pg-1"))
    privileges = server.sql(database, f"SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = '{AUDIT_ROLE}' "
                                      "AND table_name = 'transactions'")
    assert privileges == "0"
    server.sql(database, "INSERT INTO public.transactions VALUES (1); INSERT INTO public.bets VALUES (1)")
    written = [line for line in _audit_lines(logs) if "AUDIT: OBJECT" in line]
    assert [("public.bets" in line) for line in written] == [True], written


def test_the_audit_step_waits_for_a_database_that_does_not_exist(audited, capsys):
    settings, bundle, server, _ = audited
    report = agent.Report("pg-1")
    agent.converge_audit("pg-1", bundle["patroni"], server, report)
    assert f"audit: database {settings.audit.database} does not exist yet" in capsys.readouterr().out
    assert json.loads(json.dumps(bundle["patroni"]["audit"])) == {"database": "betting", "sql": "/etc/betting/pg-audit.sql"}
