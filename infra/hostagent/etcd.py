"""An etcd member's first start: a first boot of the cluster, or a join to the running cluster.

The rendered /etc/default/etcd says ETCD_INITIAL_CLUSTER_STATE=new and lists every member of the
topology in ETCD_INITIAL_CLUSTER: right for the cluster's first boot only. A member whose data dir
has no member yet and that starts later (etcd.members raised, or a host replaced with a blank
volume) must be added with `member add` on the running cluster first, then start with state
`existing` and ETCD_INITIAL_CLUSTER = the cluster's members as they are after the add (etcd
refuses any other list). etcd reads the initial-* settings only when its data dir is empty, so
a member that has started once restarts as rendered whatever they say.

`prepare_join` runs before the agent first starts the unit and decides which case this is:

    restart     the data dir has a member (a WAL): nothing to do
    first-boot  no other member answers: start as rendered
    bootstrap   the running cluster was bootstrapped from the rendered list and knows this member
                by the id that bootstrap gave it; it never started: start as rendered
    join        the cluster does not know this member: member add, then start `existing`
    added       an earlier run added it and it never started: start `existing`, add nothing
    replace     the cluster knows it as started, yet its data dir is empty (a new volume): the
                old member is removed and the new one added, then it starts `existing`

A join writes a systemd drop-in (JOIN_DROP_IN) whose EnvironmentFile, loaded after the unit's
/etc/default/etcd, overrides those two variables (systemd.exec: a variable set by a later
EnvironmentFile wins), then reloads systemd. Joins are serialized cluster-wide by an etcd lock
held until the new member has started (new hosts boot in parallel: their first apply is not the
SSM rollout); a member that an earlier run added starts without it (it changes no membership, and a
1-member cluster that added it has no quorum until it runs). A join is refused while another
member is added but not started, or while any other member is not healthy: adding a voting
member to 3 raises the quorum to 3 of 4.

etcd asks every client for a certificate of the stack's CA: `configure` with the host's own pair first
(prepare_join does, from the bundle's `tls`).

Standard library only, like the rest of the agent. Every host path goes through platform.path.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from infra.hostagent.envfile import read_environment_file

JOIN_DROP_IN = "/etc/systemd/system/etcd.service.d/betting-join.conf"
JOIN_ENV = "/etc/default/etcd-join"
LOCK_NAME = "/betting-agent/etcd-join"
LOCK_TTL_SECONDS = 300  # a join's lock outlives an agent that died holding it by at most this; > the gate's wait
REQUEST_TIMEOUT = 3.0
POLL_SECONDS = 0.5

RESTART, FIRST_BOOT, BOOTSTRAP, JOIN, ADDED, REPLACE = "restart", "first-boot", "bootstrap", "join", "added", "replace"
AS_RENDERED = (FIRST_BOOT, BOOTSTRAP)


class JoinError(RuntimeError):
    pass


# ---- what this member is, from its rendered environment file -----------------------------
def read_env(path: str) -> dict[str, str]:
    """A systemd EnvironmentFile (the rendered ones are unquoted), read as systemd reads it."""
    with open(path) as handle:
        return read_environment_file(handle.read())


def parse_initial_cluster(value: str) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for pair in filter(None, value.split(",")):
        name, _, url = pair.partition("=")
        members.setdefault(name, []).append(url)
    return members


def member_id(peer_urls: list[str], token: str) -> int:
    """The id etcd gives a member at bootstrap (membership.NewMember with no time): sha1 of its sorted
    peer URLs and the cluster token, first 8 bytes big-endian. A member added later has a time in it."""
    digest = hashlib.sha1(("".join(sorted(peer_urls)) + token).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def cluster_id(member_ids: list[int]) -> int:
    """The cluster id a bootstrap from these members gets (RaftCluster.genID)."""
    packed = b"".join(i.to_bytes(8, "big") for i in sorted(member_ids))
    return int.from_bytes(hashlib.sha1(packed).digest()[:8], "big")


@dataclass(frozen=True)
class Local:
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    data_dir: str
    wal_dir: str
    initial_cluster: dict[str, list[str]]
    token: str

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Local:
        data_dir = env["ETCD_DATA_DIR"]
        return cls(
            name=env["ETCD_NAME"],
            peer_urls=tuple(env["ETCD_INITIAL_ADVERTISE_PEER_URLS"].split(",")),
            client_urls=tuple(env.get("ETCD_ADVERTISE_CLIENT_URLS", "").split(",")),
            data_dir=data_dir,
            wal_dir=env.get("ETCD_WAL_DIR") or f"{data_dir}/member/wal",
            initial_cluster=parse_initial_cluster(env["ETCD_INITIAL_CLUSTER"]),
            token=env.get("ETCD_INITIAL_CLUSTER_TOKEN", "etcd-cluster"),
        )

    @property
    def bootstrap_id(self) -> int:
        return member_id(list(self.peer_urls), self.token)

    @property
    def bootstrap_cluster_id(self) -> int:
        return cluster_id([member_id(urls, self.token) for urls in self.initial_cluster.values()])


def has_member(wal_dir: str) -> bool:
    """What etcd itself asks (wal.Exist): a WAL means this member has been bootstrapped. A failed start
    can leave member/snap/db behind without one."""
    try:
        return any(name.endswith(".wal") for name in os.listdir(wal_dir))
    except FileNotFoundError:
        return False


# ---- what the cluster says ----------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]

    @property
    def started(self) -> bool:
        # A member publishes its name and client URLs once it runs; a member known only from the
        # bootstrap list has a name in memory but no client URLs, one added with member add neither.
        return bool(self.name and self.client_urls)

    @classmethod
    def from_json(cls, data: dict) -> Member:
        return cls(int(data["ID"]), data.get("name", ""), tuple(data.get("peerURLs", [])),
                   tuple(data.get("clientURLs", [])))


@dataclass(frozen=True)
class View:
    """The member list as one member answered it."""

    endpoint: str
    cluster_id: int
    members: tuple[Member, ...]

    @classmethod
    def from_json(cls, endpoint: str, data: dict) -> View:
        return cls(endpoint, int(data["header"]["cluster_id"]), tuple(Member.from_json(m) for m in data.get("members", [])))


def entry_of(local: Local, members: tuple[Member, ...]) -> Member | None:
    """This host's entry: the member with its peer URL (a peer URL belongs to one member)."""
    return next((m for m in members if set(m.peer_urls) & set(local.peer_urls)), None)


def decide(local: Local, view: View | None, override_exists: bool, locked: bool = True) -> str:
    """Which first start this is (the module's docstring lists them); JoinError where none is safe.
    The data dir is known to have no member. Before the join lock is held (`locked` False) another
    member may be joining, so only under it is a member that has not started a reason to refuse."""
    if view is None:
        if override_exists:
            raise JoinError(f"an earlier run found a running cluster and wrote {JOIN_DROP_IN}, but no other member "
                            "answers now: a first boot would start a second cluster")
        return FIRST_BOOT
    entry = entry_of(local, view.members)
    others = [m for m in view.members if m is not entry]
    if entry is None:
        kind = JOIN
    elif not entry.started:
        bootstrapped = entry.id == local.bootstrap_id and view.cluster_id == local.bootstrap_cluster_id
        kind = BOOTSTRAP if bootstrapped else ADDED
    elif entry.name != local.name:
        raise JoinError(f"the cluster's member {entry.name} ({entry.id:x}) has this host's peer URL {entry.peer_urls}")
    else:
        kind = REPLACE
    unstarted = [m for m in others if not m.started]
    if locked and kind != BOOTSTRAP and unstarted:
        names = ", ".join(m.name or f"{m.id:x} {list(m.peer_urls)}" for m in unstarted)
        raise JoinError(f"member {names} is in the cluster but has not started: one member joins at a time, "
                        "to a cluster whose members all run")
    return kind


def initial_cluster(local: Local, members: tuple[Member, ...]) -> str:
    """ETCD_INITIAL_CLUSTER for a start with state existing: every member of the cluster now, this one
    under its own name (etcd matches the list to the cluster by peer URLs and count)."""
    pairs = []
    for member in members:
        mine = bool(set(member.peer_urls) & set(local.peer_urls))
        name = local.name if mine else member.name
        if not name:
            raise JoinError(f"member {member.id:x} {list(member.peer_urls)} has not started: cannot name it")
        pairs += [(name, url) for url in (local.peer_urls if mine else member.peer_urls)]
    return ",".join(f"{name}={url}" for name, url in sorted(pairs))


def override_files(local: Local, members: tuple[Member, ...]) -> dict[str, bytes]:
    variables = {"ETCD_INITIAL_CLUSTER_STATE": "existing", "ETCD_INITIAL_CLUSTER": initial_cluster(local, members)}
    for value in variables.values():
        if any(c.isspace() or c in "\"'\\$" for c in value):
            raise JoinError(f"cannot write {value!r} unquoted to an EnvironmentFile")
    env = "".join(f"{key}={value}\n" for key, value in variables.items())
    drop_in = (f"# Written by the betting host agent when {local.name} joined the running etcd cluster\n"
               "# (infra/hostagent/etcd.py). etcd reads these only while its data dir is empty.\n"
               f"[Service]\nEnvironmentFile={JOIN_ENV}\n")
    return {JOIN_ENV: ("# ETCD_INITIAL_CLUSTER as the cluster was when this member was added\n" + env).encode(),
            JOIN_DROP_IN: drop_in.encode()}


# ---- the etcd v3 JSON gateway ---------------------------------------------------------------
_tls: dict = {"context": None}


def client_context(ca_file: str, cert: str, key: str) -> ssl.SSLContext:
    """Verifies the member with the stack's CA and presents this host's certificate (etcd's client-cert auth)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.load_cert_chain(cert, key)
    return context


def configure(ca_file: str, cert: str, key: str) -> None:
    _tls["context"] = client_context(ca_file, cert, key)


def _open(request, timeout: float):
    url = request.full_url if isinstance(request, urllib.request.Request) else request
    context = _tls["context"] if url.startswith("https://") else None
    return urllib.request.urlopen(request, timeout=timeout, context=context)


def _post(url: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with _open(request, timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("message") or detail
        raise JoinError(f"{url} answered {error.code}: {detail}") from None


def _reconfigure(url: str, body: dict, timeout: float) -> dict:
    """member add / remove. etcd's strict reconfiguration check refuses either ("unhealthy cluster")
    until every member has been connected for 5 s; such a refusal changed nothing, so ask again."""
    def attempt():
        try:
            return _post(url, body), ""
        except JoinError as error:
            if "unhealthy cluster" not in str(error):
                raise
            return None, str(error)

    return _wait("the cluster refused the change", attempt, timeout)


def _healthy(url: str) -> tuple[bool, str]:
    try:
        with _open(f"{url}/health", REQUEST_TIMEOUT) as response:
            health = json.loads(response.read())
    except urllib.error.HTTPError as error:  # 503 with a body when there is no leader
        return False, f"{url}/health answered {error.code}"
    except (OSError, ValueError) as error:
        return False, f"{url}: {error}"
    return health.get("health") == "true", f"{url}/health says {health}"


def member_list(url: str) -> View:
    return View.from_json(url, _post(f"{url}/v3/cluster/member/list", {}))


def survey(client_urls: dict[str, str]) -> View | None:
    """The member list from the first of the other members that answers (all asked at once: a member
    that is up but has no quorum yet holds the connection until the timeout); None if none does."""
    if not client_urls:
        return None

    def ask(url: str) -> View | None:
        try:
            return member_list(url)
        except (OSError, ValueError, KeyError, JoinError):
            return None

    with ThreadPoolExecutor(max_workers=len(client_urls)) as pool:
        answers = list(pool.map(ask, [client_urls[name] for name in sorted(client_urls)]))
    return next((a for a in answers if a is not None), None)


def _wait(what: str, check, timeout: float):
    """Poll check() -> (value or None, reason) until it gives a value; JoinError with the last reason."""
    deadline = time.monotonic() + timeout
    while True:
        value, reason = check()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise JoinError(f"{what} after {timeout:.0f}s: {reason}")
        time.sleep(POLL_SECONDS)


def healthy_endpoint(client_urls: dict[str, str], timeout: float) -> str:
    def check():
        reasons = []
        for name in sorted(client_urls):
            ok, reason = _healthy(client_urls[name])
            if ok:
                return client_urls[name], ""
            reasons.append(f"{name}: {reason}")
        return None, "; ".join(reasons)

    return _wait("no healthy member of the running cluster", check, timeout)


def wait_others_healthy(local: Local, endpoint: str, timeout: float) -> View:
    """The member list once every started member but this host's entry answers /health true at its client
    URLs (one that has not started makes `decide` refuse, naming it)."""
    def check():
        view = member_list(endpoint)
        entry = entry_of(local, view.members)
        sick = []
        for member in view.members:
            if member is entry or not member.started:
                continue
            results = [_healthy(url) for url in member.client_urls] or [(False, "no client URL")]
            if not any(ok for ok, _ in results):
                sick.append(f"{member.name or f'{member.id:x}'}: {results[0][1]}")
        return (None, "not healthy: " + "; ".join(sick)) if sick else (view, "")

    return _wait("members of the running cluster are not all healthy", lambda: _guard(check), timeout)


# ---- the cluster-wide join lock -------------------------------------------------------------
def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def acquire_lock(endpoint: str, timeout: float) -> str:
    """An etcd lock (v3lock, on a lease): one join at a time in the whole cluster. Returns the lease."""
    lease = _post(f"{endpoint}/v3/lease/grant", {"TTL": LOCK_TTL_SECONDS})["ID"]
    try:
        _post(f"{endpoint}/v3/lock/lock", {"name": _b64(LOCK_NAME), "lease": lease}, timeout=timeout)
    except (OSError, JoinError) as error:
        release_lock(endpoint, lease)
        raise JoinError(f"another member's join holds {LOCK_NAME} ({error})") from None
    keep_alive(endpoint, lease)  # its TTL ran while it waited for the lock
    return lease


def keep_alive(endpoint: str, lease: str) -> None:
    """The lease's TTL from now again (one request of the gateway's LeaseKeepAlive stream). Best effort:
    right after an add to a 1-member cluster there is no quorum until the new member runs."""
    with contextlib.suppress(OSError, ValueError, JoinError):
        _post(f"{endpoint}/v3/lease/keepalive", {"ID": lease})


def release_lock(endpoint: str, lease: str) -> None:
    with contextlib.suppress(OSError, ValueError, JoinError):  # the lease expires by itself otherwise
        _post(f"{endpoint}/v3/lease/revoke", {"ID": lease})


# ---- the first start ----------------------------------------------------------------------
@dataclass
class Join:
    """What prepare_join decided and did; a join holds the cluster's join lock until release()."""

    kind: str
    name: str
    local_url: str = ""
    endpoint: str = ""
    lease: str | None = None
    actions: list[str] = field(default_factory=list)

    @property
    def joining(self) -> bool:
        return self.kind in (JOIN, ADDED, REPLACE)

    def wait_started(self, timeout: float) -> None:
        """Until this member answers on its own client URL (it serves clients only once it has joined
        and published itself) and is listed as started."""
        if not self.joining:
            return

        def check():
            ok, reason = _healthy(self.local_url)
            if not ok:
                return None, reason
            mine = [m for m in member_list(self.local_url).members if m.name == self.name and m.started]
            return (True, "") if mine else (None, f"{self.name} is not listed as started")

        try:
            _wait(f"{self.name} did not start", lambda: _guard(check), timeout)
        except JoinError as error:
            raise JoinError(f"{error} (see its log; the drop-in is {JOIN_DROP_IN})") from None

    def release(self) -> None:
        if self.lease is not None:
            release_lock(self.endpoint, self.lease)
            self.lease = None


def _guard(check):
    try:
        return check()
    except (OSError, ValueError, KeyError, JoinError) as error:
        return None, str(error)


def _write(path: str, content: bytes) -> None:
    # The agent's own atomic write (imported here: the agent imports this module).
    from infra.hostagent.agent import write_atomic

    write_atomic(path, content, "0644")


def _remove_override(platform) -> bool:
    removed = False
    for path in (JOIN_DROP_IN, JOIN_ENV):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(platform.path(path))
            removed = True
    if removed:
        platform.daemon_reload()
    return removed


def _write_override(platform, local: Local, members: tuple[Member, ...], join: Join) -> None:
    for path, content in override_files(local, members).items():
        _write(platform.path(path), content)
    platform.daemon_reload()
    join.actions.append(f"{JOIN_DROP_IN}: start existing, {len(members)} members")


def prepare_join(spec: dict, platform, timeout: float) -> Join:
    """Before the first start of etcd on this host: decide, and for a join add the member and write the
    override. `spec` is the bundle's "etcd" section; `timeout` bounds each wait for the cluster."""
    if "tls" in spec:
        configure(*(platform.path(spec["tls"][k]) for k in ("ca_file", "cert", "key")))
    local = Local.from_env(read_env(platform.path(spec["env_file"])))
    join = Join(RESTART, local.name, local_url=spec["url"])
    if has_member(platform.path(local.wal_dir)):
        return join
    override_exists = os.path.exists(platform.path(JOIN_DROP_IN))
    view = survey(spec["client_urls"])
    join.kind = decide(local, view, override_exists, locked=False)
    if join.kind in AS_RENDERED:
        if _remove_override(platform):
            join.actions.append(f"removed a stale {JOIN_DROP_IN}")
        return join
    if join.kind == ADDED:
        # Added by an earlier run that stopped before the start: no change to the membership, so neither
        # the lock nor a quorum is needed (a 1-member cluster that added this one has none until it runs).
        decide(local, view, override_exists)  # but refused while another member is added and not started
        _write_override(platform, local, view.members, join)
        return join
    # The cluster runs: everything from here on under its join lock, on a fresh member list.
    answering = {m.name or f"{m.id:x}": m.client_urls[0] for m in view.members if m.client_urls
                 and m is not entry_of(local, view.members)}
    join.endpoint = healthy_endpoint(answering, timeout)
    join.lease = acquire_lock(join.endpoint, LOCK_TTL_SECONDS + 60)
    try:
        view = wait_others_healthy(local, join.endpoint, timeout)
        join.kind = decide(local, view, override_exists)
        if join.kind in AS_RENDERED:  # not after a lock on a running cluster, but never start wrongly
            raise JoinError(f"the cluster changed its answer while this member waited to join ({join.kind})")
        members = view.members
        if join.kind == REPLACE:
            old = entry_of(local, members)
            _reconfigure(f"{join.endpoint}/v3/cluster/member/remove", {"ID": str(old.id)}, timeout)
            join.actions.append(f"etcd member remove {old.id:x} (the old {local.name}; its data dir is empty)")
        if join.kind in (JOIN, REPLACE):
            added = _reconfigure(f"{join.endpoint}/v3/cluster/member/add", {"peerURLs": list(local.peer_urls)}, timeout)
            members = tuple(Member.from_json(m) for m in added["members"])
            new_id = int(added["member"]["ID"])
            join.actions.append(f"etcd member add {local.name} {','.join(local.peer_urls)} (id {new_id:x})")
        _write_override(platform, local, members, join)
        keep_alive(join.endpoint, join.lease)  # held for the start: at most `timeout` more, under the TTL
    except BaseException:
        join.release()
        raise
    return join

