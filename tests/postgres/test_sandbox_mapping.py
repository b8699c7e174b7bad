"""The sandbox runs each host's real bundle: it changes names, ports and host paths in it, and not
one other byte; and it reads Debian's own unit files the way systemd does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.bundle import bundle_document
from infra.hostagent.envfile import read_environment_file
from infra.hosts import host_specs
from infra.render.backup import TIMERS
from infra.render.pgbackrest import members
from infra.sandbox import mapping as m
from infra.sandbox.platform import SandboxHost, SecretStore, expand_command, parse_unit
from infra.sandbox.runner import ALL_SERVICES, Sandbox
from infra.topology import Paths

# Services the sandbox does not run keep their DNS names (their scrape jobs report "not deployed").
NOT_IN_SANDBOX = ("grafana-", "clickhouse-", "api.")
S3 = m.SandboxS3(port=25099, ca_file="/tmp/s3-ca.pem", access_key_id="AKIA", secret_access_key="secret")


def _sandbox(settings, tmp_path) -> Sandbox:
    return Sandbox(tmp_path / "state", 25000, settings=settings)


def _pairs(sandbox):
    """(host, path, rendered bytes, mapped bytes) of every file of every host the sandbox runs."""
    specs = {s.host.name: s for s in host_specs(sandbox.settings, sandbox.topology)}
    for host in sandbox.hosts():
        rendered = {f["path"]: f["content"].encode() for f in bundle_document(specs[host.name], sandbox.settings,
                                                                             sandbox.topology)["files"]}
        mapped = {f["path"]: f["content"].encode() for f in sandbox.host_bundle(host, ALL_SERVICES)["files"]}
        assert rendered.keys() == mapped.keys(), host.name
        for path, content in rendered.items():
            yield host, path, content, mapped[path]


def test_the_sandbox_runs_every_etcd_postgres_and_monitoring_host(settings, tmp_path):
    sandbox = _sandbox(settings, tmp_path)
    roles = [h.role for h in sandbox.hosts()]
    assert roles == sorted(roles, key=["etcd", "postgres", "monitoring"].index)
    assert len(roles) == len(sandbox.topology.etcd) + len(sandbox.topology.postgres) + len(sandbox.topology.monitoring)


def test_every_file_differs_from_the_rendered_one_only_in_mapped_tokens_and_host_paths(settings, tmp_path):
    sandbox = _sandbox(settings, tmp_path)
    changed = 0
    for host, path, content, mapped in _pairs(sandbox):
        mapping = m.host_mapping(sandbox.layout, sandbox.topology, host, settings=sandbox.settings)
        root = str(sandbox.layout.host_root(host)).encode()
        rooted = not path.startswith(m.UNROOTED_FILES)
        # A token mapped to nothing (a scrape entry of a service the sandbox does not run) is removed first.
        for key in (key for key, value in mapping.items() if not value and key in content):
            content = content.replace(key, b"")
        used = {key: value for key, value in mapping.items() if value and key in content}
        between_rendered = m.unmapped_parts(content, used, with_paths=rooted)
        replacements = set(used.values()) | ({root + f.encode() for f in m.HOST_FOLDERS} if rooted else set())
        between_mapped = m.unmapped_parts(mapped, replacements)
        assert between_rendered == between_mapped, (host.name, path)
        changed += mapped != content
    assert changed > 20


def test_nothing_the_sandbox_does_not_run_is_scraped(settings, tmp_path):
    """ClickHouse, Grafana and the application have no host here: their scrape entries are dropped (their `up` and
    every rule on them stay empty), and what is left is a config the real promtool accepts."""
    sandbox = _sandbox(settings, tmp_path)
    (monitoring, *_) = sandbox.topology.monitoring
    config = next(mapped for host, path, _, mapped in _pairs(sandbox)
                  if host.name == monitoring.name and path == "/etc/prometheus/prometheus.yml")
    document = yaml.safe_load(config)
    targets = {job["job_name"]: [t for entry in job.get("static_configs") or [] for t in entry["targets"]]
               for job in document["scrape_configs"]}
    assert targets["clickhouse"] == targets["grafana"] == [] and targets.get("app", []) == []
    scraped = {t for ts in targets.values() for t in ts}
    assert scraped and all(t.startswith(f"{m.LOOPBACK}:") for t in scraped)
    assert len(targets["node"]) == len(sandbox.hosts())
    path = tmp_path / "prometheus.yml"
    path.write_bytes(config)
    checked = subprocess.run(["promtool", "check", "config", "--syntax-only", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_host_paths_never_leave_the_hosts_root(settings, tmp_path):
    """Every /etc, /var, /run or /tmp path in a mapped file is the host's own (or the shared socket dir), but for
    the other members' data directories in pgbackrest.conf: their TLS servers open the files those name."""
    sandbox = _sandbox(settings, tmp_path)
    for host, path, _, mapped in _pairs(sandbox):
        if path.startswith(m.UNROOTED_FILES):
            continue
        allowed = (str(sandbox.layout.host_root(host)).encode(), str(sandbox.layout.socket_dir).encode())
        others = {f"pg{i}-path={sandbox.layout.data_dir(member)}".encode()
                  for i, member in members(sandbox.topology, host) if member != host} if host.role == "postgres" else set()
        for match in re.finditer(rb"(?<![\w.~/-])(pg\d-path=)?(/(?:etc|var|run|tmp)/[^\s\"',]*)", mapped):
            if match.group(1) and match.group(0) in others and path == Paths.PGBACKREST_CONFIG:
                continue
            assert match.group(2).startswith(allowed), (host.name, path, match.group(0))


def test_rule_files_keep_the_hosts_mount_points(settings, tmp_path):
    """Rules name mount points as label values: they are queries about the hosts, not paths here."""
    sandbox = _sandbox(settings, tmp_path)
    rules = [(p, c, mp) for h, p, c, mp in _pairs(sandbox) if p.startswith(m.UNROOTED_FILES)]
    assert rules and any(b'mountpoint="/var/lib/' in c for _, c, _ in rules)
    for path, content, mapped in rules:
        assert mapped == content, path  # the rules name no host:port of ours either


def test_sandbox_files_listen_and_connect_on_loopback_only(settings, tmp_path):
    sandbox = _sandbox(settings, tmp_path)
    zone = settings.dns_zone.encode()
    for host, path, _, mapped in _pairs(sandbox):
        # A program's own defaults are not where it listens: its configuration says that (the exporter's env file).
        assert b"0.0.0.0" not in mapped or path == Paths.PGBOUNCER_EXPORTER, (host.name, path)
        assert b"=:" not in re.sub(rb"[^\n]*#[^\n]*", b"", mapped) or path.endswith(".yml"), (host.name, path)
        for name in re.findall(rb"[a-z0-9.-]+\." + re.escape(zone), mapped):
            assert name.decode().startswith(NOT_IN_SANDBOX), (host.name, path, name)
        ports = {int(p) for p in re.findall(rb"127\.0\.0\.1:(\d+)", mapped)}
        assert ports <= set(sandbox.layout.ports(sandbox.topology)), (host.name, path, ports)


def test_gates_and_the_patroni_api_point_at_the_hosts_own_ports(settings, tmp_path):
    sandbox = _sandbox(settings, tmp_path)
    layout, topology = sandbox.layout, sandbox.topology
    for host in sandbox.hosts():
        bundle = sandbox.host_bundle(host, ALL_SERVICES)
        urls = [s["gate"].get("url") or s["gate"].get("api") or f"http://{s['gate']['address']}"
                for s in bundle["services"] if s["gate"]]
        assert urls
        own = set(layout.host_ports(host, topology).values())
        for url in urls:
            port = re.search(r":(\d+)", re.sub(r"^https?://127\.0\.0\.1", "", url)).group(1)
            assert int(port) in own, (host.name, url)
        if host.role == "postgres":
            assert bundle["patroni"]["api"] == f"https://127.0.0.1:{layout.patroni(host)}"


def test_only_the_asked_services_run_and_never_a_timer(settings, tmp_path):
    sandbox = _sandbox(settings, tmp_path)
    node = sandbox.topology.postgres[0]
    assert [s["unit"] for s in sandbox.host_bundle(node, ("postgres",))["services"]] == ["patroni", "pgbouncer", "haproxy"]
    units = [s["unit"] for s in sandbox.host_bundle(node, ALL_SERVICES)["services"]]
    assert units == ["patroni", "pgbouncer", "haproxy", "prometheus-postgres-exporter", "betting-pgbouncer-exporter",
                     "prometheus-node-exporter"]
    assert [s["unit"] for s in sandbox.host_bundle(sandbox.topology.etcd[0], ())["services"]] == ["etcd"]
    # The backup timers are in the bundle but never armed here; the TLS server runs only with an S3 endpoint.
    rendered = [s["unit"] for s in bundle_document(next(s for s in host_specs(settings, sandbox.topology)
                                                            if s.host == node), settings, sandbox.topology)["services"]]
    assert set(TIMERS.values()) <= set(rendered)
    with_s3 = Sandbox(tmp_path / "s3", 25000, settings=settings, s3=S3)
    expected = (["pgbackrest"] if len(sandbox.topology.postgres) > 1 else []) + ["patroni", "pgbouncer", "haproxy"]
    assert [s["unit"] for s in with_s3.host_bundle(node, ("postgres",))["services"]] == expected
    assert sandbox.platform(node).active(TIMERS["full"])  # "active": the sandbox never starts a timer


def test_only_declared_non_address_changes(settings, tmp_path):
    """Besides hosts/ports/paths, only the pgBackRest binary (no S3), a required watchdog (no device)
    and Redis's TLS scheme (a plain local redis-server) change."""
    sandbox = _sandbox(settings, tmp_path)
    for node in sandbox.topology.postgres:
        files = {f["path"]: f["content"] for f in sandbox.host_bundle(node, ALL_SERVICES)["files"]}
        mapped = files["/etc/patroni/config.yml"]
        assert "/usr/bin/pgbackrest" not in mapped and f"{m.NO_S3_BIN} --config=" in mapped
        assert f"post_bootstrap: {sandbox.layout.host_path(node, Paths.POST_BOOTSTRAP)} " in mapped
        config = yaml.safe_load(mapped)
        expected = "automatic" if settings.patroni.watchdog == "required" else settings.patroni.watchdog
        assert config["watchdog"]["mode"] == expected
        assert config["postgresql"]["data_dir"] == str(sandbox.layout.data_dir(node))
    for host in sandbox.topology.monitoring:
        files = {f["path"]: f["content"] for f in sandbox.host_bundle(host, ALL_SERVICES)["files"]}
        assert f"--redis.addr=redis://127.0.0.1:{sandbox.layout.redis} " in files["/etc/default/prometheus-redis-exporter"]


def test_map_bytes_replaces_longest_token_first_and_roots_host_paths():
    mapping = {b"/var/lib/prometheus": b"/s/prom", b"/var/lib/prometheus/alertmanager": b"/s/am"}
    assert m.map_bytes(b"a /var/lib/prometheus/alertmanager b /var/lib/prometheus/x", mapping) == b"a /s/am b /s/prom/x"
    assert (m.map_bytes(b"c=/etc/x -/etc/y /usr/local/etc/z http://h/var/w /run/p", {b"/run/p": b"/sock"}, Path("/r"))
            == b"c=/r/etc/x -/r/etc/y /usr/local/etc/z http://h/var/w /sock")
    rooted = m.map_bytes(b"EnvironmentFile=/etc/x\n", {}, Path("/tmp/r"))
    assert rooted == b"EnvironmentFile=/tmp/r/etc/x\n" and m.map_bytes(rooted, {}, Path("/tmp/r")) == rooted


# ---- units as systemd reads them -----------------------------------------------------------
def test_unit_files_are_read_the_way_systemd_reads_them():
    package = """[Unit]\nDescription=x\n[Service]\nEnvironment=DAEMON_ARGS=\nEnvironment="NAME=%H" MODE=a
EnvironmentFile=-/etc/default/%p\nUser=etcd\nExecStart=/usr/bin/etcd $DAEMON_ARGS\nExecReload=/bin/kill -HUP $MAINPID
TimeoutSec=30\n[Install]\nWantedBy=multi-user.target\n"""
    drop_in = "[Service]\nEnvironmentFile=/etc/betting/secrets/etcd.env\nKillMode=process\n"
    unit = parse_unit("etcd", [package, drop_in], {"H": "etcd-1", "p": "etcd"})
    assert unit.environment == ["DAEMON_ARGS=", "NAME=etcd-1", "MODE=a"]
    assert unit.environment_files == ["-/etc/default/etcd", "/etc/betting/secrets/etcd.env"]
    assert (unit.user, unit.kill_mode, unit.stop_timeout) == ("etcd", "process", 30.0)
    reset = parse_unit("etcd", [package, "[Service]\nEnvironmentFile=\nExecStart=\nExecStart=/bin/true\n"], {})
    assert reset.environment_files == [] and reset.exec_start == "/bin/true"


def test_exec_start_expands_variables_as_systemd_does():
    env = {"ARGS": '--a=1  --b=2', "ONE": "x y"}
    assert expand_command("/usr/bin/d $ARGS --c", env) == ["/usr/bin/d", "--a=1", "--b=2", "--c"]
    assert expand_command("/usr/bin/d ${ONE} --n=$ONE", env) == ["/usr/bin/d", "x y", "--n=x y"]
    assert expand_command("-/usr/bin/d $MISSING", env) == ["/usr/bin/d"]


def test_environment_files_lose_their_quotes_and_comments():
    text = '# comment\n; other\nARGS="--x=\\"q\\" --y"\nPLAIN=a b\nSINGLE=\'s\'\n\nBAD LINE\n'
    assert read_environment_file(text) == {"ARGS": '--x="q" --y', "PLAIN": "a b", "SINGLE": "s"}


def test_debian_units_give_the_daemons_the_bundles_files(settings, tmp_path):
    """The real unit files of this machine's packages, with the hosts' files mapped under their roots."""
    sandbox = _sandbox(settings, tmp_path)
    node, member = sandbox.topology.postgres[0], sandbox.topology.etcd[0]
    for host in (node, member):
        for file in sandbox.host_bundle(host, ALL_SERVICES)["files"]:
            target = Path(sandbox.platform(host).path(file["path"]))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file["content"])
    patroni = sandbox.platform(node).unit("patroni")
    assert expand_command(patroni.exec_start, {}) == ["/usr/bin/patroni", sandbox.platform(node).path("/etc/patroni/config.yml")]
    assert patroni.environment_files[-1] == sandbox.platform(node).path("/etc/betting/secrets/patroni.env")
    assert patroni.user == "postgres" and patroni.kill_mode == "process"
    etcd = sandbox.platform(member)
    env = etcd._environment(etcd.unit("etcd"))
    assert env["ETCD_LISTEN_CLIENT_URLS"] == f"https://127.0.0.1:{sandbox.layout.etcd_client(member)}"
    assert env["ETCD_DATA_DIR"].startswith(str(sandbox.layout.host_root(member)))


def test_a_missing_package_or_unit_is_named(settings, tmp_path):
    sandbox = _sandbox(settings, tmp_path)
    platform = SandboxHost(sandbox.layout, sandbox.topology, sandbox.topology.etcd[0],
                           SecretStore(tmp_path / "secrets", {}), spawn=None, process=lambda name: None, mapping={})
    with pytest.raises(RuntimeError, match="etcd-1: package no-such-package is not installed on this machine"):
        platform.install(["no-such-package"])
    with pytest.raises(RuntimeError, match="etcd-1: no unit file /lib/systemd/system/no-such-unit.service"):
        platform.unit("no-such-unit")


def test_secrets_are_generated_once_and_placeholders_kept(tmp_path):
    store = SecretStore(tmp_path / "secrets", {"slack": "http://127.0.0.1:9/x"})
    first = store.get("/betting/prod/postgres_superuser_password")
    assert len(first) >= 24 and store.get("/betting/prod/postgres_superuser_password") == first
    assert store.get("/betting/prod/slack") == "http://127.0.0.1:9/x"
    assert (tmp_path / "secrets" / "postgres_superuser_password").stat().st_mode & 0o777 == 0o400


def test_with_an_s3_endpoint_only_its_address_tls_and_credentials_differ(settings, tmp_path):
    """The declared exceptions for pgBackRest and the backup job against a loopback S3 (SandboxS3): the real
    binary, the endpoint's host, port and CA, path-style URIs, and credentials from the environment."""
    sandbox = Sandbox(tmp_path / "state", 25000, settings=settings, s3=S3)
    specs = {s.host.name: s for s in host_specs(settings, sandbox.topology)}
    for node in sandbox.topology.postgres:
        rendered = {f["path"]: f["content"] for f in bundle_document(specs[node.name], settings, sandbox.topology)["files"]}
        files = {f["path"]: f["content"] for f in sandbox.host_bundle(node, ALL_SERVICES)["files"]}
        conf = files[Paths.PGBACKREST_CONFIG]
        assert "repo1-s3-key-type=shared\n" in conf and "repo1-s3-key=" not in conf  # the key comes from the environment
        endpoint = f"repo1-s3-endpoint=s3.{settings.region}.amazonaws.com\n"
        assert (endpoint + f"repo1-storage-host=127.0.0.1\nrepo1-storage-port={S3.port}\n"
                f"repo1-storage-ca-file={S3.ca_file}\nrepo1-s3-uri-style=path\n") in conf
        assert endpoint in rendered[Paths.PGBACKREST_CONFIG] and "repo1-storage" not in rendered[Paths.PGBACKREST_CONFIG]
        assert "/usr/bin/pgbackrest --config=" in files[Paths.PATRONI_CONFIG]  # the real binary
        assert f'S3_ENDPOINT="{S3.url}"' in files[Paths.BACKUP_ENV]
        for index, member in members(sandbox.topology, node):
            if member != node:
                assert f"pg{index}-host=127.0.0.1\npg{index}-host-type=tls\n" in conf
                assert f"pg{index}-host-port={sandbox.layout.pgbackrest_server(member)}\n" in conf
                assert f"pg{index}-port={sandbox.layout.postgres(member)}\n" in conf
        if len(sandbox.topology.postgres) > 1:
            assert f"tls-server-address=127.0.0.1\ntls-server-port={sandbox.layout.pgbackrest_server(node)}\n" in conf
        environment = sandbox.platform(node)._environment(sandbox.platform(node).unit("patroni"))
        assert environment["PGBACKREST_REPO1_S3_KEY"] == S3.access_key_id and environment["AWS_CA_BUNDLE"] == S3.ca_file
    assert "AWS_ACCESS_KEY_ID" not in sandbox.platform(sandbox.topology.etcd[0])._environment(
        sandbox.platform(sandbox.topology.etcd[0]).unit("etcd"))


def test_bundle_units_and_templates_are_read_from_the_hosts_etc_systemd_system(settings, tmp_path):
    sandbox = _sandbox(settings, tmp_path)
    node = sandbox.topology.postgres[0]
    for file in sandbox.host_bundle(node, ALL_SERVICES)["files"]:
        target = Path(sandbox.platform(node).path(file["path"]))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file["content"])
    unit = sandbox.platform(node).unit("betting-pg-backup@full.service")
    script = str(sandbox.layout.host_path(node, "/usr/local/lib/betting-pg-backup/backup.py"))
    assert expand_command(unit.exec_start, {}) == ["/usr/bin/python3", script, "run", "--type=full"]
    assert unit.user == "postgres"
    if len(sandbox.topology.postgres) > 1:
        server = sandbox.platform(node)
        env = server._environment(server.unit("pgbackrest"))
        assert env["PGBACKREST_CONFIG"] == server.path(Paths.PGBACKREST_CONFIG)  # the drop-in, mapped
        assert expand_command(server.unit("pgbackrest").exec_start, env) == [m.NO_S3_BIN, "server"]
