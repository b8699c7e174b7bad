"""Backups end to end, under the PostgreSQL hosts' own IAM policy: the prod sandbox (3 etcd, 3 Patroni nodes,
each with its pgBackRest TLS server, every host started by the agent from its real bundle) archiving and
backing up with the real pgBackRest 2.45 into an S3-compatible endpoint on loopback that speaks TLS
(moto's server app, a certificate made here) and enforces IAM: pgBackRest and the backup script sign with
credentials that carry the pg host's role policy as the program renders it (under the mock engine).

The backup job runs as systemd runs it: each node's betting-pg-backup@<type>.service ExecStart, with the
unit's environment, as postgres (SandboxHost.run_oneshot); operators' commands (`verify`, `restore`,
`list`) run the same script in that environment. The tests run in file order on one cluster.

Where moto cannot enforce the rendered policy, a check below does, on every request the hosts made (the
endpoint records them): moto hands no condition values to S3 policies, so ListBucket's `s3:prefix`
condition would deny every listing (dropped for moto, checked per listing here), and moto authorizes a
multi-object delete on the bucket, where AWS checks each key (allowed on the bucket for moto, checked per
key here). Not checked by anything here: the KMS grants (moto's S3 calls no KMS), the instance role's
credentials (keys in the environment instead: SandboxS3), and the VPC endpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from infra.sandbox.mapping import LOOPBACK
from infra.sandbox.runner import Sandbox, wait_for
from infra.sandbox.s3 import S3Endpoint, backup_endpoint
from infra.settings import load_settings
from infra.topology import BackupLayout, Paths
from scripts import backup
from tests.backup_bucket import allowed, authorizations
from tests.conftest import stack_config
from tests.monitoring.conftest import binary, render_all
from tests.monitoring.harness import Webhook, map_rule_for, map_rule_intervals, mentions, start_stack, wait_scraped
from tests.ports import port

pytestmark = pytest.mark.live

# 27600-27699 belong to these tests: the sandbox's ports are the base + 1..97, the endpoint is 99.
PORT_BASE = port(27600)
S3_PORT = port(27699)
CHECKS = ["backup", "restore", "recovery", "pg_amcheck", "canary", "checksums"]


class Cluster:
    """The sandbox, its S3 endpoint, and the backup job's and operators' commands on its nodes."""

    def __init__(self, sandbox: Sandbox, endpoint: S3Endpoint, keys: dict, policy: str, settings):
        self.sandbox, self.endpoint, self.keys, self.policy, self.settings = sandbox, endpoint, keys, policy, settings
        self.topology = sandbox.topology
        self.bucket, self.stanza = self.topology.backup_bucket, self.topology.patroni_scope

    def members(self) -> list[dict]:
        return self.sandbox.cluster()["members"]

    def designated(self) -> str:
        return backup.designated_member(self.members())["name"]

    def service(self, node: str, kind: str) -> subprocess.CompletedProcess:
        return self.sandbox.platform(self.sandbox.node(node)).run_oneshot(f"betting-pg-backup@{kind}.service")

    def script(self, node: str, *arguments: str) -> subprocess.CompletedProcess:
        """backup.py run by hand on `node`, in the environment of its backup unit (as postgres)."""
        return self.sandbox.platform(self.sandbox.node(node)).run_oneshot("betting-pg-backup@diff.service",
                                                                          arguments=list(arguments))

    def backups(self, node: str) -> list[dict]:
        result = self.script(node, "list", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def metrics(self, node: str) -> str | None:
        path = self.sandbox.layout.host_path(self.sandbox.node(node), f"{Paths.NODE_EXPORTER_TEXTFILE_DIR}/{backup.METRICS_FILE}")
        return path.read_text() if path.exists() else None

    def sql(self, statement: str, *params) -> list[tuple]:
        leader = self.sandbox.leader()
        with psycopg.connect(self.sandbox.dsn(leader), autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def keys_under(self, prefix: str) -> list[str]:
        s3, keys = self.endpoint.admin(), []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def archived(self, segment: str) -> bool:
        return any(k.rsplit("/", 1)[-1].startswith(segment + "-")
                   for k in self.keys_under(f"{BackupLayout.REPOSITORY}archive/{self.stanza}/"))

    def switch_wal(self) -> str:
        """Close the current WAL segment; its name (the archiver pushes it next)."""
        ((segment,),) = self.sql("SELECT pg_walfile_name(pg_switch_wal())")
        return segment

    def manifest(self, label: str) -> str:
        key = f"{BackupLayout.REPOSITORY}backup/{self.stanza}/{label}/backup.manifest"
        return self.endpoint.admin().get_object(Bucket=self.bucket, Key=key)["Body"].read().decode()

    def records(self, label: str) -> list[dict]:
        s3 = self.endpoint.admin()
        out = []
        for key in sorted(self.keys_under(f"{BackupLayout.VERIFICATION}{self.stanza}/{label}/")):
            head = s3.head_object(Bucket=self.bucket, Key=key)
            out.append({"key": key, "sse": head.get("ServerSideEncryption"), "kms": head.get("SSEKMSKeyId"),
                        **json.loads(s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())})
        return out


@pytest.fixture(scope="module")
def cluster():
    settings = load_settings(stack_config("prod"), "prod")
    # Not pytest's tmp_path: the postgres user must reach the state dir and the endpoint's CA file.
    state = Path(tempfile.mkdtemp(prefix="pg-backups-live-"))
    state.chmod(0o755)
    try:
        endpoint, keys, policy = backup_endpoint(state / "s3", S3_PORT, "prod", stack_config("prod"))
    except BaseException:
        shutil.rmtree(state, ignore_errors=True)
        raise
    sandbox = None
    try:
        sandbox = Sandbox(state / "sandbox", PORT_BASE, s3=endpoint.sandbox_s3(keys))
        sandbox.up(settings, services=("postgres", "exporters"))
        yield Cluster(sandbox, endpoint, keys, policy, settings)
    finally:
        if sandbox is not None:
            sandbox.down()
        endpoint.relax()  # moto's auth setting is process-wide: leave it as other tests expect it
        endpoint.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_wal_is_archived_from_the_first_minute_before_any_backup(cluster):
    # The stanza exists already: Patroni's post_bootstrap created it when it initialised the cluster.
    assert cluster.keys_under(f"{BackupLayout.REPOSITORY}backup/{cluster.stanza}/backup.info")
    assert not cluster.backups(cluster.topology.postgres[0].name)
    cluster.sql("CREATE TABLE first_minute (x int); INSERT INTO first_minute VALUES (1)")
    segment = cluster.switch_wal()
    wait_for(f"WAL segment {segment} in the repository", lambda: cluster.archived(segment), 60)


def test_the_designated_standby_takes_a_full_and_a_differential_backup_and_verifies_each(cluster):
    designated = cluster.designated()
    role = next(m["role"] for m in cluster.members() if m["name"] == designated)
    assert role == "replica"  # prod: the asynchronous replica, never the leader or the synchronous standby
    for kind in ("full", "diff"):
        for node in (h.name for h in cluster.topology.postgres):
            result = cluster.service(node, kind)
            assert result.returncode == 0, (node, result.stdout + result.stderr)
            if node == designated:
                assert "\nbackup: done: " in result.stdout, result.stdout
            else:
                assert result.stdout.splitlines() == [
                    f"backup: designate: {designated} (replica) takes the backup; nothing to do on {node}"]
    full, diff = cluster.backups(designated)
    assert (full["type"], diff["type"], diff["prior"]) == ("full", "diff", full["label"])
    for taken in (full, diff):
        # pgBackRest copied the files from the standby (it only starts and stops the backup on the primary).
        assert "option-backup-standby=true" in cluster.manifest(taken["label"])
        (record,) = cluster.records(taken["label"])
        assert record["result"] == "passed" and record["node"] == designated
        assert [c["name"] for c in record["checks"]] == CHECKS
        assert {c["result"] for c in record["checks"]} == {"passed"}, record["checks"]
        assert (record["sse"], record["kms"]) == ("aws:kms", cluster.topology.backup_key_alias)
    samples = dict(line.rsplit(" ", 1) for line in cluster.metrics(designated).splitlines() if not line.startswith("#"))
    cluster_label = f'{{cluster="{cluster.stanza}"}}'
    assert set(samples) == {name + cluster_label for name in backup.METRICS}
    assert samples["backup_last_success_timestamp" + cluster_label] == samples["backup_last_verified_timestamp" + cluster_label]
    assert float(samples["backup_last_size_bytes" + cluster_label]) == diff["info"]["size"]
    assert all(cluster.metrics(h.name) is None for h in cluster.topology.postgres if h.name != designated)


def test_verify_restores_an_existing_backup_and_updates_only_the_verified_time(cluster):
    designated = cluster.designated()
    full = cluster.backups(designated)[0]
    before = backup.read_metrics(str(cluster.sandbox.layout.host_path(
        cluster.sandbox.node(designated), f"{Paths.NODE_EXPORTER_TEXTFILE_DIR}/{backup.METRICS_FILE}")))
    result = cluster.script(designated, "verify", full["label"])
    assert result.returncode == 0, result.stdout + result.stderr
    after = backup.read_metrics(str(cluster.sandbox.layout.host_path(
        cluster.sandbox.node(designated), f"{Paths.NODE_EXPORTER_TEXTFILE_DIR}/{backup.METRICS_FILE}")))
    assert float(after["backup_last_verified_timestamp"]) > float(before["backup_last_verified_timestamp"])
    assert {k: v for k, v in after.items() if k != "backup_last_verified_timestamp"} == {
        k: v for k, v in before.items() if k != "backup_last_verified_timestamp"}
    assert [r["result"] for r in cluster.records(full["label"])] == ["passed", "passed"]


def _start_copy(data: Path, socket: Path, port: int) -> None:
    subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
                    f"{Paths.POSTGRES_BIN}/pg_ctl", "start", "-w", "-D", str(data), "-l", str(data.parent / "copy.log"),
                    "-o", f"-c port={port} -c listen_addresses='' -c unix_socket_directories={socket} "
                          "-c synchronous_standby_names='' -c archive_mode=off"],
                   check=True, capture_output=True, timeout=120)


def test_a_point_in_time_restore_has_the_earlier_write_and_not_the_later(cluster):
    designated = cluster.designated()
    cluster.sql("CREATE TABLE pitr (what text, at timestamptz DEFAULT clock_timestamp())")
    cluster.sql("INSERT INTO pitr (what) VALUES ('before')")
    time.sleep(1)  # a moment between the writes that no commit timestamp is near
    moment = datetime.datetime.now(datetime.UTC)
    time.sleep(1)
    cluster.sql("INSERT INTO pitr (what) VALUES ('after')")
    segment = cluster.switch_wal()
    wait_for(f"WAL segment {segment} in the repository", lambda: cluster.archived(segment), 60)
    node = cluster.sandbox.node(designated)
    target = cluster.sandbox.layout.host_path(node, "/var/lib/postgresql/pitr")
    result = cluster.script(designated, "restore", "--to", moment.isoformat(), "--target", str(target))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"holds the cluster as of {moment.isoformat(sep=' ')}" in result.stdout
    socket = cluster.sandbox.layout.host_path(node, "/var/lib/postgresql/pitr-socket")
    socket.mkdir()
    shutil.chown(socket, "postgres", "postgres")
    _start_copy(target, socket, 5999)
    try:
        # As postgres: the copy's pg_hba.conf (Patroni's) lets local connections in by peer authentication only.
        query = subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
                                f"{Paths.POSTGRES_BIN}/psql", "-X", "-A", "-t", "-h", str(socket), "-p", "5999", "-d", "postgres",
                                "-c", "SELECT string_agg(what, ',' ORDER BY at) FROM pitr", "-c", "SELECT pg_is_in_recovery()"],
                               capture_output=True, text=True, timeout=60)
        assert query.stdout.split() == ["before", "f"], query.stdout + query.stderr
    finally:
        subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
                        f"{Paths.POSTGRES_BIN}/pg_ctl", "stop", "-D", str(target), "-m", "immediate"], capture_output=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(socket, ignore_errors=True)


@contextlib.contextmanager
def _damaged(cluster, key: str, how: str):
    """A repository file corrupted (one byte flipped) or deleted, and put back afterwards."""
    s3 = cluster.endpoint.admin()
    original = s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read()
    if how == "corrupt":
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0xFF
        s3.put_object(Bucket=cluster.bucket, Key=key, Body=bytes(damaged))
    else:
        s3.delete_object(Bucket=cluster.bucket, Key=key)
    try:
        yield
    finally:
        s3.put_object(Bucket=cluster.bucket, Key=key, Body=original)


def _referenced_files(cluster, full_label: str, count: int) -> list[str]:
    """Files of the full backup that a differential taken now still takes from it (unchanged ones)."""
    manifest = cluster.manifest(full_label)
    names = re.findall(r'^(pg_data/base/1/\d+)=\{[^\n]*"size":(\d+)', manifest, re.MULTILINE)
    largest = [name for name, size in sorted(names, key=lambda n: -int(n[1]))][:count]
    return [f"{BackupLayout.REPOSITORY}backup/{cluster.stanza}/{full_label}/{name}.zst" for name in largest]


def test_a_corrupted_or_deleted_repository_file_fails_verification_and_marks_nothing(cluster):
    designated = cluster.designated()
    full = cluster.backups(designated)[0]
    before = cluster.metrics(designated)
    corrupted, deleted = _referenced_files(cluster, full["label"], 2)
    with _damaged(cluster, corrupted, "corrupt"):
        # The new differential is taken (it reads the manifest, not the full's files), its restore is not.
        result = cluster.service(designated, "diff")
        assert result.returncode == 1, result.stdout + result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("backup: restore failed: ") and "ERROR" in line, line
    taken = cluster.backups(designated)[-1]
    assert taken["type"] == "diff" and taken["prior"] == full["label"]
    (record,) = cluster.records(taken["label"])
    assert (record["result"], record["failed_step"]) == ("failed", "restore")
    assert cluster.metrics(designated) == before  # backup_last_success_timestamp untouched
    with _damaged(cluster, deleted, "delete"):
        result = cluster.script(designated, "verify", taken["label"])
        assert result.returncode == 1, result.stdout + result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("backup: restore failed: ") and "missing" in line, line
    assert cluster.metrics(designated) == before


def test_with_no_healthy_replica_the_leader_backs_up_itself(cluster):
    leader = cluster.sandbox.leader()
    replicas = [h for h in cluster.topology.postgres if h != leader]
    for node in replicas:
        cluster.sandbox.platform(node).stop("patroni")
    try:
        wait_for("no running replica", lambda: not [m for m in cluster.members()
                                                    if m["name"] != leader.name and m["state"] == "running"], 60)
        assert cluster.designated() == leader.name
        result = cluster.service(leader.name, "full")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"designate: {leader.name} (leader) takes the full backup (no healthy replica" in result.stdout
        taken = cluster.backups(leader.name)[-1]
        assert taken["type"] == "full" and "option-backup-standby=false" in cluster.manifest(taken["label"])
        (record,) = cluster.records(taken["label"])
        assert record["result"] == "passed" and record["node"] == leader.name
        assert cluster.metrics(leader.name) is not None
    finally:
        cluster.sandbox.up(cluster.settings, services=("postgres",))


def test_an_unreachable_repository_pages_on_wal_archiving_and_fails_the_backup_naming_the_step(cluster):
    """The seam from pgBackRest to the pager: archive_command (pgbackrest archive-push, asynchronous)
    failing against a stopped endpoint, PostgreSQL's pg_stat_archiver, the leader's real postgres_exporter,
    the real Prometheus with the rendered rules and the real Alertmanager with the rendered routes.
    Mapped for the test: the scrape target (the leader's exporter on loopback), receivers (a local
    webhook), 1 s scrape and evaluation intervals, and WalArchivingFailing's `for` (5m rendered; its
    length has promtool cases in tests/monitoring/backups_test.yml). The expression, labels and routes are
    as rendered."""
    leader, designated = cluster.sandbox.leader(), cluster.designated()
    before = cluster.metrics(designated)
    files = map_rule_for(map_rule_intervals(render_all(cluster.settings, cluster.topology), "1s"),
                         "WalArchivingFailing", "5s")
    exporter = f"{LOOPBACK}:{cluster.sandbox.layout.postgres_exporter(leader)}"
    webhook, workdir = Webhook(), Path(tempfile.mkdtemp(prefix="wal-alert-"))
    stack = start_stack(workdir, files, {"postgres": [(exporter, leader.name)]}, webhook,
                        {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        prometheus_bin=binary("prometheus"), alertmanager_bin=binary("prometheus-alertmanager"),
                        target_ca={"postgres": cluster.sandbox.ca_file})  # the exporter serves the sandbox CA's pair
    cluster.endpoint.stop()
    try:
        wait_scraped(stack.prometheus_url, f'pg_stat_archiver_archived_count{{instance="{leader.name}"}}', client=stack.client)
        cluster.sql("CREATE TABLE IF NOT EXISTS archive_probe (note text)")
        cluster.sql("INSERT INTO archive_probe VALUES ('written while the repository is down')")
        pending = cluster.switch_wal()
        # pgBackRest's async push gives up after its archive-timeout (60 s): then PostgreSQL counts a failure.
        page = webhook.wait_for(lambda n: n.path == "/pagerduty" and mentions(n, "WalArchivingFailing"), 150)
        assert page is not None, stack.log_tail()
        summary, details = page.body["payload"]["summary"], page.body["payload"]["custom_details"]
        assert summary == f"WalArchivingFailing - WAL archiving is failing on {leader.name}", summary
        assert details["runbook"].endswith("/WalArchivingFailing.md"), details
        assert cluster.sql("SELECT last_failed_wal FROM pg_stat_archiver") == [(pending,)]
        result = cluster.service(designated, "full")
    finally:
        cluster.endpoint.start()
        stack.stop()
        webhook.close()
        shutil.rmtree(workdir, ignore_errors=True)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("backup: repository failed: ") and "Could not connect to the endpoint URL" in line, line
    assert cluster.metrics(designated) == before
    # With the endpoint back, the archiver catches up on the segment it kept (a new segment wakes it
    # from its minute's wait between rounds of retries).
    cluster.sql("INSERT INTO archive_probe VALUES ('written when the repository is back')")
    following = cluster.switch_wal()
    wait_for(f"{pending} and {following} archived", lambda: cluster.archived(pending) and cluster.archived(following), 120)


def test_every_request_the_hosts_made_is_allowed_by_the_rendered_policy_and_every_write_names_the_key(cluster):
    requests = cluster.endpoint.requests_by(cluster.keys)
    assert len(requests) > 500
    denied = [(r.method, r.path, r.query, action, resource, context)
              for r in requests for action, resource, context in authorizations(r)
              if not allowed(cluster.policy, action, resource, context)]
    assert denied == [], denied[:10]
    assert [r for r in requests if r.status == 403] == []  # moto, enforcing, agreed
    kinds = {action for r in requests for action, _, _ in authorizations(r)}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject"} <= kinds, kinds
    listings = {c["s3:prefix"] for r in requests for a, _, c in authorizations(r) if a == "s3:ListBucket"}
    assert all(p.startswith(BackupLayout.REPOSITORY) for p in listings), listings
    writes = [r for r in requests if (r.method == "PUT" or (r.method == "POST" and r.query == "uploads="))
              and r.path.count("/") >= 2]
    assert writes and all(r.headers.get("HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION") == "aws:kms" and
                          r.headers.get("HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION_AWS_KMS_KEY_ID") == cluster.topology.backup_key_alias
                          for r in writes), [(r.method, r.path) for r in writes][:5]
    # The rendered policy itself refuses what the host has no business with, as AWS would.
    for action, resource, context in (
        ("s3:PutObject", f"arn:aws:s3:::{cluster.bucket}/betting-prod/archive/x", {}),  # the old repo1-path
        ("s3:GetObject", f"arn:aws:s3:::{cluster.bucket}/{BackupLayout.VERIFICATION}x", {}),
        ("s3:ListBucket", f"arn:aws:s3:::{cluster.bucket}", {"s3:prefix": BackupLayout.VERIFICATION}),
        ("s3:ListBucket", f"arn:aws:s3:::{cluster.bucket}", {}),
    ):
        assert not allowed(cluster.policy, action, resource, context), (action, resource, context)
