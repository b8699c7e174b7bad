"""The seam between a host and AWS: the request the stub and the agent make for a bundle, signed with
credentials that carry exactly the host's IAM policy from the program, against moto with IAM
enforcement on. Each host may read its own bundle and nothing of another host's.

What moto cannot see:
- the SSM half: moto 5.2 authorizes SSM actions against Resource "*" only, so an ARN-scoped grant
  can be neither allowed nor denied there (tests/test_delivery.py checks the digest parameter's ARN);
- the AWS CLI's mapping of `aws s3api get-object` to GetObject (the request here is that API call,
  with the bucket and key the stub's and agent's command lines use);
- the kms:ViaService decryption of the SSE-KMS object, and real AWS's evaluation of conditions
  (moto's is partial); the policy is attached to a user here, where the host has it on its role.
"""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import set_initial_no_auth_action_count

from infra.bundle import digest_parameter_name
from infra.engine import OFFLINE_ACCOUNT, evaluate
from infra.hostagent import agent, stub
from infra.settings import load_settings
from infra.topology import build_topology
from tests.aws_users import client, user_with
from tests.conftest import stack_config

REGION = "eu-west-1"
MOTO_ACCOUNT = "123456789012"  # moto's account: the offline plan's account is the same, so ARNs match as rendered
HOSTS = ("pg-1", "etcd-1", "monitoring-1")




@pytest.fixture
def aws_env(monkeypatch):
    for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "setup")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "setup")


@mock_aws
@set_initial_no_auth_action_count(3)  # create the admin user, its policy and its key; everything after is signed
def test_each_host_reads_its_own_bundle_and_digest_and_nothing_of_another_host(aws_env):
    assert OFFLINE_ACCOUNT == MOTO_ACCOUNT
    settings = load_settings(stack_config("prod"), "prod")
    topology = build_topology(settings)
    evaluation = evaluate("prod", stack_config("prod"))
    policies = {r.name.removesuffix("-access"): r.props["policy"] for r in evaluation.resources
                if r.type == "aws:iam/rolePolicy:RolePolicy"}
    objects = {r.props["tags"]["Host"]: r for r in evaluation.resources if r.type == "aws:s3/bucketObjectv2:BucketObjectv2"}

    admin = user_with(boto3.client("iam", region_name=REGION), "admin", json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    iam, s3, ssm = (client(service, admin) for service in ("iam", "s3", "ssm"))
    s3.create_bucket(Bucket=topology.bundle_bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    configs = {}
    for host in HOSTS:
        obj = objects[host]
        content_digest = obj.props["key"].split("/")[-1].removesuffix(".json")
        s3.put_object(Bucket=topology.bundle_bucket, Key=obj.props["key"], Body=obj.props["content"].encode())
        ssm.put_parameter(Name=digest_parameter_name("prod", host), Value=content_digest, Type="String")
        configs[host] = {"host": host, "region": REGION, "bucket": topology.bundle_bucket,
                         "digest_parameter": digest_parameter_name("prod", host), "digest": content_digest}

    for host in HOSTS:
        (policy,) = [p for name, p in policies.items() if name.endswith(f"-{host}")]
        keys = user_with(iam, f"host-{host}", policy)
        host_s3 = client("s3", keys)
        config = configs[host]
        # What the stub does at boot, then what the agent does on a rollout.
        for key in (stub.bundle_key(config, config["digest"]), agent.bundle_key(config, config["digest"])):
            body = host_s3.get_object(Bucket=config["bucket"], Key=key)["Body"].read()
            assert body == objects[host].props["content"].encode()
        for other in (h for h in HOSTS if h != host):
            with pytest.raises(ClientError, match="AccessDenied"):
                host_s3.get_object(Bucket=config["bucket"], Key=agent.bundle_key(configs[other], configs[other]["digest"]))
        with pytest.raises(ClientError, match="AccessDenied"):
            host_s3.put_object(Bucket=config["bucket"], Key=agent.bundle_key(config, "0" * 64), Body=b"{}")
