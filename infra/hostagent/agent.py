"""The host agent: applies a host's bundle (infra/bundle.py) idempotently, then waits until the
host is healthy again. The same code runs on EC2 (from the boot stub and from the SSM
association that rolls a change one host at a time) and in the local sandbox; only the
`Platform` differs (systemd, apt, SSM and EBS here; processes under a state dir there).

Standard library only: it runs on the image's python3 before anything is installed.

    betting-agent apply --bundle FILE         apply a bundle that is already on disk
    betting-agent fetch-apply --digest D      fetch bundles/<host>/D.json from S3, verify, apply
    betting-agent fetch-apply --digests JSON  the same, taking this host's digest from a map (SSM)
    betting-agent check                       run every gate of the last applied bundle
    betting-agent handover                    a Patroni leader switches over (before a host is replaced)

Exit 0 when the host is healthy with the bundle applied; 1 with one line naming the host and
the failed check otherwise (the rollout stops there: max_errors 0).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from infra.hostagent import etcd, gates, patroni
from infra.hostagent.envfile import read_environment_file

HOST_CONFIG = "/etc/betting/host.json"  # written by the boot stub's user data: host, region, bucket
STATE_DIR = "/var/lib/betting"
LOCK = "/run/betting-agent.lock"
NO_AUTOSTART = "/usr/sbin/policy-rc.d"  # exit 101: Debian packages must not start before their config is in place
VOLUME_WAIT_SECONDS = 600
AGENT_ROOT = "/usr/local/lib/betting-agent"  # the agent's package on a host (the launcher's PYTHONPATH)
AGENT_COMMAND = "/usr/local/sbin/betting-agent"
GATE_TIMEOUT = {"patroni": 600.0, "etcd": 180.0}  # a replica's rejoin or an etcd catch-up takes a while
DEFAULT_GATE_TIMEOUT = 120.0
ACTION_ORDER = {"none": 0, "reload": 1, "restart": 2}
# node_exporter's textfile folder (infra/topology.py Paths.NODE_EXPORTER_TEXTFILE_DIR; the agent imports no infra
# module but its own): after each healthy apply the agent says there which bundle it runs, so rollouts show in Prometheus.
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
METRICS_FILE = "betting_agent.prom"


class ApplyError(RuntimeError):
    def __init__(self, host: str, check: str, reason: str):
        self.host, self.check, self.reason = host, check, reason
        super().__init__(f"{host}: {check} failed: {reason}")


# ---- platforms ----------------------------------------------------------------------------
class DebianHost:
    """A Debian EC2 host: systemd units, apt, SSM parameters, one EBS data volume."""

    def __init__(self, region: str):
        self.region = region

    def path(self, path: str) -> str:
        return path

    def run(self, *command: str) -> str:
        return subprocess.run(command, check=True, text=True, capture_output=True).stdout

    def succeeds(self, *command: str) -> bool:
        return subprocess.run(command, capture_output=True).returncode == 0

    def _installed(self, package: str) -> bool:
        query = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        return query.returncode == 0 and query.stdout == "install ok installed"

    def install(self, packages: list[str]) -> list[str]:
        missing = [p for p in packages if not self._installed(p)]
        if not missing:
            return []
        write_atomic(NO_AUTOSTART, b"#!/bin/sh\nexit 101\n", "0755")
        try:
            env = "DEBIAN_FRONTEND=noninteractive"
            self.run("env", env, "apt-get", "update", "-q")
            self.run("env", env, "apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", *missing)
        finally:
            os.unlink(NO_AUTOSTART)
        return missing

    def _data_device(self) -> str:
        """The one attached EBS volume that is not the root disk (attachment may lag the boot)."""
        root = self.run("findmnt", "-no", "SOURCE", "/").strip()
        deadline = time.monotonic() + VOLUME_WAIT_SECONDS
        while time.monotonic() < deadline:
            for link in sorted(glob.glob("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_*")):
                device = os.path.realpath(link)
                if "-part" not in link and not root.startswith(device):
                    return device
            time.sleep(5)
        raise ApplyError(self.hostname(), "data volume", f"no data volume attached after {VOLUME_WAIT_SECONDS}s")

    def mount(self, volume: dict) -> bool:
        if self.succeeds("findmnt", "--mountpoint", volume["mount"]):
            return False
        device = self._data_device()
        if not self.succeeds("blkid", device):
            self.run("mkfs.xfs", device)  # only a blank volume: a reattached one keeps its data
        uuid = self.run("blkid", "-s", "UUID", "-o", "value", device).strip()
        os.makedirs(volume["mount"], exist_ok=True)
        line = f"UUID={uuid} {volume['mount']} xfs defaults,nofail,noatime 0 2"
        with open("/etc/fstab", "a+") as fstab:
            fstab.seek(0)
            if line not in fstab.read().splitlines():
                fstab.write(line + "\n")
        self.run("mount", volume["mount"])
        return True

    def secret(self, parameter: str, attempts: int = 30) -> str:
        for attempt in range(1, attempts + 1):
            try:
                return self.run("aws", "ssm", "get-parameter", "--region", self.region, "--with-decryption", "--name",
                                parameter, "--query", "Parameter.Value", "--output", "text").rstrip("\n")
            except subprocess.CalledProcessError:
                # A new parameter or role policy can take a while to become visible.
                if attempt == attempts:
                    raise
                time.sleep(10)
        raise AssertionError("unreachable")

    def chown(self, path: str, owner: str) -> None:
        self.run("chown", owner, path)

    def boot_command(self, command: str) -> None:
        self.run("sh", "-c", command)

    def daemon_reload(self) -> None:
        self.run("systemctl", "daemon-reload")

    def active(self, unit: str) -> bool:
        return self.succeeds("systemctl", "is-active", "--quiet", unit)

    def start(self, unit: str) -> None:
        self.run("systemctl", "enable", unit)
        self.run("systemctl", "start", unit)

    def restart(self, unit: str) -> None:
        self.run("systemctl", "restart", unit)

    def reload(self, unit: str) -> None:
        self.run("systemctl", "reload", unit)

    def psql(self, database: str, *args: str) -> str:
        """psql as PostgreSQL's superuser over the local socket (peer authentication), stopping at the first error."""
        return self.run("runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database, *args)

    def hostname(self) -> str:
        return os.uname().nodename.split(".")[0]


# ---- files --------------------------------------------------------------------------------
def _owner_ids(owner: str) -> tuple[int, int]:
    import grp
    import pwd

    user, _, group = owner.partition(":")
    return pwd.getpwnam(user).pw_uid, grp.getgrnam(group or user).gr_gid


def write_atomic(path: str, content: bytes, mode: str, owner: str | None = None) -> None:
    """Write beside the target, set owner and mode, fsync, rename: a reader sees the old or the new file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".betting-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if owner is not None:
            os.chown(tmp, *_owner_ids(owner))
        os.chmod(tmp, int(mode, 8))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def converge_directory(path: str, mode: str, owner: str | None) -> bool:
    """Make the folder exist with exactly this owner and mode; True when anything had to change."""
    changed = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    stat = os.stat(path)
    if owner is not None and (stat.st_uid, stat.st_gid) != _owner_ids(owner):
        os.chown(path, *_owner_ids(owner))
        changed = True
    if (stat.st_mode & 0o7777) != int(mode, 8):
        os.chmod(path, int(mode, 8))
        changed = True
    return changed


def converge_file(path: str, content: bytes, mode: str, owner: str | None) -> bool:
    """Make the file exactly so; True when anything (bytes, owner or mode) had to change."""
    try:
        with open(path, "rb") as handle:
            current = handle.read()
        stat = os.stat(path)
    except FileNotFoundError:
        write_atomic(path, content, mode, owner)
        return True
    same_owner = owner is None or (stat.st_uid, stat.st_gid) == _owner_ids(owner)
    if current == content and same_owner and (stat.st_mode & 0o7777) == int(mode, 8):
        return False
    write_atomic(path, content, mode, owner)
    return True


# ---- apply --------------------------------------------------------------------------------
def bundle_digest(bundle: dict) -> str:
    """The sha256 of the bundle's bytes as infra/bundle.py renders them (the digest its S3 key and SSM name)."""
    return hashlib.sha256((json.dumps(bundle, indent=1, sort_keys=True) + "\n").encode()).hexdigest()


def metrics_text(bundle: dict, changed: int, applied_at: float, rollout: str) -> str:
    labels = f'digest="{bundle_digest(bundle)}",role="{bundle["role"]}"' + (f',rollout="{rollout}"' if rollout else "")
    return "".join([
        "# HELP betting_agent_last_apply_timestamp_seconds Unix time of the host agent's last apply that ended healthy.\n",
        "# TYPE betting_agent_last_apply_timestamp_seconds gauge\n",
        f"betting_agent_last_apply_timestamp_seconds {applied_at:.3f}\n",
        "# HELP betting_agent_apply_changed_files Files, folders and secrets that apply changed.\n",
        "# TYPE betting_agent_apply_changed_files gauge\n",
        f"betting_agent_apply_changed_files {changed}\n",
        "# HELP betting_agent_bundle_info The bundle this host runs (sha256), its role and the rollout that applied it"
        " (sha256 of the role's digests parameter; none for an apply by hand or at boot).\n",
        "# TYPE betting_agent_bundle_info gauge\n",
        f"betting_agent_bundle_info{{{labels}}} 1\n",
    ])


def write_apply_metrics(bundle: dict, platform, report: Report, rollout: str = "") -> None:
    """The textfile node_exporter serves: written beside it and renamed, so a scrape never reads half of it.
    Only after a healthy apply: a failed one leaves the last good apply's figures (the dashboard shows it lagging)."""
    path = os.path.join(platform.path(TEXTFILE_DIR), METRICS_FILE)
    try:
        write_atomic(path, metrics_text(bundle, len(report.changed), time.time(), rollout).encode(), "0644")
    except OSError as error:  # the host is healthy: the apply stands, the stale figures say the rest
        report.log(f"apply metrics not written: {path}: {error.strerror}")


class Report:
    def __init__(self, host: str):
        self.host = host
        self.changed: list[str] = []
        self.actions: list[str] = []

    def log(self, line: str) -> None:
        print(f"{self.host}: {line}", flush=True)


def _escape_env(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


GATE_FILES = ("ca_file", "cert", "key")  # a gate's TLS files: host paths


def _gate_on(gate: dict | None, platform) -> dict | None:
    """The gate with its TLS files where this platform has them."""
    if gate is None:
        return None
    gate = {k: platform.path(v) if k in GATE_FILES else v for k, v in gate.items()}
    if "tls" in gate:
        gate["tls"] = {k: platform.path(v) for k, v in gate["tls"].items()}
    return gate


def configure_patroni_access(spec: dict, platform) -> None:
    """The members' CA and the REST API's login for the unsafe calls: the login from Patroni's own
    environment file (the SecretEnvironment the bundle wrote), so both always agree."""
    username = password = None
    with contextlib.suppress(FileNotFoundError):
        with open(platform.path(spec["credentials"])) as handle:
            env = read_environment_file(handle.read())
        username, password = env.get("PATRONI_RESTAPI_USERNAME"), env.get("PATRONI_RESTAPI_PASSWORD")
    patroni.configure(platform.path(spec["ca_file"]), username, password)


def _with_parameters(file: dict, platform) -> str:
    """The file's content with each of its tokens replaced by its parameter's value (a value known only once a
    resource exists, e.g. the AMP workspace id in prometheus.yml): a new value changes the file like any edit."""
    content = file["content"]
    for token, parameter in sorted(file.get("parameters", {}).items()):
        content = content.replace(token, platform.secret(parameter))
    return content


def _wait_gate(host: str, unit: str, gate: dict | None, timeout: float | None = None) -> None:
    if gate is None:
        return
    try:
        gates.wait(gate, timeout or GATE_TIMEOUT.get(gate["kind"], DEFAULT_GATE_TIMEOUT))
    except gates.GateError as error:
        raise ApplyError(host, f"{unit} health ({gate['kind']})", str(error)) from None


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _only_inert(before: bytes | None, after: bytes, inert: list[str] | tuple[str, ...]) -> bool:
    """True when the file existed and differs only in lines its rule calls inert."""
    if before is None or not inert:
        return False

    def live(content: bytes) -> list[bytes]:
        return [line for line in content.splitlines() if not line.startswith(tuple(p.encode() for p in inert))]

    return live(before) == live(after)


def converge_patroni(host: str, spec: dict, report: Report, timeout: float, reloaded: bool = False) -> None:
    """Cluster-wide settings through PATCH /config; a pending restart one member at a time (this one).

    `reloaded`: patroni.yml changed and Patroni was sent a reload, which it applies at its next HA loop;
    a local parameter that needs a restart shows as pending only then."""
    api, name = spec["api"], host
    try:
        patroni.wait_healthy(api, timeout, name, allow_pending=True)
        patch = patroni.apply_dynamic_config(api, spec["dynamic"])
        if patch:
            report.actions.append(f"PATCH /config {json.dumps(patch, sort_keys=True)}")
            report.log(f"patroni dynamic configuration changed: {json.dumps(patch, sort_keys=True)}")
        elif reloaded:  # (a PATCH waits for an HA loop already)
            patroni.wait_reload_applied(api, int(spec["dynamic"].get("loop_wait", 10)))
        # A leader restarts the other pending members first, one at a time, then hands over once.
        if patroni.restart_if_pending(api, timeout, name, expected_members=spec["members"]):
            report.actions.append("restart postgresql (pending restart)")
            report.log("postgresql restarted for settings that needed it")
    except patroni.PatroniError as error:
        raise ApplyError(host, "patroni", str(error)) from None


def converge_audit(host: str, spec: dict, platform, report: Report) -> None:
    """On the Patroni leader: pgaudit's object audit role and its grants (the bundle's SQL file, idempotent).

    Replicas get the grants by replication. A database that does not exist yet has no table to
    audit: the next apply after it is created installs the grants and the event trigger there."""
    api, audit = spec["api"], spec["audit"]
    try:
        if patroni.member(api).get("role") not in patroni.LEADER_ROLES:
            return
    except patroni.PatroniError as error:
        raise ApplyError(host, "audit", str(error)) from None
    database = audit["database"]  # a plain lower-case identifier (infra/settings.py AuditSettings)
    try:
        found = platform.psql("postgres", "-At", "-c", f"SELECT 1 FROM pg_database WHERE datname = '{database}'").strip()
        if found != "1":
            report.log(f"audit: database {database} does not exist yet; its tables are audited from the next apply")
            return
        platform.psql(database, "-f", platform.path(audit["sql"]))
    except subprocess.CalledProcessError as error:
        raise ApplyError(host, "audit", (error.stderr or str(error)).strip().splitlines()[-1]) from None
    report.log(f"audit: grants of {database} match betting.audit_tables")


def converge_extensions(host: str, spec: dict, platform, report: Report) -> None:
    """On the Patroni leader: the extensions the monitoring reads (the bundle's SQL file, idempotent); a cluster
    bootstrapped before they were added gets them here, its replicas by replication."""
    api, extensions = spec["api"], spec["extensions"]
    try:
        if patroni.member(api).get("role") not in patroni.LEADER_ROLES:
            return
        platform.psql(extensions["database"], "-f", platform.path(extensions["sql"]))
    except patroni.PatroniError as error:
        raise ApplyError(host, "extensions", str(error)) from None
    except subprocess.CalledProcessError as error:
        raise ApplyError(host, "extensions", (error.stderr or str(error)).strip().splitlines()[-1]) from None


def converge_aggregates(host: str, spec: dict, platform, report: Report) -> None:
    """On the Patroni leader: the SLO aggregates' database and its writer role, whose password is set from its secret
    file (the bundle's SQL file, idempotent); replicas get both by replication."""
    api, aggregates = spec["api"], spec["aggregates"]
    try:
        if patroni.member(api).get("role") not in patroni.LEADER_ROLES:
            return
        platform.psql("postgres", "-v", f"database={aggregates['database']}", "-v", f"role={aggregates['role']}",
                      "-v", f"password_file={platform.path(aggregates['password_file'])}",
                      "-f", platform.path(aggregates["sql"]))
    except patroni.PatroniError as error:
        raise ApplyError(host, "aggregates", str(error)) from None
    except subprocess.CalledProcessError as error:
        raise ApplyError(host, "aggregates", (error.stderr or str(error)).strip().splitlines()[-1]) from None


def converge_pgbouncer_auth(host: str, spec: dict, platform, report: Report) -> None:
    """On the Patroni leader: PgBouncer's auth function in every database that takes connections (the bundle's
    SQL file, idempotent, silent when nothing differs). PgBouncer runs auth_query in the database a client
    asks for; databases created later copy it from template1, replicas get it by replication."""
    try:
        if patroni.member(spec["api"]).get("role") not in patroni.LEADER_ROLES:
            return
    except patroni.PatroniError as error:
        raise ApplyError(host, "pgbouncer auth", str(error)) from None
    try:
        databases = platform.psql("postgres", "-At", "-c", "SELECT datname FROM pg_database WHERE datallowconn "
                                  "ORDER BY datname").splitlines()
        for database in databases:
            platform.psql(database, "-f", platform.path(spec["pgbouncer_auth"]["sql"]))
    except subprocess.CalledProcessError as error:
        raise ApplyError(host, "pgbouncer auth", (error.stderr or str(error)).strip().splitlines()[-1]) from None
    report.log(f"pgbouncer auth: pgbouncer.get_auth in {', '.join(databases)}")


def apply(bundle: dict, platform, gate_timeout: float | None = None, rollout: str = "") -> Report:
    """Apply `bundle` on `platform`; return what changed. Raises ApplyError at the first failed gate.
    `rollout` names the rollout that asked for it (the apply metrics' label)."""
    host = bundle["host"]
    report = Report(host)
    volume = bundle["volume"]
    if volume and platform.mount(volume):
        report.actions.append(f"mounted {volume['mount']}")
    installed = platform.install(bundle["packages"])
    if installed:
        report.actions.append(f"installed {' '.join(installed)}")
    if volume:
        platform.chown(platform.path(volume["mount"]), volume["owner"])

    pending: dict[str, str] = {}  # unit -> strongest action its changed files need

    def need(unit: str | None, action: str) -> None:
        if unit and ACTION_ORDER[action] > ACTION_ORDER.get(pending.get(unit, "none"), 0):
            pending[unit] = action

    for directory in bundle.get("directories", []):
        if converge_directory(platform.path(directory["path"]), directory["mode"], directory["owner"]):
            report.changed.append(directory["path"] + "/")
    for secret in bundle["secret_files"]:
        value = platform.secret(secret["parameter"]).encode()
        if converge_file(platform.path(secret["path"]), value, secret["mode"], secret["owner"]):
            report.changed.append(secret["path"])
            for unit, action in secret.get("reloads", []):  # e.g. a renewed certificate
                need(unit, action)
    for environment in bundle["secret_environments"]:
        lines = [f'{var}="{_escape_env(platform.secret(param))}"\n' for var, param in sorted(environment["variables"].items())]
        if converge_file(platform.path(environment["path"]), "".join(lines).encode(), "0400", environment["owner"]):
            report.changed.append(environment["path"])
            need(environment["unit"], "restart")
    units_changed = False
    for file in bundle["files"]:
        path = platform.path(file["path"])
        before = _read(path)
        content = _with_parameters(file, platform).encode()
        if converge_file(path, content, file["mode"], file["owner"]):
            report.changed.append(file["path"])
            if not _only_inert(before, content, file.get("inert_lines", ())):
                need(file["unit"], file["on_change"])
            units_changed |= file["path"].startswith("/etc/systemd/system/")
    for command in bundle["boot_commands"]:
        platform.boot_command(command)
    if units_changed:
        platform.daemon_reload()

    if "ca_file" in bundle.get("patroni", {}):
        configure_patroni_access(bundle["patroni"], platform)
    for service in bundle["services"]:
        unit, gate = service["unit"], _gate_on(service["gate"], platform)
        action = pending.get(unit, "none")
        reloaded = False
        if not platform.active(unit):
            _first_start(host, bundle, unit, platform, report, gate_timeout or GATE_TIMEOUT.get(unit, DEFAULT_GATE_TIMEOUT))
        elif action == "restart":
            if unit == "patroni" and "patroni" in bundle:
                _handover(host, bundle, report)
            platform.restart(unit)
            report.actions.append(f"restart {unit}")
        elif action == "reload":
            platform.reload(unit)
            report.actions.append(f"reload {unit}")
            reloaded = True
        if unit == "patroni" and "patroni" in bundle:
            converge_patroni(host, bundle["patroni"], report, gate_timeout or GATE_TIMEOUT["patroni"], reloaded)
        _wait_gate(host, unit, gate, gate_timeout)
        if unit == "patroni" and "audit" in bundle.get("patroni", {}):
            converge_audit(host, bundle["patroni"], platform, report)
        if unit == "patroni" and "extensions" in bundle.get("patroni", {}):
            converge_extensions(host, bundle["patroni"], platform, report)
        # Before PgBouncer's auth function: the aggregates' database gets it in the same apply.
        if unit == "patroni" and "aggregates" in bundle.get("patroni", {}):
            converge_aggregates(host, bundle["patroni"], platform, report)
        if unit == "patroni" and "pgbouncer_auth" in bundle.get("patroni", {}):
            converge_pgbouncer_auth(host, bundle["patroni"], platform, report)
    write_apply_metrics(bundle, platform, report, rollout)
    return report


def _first_start(host: str, bundle: dict, unit: str, platform, report: Report, timeout: float) -> None:
    """Start a unit that is not running. An etcd member with an empty data dir first finds out whether
    a cluster runs already and, if so, joins it (infra/hostagent/etcd.py) under the cluster's join
    lock, which is held until the member has started."""
    join = None
    if unit == "etcd" and "etcd" in bundle:
        try:
            join = etcd.prepare_join(bundle["etcd"], platform, timeout)
        except etcd.JoinError as error:
            raise ApplyError(host, "etcd join", str(error)) from None
        for action in join.actions:
            report.actions.append(action)
            report.log(action)
        if join.kind != etcd.RESTART:
            report.log(f"etcd: {join.kind} ({'state existing' if join.joining else 'as rendered, state new'})")
    try:
        platform.start(unit)
        report.actions.append(f"start {unit}")
        if join is not None:
            join.wait_started(timeout)
    except etcd.JoinError as error:
        raise ApplyError(host, "etcd join", str(error)) from None
    finally:
        if join is not None:
            join.release()


def _handover(host: str, bundle: dict, report: Report) -> None:
    """A leader whose Patroni must restart hands over to a healthy (synchronous) standby first."""
    try:
        new_leader = patroni.handover_if_leader(bundle["patroni"]["api"], GATE_TIMEOUT["patroni"], host)
    except patroni.PatroniError as error:
        raise ApplyError(host, "switchover", str(error)) from None
    if new_leader:
        report.actions.append(f"switchover to {new_leader}")
        report.log(f"switched over to {new_leader} before restarting patroni")


def check_all(bundle: dict) -> list[tuple[str, bool, str]]:
    results = []
    for service in bundle["services"]:
        if service["gate"] is not None:
            ok, reason = gates.check(service["gate"])
            results.append((service["unit"], ok, reason))
    return results


# ---- fetching a bundle on a host ---------------------------------------------------------
def _host_config() -> dict:
    with open(HOST_CONFIG) as handle:
        return json.load(handle)


def bundle_key(config: dict, content_digest: str) -> str:
    return f"bundles/{config['host']}/{content_digest}.json"


def fetch(config: dict, content_digest: str) -> str:
    """Download bundles/<host>/<digest>.json and check its sha256; return the local path."""
    os.makedirs(f"{STATE_DIR}/bundles", exist_ok=True)
    path = f"{STATE_DIR}/bundles/{content_digest}.json"
    key = bundle_key(config, content_digest)
    subprocess.run(["aws", "s3api", "get-object", "--region", config["region"], "--bucket", config["bucket"], "--key", key,
                    path], check=True, capture_output=True)
    with open(path, "rb") as handle:
        actual = hashlib.sha256(handle.read()).hexdigest()
    if actual != content_digest:
        os.unlink(path)
        raise ApplyError(config["host"], "bundle digest", f"s3://{config['bucket']}/{key} has sha256 {actual}")
    return path


def install_agent(bundle: dict) -> bool:
    """Put the bundle's agent in place; True when it differs from the running one."""
    changed = False
    for file in bundle["files"]:
        if file["path"].startswith(AGENT_ROOT + "/") or file["path"] == AGENT_COMMAND:
            changed |= converge_file(file["path"], file["content"].encode(), file["mode"], file["owner"])
    return changed


def _digest_for(config: dict, args: argparse.Namespace) -> str:
    if args.digest:
        return args.digest
    digests = json.loads(args.digests)
    if config["host"] not in digests:
        raise ApplyError(config["host"], "rollout parameters", f"no bundle digest for this host in {sorted(digests)}")
    return digests[config["host"]]


def rollout_digest(digests: str) -> str:
    """One name for a role's rollout: the sha256 of its digests parameter, equal on every host it reached."""
    return hashlib.sha256(digests.encode()).hexdigest()


def _apply_file(path: str, platform, rollout: str = "") -> int:
    with open(path) as handle:
        bundle = json.load(handle)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the boot stub and an association run may overlap on a new host
        report = apply(bundle, platform, rollout=rollout)
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(f"{STATE_DIR}/applied.json", "w") as handle:
        json.dump({"bundle": path, "changed": report.changed, "actions": report.actions}, handle)
    report.log(f"healthy; {len(report.changed)} files changed; actions: {', '.join(report.actions) or 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="betting-agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("apply", help="apply a bundle file")
    one.add_argument("--bundle", required=True)
    one.add_argument("--rollout", default="", help="the rollout's digest (rollout_digest), for the apply metrics")
    fetch_apply = sub.add_parser("fetch-apply", help="fetch this host's bundle from S3, verify it, apply it")
    which = fetch_apply.add_mutually_exclusive_group(required=True)
    which.add_argument("--digest")
    which.add_argument("--digests", help="JSON map host -> digest (the rollout's SSM parameter)")
    # The rollout's digest of the role's secret versions: it only makes SSM run the apply again after a renewal
    # (the apply reads every secret anew); logged, so a run says which revision it applied.
    fetch_apply.add_argument("--secrets", default="", help="the rollout's secrets revision (logged only)")
    sub.add_parser("check", help="run every health gate of the last applied bundle")
    sub.add_parser("handover", help="if this host is the Patroni leader, switch over to a healthy standby")
    args = parser.parse_args(argv)
    try:
        if args.command == "apply":
            return _apply_file(args.bundle, DebianHost(_host_config()["region"]), args.rollout)
        config = _host_config()
        if args.command == "fetch-apply":
            path = fetch(config, _digest_for(config, args))
            rollout = rollout_digest(args.digests) if args.digests else ""
            if args.secrets:
                print(f"{config['host']}: rollout secrets revision {args.secrets}", file=sys.stderr)
            with open(path) as handle:
                if install_agent(json.load(handle)):
                    # The new agent applies its own bundle.
                    os.execv(AGENT_COMMAND, [AGENT_COMMAND, "apply", "--bundle", path, "--rollout", rollout])
            return _apply_file(path, DebianHost(config["region"]), rollout)
        with open(f"{STATE_DIR}/applied.json") as handle:
            with open(json.load(handle)["bundle"]) as bundle_file:
                bundle = json.load(bundle_file)
        if args.command == "check":
            failed = [(unit, reason) for unit, ok, reason in check_all(bundle) if not ok]
            for unit, reason in failed:
                print(f"{config['host']}: {unit}: {reason}", file=sys.stderr)
            return 1 if failed else 0
        report = Report(config["host"])
        _handover(config["host"], bundle, report)
        report.log(", ".join(report.actions) or "not the leader; nothing to hand over")
        return 0
    except ApplyError as error:
        print(str(error), file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"{os.uname().nodename}: {shlex.join(error.cmd)} exited {error.returncode}: "
              f"{(error.stderr or '').strip()[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
