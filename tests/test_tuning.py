"""PostgreSQL and the host tuned to the hardware, without daemons: the derived parameters per stack against the
instance table, where each lands in patroni.yml (DCS or the node's own), every check of `patroni.parameters`
and of the hardware settings, the kernel settings (their keys are this kernel's, the agent applies them at once
and its gate sees what the kernel took), the systemd units and drop-ins as `systemd-analyze verify` reads them,
chrony's config as the real chronyd parses it, and the sandbox never touching this machine's kernel or clock.

What these cannot see: PostgreSQL running with the parameters and its own shared-memory figure
(tests/postgres/test_tuning_live.py), systemd on a booted host ordering the units (no systemd here).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.bundle import bundle_document
from infra.hostagent import agent, gates, patroni
from infra.hosts import host_specs
from infra.hosts.system import CHRONY_CONFIG, POSTGRES_HOST_UNITS, SYSCTL_FILE, SYSCTL_UNIT, THP_UNIT
from infra.instance_types import INSTANCE_TYPES, Hardware
from infra.pg_parameters import OWNED, check_value
from infra.render.patroni import patroni_config
from infra.render.tuning import LOCAL, NLB_IDLE_TIMEOUT_S, Volume, derive, render_sysctl, stack_tuning
from infra.sandbox import mapping as m
from infra.sandbox.runner import ALL_SERVICES, Sandbox
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import stack_config
from tests.test_agent import RecordingPlatform
from tests.test_settings import P, problems_for, raw_stack

FILES = Path(__file__).resolve().parents[1] / "infra" / "hostagent" / "files"

# What each shipped stack gets: the instance table's figures in, these out (README "PostgreSQL tuning").
EXPECTED = {
    "prod": {  # r6i.xlarge: 4 vCPUs, 32 GiB; 500 GiB gp3 at 6000 IOPS and 250 MiB/s; 400 connections
        "shared_buffers": "8GB", "huge_pages": "on", "effective_cache_size": "24GB", "work_mem": "14MB",
        "maintenance_work_mem": "2GB", "autovacuum_work_mem": "409MB", "max_wal_size": "20GB", "min_wal_size": "5GB",
        "autovacuum_max_workers": 5, "autovacuum_vacuum_cost_limit": 600, "max_worker_processes": 8,
        "max_parallel_workers": 4, "max_parallel_workers_per_gather": 2, "max_parallel_maintenance_workers": 2,
    },
    "staging": {  # r6i.large: 2 vCPUs, 16 GiB; 200 GiB gp3 at its 3000 IOPS baseline; 200 connections
        "shared_buffers": "4GB", "huge_pages": "on", "effective_cache_size": "12GB", "work_mem": "14MB",
        "maintenance_work_mem": "1GB", "autovacuum_work_mem": "341MB", "max_wal_size": "8GB", "min_wal_size": "2GB",
        "autovacuum_max_workers": 3, "autovacuum_vacuum_cost_limit": 300, "max_worker_processes": 8,
        "max_parallel_workers": 2, "max_parallel_workers_per_gather": 1, "max_parallel_maintenance_workers": 1,
    },
    "dev": {  # t3.medium: 2 vCPUs, 4 GiB; 50 GiB gp3; 200 connections: too small for huge pages
        "shared_buffers": "1GB", "huge_pages": "off", "effective_cache_size": "3GB", "work_mem": "4MB",
        "maintenance_work_mem": "256MB", "autovacuum_work_mem": "85MB", "max_wal_size": "2GB", "min_wal_size": "512MB",
        "autovacuum_max_workers": 3, "autovacuum_vacuum_cost_limit": 300, "max_worker_processes": 8,
        "max_parallel_workers": 2, "max_parallel_workers_per_gather": 1, "max_parallel_maintenance_workers": 1,
    },
}
EXPECTED_SYSCTL = {
    "prod": {"vm.nr_hugepages": 4221, "vm.overcommit_ratio": 86, "vm.dirty_background_bytes": 125 * 2**20,
             "vm.dirty_bytes": 500 * 2**20},
    "staging": {"vm.nr_hugepages": 2121, "vm.overcommit_ratio": 86, "vm.dirty_background_bytes": 62 * 2**20,
                "vm.dirty_bytes": 250 * 2**20},
    "dev": {"vm.nr_hugepages": 0, "vm.overcommit_ratio": 87, "vm.dirty_background_bytes": 62 * 2**20,
            "vm.dirty_bytes": 250 * 2**20},
}
# The same on every stack: not hardware-bound.
FIXED = {"checkpoint_timeout": "15min", "checkpoint_completion_target": 0.9, "wal_compression": "lz4",
         "random_page_cost": 1.1, "effective_io_concurrency": 200, "jit": "off", "hot_standby_feedback": "on",
         "idle_in_transaction_session_timeout": "60s", "track_activity_query_size": 4096, "log_lock_waits": "on",
         "log_temp_files": 0, "log_autovacuum_min_duration": "1s", "autovacuum_vacuum_scale_factor": 0.02}


def _mib(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(MB|GB)", text).groups()
    return int(number) * (1024 if unit == "GB" else 1)


def test_each_stack_is_tuned_for_its_instance_type(settings, stack):
    hardware = INSTANCE_TYPES[settings.patroni.instance_type]
    assert settings.patroni.hardware == hardware
    tuning = stack_tuning(settings)
    assert {k: tuning.parameters[k] for k in EXPECTED[stack]} == EXPECTED[stack]
    assert {k: tuning.parameters[k] for k in FIXED} == FIXED
    assert {k: tuning.sysctl[k] for k in EXPECTED_SYSCTL[stack]} == EXPECTED_SYSCTL[stack]
    # The rules behind the figures, against the table.
    assert _mib(tuning.parameters["shared_buffers"]) == hardware.memory_mib // 4
    assert _mib(tuning.parameters["effective_cache_size"]) == hardware.memory_mib * 3 // 4
    assert tuning.parameters["max_parallel_workers"] == hardware.vcpus
    assert tuning.sysctl["vm.nr_hugepages"] * 2 >= _mib(tuning.parameters["shared_buffers"]) or \
        tuning.parameters["huge_pages"] == "off"
    assert tuning.parameters["tcp_keepalives_idle"] + tuning.parameters["tcp_keepalives_interval"] < NLB_IDLE_TIMEOUT_S


def test_prod_no_longer_runs_postgresql_defaults():
    settings = load_settings(stack_config("prod"), "prod")
    parameters = stack_tuning(settings).parameters
    assert parameters["shared_buffers"] != "128MB" and parameters["max_wal_size"] != "1GB"
    assert parameters["random_page_cost"] != 4 and parameters["effective_io_concurrency"] != 1


def test_host_memory_parameters_are_local_and_the_rest_in_the_dcs(settings, topology):
    tuning = stack_tuning(settings)
    for node in topology.postgres:
        config = patroni_config(settings, topology, node)
        dcs, local = config["bootstrap"]["dcs"]["postgresql"]["parameters"], config["postgresql"]["parameters"]
        assert {k: local[k] for k in LOCAL} == tuning.local and not set(LOCAL) & set(dcs)
        assert {k: dcs[k] for k in tuning.cluster} == tuning.cluster and not set(tuning.cluster) & set(local)
        # The agent PATCHes exactly what the DCS part says.
        (spec,) = [s for s in host_specs(settings, topology) if s.host == node]
        assert bundle_document(spec, settings, topology)["patroni"]["dynamic"]["postgresql"]["parameters"] == dcs


def test_every_rendered_parameter_is_one_postgresql_15_accepts(settings, topology):
    config = patroni_config(settings, topology, topology.postgres[0])
    rendered = {**config["bootstrap"]["dcs"]["postgresql"]["parameters"], **config["postgresql"]["parameters"]}
    for name, value in rendered.items():
        if name != "betting.audit_tables":  # a placeholder of ours
            assert check_value(name, value) is not None, name


def test_the_data_volume_bounds_the_wal_and_its_type_the_planner():
    hardware = Hardware(4, 32768)
    assert derive(hardware, Volume("gp3", 20), 200).parameters["max_wal_size"] == "1GB"  # the floor
    assert derive(hardware, Volume("gp3", 16384), 200).parameters["max_wal_size"] == "64GB"  # the ceiling
    magnetic = derive(hardware, Volume("st1", 500), 200).parameters
    assert (magnetic["random_page_cost"], magnetic["effective_io_concurrency"]) == (4.0, 2)
    provisioned = derive(hardware, Volume("io2", 500, iops=16000), 200)
    assert provisioned.parameters["autovacuum_vacuum_cost_limit"] == 1600
    assert provisioned.sysctl["vm.dirty_background_bytes"] == 500 * 2**20  # 1000 MiB/s for half a second


def test_work_mem_shares_what_is_left_among_the_pooled_connections():
    hardware = Hardware(4, 32768)
    few, many = (int(derive(hardware, Volume("gp3", 500), n).parameters["work_mem"].removesuffix("MB")) for n in (100, 2000))
    assert few > many >= 4  # never under PostgreSQL's default
    assert derive(Hardware(2, 2048), Volume("gp3", 50), 400).parameters["work_mem"] == "4MB"


# ---- stack settings: the hardware and the overrides ------------------------------------------------------
@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda r: r[P + "patroni"].update(instanceType="x9.huge"),
     "betting-platform:patroni.instanceType: not in the instance table (infra/instance_types.py: m6i, m7i, r6i, r7i, t3); "
     "add it there, or set patroni.memoryMiB and patroni.vcpus to tune PostgreSQL for it (found 'x9.huge')"),
    (lambda r: r[P + "patroni"].update(memoryMiB=16384),
     "betting-platform:patroni.vcpus: patroni.memoryMiB and patroni.vcpus go together: set both"),
    (lambda r: r[P + "patroni"].update(memoryMiB=65536, vcpus=4),
     "betting-platform:patroni.memoryMiB: memoryMiB 65536 and vcpus 4 must not exceed what r6i.xlarge has "
     "(32768 MiB, 4 vCPUs) (found 65536)"),
    (lambda r: r[P + "patroni"].update(memoryMiB=512, vcpus=2),
     "betting-platform:patroni.memoryMiB: Input should be greater than or equal to 1024 (found 512)"),
    (lambda r: r[P + "patroni"].update(parameters={"shared_bufers": "1GB"}),
     "betting-platform:patroni.parameters.shared_bufers: not a PostgreSQL 15 parameter; did you mean shared_buffers?"),
    (lambda r: r[P + "patroni"].update(parameters={"archive_command": "/bin/true"}),
     "betting-platform:patroni.parameters.archive_command: set by the program (WAL archiving to the backups (pgBackRest)); "
     "it cannot be overridden"),
    (lambda r: r[P + "patroni"].update(parameters={"Shared_Preload_Libraries": "auto_explain"}),
     "betting-platform:patroni.parameters.Shared_Preload_Libraries: set by the program"),
    (lambda r: r[P + "patroni"].update(parameters={"max_connections": 500}),
     "betting-platform:patroni.parameters.max_connections: set by the program (set it with patroni.maxConnections)"),
    (lambda r: r[P + "patroni"].update(parameters={"work_mem": "10 parsecs"}),
     "betting-platform:patroni.parameters.work_mem: unit 'parsecs' is not one of B, kB, MB, GB, TB (found '10 parsecs')"),
    (lambda r: r[P + "patroni"].update(parameters={"checkpoint_timeout": "15GB"}),
     "betting-platform:patroni.parameters.checkpoint_timeout: unit 'GB' is not one of us, ms, s, min, h, d (found '15GB')"),
    (lambda r: r[P + "patroni"].update(parameters={"work_mem": "32"}),
     "betting-platform:patroni.parameters.work_mem: out of range: 64 to 2147483647 kB (found '32')"),
    (lambda r: r[P + "patroni"].update(parameters={"effective_io_concurrency": 5000}),
     "betting-platform:patroni.parameters.effective_io_concurrency: out of range: 0 to 1000 (found 5000)"),
    (lambda r: r[P + "patroni"].update(parameters={"jit": "maybe"}),
     "betting-platform:patroni.parameters.jit: expects on or off (found 'maybe')"),
    (lambda r: r[P + "patroni"].update(parameters={"wal_compression": "gzip"}),
     "betting-platform:patroni.parameters.wal_compression: expects one of pglz, lz4, zstd, on, off (found 'gzip')"),
    (lambda r: r[P + "patroni"].update(parameters={"max_parallel_workers": 2.5}),
     "betting-platform:patroni.parameters.max_parallel_workers: expects an integer (found 2.5)"),
    (lambda r: r[P + "patroni"].update(parameters={"random_page_cost": "cheap"}),
     "betting-platform:patroni.parameters.random_page_cost: is not a number (with an optional unit) (found 'cheap')"),
    (lambda r: r[P + "patroni"].update(parameters={"TimeZone": 3}),
     "betting-platform:patroni.parameters.TimeZone: expects a string (found 3)"),
    (lambda r: r[P + "patroni"].update(parameters={"data_checksums": "on"}),
     "betting-platform:patroni.parameters.data_checksums: is read-only (fixed when PostgreSQL is built or the cluster "
     "initialised) (found 'on')"),
    (lambda r: r[P + "patroni"].update(parameters={"shared_buffers": "20GB"}),
     "betting-platform:patroni.parameters.shared_buffers: at most half of the host's 32768 MiB: the page cache, the "
     "backends and autovacuum need the rest (found '20GB')"),
])
def test_a_bad_hardware_or_parameter_setting_gets_one_line(mutate, expected):
    problems = problems_for(mutate)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_every_owned_parameter_is_refused_on_its_own_line():
    problems = problems_for(lambda r: r[P + "patroni"].update(parameters={name: "x" for name in OWNED}))
    assert len(problems) == len(OWNED)
    for name, problem in zip(OWNED, problems, strict=True):
        assert problem.startswith(f"betting-platform:patroni.parameters.{name}: set by the program ("), problem


def _stack_with(stack: str = "prod", **patroni):
    raw = copy.deepcopy(raw_stack(stack))
    raw[P + "patroni"].update(patroni)
    return load_settings({k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}, stack)


def test_an_instance_type_outside_the_table_is_tuned_from_its_figures():
    settings = _stack_with(instanceType="x2iedn.xlarge", memoryMiB=131072, vcpus=4)
    tuning = stack_tuning(settings)
    assert settings.patroni.hardware == Hardware(4, 131072)
    assert tuning.parameters["shared_buffers"] == "32GB" and tuning.sysctl["vm.nr_hugepages"] > 16384


def test_overrides_are_laid_over_the_derived_values_and_the_kernel_follows():
    settings = _stack_with(parameters={"shared_buffers": "4GB", "work_mem": "64MB", "jit": True, "huge_pages": "off"})
    tuning = stack_tuning(settings)
    assert tuning.parameters | {"shared_buffers": "4GB", "work_mem": "64MB", "jit": "on"} == tuning.parameters
    assert tuning.sysctl["vm.nr_hugepages"] == 0  # huge pages off: nothing reserved
    topology = build_topology(settings)
    config = patroni_config(settings, topology, topology.postgres[0])
    assert config["postgresql"]["parameters"]["shared_buffers"] == "4GB"
    assert config["bootstrap"]["dcs"]["postgresql"]["parameters"]["work_mem"] == "64MB"
    bigger = stack_tuning(_stack_with(parameters={"shared_buffers": "12GB"}))
    assert bigger.sysctl["vm.nr_hugepages"] > stack_tuning(_stack_with()).sysctl["vm.nr_hugepages"]
    # A parameter PostgreSQL knows and the program does not derive is simply added.
    assert stack_tuning(_stack_with(parameters={"statement_timeout": "30s"})).cluster["statement_timeout"] == "30s"


# ---- the kernel ------------------------------------------------------------------------------------------
def test_every_sysctl_key_is_one_of_this_kernels_and_the_file_reads_back(settings):
    tuning = stack_tuning(settings)
    content = render_sysctl(tuning).decode()
    assert gates.sysctl_settings(content) == {k: str(v) for k, v in tuning.sysctl.items()}
    for key in tuning.sysctl:
        assert Path("/proc/sys", *key.split(".")).is_file(), key
    assert list(tuning.sysctl) == ["vm.swappiness", "vm.overcommit_memory", "vm.overcommit_ratio",
                                   "vm.dirty_background_bytes", "vm.dirty_bytes", "vm.nr_hugepages"]


def test_the_sysctl_gate_says_what_the_kernel_did_not_take(tmp_path, monkeypatch):
    settings = load_settings(stack_config("prod"), "prod")
    sysctl = tmp_path / "60-betting-postgres.conf"
    sysctl.write_bytes(render_sysctl(stack_tuning(settings)))
    proc = tmp_path / "proc"
    for key, value in stack_tuning(settings).sysctl.items():
        (proc / key.replace(".", "/")).parent.mkdir(parents=True, exist_ok=True)
        (proc / key.replace(".", "/")).write_text(f"{value}\n")
    monkeypatch.setattr(gates, "PROC_SYS", str(proc))
    gate = {"kind": "sysctl", "files": [str(sysctl)]}
    assert gates.check(gate) == (True, "kernel settings applied")
    (proc / "vm" / "nr_hugepages").write_text("3100\n")  # fragmented memory: fewer pages than asked
    ok, reason = gates.check(gate)
    assert not ok and reason == (f"vm.nr_hugepages is 3100, {sysctl} asks 4221 (memory too fragmented for the huge "
                                 f"pages at run time: reboot the host)")


def _bundle(stack: str, host: str) -> dict:
    settings = load_settings(stack_config(stack), stack)
    topology = build_topology(settings)
    (spec,) = [s for s in host_specs(settings, topology) if s.host.name == host]
    return json.loads(json.dumps(bundle_document(spec, settings, topology)))


def test_the_host_units_come_first_and_a_kernel_change_applies_without_a_reboot(tmp_path):
    bundle = _bundle("prod", "pg-1")
    units = [s["unit"] for s in bundle["services"]]
    assert units[:3] == ["chrony", *POSTGRES_HOST_UNITS] and units.index(SYSCTL_UNIT) < units.index("patroni")
    assert next(s for s in bundle["services"] if s["unit"] == SYSCTL_UNIT)["gate"] == {"kind": "sysctl", "files": [SYSCTL_FILE]}
    for service in bundle["services"]:
        service["gate"] = None
    bundle.pop("patroni")
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    platform.calls.clear()
    (entry,) = [f for f in bundle["files"] if f["path"] == SYSCTL_FILE]
    entry["content"] = entry["content"].replace("vm.swappiness = 1", "vm.swappiness = 0")
    report = agent.apply(bundle, platform)
    assert report.changed == [SYSCTL_FILE] and [c for c in platform.calls if c.split()[0] in ("restart", "reload")] == [
        f"restart {SYSCTL_UNIT}"]
    assert not [c for c in platform.calls if "sysctl" in c and c != f"restart {SYSCTL_UNIT}"]  # no boot command, no reboot


def test_every_host_keeps_time_with_chrony_first():
    for stack in ("dev", "prod"):
        settings = load_settings(stack_config(stack), stack)
        for spec in host_specs(settings, build_topology(settings)):
            assert "chrony" in spec.packages and spec.services[0] == "chrony", spec.host.name
            assert [f.content for f in spec.files if f.path == CHRONY_CONFIG] == [(FILES / "chrony.conf").read_bytes()]


def test_a_reloaded_patroni_yml_is_given_its_ha_loop_before_a_pending_restart_is_read(tmp_path, monkeypatch):
    """A restart-needing local parameter (shared_buffers) shows as pending only after Patroni's next HA loop."""
    bundle = _bundle("prod", "pg-1")
    for service in bundle["services"]:
        service["gate"] = None
    bundle["patroni"].pop("audit"), bundle["patroni"].pop("extensions"), bundle["patroni"].pop("pgbouncer_auth")
    bundle["patroni"].pop("aggregates")
    calls = []
    monkeypatch.setattr(patroni, "wait_healthy", lambda *a, **k: "ok")
    monkeypatch.setattr(patroni, "apply_dynamic_config", lambda api, desired: {})
    monkeypatch.setattr(patroni, "wait_reload_applied", lambda api, loop_wait: calls.append(f"wait {loop_wait}") or True)
    monkeypatch.setattr(patroni, "restart_if_pending", lambda *a, **k: calls.append("restart_if_pending") or True)
    platform = RecordingPlatform(tmp_path)
    agent.apply(bundle, platform)
    assert calls == ["restart_if_pending"]  # first start: nothing was reloaded
    calls.clear()
    (config,) = [f for f in bundle["files"] if f["path"] == "/etc/patroni/config.yml"]
    config["content"] = config["content"].replace("shared_buffers: 8GB", "shared_buffers: 6GB")
    report = agent.apply(bundle, platform)
    assert "reload patroni" in report.actions and calls == ["wait 2", "restart_if_pending"]


class _Patroni:
    """/patroni of a member that shows pending_restart from its `after`-th answer on."""

    def __init__(self, after: int):
        self.after, self.asked = after, 0

    def __call__(self, api):
        self.asked += 1
        return {"state": "running", "pending_restart": self.asked >= self.after}


def test_waiting_for_a_reload_ends_when_a_restart_shows_pending(monkeypatch):
    monkeypatch.setattr(patroni, "POLL", 0.01)
    member = _Patroni(after=3)
    monkeypatch.setattr(patroni, "member", member)
    assert patroni.wait_reload_applied("http://x", loop_wait=2) is True and member.asked == 3


def test_the_extensions_are_created_on_the_leader_only(tmp_path, monkeypatch):
    bundle = _bundle("prod", "pg-1")
    ran = []

    class Platform(RecordingPlatform):
        def psql(self, database, *args):
            ran.append((database, *args))
            return ""

    platform = Platform(tmp_path)
    monkeypatch.setattr(patroni, "member", lambda api: {"role": "replica"})
    agent.converge_extensions("pg-1", bundle["patroni"], platform, agent.Report("pg-1"))
    assert ran == []
    monkeypatch.setattr(patroni, "member", lambda api: {"role": "master"})
    agent.converge_extensions("pg-1", bundle["patroni"], platform, agent.Report("pg-1"))
    assert ran == [("postgres", "-f", platform.path("/etc/betting/pg-extensions.sql"))]
    assert (FILES / "pg-extensions.sql").read_text().count("CREATE EXTENSION IF NOT EXISTS pg_stat_statements;") == 1


# ---- systemd and chrony as the real tools read them ------------------------------------------------------
def _require(binary: str, package: str) -> str:
    found = shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{binary} is not installed: apt-get install -y {package} (make system-deps)")
    return found


def _verify(units: Path, *names: str) -> str:
    """systemd-analyze verify of units in `units` (their drop-ins beside them); what it says about our files."""
    result = subprocess.run([_require("systemd-analyze", "systemd"), "verify", *(str(units / n) for n in names)],
                            capture_output=True, text=True, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
    assert result.returncode == 0, result.stdout + result.stderr
    return "\n".join(line for line in (result.stdout + result.stderr).splitlines() if str(units) in line)


def _units(tmp_path: Path, stack: str, host: str, unit: str) -> Path:
    """Debian's unit file of `unit` with the bundle's drop-ins for it, as /etc/systemd/system holds them."""
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    shutil.copy(f"/lib/systemd/system/{unit}", units / unit)
    for file in _bundle(stack, host)["files"]:
        if file["path"].startswith(f"/etc/systemd/system/{unit}.d/") or file["path"] == f"/etc/systemd/system/{THP_UNIT}.service":
            target = units / file["path"].removeprefix("/etc/systemd/system/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file["content"])
    return units


def test_the_drop_ins_and_the_thp_unit_pass_systemd_analyze_verify(tmp_path):
    units = _units(tmp_path, "prod", "pg-1", "patroni.service")
    drop_ins = sorted(p.name for p in (units / "patroni.service.d").iterdir())
    assert drop_ins == ["betting-data-volume.conf", "betting-oom.conf", "betting-secrets.conf"]
    assert _verify(units, "patroni.service", f"{THP_UNIT}.service") == ""
    text = (units / "patroni.service.d" / "betting-data-volume.conf").read_text()
    assert "RequiresMountsFor=/var/lib/postgresql\n" in text and "AssertPathIsMountPoint=/var/lib/postgresql\n" in text
    oom = (units / "patroni.service.d" / "betting-oom.conf").read_text()
    assert "OOMScoreAdjust=-1000\n" in oom and "PG_OOM_ADJUST_FILE=/proc/self/oom_score_adj PG_OOM_ADJUST_VALUE=0" in oom
    # verify reads these very files: a bad value or key in a drop-in is reported.
    (units / "patroni.service.d" / "betting-oom.conf").write_text(oom.replace("-1000", "-2000"))
    (units / "patroni.service.d" / "betting-data-volume.conf").write_text(text.replace("RequiresMountsFor", "RequireMountsFor"))
    said = _verify(units, "patroni.service")
    assert "OOM score adjust value out of range" in said and "Unknown key 'RequireMountsFor'" in said, said


def test_etcd_never_starts_without_its_data_volume(tmp_path):
    units = _units(tmp_path, "prod", "etcd-1", "etcd.service")
    text = (units / "etcd.service.d" / "betting-data-volume.conf").read_text()
    assert "RequiresMountsFor=/var/lib/etcd\n" in text and "AssertPathIsMountPoint=/var/lib/etcd\n" in text
    assert _verify(units, "etcd.service") == ""
    bundle = _bundle("prod", "etcd-1")
    assert bundle["volume"]["mount"] == "/var/lib/etcd"  # the mount the agent makes is the one required


def test_chronyd_accepts_the_config_and_uses_the_amazon_time_sync_service(tmp_path):
    chronyd = _require("chronyd", "chrony")
    config = tmp_path / "chrony.conf"
    config.write_bytes((FILES / "chrony.conf").read_bytes())
    # -p: parse the file, print the configuration and exit (no daemon, the clock untouched).
    result = subprocess.run([chronyd, "-p", "-f", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "server 169.254.169.123 prefer iburst minpoll 4 maxpoll 4" in result.stdout.splitlines()
    assert not re.search(r"^(pool|server) (?!169\.254\.169\.123 )", result.stdout, re.MULTILINE)  # no other source
    config.write_text(config.read_text().replace("prefer iburst", "prefer iburts"))
    broken = subprocess.run([chronyd, "-p", "-f", str(config)], capture_output=True, text=True)
    assert broken.returncode != 0 and "Could not parse server directive" in broken.stderr


# ---- the sandbox -----------------------------------------------------------------------------------------
def test_the_sandbox_never_touches_this_machines_kernel_clock_or_memory(settings, tmp_path):
    sandbox = Sandbox(tmp_path / "state", 25000, settings=settings)
    for host in sandbox.hosts():
        units = {s["unit"] for s in sandbox.host_bundle(host, ALL_SERVICES)["services"]}
        assert not units & set(m.SHARED_MACHINE_UNITS), host.name
    node = sandbox.topology.postgres[0]
    mapped = {f["path"]: f["content"] for f in sandbox.host_bundle(node, ALL_SERVICES)["files"]}
    parameters = yaml.safe_load(mapped["/etc/patroni/config.yml"])["postgresql"]["parameters"]
    assert parameters["shared_buffers"] == m.SANDBOX_SHARED_BUFFERS
    assert parameters["huge_pages"] == (m.SANDBOX_HUGE_PAGES if stack_tuning(settings).local["huge_pages"] != "off" else "off")
    assert SYSCTL_FILE in mapped  # written under the host's root, never applied


def test_an_override_goes_where_the_program_renders_that_parameter():
    """Patroni lets a node's own value win over the DCS: an override of a local parameter must be local to take effect."""
    settings = _stack_with(parameters={"pg_stat_statements.max": 5000, "statement_timeout": "30s", "shared_buffers": "6GB"})
    topology = build_topology(settings)
    config = patroni_config(settings, topology, topology.postgres[0])
    dcs, local = config["bootstrap"]["dcs"]["postgresql"]["parameters"], config["postgresql"]["parameters"]
    assert (local["pg_stat_statements.max"], local["shared_buffers"], dcs["statement_timeout"]) == (5000, "6GB", "30s")
    assert not {"pg_stat_statements.max", "shared_buffers"} & set(dcs) and "statement_timeout" not in local
