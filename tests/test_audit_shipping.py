"""The audit-log shipper and its seam with AWS.

- The shipper file (infra/hostagent/files/betting-ship-audit-logs), run as a process with the
  environment file the bundle writes, against a moto S3 server holding the audit-log bucket as
  BackupStorage declares it (versioning, Object Lock in compliance mode for 7 years, the KMS alias):
  closed log files land under the host's prefix, SSE-KMS; the file PostgreSQL writes is left; a
  second run uploads nothing; a file appended after shipping is shipped again as a new version;
  a locked version cannot be deleted.
- The host's exact IAM policy from the program, on moto with IAM enforcement: it may put under its
  own prefix, and not under another host's, nor delete, read or list.
- The systemd units pass `systemd-analyze verify`; the bundle carries them with the timer started.

What moto cannot show: the KMS side of SSE-KMS (moto records the key id; kms:GenerateDataKey is
checked in the policy's text), S3's real clock for retention, and that the host runs Debian's boto3
1.26 under /usr/bin/python3 (the process here runs the venv's boto3, the only one moto's endpoint
variable reaches).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import set_initial_no_auth_action_count
from moto.server import ThreadedMotoServer

from infra.engine import evaluate
from infra.hostagent.envfile import read_environment_file
from infra.hosts import host_specs
from infra.hosts.postgres import AUDIT_SHIP_ENV, AUDIT_SHIP_UNIT, AUDIT_SHIPPER
from infra.settings import load_settings
from infra.topology import audit_log_prefix, backup_key_alias, build_topology
from tests.aws_users import client, user_with
from tests.conftest import ROOT, stack_config
from tests.monitoring.harness import free_port

REGION = "eu-west-1"
SHIPPER = ROOT / "infra" / "hostagent" / "files" / "betting-ship-audit-logs"


def _host_files(stack: str, host: str) -> dict[str, bytes]:
    settings = load_settings(stack_config(stack), stack)
    spec = next(s for s in host_specs(settings, build_topology(settings)) if s.host.name == host)
    return {f.path: f.content for f in spec.files}


def _audit_bucket(s3, bucket: str, years: int = 7) -> None:
    """The audit-log bucket as BackupStorage declares it."""
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION}, ObjectLockEnabledForBucket=True)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Years": years}}})


@pytest.fixture
def moto_server(monkeypatch):
    for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # The threaded server shares moto's in-process backends with every @mock_aws test before it: start empty.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_shipper_uploads_closed_logs_once_under_the_hosts_prefix_with_sse_kms(moto_server, tmp_path):
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    env = read_environment_file(_host_files("prod", "pg-1")[AUDIT_SHIP_ENV].decode())
    assert env["AUDIT_BUCKET"] == topology.audit_bucket and env["AUDIT_PREFIX"] == audit_log_prefix("pg-1") == "postgres/pg-1/"
    assert env["AUDIT_KMS_KEY"] == backup_key_alias("prod") and env["AWS_DEFAULT_REGION"] == REGION

    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_server, **{k.lower(): v for k, v in credentials.items()})
    kms = boto3.client("kms", region_name=REGION, endpoint_url=moto_server, **{k.lower(): v for k, v in credentials.items()})
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=env["AUDIT_KMS_KEY"], TargetKeyId=key_id)
    _audit_bucket(s3, env["AUDIT_BUCKET"])

    # PostgreSQL's log folder: three closed hours and the one it writes now (current_logfiles).
    logs, data = tmp_path / "log", tmp_path / "data"
    logs.mkdir()
    data.mkdir()
    closed = [f"postgresql-2026-12-01T{h:02d}.log" for h in (14, 15, 16)]
    for name in [*closed, "postgresql-2026-12-01T17.log"]:
        (logs / name).write_text(f"2026-12-01 LOG:  AUDIT: SESSION,1,1,DDL,CREATE TABLE,,,CREATE TABLE t{name[-6:-4]} (a int)\n")
    (logs / "unrelated.txt").write_text("not a log file\n")
    (data / "current_logfiles").write_text(f"stderr {logs}/postgresql-2026-12-01T17.log\n")
    run_env = {"PATH": os.environ["PATH"], **credentials, **env, "AWS_ENDPOINT_URL": moto_server,
               "LOG_DIRECTORY": str(logs), "CURRENT_LOGFILES": str(data / "current_logfiles"),
               "STATE_FILE": str(tmp_path / "audit-shipped.json")}

    def run() -> str:
        result = subprocess.run([sys.executable, str(SHIPPER)], env=run_env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    assert "shipped 3 file(s)" in run()
    listed = s3.list_objects_v2(Bucket=env["AUDIT_BUCKET"])["Contents"]
    assert sorted(o["Key"] for o in listed) == [f"postgres/pg-1/{n}" for n in closed]
    for name in closed:
        head = s3.head_object(Bucket=env["AUDIT_BUCKET"], Key=f"postgres/pg-1/{name}")
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"].endswith(env["AUDIT_KMS_KEY"]), head
        # Object Lock's default retention: compliance mode, 7 years from the upload.
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"] > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7 * 365 - 1)
        body = s3.get_object(Bucket=env["AUDIT_BUCKET"], Key=f"postgres/pg-1/{name}")["Body"].read()
        assert body == (logs / name).read_bytes()

    assert "shipped 0 file(s)" in run()  # the marker: nothing new, nothing uploaded
    with (logs / closed[-1]).open("a") as handle:  # PostgreSQL restarted within that hour and appended
        handle.write("2026-12-01 LOG:  AUDIT: SESSION,2,1,ROLE,GRANT,,,GRANT SELECT ON t TO app\n")
    assert f"postgres/pg-1/{closed[-1]}" in run()
    versions = s3.list_object_versions(Bucket=env["AUDIT_BUCKET"], Prefix=f"postgres/pg-1/{closed[-1]}")["Versions"]
    assert len(versions) == 2  # both kept

    # A locked version cannot be deleted, not even by an administrator.
    for version in versions:
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.delete_object(Bucket=env["AUDIT_BUCKET"], Key=f"postgres/pg-1/{closed[-1]}", VersionId=version["VersionId"])


def test_shipper_fails_with_one_line_when_a_setting_is_missing(tmp_path):
    result = subprocess.run([sys.executable, str(SHIPPER)], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "betting-ship-audit-logs: AUDIT_BUCKET is not set (see /etc/betting/audit-ship.env)"




@mock_aws
@set_initial_no_auth_action_count(3)  # the admin user, its policy and its key; everything after is signed
def test_a_postgres_host_may_only_add_audit_logs_under_its_own_prefix(monkeypatch):
    for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "setup")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "setup")
    settings = load_settings(stack_config("prod"), "prod")
    bucket = build_topology(settings).audit_bucket
    evaluation = evaluate("prod", stack_config("prod"))
    (policy,) = [r.props["policy"] for r in evaluation.resources
                 if r.type == "aws:iam/rolePolicy:RolePolicy" and r.name.endswith("-pg-1-access")]
    (key,) = [r for r in evaluation.resources if r.type == "aws:kms/key:Key" and r.name == "backups-key"]
    statements = json.loads(policy)["Statement"]
    assert any("kms:GenerateDataKey" in s["Action"] and s["Effect"] == "Allow" for s in statements)
    assert not any(s.get("Sid") == "PutOwnAuditLogs" and set(s["Action"]) != {"s3:PutObject"} for s in statements)

    admin = user_with(boto3.client("iam", region_name=REGION), "admin", json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    iam, s3 = client("iam", admin), client("s3", admin)
    _audit_bucket(s3, bucket)
    s3.put_object(Bucket=bucket, Key="postgres/pg-2/postgresql-2026-12-01T10.log", Body=b"pg-2's\n",
                  ContentMD5="pFF376renoEKKLH6vVFdMg==")
    host = client("s3", user_with(iam, "host-pg-1", policy))
    md5 = "6aiIFPqBW9w0sIToc1Qg5Q=="  # base64 MD5 of b"audit\n": S3 wants one on uploads under Object Lock
    host.put_object(Bucket=bucket, Key="postgres/pg-1/postgresql-2026-12-01T10.log", Body=b"audit\n", ContentMD5=md5,
                    ServerSideEncryption="aws:kms", SSEKMSKeyId=backup_key_alias("prod"))
    for denied in (
        lambda: host.put_object(Bucket=bucket, Key="postgres/pg-2/postgresql-2026-12-01T11.log", Body=b"audit\n", ContentMD5=md5),
        lambda: host.put_object(Bucket=bucket, Key="postgresql-2026-12-01T11.log", Body=b"audit\n", ContentMD5=md5),
        lambda: host.delete_object(Bucket=bucket, Key="postgres/pg-1/postgresql-2026-12-01T10.log"),
        lambda: host.get_object(Bucket=bucket, Key="postgres/pg-1/postgresql-2026-12-01T10.log"),
        lambda: host.list_objects_v2(Bucket=bucket, Prefix="postgres/pg-1/"),
    ):
        with pytest.raises(ClientError, match="AccessDenied"):
            denied()
    assert key.props["enableKeyRotation"] is True


def test_the_bundle_runs_the_shipper_hourly_as_postgres():
    settings = load_settings(stack_config("prod"), "prod")
    spec = next(s for s in host_specs(settings, build_topology(settings)) if s.host.name == "pg-1")
    files = {f.path: f for f in spec.files}
    assert files[AUDIT_SHIPPER].content == SHIPPER.read_bytes() and files[AUDIT_SHIPPER].mode == "0755"
    assert f"{AUDIT_SHIP_UNIT}.timer" in spec.services and "python3-boto3" in spec.packages
    assert "postgresql-15-pgaudit" in spec.packages
    unit = files[f"/etc/systemd/system/{AUDIT_SHIP_UNIT}.service"].content.decode()
    assert f"ExecStart=/usr/bin/python3 {AUDIT_SHIPPER}" in unit and "User=postgres" in unit
    assert f"EnvironmentFile={AUDIT_SHIP_ENV}" in unit


def test_systemd_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: apt-get install -y systemd")
    for kind in ("service", "timer"):
        shutil.copy(ROOT / "infra" / "hostagent" / "files" / f"{AUDIT_SHIP_UNIT}.{kind}", tmp_path)
    result = subprocess.run([analyze, "verify", str(tmp_path / f"{AUDIT_SHIP_UNIT}.timer"),
                             str(tmp_path / f"{AUDIT_SHIP_UNIT}.service")], capture_output=True, text=True)
    # verify also checks ExecStart's binary; the shipper is installed by the bundle, not on this machine.
    problems = [line for line in result.stderr.splitlines() if AUDIT_SHIPPER not in line and line.strip()]
    assert not problems, result.stderr
    assert Path(tmp_path / f"{AUDIT_SHIP_UNIT}.timer").read_text().count("OnCalendar=*-*-* *:05:00") == 1
