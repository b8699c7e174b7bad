"""A host's bundle: every file it runs, its packages, secrets, services and health gates, as one
content-addressed document that the host agent (infra/hostagent/agent.py) applies.

Pure data, no Pulumi. The same bytes are published to S3 for a host on AWS (key
`bundles/<host>/<sha256>.json`) and applied by the sandbox (with only its mapping applied), so
the code a host runs is the code the tests run. A bundle changes when any rendered file, setting
or rule of its host changes; the instance's user data (the stub) never does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from infra import aggregates, pki
from infra.hostagent.agent import AGENT_COMMAND, AGENT_ROOT
from infra.hosts.monitoring import AGGREGATES_ENV, AGGREGATES_LIB, AGGREGATES_UNIT
from infra.hosts.postgres import AGGREGATES_SQL, AUDIT_SQL, PGBOUNCER_EXPORTER_ENV, PGBOUNCER_EXPORTER_UNIT
from infra.hosts.spec import File, HostSpec
from infra.hosts.system import CHRONY_UNIT, SYSCTL_UNIT, THP_UNIT
from infra.render.backup import SERVICE_TEMPLATE, TIMERS
from infra.render.haproxy import HEALTH_WRITER
from infra.render.patroni import EXTENSIONS_SQL, patroni_config, restapi_url
from infra.render.webconfig import MONITORING_USER, password_path
from infra.settings import StackSettings
from infra.topology import Paths, Ports, SecretNames, Topology, secret_path, ssm_parameter_name

FORMAT = 1
HOSTAGENT_DIR = Path(__file__).resolve().parent / "hostagent"
# The agent's own modules travel in every bundle: a new agent rolls like any other file.
AGENT_MODULES = ("__init__.py", "agent.py", "envfile.py", "etcd.py", "gates.py", "patroni.py")

Action = Literal["none", "reload", "restart"]


@dataclass(frozen=True)
class ChangeRule:
    """What a changed file at `path` (a file, or a folder ending in /) needs from its unit."""

    path: str
    unit: str | None
    action: Action
    # Lines starting with these change nothing the running daemon uses: a change only in them
    # writes the file and takes no action.
    inert_lines: tuple[str, ...] = ()


# The least action each file needs when its bytes change (Debian's units: ExecReload sends SIGHUP).
CHANGE_RULES = (
    # Patroni re-reads patroni.yml on reload; its cluster-wide part goes through PATCH /config.
    ChangeRule(Paths.PATRONI_CONFIG, "patroni", "reload"),
    # Read by every pgbackrest invocation; the TLS server re-reads it on SIGHUP (Debian's ExecReload).
    ChangeRule(Paths.PGBACKREST_CONFIG, "pgbackrest", "reload"),
    ChangeRule(Paths.POSTGRES_EXPORTER_QUERIES, "prometheus-postgres-exporter", "restart"),
    ChangeRule("/etc/default/prometheus-postgres-exporter", "prometheus-postgres-exporter", "restart"),
    # etcd reads ETCD_INITIAL_* only when its data dir has no member: adding members changes them on
    # every original member, and restarting those would cost quorum margin while the new ones join.
    ChangeRule(Paths.ETCD_CONFIG, "etcd", "restart", inert_lines=("ETCD_INITIAL_",)),
    ChangeRule(Paths.PROMETHEUS_CONFIG, "prometheus", "reload"),
    ChangeRule(Paths.PROMETHEUS_RULES_DIR + "/", "prometheus", "reload"),
    ChangeRule("/etc/default/prometheus", "prometheus", "restart"),
    ChangeRule(Paths.ALERTMANAGER_CONFIG, "prometheus-alertmanager", "reload"),
    ChangeRule("/etc/prometheus/alertmanager/", "prometheus-alertmanager", "reload"),
    ChangeRule("/etc/default/prometheus-alertmanager", "prometheus-alertmanager", "restart"),
    ChangeRule("/etc/default/prometheus-redis-exporter", "prometheus-redis-exporter", "restart"),
    ChangeRule("/etc/default/prometheus-node-exporter", "prometheus-node-exporter", "restart"),
    # node_exporter and postgres_exporter read their web config (exporter-toolkit) at every connection.
    ChangeRule(Paths.EXPORTER_WEB_CONFIG, None, "none"),
    # PgBouncer re-reads its files on SIGHUP (Debian's ExecReload): pools, limits, users; its clients stay.
    ChangeRule(Paths.PGBOUNCER_CONFIG, "pgbouncer", "reload"),
    ChangeRule(Paths.PGBOUNCER_HBA, "pgbouncer", "reload"),
    ChangeRule(Paths.PGBOUNCER_USERS, "pgbouncer", "reload"),
    # HAProxy's master starts new workers with the new file (Debian's ExecReload); old sessions finish on the old.
    ChangeRule(Paths.HAPROXY_CONFIG, "haproxy", "reload"),
    ChangeRule(Paths.PGBOUNCER_EXPORTER, PGBOUNCER_EXPORTER_UNIT, "restart"),
    ChangeRule(f"/etc/systemd/system/{PGBOUNCER_EXPORTER_UNIT}.service", PGBOUNCER_EXPORTER_UNIT, "restart"),
    ChangeRule(PGBOUNCER_EXPORTER_ENV, PGBOUNCER_EXPORTER_UNIT, "restart"),
    ChangeRule(Paths.CLICKHOUSE_CONFIG_D + "/", "clickhouse-server", "restart"),
    ChangeRule(Paths.CLICKHOUSE_USERS_D + "/", "clickhouse-server", "restart"),
    # Its settings and provisioning are read at start; dashboards are re-read by Grafana itself.
    ChangeRule(Paths.GRAFANA_CONFIG, "grafana-server", "restart"),
    ChangeRule(Paths.GRAFANA_PROVISIONING + "/", "grafana-server", "restart"),
    ChangeRule(Paths.GRAFANA_DASHBOARDS + "/", None, "none"),
    ChangeRule("/etc/betting/", None, "none"),  # read by the jobs that use them, at each run
    ChangeRule("/usr/local/sbin/", None, "none"),
    ChangeRule(Paths.BACKUP_LIB + "/", None, "none"),  # the backup script: its next run reads it
    # The backup job's unit: daemon-reload (the agent does it for any unit file) is all its next run needs;
    # a timer must restart to take a new schedule.
    ChangeRule(f"/etc/systemd/system/{SERVICE_TEMPLATE}", None, "none"),
    *(ChangeRule(f"/etc/systemd/system/{timer}", timer, "restart") for timer in TIMERS.values()),
    ChangeRule(AGENT_ROOT + "/", None, "none"),
    ChangeRule("/etc/postgresql-common/", None, "none"),  # only read when a package is installed
    ChangeRule("/etc/modules-load.d/", None, "none"),  # read at boot; the boot commands load it now
    ChangeRule("/etc/udev/rules.d/", None, "none"),
    # A oneshot started by its timer: the next run reads the new unit (the agent daemon-reloads first).
    ChangeRule("/etc/systemd/system/betting-audit-ship.service", None, "none"),
    ChangeRule("/etc/systemd/system/betting-audit-ship.timer", "betting-audit-ship.timer", "restart"),
    # The aggregates job likewise: its script, modules and values are read at its next run.
    ChangeRule(f"{AGGREGATES_LIB}/", None, "none"),
    ChangeRule(AGGREGATES_ENV, None, "none"),
    ChangeRule(f"/etc/systemd/system/{AGGREGATES_UNIT}.service", None, "none"),
    ChangeRule(f"/etc/systemd/system/{AGGREGATES_UNIT}.timer", f"{AGGREGATES_UNIT}.timer", "restart"),
    # Kernel settings apply at once (systemd-sysctl re-reads every file, as at boot), never by a reboot;
    # its gate checks the kernel took them (huge pages may not fit in fragmented memory).
    ChangeRule("/etc/sysctl.d/", SYSCTL_UNIT, "restart"),
    ChangeRule(f"/etc/systemd/system/{THP_UNIT}.service", THP_UNIT, "restart"),
    ChangeRule("/etc/chrony/", CHRONY_UNIT, "restart"),
)


def change_rule(path: str) -> ChangeRule:
    exact = [r for r in CHANGE_RULES if r.path == path]
    folder = sorted((r for r in CHANGE_RULES if r.path.endswith("/") and path.startswith(r.path)),
                    key=lambda r: len(r.path), reverse=True)
    drop_in = path.startswith("/etc/systemd/system/") and ".service.d/" in path
    if drop_in:  # a unit's drop-in (its secrets' EnvironmentFile): daemon-reload, then restart the unit
        return ChangeRule(path, path.split("/")[4].removesuffix(".service.d"), "restart")
    rules = exact or folder
    if not rules:
        raise ValueError(f"no change rule for {path}: say in infra/bundle.py CHANGE_RULES what a change to it needs")
    return rules[0]


def etcd_url(spec: HostSpec) -> str:
    """This member's client URL by its name, which its certificate has."""
    return f"https://{spec.host.fqdn}:{Ports.ETCD_CLIENT}"


def client_tls() -> dict:
    """The host's own pair as its client certificate, and the CA it verifies servers with (infra/pki.py)."""
    return {"ca_file": pki.ca_path(), "cert": pki.cert_path(), "key": pki.key_path()}


def _gate(spec: HostSpec, topology: Topology, unit: str) -> dict | None:
    """How the agent knows `unit` is healthy again on this host (None: running is enough)."""
    local = "http://127.0.0.1"
    if unit == "patroni":  # over TLS by the host's name; its GET endpoints need no login
        return {"kind": "patroni", "api": restapi_url(spec.host), "name": spec.host.name, "ca_file": pki.ca_path()}
    if unit == "etcd":
        return {"kind": "etcd", "url": etcd_url(spec), "name": spec.host.name,
                "members": len(topology.etcd), "tls": client_tls()}
    # The monitoring endpoints serve TLS with the host's identity: the gate asks by the host's name, which the
    # certificate names, verifying it against the stack's CA, with the monitoring credential.
    own = f"https://{spec.host.fqdn}"
    monitoring_client = {"ca": pki.ca_path(), "username": MONITORING_USER, "password_file": password_path()}
    if unit == "prometheus":
        rules = sorted(f.path for f in spec.files if f.path.startswith(Paths.PROMETHEUS_RULES_DIR + "/"))
        return {"kind": "prometheus", "url": f"{own}:{Ports.PROMETHEUS}", "rule_files": rules, **monitoring_client}
    if unit == SYSCTL_UNIT:
        return {"kind": "sysctl", "files": sorted(f.path for f in spec.files if f.path.startswith("/etc/sysctl.d/"))}
    if unit == "prometheus-alertmanager":
        return {"kind": "alertmanager", "url": f"{own}:{Ports.ALERTMANAGER}", "peers": len(topology.monitoring),
                **monitoring_client}
    if unit == "grafana-server":
        return {"kind": "http", "url": f"{own}:{Ports.GRAFANA}/api/health", "ca": pki.ca_path()}
    # The exporters serve TLS with the host's identity too (no login).
    exporters = {"prometheus-node-exporter": Ports.NODE_EXPORTER, "prometheus-postgres-exporter": Ports.POSTGRES_EXPORTER,
                 "prometheus-redis-exporter": Ports.REDIS_EXPORTER}
    if unit in exporters:
        return {"kind": "http", "url": f"{own}:{exporters[unit]}/metrics", "ca": pki.ca_path()}
    if unit == "pgbouncer":  # no HTTP: it listens, and takes logins (the exporter's gate shows its console answers)
        return {"kind": "tcp", "address": f"127.0.0.1:{Ports.PGBOUNCER}"}
    http = {
        # HAProxy sees the Patroni leader: this node forwards writes (what the load balancer's check asks).
        "haproxy": f"{local}:{Ports.HAPROXY_STATS}{HEALTH_WRITER}",
        PGBOUNCER_EXPORTER_UNIT: f"{local}:{Ports.PGBOUNCER_EXPORTER}/metrics",
        "clickhouse-server": f"{local}:{Ports.CLICKHOUSE_HTTP}/ping",
    }
    return {"kind": "http", "url": http[unit]} if unit in http else None


def agent_files() -> tuple[File, ...]:
    """The agent's package, as files under AGENT_ROOT, and its launcher."""
    package = f"{AGENT_ROOT}/infra/hostagent"
    files = [File(f"{AGENT_ROOT}/infra/__init__.py", b"", "0644")]
    files += [File(f"{package}/{name}", (HOSTAGENT_DIR / name).read_bytes(), "0644") for name in AGENT_MODULES]
    launcher = (HOSTAGENT_DIR / "betting-agent").read_bytes()
    files.append(File(AGENT_COMMAND, launcher, "0755"))
    return tuple(files)


def _secret_drop_ins(spec: HostSpec) -> list[File]:
    return [File(f"/etc/systemd/system/{env.unit}.service.d/betting-secrets.conf",
                 f"[Service]\nEnvironmentFile={env.path}\n".encode()) for env in spec.secret_environments]


def bundle_document(spec: HostSpec, settings: StackSettings, topology: Topology) -> dict:
    environment = settings.environment
    files = [*spec.files, *_secret_drop_ins(spec), *agent_files()]
    entries = []
    for file in sorted(files, key=lambda f: f.path):
        rule = change_rule(file.path)
        entry = {"path": file.path, "mode": file.mode, "owner": file.owner, "content": file.content.decode(),
                 "unit": rule.unit, "on_change": rule.action}
        if rule.inert_lines:
            entry["inert_lines"] = list(rule.inert_lines)
        if file.parameters:
            entry["parameters"] = {token: ssm_parameter_name(environment, name) for token, name in file.parameters}
        entries.append(entry)
    document: dict = {
        "format": FORMAT,
        "host": spec.host.name,
        "role": spec.host.role,
        "packages": list(spec.packages),
        "volume": None if spec.volume is None else {"mount": spec.volume.mount, "owner": spec.volume.owner},
        "files": entries,
        "directories": [{"path": d.path, "mode": d.mode, "owner": d.owner} for d in spec.directories],
        "secret_files": [
            {"path": secret_path(s.name), "parameter": ssm_parameter_name(environment, s.parameter_name),
             "owner": s.owner, "mode": s.mode, "reloads": [list(r) for r in s.reloads]}
            for s in spec.secret_files
        ],
        "secret_environments": [
            {"path": e.path, "unit": e.unit, "owner": e.owner,
             "variables": {var: ssm_parameter_name(environment, name) for var, name in e.variables}}
            for e in spec.secret_environments
        ],
        "boot_commands": list(spec.boot_commands),
        "services": [{"unit": unit, "gate": _gate(spec, topology, unit)} for unit in spec.services],
    }
    if spec.host.role == "postgres":
        # Patroni keeps these in the DCS after bootstrap; the agent PATCHes /config when they differ.
        dynamic = patroni_config(settings, topology, spec.host)["bootstrap"]["dcs"]
        # The agent calls its member by name over TLS, with the login Patroni's own environment file has.
        env = next(e for e in spec.secret_environments if e.unit == "patroni")
        document["patroni"] = {"api": restapi_url(spec.host), "ca_file": pki.ca_path(), "credentials": env.path,
                               "dynamic": dynamic,
                               "members": len(topology.postgres),
                               # pgaudit's object audit grants, run on the leader after Patroni is healthy.
                               "audit": {"database": settings.audit.database, "sql": AUDIT_SQL},
                               # pg_stat_statements in the exporter's database, created on the leader likewise.
                               "extensions": {"database": "postgres", "sql": EXTENSIONS_SQL},
                               # The SLO aggregates' database and writer role, on the leader likewise.
                               "aggregates": {"database": settings.aggregates.database, "role": aggregates.ROLE,
                                              "sql": AGGREGATES_SQL,
                                              "password_file": secret_path(SecretNames.METRICS_AGGREGATOR_PASSWORD)},
                               # PgBouncer's auth function, in every database, on the leader after Patroni is healthy.
                               "pgbouncer_auth": {"sql": Paths.PGBOUNCER_AUTH_SQL}}
    if spec.host.role == "etcd":
        # Before its first start with an empty data dir the agent asks the other members whether a
        # cluster runs already, and joins it (infra/hostagent/etcd.py); the rest it reads from env_file.
        document["etcd"] = {
            "env_file": Paths.ETCD_CONFIG,
            "url": etcd_url(spec),
            "client_urls": {m.name: f"https://{m.fqdn}:{Ports.ETCD_CLIENT}" for m in topology.etcd if m != spec.host},
            "tls": client_tls(),
        }
    return document


def render_bundle(spec: HostSpec, settings: StackSettings, topology: Topology) -> bytes:
    """The bundle's bytes: sorted keys, so equal content gives an equal digest on every run."""
    return (json.dumps(bundle_document(spec, settings, topology), indent=1, sort_keys=True) + "\n").encode()


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def bundle_key(host: str, content_digest: str) -> str:
    return f"bundles/{host}/{content_digest}.json"


def bundle_prefix(host: str) -> str:
    return f"bundles/{host}/"


def digest_parameter_name(environment: str, host: str) -> str:
    """The SSM String parameter holding the digest of a host's current bundle (read by the stub at boot)."""
    return f"/betting/{environment}/bundles/{host}"
