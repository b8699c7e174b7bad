"""Host agent: roll a change through a Patroni cluster safely, one member at a time.

Standard library only (it runs on the hosts' bare python3, like the rest of the agent). It talks to the
local member's REST API and to the other members' APIs at the `api_url` Patroni reports in
/cluster. Give `api` as the member advertises itself (restapi.connect_address, e.g.
https://pg-1.prod.betting.internal:8008) so it can be found in /cluster, or pass `name`.

Written against Patroni 3.0.2 (Debian 12), whose REST API differs from the current docs:
- /patroni says role "master" (not "primary") for the leader, has no member name, no
  `replication_state`; a sync standby has "sync_standby": true; the leader lists its WAL
  senders in "replication" (application_name = member name, state "streaming").
- /cluster members: role leader | sync_standby | replica, state running | restarting |
  stopping | stopped | starting ..., never "streaming"; `lag` in bytes (or "unknown"),
  `pending_restart` one HA loop after /patroni shows it.
- POST /restart {"role": "primary"} never matches the leader (its role is "master").

The REST API is TLS (the stack's CA) and asks a login for its unsafe endpoints (POST, PATCH): `configure`
once with the CA file and the login (the agent does, from the bundle) before calling; every member shares both.

A typical rollout on each host in turn: apply_dynamic_config (once, anywhere), then
restart_if_pending and wait_healthy on this host's member.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request

HTTP_TIMEOUT = 5.0
POLL = 0.5
LEADER_ROLES = ("master", "primary")  # /patroni: "master" up to 3.0.x, "primary" later
DEFAULT_MAX_LAG = 1048576  # Patroni's default maximum_lag_on_failover


class PatroniError(RuntimeError):
    pass


# ---- HTTP --------------------------------------------------------------------------------
_access: dict = {"context": None, "authorization": None}


def configure(ca_file: str | None = None, username: str | None = None, password: str | None = None) -> None:
    """Verify the members' certificates with `ca_file`; send `username`/`password` on unsafe calls. Only what is
    given changes (a gate knows the CA, not the login)."""
    if ca_file is not None:
        _access["context"] = ssl.create_default_context(cafile=ca_file)
    if username is not None and password is not None:
        _access["authorization"] = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _call(method: str, url: str, body: dict | None = None, timeout: float = HTTP_TIMEOUT) -> tuple[int, object]:
    """(status, JSON or text). Patroni answers errors with a body worth reading, so HTTPError is not raised."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if method != "GET" and _access["authorization"]:  # GETs need none: the login travels only where it is asked
        headers["Authorization"] = _access["authorization"]
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        context = _access["context"] if url.startswith("https://") else None
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        raise PatroniError(f"{url}: {getattr(error, 'reason', error)}") from error
    text = raw.decode(errors="replace").strip()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _get(api: str, path: str) -> dict:
    status, payload = _call("GET", api.rstrip("/") + path)
    if status != 200 or not isinstance(payload, dict):
        raise PatroniError(f"GET {api}{path}: {status} {payload}")
    return payload


def _base(api_url: str) -> str:
    """/cluster's api_url is the member's /patroni endpoint; the base URL is what the functions take."""
    return api_url.rstrip("/").removesuffix("/patroni")


def member(api: str) -> dict:
    """GET /patroni: this member's status (always 200 while Patroni runs)."""
    return _get(api, "/patroni")


def cluster(api: str) -> dict:
    """GET /cluster: every member as this member's Patroni sees the DCS."""
    return _get(api, "/cluster")


def config(api: str) -> dict:
    """GET /config: the dynamic configuration in the DCS (this member's cached view of it)."""
    return _get(api, "/config")


def _on(value: object) -> bool:
    """A mode flag in /config as Patroni parses it (true, "on", "yes"...)."""
    return str(value).lower() in ("true", "on", "yes", "1")


def _members(clus: dict) -> dict[str, dict]:
    return {m["name"]: m for m in clus.get("members", [])}


def _leader(clus: dict) -> dict | None:
    return next((m for m in clus.get("members", []) if m.get("role") in ("leader", "standby_leader")), None)


def _whoami(api: str, clus: dict, name: str | None) -> str:
    if name:
        return name
    for m in clus.get("members", []):
        if _base(m.get("api_url", "")) == api.rstrip("/"):
            return m["name"]
    # /patroni carries no name in 3.0.2: only the advertised URL identifies a member.
    raise PatroniError(f"{api} is not an api_url in /cluster: pass the member's name")


def _name_or(api: str, name: str | None) -> str:
    try:
        return _whoami(api, cluster(api), name)
    except PatroniError:
        return name or api


# ---- health ------------------------------------------------------------------------------
def health(api: str, name: str | None = None, allow_pending: bool = False) -> tuple[bool, str]:
    """Is this member healthy for a rollout to continue? (ok, reason naming the member).

    Leader: running, holds the leader key, and in synchronous mode has a sync standby (unless
    alone). Replica: running, replay not paused, streaming from the leader (the leader's
    pg_stat_replication, as 3.0.2 reports no receiver state), lag within maximum_lag_on_failover.
    Either: no pending restart (unless allow_pending), DCS reachable.
    """
    label = name or api
    try:
        status = member(api)
    except PatroniError as error:
        return False, f"{label}: Patroni not answering ({error})"
    if status.get("state") != "running":
        return False, f"{_name_or(api, name)}: state {status.get('state')}"
    if status.get("failsafe_mode_is_active"):  # checked before /cluster, which hangs while the DCS does
        return False, f"{label}: DCS unreachable (failsafe mode active)"
    if status.get("cluster_unlocked"):
        return False, f"{_name_or(api, name)}: no leader key in the DCS"
    try:
        clus, dyn = cluster(api), config(api)
        me = _whoami(api, clus, name)
    except PatroniError as error:
        return False, f"{label}: {error}"
    if status.get("pending_restart") and not allow_pending:
        return False, f"{me}: pending restart"
    members, leader = _members(clus), _leader(clus)
    if me not in members:
        return False, f"{me}: not a member in /cluster"
    if status.get("role") in LEADER_ROLES:
        if leader is None or leader["name"] != me:
            return False, f"{me}: runs as primary without the leader key"
        if _on(dyn.get("synchronous_mode")) and len(members) > 1 and not any(
                m.get("role") == "sync_standby" and m.get("state") == "running" for m in members.values()):
            return False, f"{me}: leader without a synchronous standby"
        return True, f"{me}: leader"
    if leader is None:
        return False, f"{me}: no leader"
    if status.get("xlog", {}).get("paused"):
        return False, f"{me}: WAL replay paused"
    try:
        senders = member(_base(leader["api_url"])).get("replication", [])
    except PatroniError as error:
        return False, f"{me}: leader {leader['name']} not answering ({error})"
    if not any(s.get("application_name") == me and s.get("state") == "streaming" for s in senders):
        return False, f"{me}: not streaming from {leader['name']}"
    lag, max_lag = members[me].get("lag"), dyn.get("maximum_lag_on_failover", DEFAULT_MAX_LAG)
    if not isinstance(lag, int) or lag > max_lag:
        return False, f"{me}: lag {lag} bytes behind {leader['name']}"
    return True, f"{me}: {members[me]['role']} streaming from {leader['name']}"


def wait_healthy(api: str, timeout: float = 120, name: str | None = None, allow_pending: bool = False) -> str:
    """Poll health until ok (returns its reason), else raise PatroniError with the last reason."""
    deadline = time.monotonic() + timeout
    while True:
        ok, reason = health(api, name, allow_pending)
        if ok:
            return reason
        if time.monotonic() >= deadline:
            raise PatroniError(reason)
        time.sleep(POLL)


# ---- dynamic configuration ---------------------------------------------------------------
def _same(have: object, want: object) -> bool:
    # Patroni's own PATCH rule (utils.patch_config): scalars are equal when str() is, so 400 vs
    # "400" is no change and the stored type is kept; comparing otherwise would patch forever.
    return str(have) == str(want)


def _without_none(value: dict) -> dict:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in value.items() if v is not None}


def dynamic_config_patch(current: dict, desired: dict) -> dict:
    """The smallest PATCH /config body that makes `current` match `desired` on the keys desired names.

    Nested dicts (postgresql.parameters...) are compared key by key; a None in desired removes
    the key; keys desired does not name are left alone.
    """
    patch: dict = {}
    for key, want in desired.items():
        present = isinstance(current, dict) and key in current
        have = current.get(key) if present else None
        if want is None:
            if have is not None:  # Patroni counts removing a null as no change
                patch[key] = None
        elif isinstance(want, dict):
            if isinstance(have, dict):
                sub = dynamic_config_patch(have, want)
                if sub:
                    patch[key] = sub
            else:  # Patroni replaces a missing or scalar value with the whole dict, nulls included
                whole = _without_none(want)
                if whole:
                    patch[key] = whole
        elif not present or not _same(have, want):
            patch[key] = want
    return patch


CONFIG_ATTEMPTS = 5


def apply_dynamic_config(api: str, desired: dict, timeout: float = 120) -> dict:
    """PATCH /config with the smallest patch (none if nothing differs); return the patch.

    Then wait until every running member's GET /config shows it, and one HA loop more: members
    apply the DCS config at the end of the HA cycle that read it and report no config version,
    so that is the only way to know it is applied (and pending_restart set where needed).
    """
    for attempt in range(1, CONFIG_ATTEMPTS + 1):
        current = config(api)
        patch = dynamic_config_patch(current, desired)
        if not patch:
            return {}
        status, payload = _call("PATCH", api.rstrip("/") + "/config", patch)
        # 409: another member's agent changed /config meanwhile (compare-and-set on its index):
        # read it again, the patch may now be smaller or empty.
        if status == 200:
            break
        if status != 409 or attempt == CONFIG_ATTEMPTS:
            raise PatroniError(f"PATCH {api}/config {patch}: {status} {str(payload)[:200]}")
        time.sleep(POLL)
    deadline = time.monotonic() + timeout
    for m in cluster(api)["members"]:
        if m.get("state") != "running":
            continue  # a stopped member reads the DCS config when it starts
        while True:
            try:
                if not dynamic_config_patch(config(_base(m["api_url"])), desired):
                    break
            except PatroniError:
                pass
            if time.monotonic() >= deadline:
                raise PatroniError(f"{m['name']}: has not seen the new dynamic configuration after {timeout:.0f}s")
            time.sleep(POLL)
    loop_wait = max(int(current.get("loop_wait", 10)), int(payload.get("loop_wait", 10)))
    time.sleep(loop_wait + 2)  # + the 1 s Patroni sleeps after a reload before reading pending_restart
    return patch


# ---- switchover and restart --------------------------------------------------------------
def _candidate(clus: dict, me: str, dyn: dict) -> str | None:
    """Who should take over from `me`: the sync standby in synchronous mode (Patroni refuses any
    other), else the healthiest streaming replica; members still pending a restart come last."""
    sync = _on(dyn.get("synchronous_mode"))
    ranked = []
    for m in clus.get("members", []):
        if m["name"] == me or m.get("state") != "running" or (m.get("tags") or {}).get("nofailover"):
            continue
        if sync and m.get("role") != "sync_standby":
            continue
        if health(_base(m["api_url"]), m["name"], allow_pending=True)[0]:
            lag = m.get("lag") if isinstance(m.get("lag"), int) else 1 << 62
            ranked.append((bool(m.get("pending_restart")), lag, m["name"]))
    return min(ranked)[2] if ranked else None


def handover_if_leader(api: str, timeout: float = 120, name: str | None = None) -> str | None:
    """If this member is the leader of a multi-member cluster, switch over and return the new leader.

    Returns None when it is a replica or alone; raises if no member can take over. Waits until the
    new leader is healthy and this member streams from it.
    """
    clus = cluster(api)
    me = _whoami(api, clus, name)
    if member(api).get("role") not in LEADER_ROLES or len(clus.get("members", [])) < 2:
        return None
    candidate = _candidate(clus, me, config(api))
    if candidate is None:
        raise PatroniError(f"{me}: no healthy member to hand the leader role over to")
    # Patroni answers once the leader key moved (it polls up to ~20 s): 200, else 412/503 with why.
    status, text = _call("POST", api.rstrip("/") + "/switchover", {"leader": me, "candidate": candidate}, timeout=60)
    if status != 200:
        raise PatroniError(f"{me}: switchover to {candidate} refused: {status} {text}")
    deadline = time.monotonic() + timeout
    while True:
        leader = _leader(cluster(api)) if health(api, me, allow_pending=True)[0] else None
        if leader and leader["name"] != me and health(_base(leader["api_url"]), leader["name"], allow_pending=True)[0]:
            return leader["name"]
        if time.monotonic() >= deadline:
            raise PatroniError(f"{me}: after the switchover to {candidate}: {health(api, me, allow_pending=True)[1]}")
        time.sleep(POLL)


def _check_others(api: str, me: str, expected_members: int | None, timeout: float) -> None:
    """Restart only when every other member is up: the rollout never takes a second one down.

    Waits up to `timeout` for that: a member the bundle expects may still be joining (a node
    being added boots and clones while the others roll), or coming back from its own restart."""
    deadline = time.monotonic() + timeout
    while True:
        members = _members(cluster(api))
        problem = None
        if expected_members is not None and len(members) < expected_members:
            problem = f"{me}: only {sorted(members)} of {expected_members} members in /cluster"
        for other in members.values() if problem is None else ():
            if other["name"] != me:
                ok, reason = health(_base(other["api_url"]), other["name"], allow_pending=True)
                if not ok:
                    problem = f"{me}: not restarting while {reason}"
                    break
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise PatroniError(problem)
        time.sleep(POLL)


def _restart(api: str, name: str, timeout: float) -> None:
    """POST /restart on one member, then wait until it is healthy with nothing pending."""
    body: dict = {"restart_pending": True}  # Patroni only looks at the key's presence
    if member(api).get("role") not in LEADER_ROLES:
        body["role"] = "replica"  # Patroni refuses (503) if this member became the leader meanwhile
    # Synchronous: answers when PostgreSQL is back, after Patroni moved the sync role off it.
    status, text = _call("POST", api.rstrip("/") + "/restart", body, timeout=max(timeout, HTTP_TIMEOUT))
    if status != 200 and member(api).get("pending_restart"):  # 503 "restart conditions are not satisfied"
        raise PatroniError(f"{name}: restart refused: {status} {text}")
    try:
        wait_healthy(api, timeout, name)
    except PatroniError as error:
        if member(api).get("pending_restart"):
            # Patroni starts a replica with the primary's pg_controldata value of max_connections & co
            # when the configured one is lower, and keeps pending_restart: lowering them needs the leader first.
            raise PatroniError(f"{name}: still pending restart after a restart ({error})") from error
        raise


def restart_if_pending(api: str, timeout: float = 300, name: str | None = None,
                       expected_members: int | None = None) -> bool:
    """Restart this member's PostgreSQL if Patroni flags pending_restart; True if it did.

    A leader goes last: it first restarts the other members that are pending (one at a time),
    then hands over to one of them (a second switchover otherwise, and for max_connections & co a
    replica must never run a lower value than its primary), then restarts if still needed (the
    demotion itself restarts PostgreSQL with the new settings).
    """
    clus = cluster(api)
    me = _whoami(api, clus, name)
    if not member(api).get("pending_restart"):
        return False
    _check_others(api, me, expected_members, timeout)
    clus = cluster(api)
    if member(api).get("role") in LEADER_ROLES and len(clus["members"]) > 1:
        for other in clus["members"]:
            other_api = _base(other["api_url"])
            # /patroni, not /cluster: the member key shows pending_restart one HA loop later.
            if other["name"] != me and member(other_api).get("pending_restart"):
                _restart(other_api, other["name"], timeout)
                wait_healthy(api, timeout, me, allow_pending=True)
        handover_if_leader(api, timeout, me)
        if not member(api).get("pending_restart"):
            wait_healthy(api, timeout, me)
            return True
        _check_others(api, me, expected_members, timeout)
    _restart(api, me, timeout)
    return True


def wait_reload_applied(api: str, loop_wait: int) -> bool:
    """After a reload (SIGHUP or POST /reload), until Patroni has applied it: it does at the start of its next
    HA loop and flags pending_restart a second later. 3.0.2 reports no config version, so without a pending
    restart to show, this waits out loop_wait plus that second and the loop's own work. True if one is pending."""
    deadline = time.monotonic() + loop_wait + 3
    while time.monotonic() < deadline:
        if member(api).get("pending_restart"):
            return True
        time.sleep(POLL)
    return bool(member(api).get("pending_restart"))


def reload(api: str) -> None:
    """POST /reload: Patroni re-reads its local patroni.yml and reloads PostgreSQL (202 "reload scheduled").

    Applies log, restapi (listen, certificates), tags, watchdog, the etcd hosts, postgresql
    parameters, pg_hba and authentication; parameters with context postmaster then show
    pending_restart (restart_if_pending). Read only when Patroni starts, so a Patroni restart is
    needed for: name, scope, namespace, the DCS type, postgresql.data_dir and bin_dir.
    """
    status, text = _call("POST", api.rstrip("/") + "/reload")
    if status != 202:
        raise PatroniError(f"POST {api}/reload: {status} {text}")
