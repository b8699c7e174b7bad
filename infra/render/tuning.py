"""PostgreSQL and kernel parameters derived from the hardware: a pure function of memory, vCPUs, the data
volume and the connection ceiling (PgBouncer pools clients onto `max_connections` server connections).

`derive` gives every figure from those inputs; `stack_tuning` applies them to a stack (its instance type,
or `patroni.memoryMiB`/`patroni.vcpus`, its data volume, `patroni.maxConnections`) and lays the stack's
`patroni.parameters` overrides over them; the kernel's huge-page reservation and overcommit follow the
shared memory the overrides leave. README "PostgreSQL tuning" explains each rule.

Where each parameter lives (infra/render/patroni.py): `local` ones go in every node's own patroni.yml
because they must match that host's kernel (vm.nr_hugepages in the same bundle, applied before
PostgreSQL restarts on that host); the rest are cluster-wide, in the DCS: one PATCH /config, rolled
one member at a time, the leader last, and a new leader runs what the old one did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from infra.instance_types import Hardware
from infra.pg_parameters import memory_mib
from infra.settings import StackSettings

HUGE_PAGE_MIB = 2  # x86_64's default huge page (Hugepagesize), the only size EC2's amd64 images use
# Below this much memory shared_buffers stays under 2 GiB: page tables for it are small, and a rigid
# reservation costs more than it saves on an instance that small.
HUGE_PAGES_MIN_MEMORY_MIB = 8 * 1024
# The AWS NLB drops a TCP flow idle for 350 s; keepalives start well before, and a dead peer is found
# within idle + interval x count.
NLB_IDLE_TIMEOUT_S = 350
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 120, 15, 4
SSD_VOLUME_TYPES = ("gp3", "gp2", "io1", "io2")
GP3_BASELINE_IOPS, GP3_BASELINE_MIBPS = 3000, 125
# Parameters that must match the host's own kernel: rendered in each node's patroni.yml.
LOCAL = ("shared_buffers", "huge_pages")


@dataclass(frozen=True)
class Volume:
    type: str
    size_gib: int
    iops: int | None = None
    throughput_mibps: int | None = None

    @property
    def ssd(self) -> bool:
        return self.type in SSD_VOLUME_TYPES

    @property
    def effective_iops(self) -> int:
        """Provisioned IOPS, or the type's baseline (gp3 3000; gp2 3 per GiB, 100 to 16000; magnetic ~200)."""
        if self.iops:
            return self.iops
        if self.type == "gp3":
            return GP3_BASELINE_IOPS
        if self.type == "gp2":
            return min(16000, max(100, 3 * self.size_gib))
        return 200

    @property
    def effective_mibps(self) -> int:
        """Sustained throughput: gp3 as set (125 baseline); gp2 128 below 170 GiB, else 250; io1/io2 256 KiB per IOPS up
        to 1000; magnetic about 40."""
        if self.type == "gp3":
            return self.throughput_mibps or GP3_BASELINE_MIBPS
        if self.type == "gp2":
            return 128 if self.size_gib < 170 else 250
        if self.type in ("io1", "io2"):
            return min(1000, self.effective_iops // 4)
        return 40


@dataclass(frozen=True)
class Tuning:
    parameters: dict  # every derived PostgreSQL parameter, overrides applied
    sysctl: dict  # kernel settings for /etc/sysctl.d, in file order
    shared_memory_mib: int  # PostgreSQL's shared memory estimate (what the huge pages hold)

    @property
    def local(self) -> dict:
        return {k: v for k, v in self.parameters.items() if k in LOCAL}

    @property
    def cluster(self) -> dict:
        return {k: v for k, v in self.parameters.items() if k not in LOCAL}


def _mb(mib: float) -> str:
    """A memory figure as PostgreSQL reads it: whole GB when exact, else MB (rounded down)."""
    mib = int(mib)
    return f"{mib // 1024}GB" if mib >= 1024 and mib % 1024 == 0 else f"{mib}MB"


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def shared_memory_estimate_mib(shared_buffers_mib: float, max_connections: int, workers: int) -> int:
    """PostgreSQL 15's shared memory for these settings, from above: buffers with their descriptors (2.3 %),
    about 50 KiB per backend slot (locks, PGPROC, activity text) and 40 MiB for the rest (WAL buffers,
    pg_stat_statements' 10000 entries, SLRUs). tests/postgres/test_tuning_live.py holds it against
    `postgres -C shared_memory_size` for every stack."""
    return math.ceil(shared_buffers_mib * 1.023 + 0.05 * (max_connections + workers) + 40)


def derive(hardware: Hardware, volume: Volume, max_connections: int) -> Tuning:
    """Every derived parameter for one host; see the module's docstring and README "PostgreSQL tuning"."""
    memory, vcpus = hardware.memory_mib, hardware.vcpus
    shared_buffers = memory // 4  # a quarter: the OS page cache holds the rest of the working set
    huge = memory >= HUGE_PAGES_MIN_MEMORY_MIB
    maintenance = min(2048, memory // 16)
    autovacuum_workers = int(_clamp(vcpus + 1, 3, 10))
    # The maintenance budget (memory / 16) shared by the autovacuum workers; vacuum uses at most 1 GB each.
    autovacuum_mem = min(1024, maintenance // autovacuum_workers)
    max_worker_processes = max(8, vcpus + 4)
    parallel_workers = vcpus
    # What queries may use: memory less shared_buffers, autovacuum and one manual maintenance job, and a
    # tenth (at least 512 MiB) for the kernel and the page cache; shared by every pooled connection and
    # parallel worker, each running up to 3 work_mem at once (a sort and a hash, which may take 2 with
    # PostgreSQL 15's hash_mem_multiplier).
    os_reserve = max(512, memory // 10)
    query_memory = memory - shared_buffers - maintenance - autovacuum_workers * autovacuum_mem - os_reserve
    work_mem = int(_clamp(query_memory / (3 * (max_connections + parallel_workers)), 4, 256))
    # WAL between checkpoints: 4 % of the data volume, 1 to 64 GiB, so checkpoints come from checkpoint_timeout
    # under normal load and the volume keeps room for the slots' and the archive queue's WAL.
    max_wal = int(_clamp(volume.size_gib * 1024 * 0.04, 1024, 64 * 1024))
    max_wal -= max_wal % 256
    iops = volume.effective_iops
    parameters = {
        "shared_buffers": _mb(shared_buffers),
        "huge_pages": "on" if huge else "off",
        "effective_cache_size": _mb(memory * 3 // 4),
        "work_mem": _mb(work_mem),
        "maintenance_work_mem": _mb(maintenance),
        "autovacuum_work_mem": _mb(autovacuum_mem),
        "max_wal_size": _mb(max_wal),
        "min_wal_size": _mb(max_wal // 4),
        "checkpoint_timeout": "15min",
        "checkpoint_completion_target": 0.9,
        "wal_compression": "lz4",
        # EBS SSDs: a random page costs about a sequential one once it is not cached.
        "random_page_cost": 1.1 if volume.ssd else 4.0,
        "effective_io_concurrency": 200 if volume.ssd else 2,
        "maintenance_io_concurrency": 200 if volume.ssd else 10,
        "autovacuum_max_workers": autovacuum_workers,
        "autovacuum_naptime": "15s",
        "autovacuum_vacuum_scale_factor": 0.02,
        "autovacuum_vacuum_insert_scale_factor": 0.05,
        "autovacuum_analyze_scale_factor": 0.01,
        # PostgreSQL's 200 with a 2 ms delay; faster volumes let vacuum go faster, a tenth of their IOPS.
        "autovacuum_vacuum_cost_limit": int(max(200, iops // 10)),
        "autovacuum_vacuum_cost_delay": "2ms",
        "max_worker_processes": max_worker_processes,
        "max_parallel_workers": parallel_workers,
        "max_parallel_workers_per_gather": int(_clamp(vcpus // 2, 1, 4)),
        "max_parallel_maintenance_workers": int(_clamp(vcpus // 2, 1, 4)),
        "jit": "off",
        "idle_in_transaction_session_timeout": "60s",
        "hot_standby_feedback": "on",
        "tcp_keepalives_idle": KEEPALIVE_IDLE_S,
        "tcp_keepalives_interval": KEEPALIVE_INTERVAL_S,
        "tcp_keepalives_count": KEEPALIVE_COUNT,
        "track_activity_query_size": 4096,
        "log_lock_waits": "on",
        "log_temp_files": 0,
        "log_autovacuum_min_duration": "1s",
    }
    return _with_kernel(parameters, hardware, volume, max_connections)


def _with_kernel(parameters: dict, hardware: Hardware, volume: Volume, max_connections: int) -> Tuning:
    """The sysctl settings that go with `parameters` on this hardware."""
    memory = hardware.memory_mib
    workers = int(parameters["autovacuum_max_workers"]) + int(parameters["max_worker_processes"])
    shared = shared_memory_estimate_mib(memory_mib(parameters["shared_buffers"], "shared_buffers"), max_connections, workers)
    huge_pages = math.ceil(shared / HUGE_PAGE_MIB) if parameters["huge_pages"] != "off" else 0
    # Strict accounting: a backend that asks for more than there is gets an error, never the OOM killer.
    # CommitLimit is (memory - huge pages) x ratio: leave a tenth of memory (at least 512 MiB) to the kernel.
    non_huge = memory - huge_pages * HUGE_PAGE_MIB
    ratio = int(100 * (non_huge - max(512, memory // 10)) / non_huge)
    # Write back dirty pages once half a second of the volume's throughput is dirty, block writers at 2 s.
    mibps = volume.effective_mibps
    sysctl = {
        "vm.swappiness": 1,
        "vm.overcommit_memory": 2,
        "vm.overcommit_ratio": ratio,
        "vm.dirty_background_bytes": max(16, mibps // 2) * 1024**2,
        "vm.dirty_bytes": max(64, mibps * 2) * 1024**2,
        "vm.nr_hugepages": huge_pages,
    }
    return Tuning(parameters, sysctl, shared)


def stack_tuning(settings: StackSettings) -> Tuning:
    """The tuning of a stack's PostgreSQL hosts, its `patroni.parameters` overrides applied."""
    patroni = settings.patroni
    disk = patroni.data_volume
    volume = Volume(disk.type, disk.size_gib, disk.iops, disk.throughput)
    base = derive(patroni.hardware, volume, patroni.max_connections)
    if not patroni.parameters:
        return base
    return _with_kernel({**base.parameters, **patroni.parameters}, patroni.hardware, volume, patroni.max_connections)


def render_sysctl(tuning: Tuning) -> bytes:
    lines = ["# PostgreSQL host kernel settings, derived with the PostgreSQL parameters (infra/render/tuning.py).",
             f"# vm.nr_hugepages holds shared_buffers and PostgreSQL's other shared memory (~{tuning.shared_memory_mib} MiB)."]
    lines += [f"{key} = {value}" for key, value in tuning.sysctl.items()]
    return ("\n".join(lines) + "\n").encode()
