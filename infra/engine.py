"""Evaluate the Pulumi program offline: Pulumi's own mock engine (pulumi.runtime.set_mocks),
fed the stack file's config, recording every resource the program registers.

This is the official unit-test path, used here for `infra plan`, plan snapshots and the tests.
Computed attributes (ids, ARNs, addresses) get stable fake values; secrets are masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from google.protobuf import json_format
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime.settings import get_root_resource
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from infra.settings import OPTIONAL_SECRET_KEYS, PROJECT, SECRET_KEYS, StackSettings
from infra.stackfile import ROOT, load_stack, read_stack_file
from infra.topology import build_topology

SECRET_MASK = "[secret]"
OFFLINE_ACCOUNT = "123456789012"
OFFLINE_AMI = "ami-0debian12offline0"

# Markers of the Pulumi wire format, as the SDK's serializer writes them.
_SIG = rpc._special_sig_key
_SECRET_SIG = rpc._special_secret_sig
_RESOURCE_SIG = rpc._special_resource_sig
_UNKNOWN = rpc.UNKNOWN


def _plain(value: Any) -> Any:
    """Wire-format value -> plain JSON, secrets masked, resource references as their id."""
    if isinstance(value, dict):
        signature = value.get(_SIG)
        if signature == _SECRET_SIG:
            return SECRET_MASK
        if signature == _RESOURCE_SIG:
            return value.get("id") or value.get("urn")
        if signature is not None:
            return {k: _plain(v) for k, v in value.items() if k != _SIG}
        return {k: _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value == _UNKNOWN:
        return "[unknown]"
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _computed(typ: str, name: str, inputs: dict, region: str = "eu-west-1") -> dict[str, Any]:
    """Attributes AWS would compute, stable per resource name (in the region of the resource's provider)."""
    state: dict[str, Any] = {"arn": f"arn:aws:offline:{region}:{OFFLINE_ACCOUNT}:{typ.split(':')[-1].lower()}/{name}"}
    if typ == "aws:s3/bucket:Bucket":
        state["arn"] = f"arn:aws:s3:::{inputs.get('bucket', name)}"
        state["bucket"] = inputs.get("bucket", name)
    elif typ == "aws:ec2/instance:Instance":
        state["privateIp"] = "10.0.0.10"
    elif typ == "aws:route53/zone:Zone":
        state["zoneId"] = f"Z{name.upper().replace('-', '')}"
    elif typ == "aws:lb/loadBalancer:LoadBalancer":
        state.update(dnsName=f"{name}.elb.{region}.amazonaws.com", zoneId="ZOFFLINELB")
    elif typ == "aws:elasticache/replicationGroup:ReplicationGroup":
        state["primaryEndpointAddress"] = f"master.{name}.cache.amazonaws.com"
    elif typ == "aws:ec2/vpcEndpoint:VpcEndpoint" and inputs.get("vpcEndpointType") == "Gateway":
        state["prefixListId"] = f"pl-{name}"
    elif typ == "aws:amp/workspace:Workspace":  # AWS's shapes, from the id the mock gives (`<name>_id`)
        state["arn"] = f"arn:aws:aps:{region}:{OFFLINE_ACCOUNT}:workspace/{name}_id"
        state["prometheusEndpoint"] = f"https://aps-workspaces.{region}.amazonaws.com/workspaces/{name}_id/"
    elif typ == "aws:kms/key:Key":
        state["keyId"] = f"{name}-key-id"
    elif typ == "aws:cloudwatch/logGroup:LogGroup":
        # AWS's shape (the provider drops the trailing ":*"): a flow log names its group by this ARN.
        state["arn"] = f"arn:aws:logs:{region}:{OFFLINE_ACCOUNT}:log-group:{inputs.get('name', name)}"
    elif typ in ("aws:iam/role:Role", "aws:iam/instanceProfile:InstanceProfile", "aws:elasticache/subnetGroup:SubnetGroup",
                 "aws:elasticache/parameterGroup:ParameterGroup"):
        state["name"] = inputs.get("name", name)
    elif typ == "random:index/randomPassword:RandomPassword":
        state["result"] = "offline-" + "x" * 24
        state["bcryptHash"] = "$2a$10$" + "offline" * 7 + "x" * 4  # the shape of a bcrypt hash (60 characters)
    elif typ == "tls:index/privateKey:PrivateKey":
        state["privateKeyPem"] = "offline-private-key"
    elif typ in ("tls:index/selfSignedCert:SelfSignedCert", "tls:index/locallySignedCert:LocallySignedCert"):
        # Not a secret (a CA certificate shows in the plan as an input of what it signs): marked as computed.
        state["certPem"] = "(certificate: computed by pulumi-tls)"
    elif typ == "tls:index/certRequest:CertRequest":
        state["certRequestPem"] = "(certificate request: computed by pulumi-tls)"
    return state


class OfflineMocks(pulumi_mocks.Mocks):
    def __init__(self) -> None:
        self.provider_regions: dict[str, str] = {}  # explicit aws providers by name -> their region

    def new_resource(self, args: pulumi_mocks.MockResourceArgs):
        if args.typ == "pulumi:providers:aws" and "region" in args.inputs:
            self.provider_regions[args.name] = args.inputs["region"]
        provider = args.provider.split("::")[-2] if args.provider else ""
        computed = _computed(args.typ, args.name, args.inputs, self.provider_regions.get(provider, "eu-west-1"))
        state = {**args.inputs, **{k: v for k, v in computed.items() if k not in args.inputs}}
        resource_id = state.get("bucket") if args.typ == "aws:s3/bucket:Bucket" else f"{args.name}_id"
        return resource_id, state

    def call(self, args: pulumi_mocks.MockCallArgs):
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": OFFLINE_ACCOUNT, "arn": f"arn:aws:iam::{OFFLINE_ACCOUNT}:user/offline", "userId": "offline"}
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": OFFLINE_AMI, "architecture": "x86_64", "name": "debian-12-amd64-offline"}
        return {}


@dataclass
class Registered:
    type: str
    name: str
    urn: str
    parent: str | None
    custom: bool
    props: dict[str, Any]
    # The resource options that decide what `pulumi up` may do to it on a change.
    options: dict[str, Any] = field(default_factory=dict)


class RecordingMonitor(pulumi_mocks.MockMonitor):
    def __init__(self, mocks: pulumi_mocks.Mocks):
        super().__init__(mocks)
        self.registered: list[Registered] = []

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            props = _plain(json_format.MessageToDict(request.object))
            parent = None
            if request.parent and request.parent.split("::")[2].split("$")[-1] != "pulumi:pulumi:Stack":
                parent = request.parent.split("::")[-1]
            options = {"protect": request.protect, "ignoreChanges": sorted(request.ignoreChanges),
                       "deleteBeforeReplace": request.deleteBeforeReplace,
                       "dependsOn": sorted(d.split("::")[-1] for d in request.dependencies),
                       # The explicit provider's name (a reference is "<urn>::<id>"); "" for the default provider.
                       "provider": request.provider.split("::")[-2] if request.provider else ""}
            self.registered.append(Registered(request.type, request.name, response.urn, parent, request.custom, props,
                                              options))
        return response


@dataclass
class Evaluation:
    stack: str
    resources: list[Registered]
    placeholder_secrets: list[str] = field(default_factory=list)
    error: BaseException | None = None
    outputs: dict[str, Any] = field(default_factory=dict)  # stack outputs, secrets masked


def _stack_outputs() -> dict[str, Any]:
    outputs = {}
    for name, value in get_root_resource().outputs.items():
        output = pulumi.Output.from_input(value)
        secret = _sync_await(output._is_secret)
        outputs[name] = SECRET_MASK if secret else _sync_await(output.future())
    return outputs


def evaluate(stack: str, config: dict[str, str] | None = None, secret_values: dict[str, str] | None = None,
             secure_keys: list[str] | None = None) -> Evaluation:
    """Run the program for `stack` under the mock engine and return what it registered.

    Secrets the stack file holds encrypted (or that are set with `pulumi config set --secret`)
    cannot be read without the CLI: a masked placeholder stands in for them, and the plan says so.
    """
    from infra import program

    secure: list[str] = list(secure_keys or [])
    if config is None:
        config, secure = read_stack_file(stack)
    config = dict(config)
    placeholders = []
    for key in SECRET_KEYS + OPTIONAL_SECRET_KEYS:
        full = f"{PROJECT}:{key}"
        if secret_values and key in secret_values:
            config[full] = secret_values[key]
        elif full not in config:  # unset, or encrypted in the stack file: unreadable without the CLI
            config[full] = "offline-placeholder"
            if key in SECRET_KEYS:  # an optional one is only read when its setting asks for it
                placeholders.append(full)
    mocks = OfflineMocks()
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_all_config(config, [f"{PROJECT}:{k}" for k in SECRET_KEYS + OPTIONAL_SECRET_KEYS] + secure)
    pulumi_mocks.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    evaluation = Evaluation(stack, monitor.registered, placeholders)
    try:
        _sync_await(run_pulumi_func(program.run))
        evaluation.outputs = _stack_outputs()
    except Exception as error:  # noqa: BLE001 - reported to the caller, who decides how to fail
        evaluation.error = error
    return evaluation


def evaluate_stack(stack: str, stacks_dir: Path = ROOT / "stacks") -> tuple[StackSettings, Evaluation]:
    """Settings and the program's evaluation of a stack file; raises what the program raised."""
    settings, config, secure = load_stack(stack, stacks_dir)
    evaluation = evaluate(stack, config, secure_keys=secure)
    if evaluation.error is not None:
        raise evaluation.error
    return settings, evaluation


def plan_document(evaluation: Evaluation, settings: StackSettings) -> dict[str, Any]:
    """The plan as `infra plan --json` writes it and plans/<stack>.json keeps it: the resources, and the estimates
    a reviewer reads beside them (how many days each Prometheus volume holds, infra/capacity.py)."""
    from infra.capacity import estimate

    resources = sorted(
        ({"type": r.type, "name": r.name, "parent": r.parent, "props": r.props} for r in evaluation.resources),
        key=lambda r: (r["type"], r["name"]),
    )
    retention = estimate(settings, build_topology(settings)).as_dict()
    return {"stack": evaluation.stack, "environment": settings.environment, "resources": resources,
            "estimates": {"prometheus_retention": retention}}
