"""Health gates: how the agent knows a service is healthy again before the rollout may go on.

Standard library only (runs on a host's bare python3). Each gate is data from the bundle
(`{"kind": ..., "url": ...}`); `check` answers (ok, reason) once, `wait` polls until ok or the
timeout, then raises GateError naming the failed check.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
import urllib.error
import urllib.request

from infra.hostagent import etcd, patroni


class GateError(RuntimeError):
    pass


def _client(gate: dict | None) -> tuple[ssl.SSLContext | None, dict[str, str]]:
    """An https gate's TLS context (the CA its server's certificate must chain to; the name is checked) and its
    basic-auth header (the password read from its file at each check, so a rotated one is used at once)."""
    gate = gate or {}
    context = ssl.create_default_context(cafile=gate["ca"]) if gate.get("ca") else None
    headers = {}
    if gate.get("password_file"):
        with open(gate["password_file"]) as handle:
            password = handle.read().strip()
        token = base64.b64encode(f"{gate['username']}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return context, headers


def _get(url: str, timeout: float = 3, data: bytes | None = None, gate: dict | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """`context`: a TLS context made by the caller (etcd's, with the host's client certificate); else the gate's."""
    gate_context, headers = _client(gate)
    context = context or gate_context
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _json(url: str, data: bytes | None = None, gate: dict | None = None, context: ssl.SSLContext | None = None):
    status, body = _get(url, data=data, gate=gate, context=context)
    if status != 200:
        raise GateError(f"{url} answered {status}")
    return json.loads(body)


def check_http(gate: dict) -> tuple[bool, str]:
    status, _ = _get(gate["url"], gate=gate)
    return status == 200, f"{gate['url']} answered {status}"


def check_tcp(gate: dict) -> tuple[bool, str]:
    """Something accepts connections at host:port (a daemon without an HTTP endpoint)."""
    host, _, port = gate["address"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=3):
        return True, f"{gate['address']} accepts connections"


def check_etcd(gate: dict) -> tuple[bool, str]:
    """This member is healthy (it sees a leader and has quorum) and the cluster has every member started.
    Asked with the host's own certificate (`tls`): etcd takes no client without one."""
    tls = gate.get("tls")
    context = etcd.client_context(tls["ca_file"], tls["cert"], tls["key"]) if tls else None
    health = _json(f"{gate['url']}/health", context=context)
    if health.get("health") != "true":
        return False, f"etcd {gate['name']}: /health says {health}"
    # etcd 3.4's gRPC gateway. A started member has published its name and client URLs; one added but
    # not started has neither, and one known only from the bootstrap list has a name but no client URLs.
    members = _json(f"{gate['url']}/v3/cluster/member/list", data=b"{}", context=context).get("members", [])
    started = sorted(m["name"] for m in members if m.get("name") and m.get("clientURLs"))
    if gate["name"] not in started:
        return False, f"etcd {gate['name']}: not a started member of the cluster ({started})"
    if len(started) < gate["members"]:
        return False, f"etcd {gate['name']}: {len(started)} of {gate['members']} members started ({started})"
    return True, "healthy"


def _not_ready(what: str, gate: dict) -> str | None:
    status, _ = _get(f"{gate['url']}/-/ready", gate=gate)
    return None if status == 200 else f"{what}: /-/ready answered {status}"


def check_prometheus(gate: dict) -> tuple[bool, str]:
    """Ready, its last config reload succeeded, and every rule file of the bundle is loaded."""
    if reason := _not_ready("prometheus", gate):
        return False, reason
    runtime = _json(f"{gate['url']}/api/v1/status/runtimeinfo", gate=gate)["data"]
    if not runtime.get("reloadConfigSuccess", False):
        return False, "prometheus: the last configuration reload failed (see its log)"
    groups = _json(f"{gate['url']}/api/v1/rules", gate=gate)["data"]["groups"]
    loaded = {g["file"] for g in groups}
    missing = [f for f in gate["rule_files"] if f not in loaded]
    if missing:
        return False, f"prometheus: rule files not loaded: {missing}"
    return True, "ready, rules loaded"


def check_alertmanager(gate: dict) -> tuple[bool, str]:
    """Ready, configuration loaded, and clustered with every peer where there are peers."""
    if reason := _not_ready("alertmanager", gate):
        return False, reason
    _, metrics = _get(f"{gate['url']}/metrics", gate=gate)
    if b"alertmanager_config_last_reload_successful 1" not in metrics:
        return False, "alertmanager: the last configuration reload failed (see its log)"
    state = _json(f"{gate['url']}/api/v2/status", gate=gate)
    if gate["peers"] > 1:
        cluster = state.get("cluster", {})
        peers = len(cluster.get("peers") or [])
        if cluster.get("status") != "ready" or peers < gate["peers"]:
            return False, f"alertmanager: cluster {cluster.get('status')} with {peers} of {gate['peers']} peers"
    return True, "ready"


PROC_SYS = "/proc/sys"


def sysctl_settings(content: str) -> dict[str, str]:
    """key = value lines of a sysctl.d file (sysctl.d(5)), values with their whitespace collapsed."""
    settings = {}
    for line in content.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings[key.strip().lstrip("-")] = " ".join(value.split())
    return settings


def check_sysctl(gate: dict) -> tuple[bool, str]:
    """The kernel runs every value of the bundle's sysctl.d files. systemd-sysctl applies them but the kernel may
    give less than asked: vm.nr_hugepages only gets the huge pages free memory can still form."""
    for path in gate["files"]:
        with open(path) as handle:
            wanted = sysctl_settings(handle.read())
        for key, value in wanted.items():
            with open(f"{PROC_SYS}/{key.replace('.', '/')}") as current:
                have = " ".join(current.read().split())
            if have != value:
                hint = " (memory too fragmented for the huge pages at run time: reboot the host)" \
                    if key == "vm.nr_hugepages" else ""
                return False, f"{key} is {have}, {path} asks {value}{hint}"
    return True, "kernel settings applied"


def check_patroni(gate: dict) -> tuple[bool, str]:
    if gate.get("ca_file"):
        patroni.configure(ca_file=gate["ca_file"])
    return patroni.health(gate["api"], gate["name"])


CHECKS = {
    "http": check_http,
    "tcp": check_tcp,
    "etcd": check_etcd,
    "prometheus": check_prometheus,
    "alertmanager": check_alertmanager,
    "patroni": check_patroni,
    "sysctl": check_sysctl,
}


def check(gate: dict) -> tuple[bool, str]:
    try:
        return CHECKS[gate["kind"]](gate)
    except (OSError, ValueError, KeyError, GateError, patroni.PatroniError) as error:
        return False, f"{gate['kind']}: {error}"


def wait(gate: dict, timeout: float, interval: float = 1.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        ok, reason = check(gate)
        if ok:
            return reason
        if time.monotonic() >= deadline:
            raise GateError(reason)
        time.sleep(interval)
