"""IAM users on moto that carry exactly one policy: how the tests sign requests as a host's role would."""

from __future__ import annotations

import boto3

REGION = "eu-west-1"


def client(service: str, keys: dict):
    return boto3.client(service, region_name=REGION, aws_access_key_id=keys["AccessKeyId"],
                        aws_secret_access_key=keys["SecretAccessKey"])


def user_with(iam, name: str, policy: str) -> dict:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="policy", PolicyDocument=policy)
    return iam.create_access_key(UserName=name)["AccessKey"]
