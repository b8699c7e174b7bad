"""HostSpec -> EC2: instance, encrypted data volume, instance role scoped to what the host needs, DNS name.

Called by components, which pass themselves as `parent`; every resource is named from the
component's name and the host's name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from infra.bundle import bundle_prefix, digest_parameter_name
from infra.hosts import HostSpec
from infra.render.cloudinit import render_cloud_init
from infra.topology import ssm_parameter_name

DATA_DEVICE = "/dev/sdf"
ROOT_VOLUME_GIB = 20
SSM_CORE_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"  # Session Manager and Run Command
# Config reaches a running host as a bundle, never through user data; an image only by a deliberate roll.
IGNORED_INSTANCE_CHANGES = ["user_data", "ami"]
STATEFUL_ROLES = ("postgres", "etcd", "monitoring", "clickhouse")
# A multipart upload a writer abandoned (a pgBackRest push that died, a shipper killed mid-file) is billed
# until something aborts it; every bucket's lifecycle does, after this many days.
ABORT_INCOMPLETE_UPLOAD_DAYS = 7


def service_trust_policy(service: str) -> str:
    """A role's trust policy: only this AWS service may assume it."""
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}]})


def abort_incomplete_uploads_rule() -> aws.s3.BucketLifecycleConfigurationRuleArgs:
    """The whole-bucket lifecycle rule every bucket carries."""
    return aws.s3.BucketLifecycleConfigurationRuleArgs(
        id="abort-incomplete-uploads",
        status="Enabled",
        filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=""),
        abort_incomplete_multipart_upload=aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
            days_after_initiation=ABORT_INCOMPLETE_UPLOAD_DAYS),
    )


@dataclass
class AwsContext:
    """What every host needs from the foundation: network, keys, image, account."""

    environment: str
    region: str
    account_id: pulumi.Input[str]
    ami_id: pulumi.Input[str]
    vpc_id: pulumi.Input[str]
    subnet_ids: dict[str, pulumi.Input[str]]  # by availability zone
    security_group_ids: dict[str, pulumi.Input[str]]  # by SecurityRole
    zone_id: pulumi.Input[str]
    data_key_arn: pulumi.Input[str]  # encrypts volumes and SSM SecureStrings
    bundle_bucket: str = ""  # the hosts' bundles: bundles/<host>/<sha256>.json, SSE-KMS with data_key_arn
    boot_dependencies: dict[str, list[pulumi.Resource]] = field(default_factory=dict)  # host -> its published bundle
    # Every secret parameter the program makes, by its name under /betting/<env>/ (create_secret_parameter adds each):
    # a host's rollout carries the versions of those it reads, so a rotated secret re-runs its association.
    secret_parameters: dict[str, aws.ssm.Parameter] = field(default_factory=dict)
    roll_host: str = ""  # `infra roll`: this host's image and stub may change in this update
    bucket_key_arns: dict[str, pulumi.Input[str]] = field(default_factory=dict)  # bucket name -> its KMS key
    protect_data: bool = False  # prod: data volumes and stateful instances are protected
    tags: dict[str, str] = field(default_factory=dict)
    amp_workspace_arn: pulumi.Input[str] | None = None  # the hosts' HostSpec.workspace_actions apply to it alone


@dataclass
class AwsHost:
    instance: aws.ec2.Instance
    volume: aws.ebs.Volume | None
    role: aws.iam.Role


def _access_policy(spec: HostSpec, ctx: AwsContext) -> pulumi.Output[str]:
    """Exactly the SSM parameters, KMS keys and bucket prefixes this host uses; nothing wider."""
    parameter_names = [ssm_parameter_name(ctx.environment, name) for name in spec.secret_names]
    grants = spec.bucket_grants
    keyed = [g for g in grants if g.bucket in ctx.bucket_key_arns]
    bucket_keys = [ctx.bucket_key_arns[g.bucket] for g in keyed]
    if spec.workspace_actions and ctx.amp_workspace_arn is None:
        raise ValueError(f"{spec.host.name} needs {', '.join(spec.workspace_actions)} but the stack has no AMP workspace")

    def document(args: list) -> str:
        account, data_key, workspace, *key_arns = args
        # A put-only grant encrypts (GenerateDataKey) and never decrypts; the others do both.
        keys = sorted({arn for g, arn in zip(keyed, key_arns, strict=True) if not g.put_only})
        put_keys = sorted({arn for g, arn in zip(keyed, key_arns, strict=True) if g.put_only} - set(keys))
        # Its own bundles and the parameter naming the current one: what the stub and the agent fetch.
        digest_parameter = digest_parameter_name(ctx.environment, spec.host.name)
        statements = [
            {"Sid": "ReadOwnBundleDigest", "Effect": "Allow", "Action": ["ssm:GetParameter"],
             "Resource": [f"arn:aws:ssm:{ctx.region}:{account}:parameter{digest_parameter}"]},
            {"Sid": "ReadOwnBundles", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [f"arn:aws:s3:::{ctx.bundle_bucket}/{bundle_prefix(spec.host.name)}*"]},
            {"Sid": "DecryptOwnBundles", "Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": [data_key],
             "Condition": {"StringEquals": {"kms:ViaService": f"s3.{ctx.region}.amazonaws.com"}}},
        ]
        if parameter_names:
            statements.append({
                "Sid": "ReadOwnSecrets",
                "Effect": "Allow",
                "Action": ["ssm:GetParameter"],
                "Resource": [f"arn:aws:ssm:{ctx.region}:{account}:parameter{name}" for name in parameter_names],
            })
            statements.append({
                "Sid": "DecryptOwnSecrets",
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": [data_key],
                "Condition": {"StringEquals": {"kms:ViaService": f"ssm.{ctx.region}.amazonaws.com"}},
            })
        for grant in grants:
            if grant.list:
                statements.append({
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket"],
                    "Resource": [f"arn:aws:s3:::{grant.bucket}"],
                    "Condition": {"StringLike": {"s3:prefix": [f"{grant.prefix}*"]}},
                })
            objects = f"arn:aws:s3:::{grant.bucket}/{grant.prefix}*"
            statements.append({"Effect": "Allow", "Action": list(grant.actions), "Resource": [objects]})
        if keys:
            statements.append({"Effect": "Allow", "Action": ["kms:Decrypt", "kms:GenerateDataKey"], "Resource": keys})
        if put_keys:
            statements.append({"Sid": "EncryptAuditLogs", "Effect": "Allow", "Action": ["kms:GenerateDataKey"],
                               "Resource": put_keys})
        if spec.workspace_actions:
            statements.append({"Sid": "ManagedPrometheus", "Effect": "Allow", "Action": list(spec.workspace_actions),
                               "Resource": [workspace]})
        return json.dumps({"Version": "2012-10-17", "Statement": statements}, sort_keys=True)

    workspace = ctx.amp_workspace_arn if spec.workspace_actions else ""
    return pulumi.Output.all(ctx.account_id, ctx.data_key_arn, workspace, *bucket_keys).apply(document)


def create_host(prefix: str, spec: HostSpec, ctx: AwsContext, parent: pulumi.Resource,
                boots_after: list[pulumi.Resource] | None = None) -> AwsHost:
    """`boots_after`: what must exist before first boot (its bundle, the SSM parameters it reads).

    The instance boots from the stub (infra/render/cloudinit.py), which never changes with
    config; changes arrive as bundles rolled by SSM. `pulumi up` therefore ignores changes to
    `userData` and `ami`: a new stub or image reaches a host only when it is replaced on purpose,
    one host at a time (`infra roll`). A replacement deletes the old instance first, so its data
    volume is detached before the new instance attaches it.
    """
    host = spec.host
    name = f"{prefix}-{host.name}"
    stateful = host.role in STATEFUL_ROLES
    opts = pulumi.ResourceOptions(parent=parent)
    tags = {**ctx.tags, "Name": host.fqdn, "Role": host.role, "Host": host.name}

    role = aws.iam.Role(
        f"{name}-role",
        assume_role_policy=service_trust_policy("ec2.amazonaws.com"),
        tags=tags,
        opts=opts,
    )
    aws.iam.RolePolicyAttachment(f"{name}-ssm-core", role=role.name, policy_arn=SSM_CORE_POLICY, opts=opts)
    aws.iam.RolePolicy(f"{name}-access", role=role.id, policy=_access_policy(spec, ctx), opts=opts)
    profile = aws.iam.InstanceProfile(f"{name}-profile", role=role.name, opts=opts)

    instance = aws.ec2.Instance(
        name,
        ami=ctx.ami_id,
        instance_type=spec.instance_type,
        subnet_id=ctx.subnet_ids[host.availability_zone],
        vpc_security_group_ids=[ctx.security_group_ids[host.role]],
        associate_public_ip_address=False,
        iam_instance_profile=profile.name,
        metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_tokens="required", http_endpoint="enabled",
                                                             http_put_response_hop_limit=1),
        root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(volume_size=ROOT_VOLUME_GIB, volume_type="gp3",
                                                              encrypted=True, kms_key_id=ctx.data_key_arn),
        user_data=render_cloud_init(host, ctx.environment, ctx.region, ctx.bundle_bucket).decode(),
        # Termination protection: the console or the API cannot terminate a stateful prod host by mistake.
        disable_api_termination=stateful and ctx.protect_data,
        # pulumi-aws 7 refuses to destroy a termination-protected instance unless forceDestroy is already in
        # its state, so without it `infra roll` could never replace one (the delete step would fail after
        # the volume was detached). Pulumi's own guard is `protect`, which a roll lifts for one host.
        force_destroy=stateful and ctx.protect_data,
        tags=tags,
        opts=pulumi.ResourceOptions(
            parent=parent, depends_on=[*(boots_after or []), *ctx.boot_dependencies.get(host.name, [])],
            ignore_changes=[] if host.name == ctx.roll_host else IGNORED_INSTANCE_CHANGES,
            protect=stateful and ctx.protect_data, delete_before_replace=spec.volume is not None),
    )

    volume = None
    if spec.volume is not None:
        settings = spec.volume.settings
        volume = aws.ebs.Volume(
            f"{name}-{spec.volume.purpose}",
            availability_zone=host.availability_zone,
            size=settings.size_gib,
            type=settings.type,
            iops=settings.iops,
            throughput=settings.throughput,
            encrypted=True,
            kms_key_id=ctx.data_key_arn,
            tags={**tags, "Name": f"{host.fqdn} {spec.volume.purpose}", "Role": spec.volume.purpose},
            # The data outlives any instance: replacing a host reattaches the same volume.
            opts=pulumi.ResourceOptions(parent=parent, protect=ctx.protect_data),
        )
        aws.ec2.VolumeAttachment(
            f"{name}-{spec.volume.purpose}-attachment",
            device_name=DATA_DEVICE,
            instance_id=instance.id,
            volume_id=volume.id,
            stop_instance_before_detaching=True,
            opts=opts,
        )

    aws.route53.Record(
        f"{name}-dns",
        zone_id=ctx.zone_id,
        name=host.fqdn,
        type="A",
        ttl=60,
        records=[instance.private_ip],
        opts=opts,
    )
    return AwsHost(instance=instance, volume=volume, role=role)


def create_secret_parameter(resource_name: str, environment: str, secret_name: str, value: pulumi.Input[str],
                            key_arn: pulumi.Input[str], parent: pulumi.Resource,
                            registry: dict[str, aws.ssm.Parameter] | None = None) -> aws.ssm.Parameter:
    """A secret as an SSM SecureString under /betting/<env>/<name>, read by hosts at boot; kept in `registry`
    (AwsContext.secret_parameters) for the rollout."""
    parameter = aws.ssm.Parameter(
        resource_name,
        name=ssm_parameter_name(environment, secret_name),
        type="SecureString",
        key_id=key_arn,
        value=pulumi.Output.secret(value),
        opts=pulumi.ResourceOptions(parent=parent),
    )
    if registry is not None:
        registry[secret_name] = parameter
    return parameter


@dataclass
class PrivateBucket:
    bucket: aws.s3.Bucket
    versioning: aws.s3.BucketVersioning  # what replication waits for: S3 refuses it on an unversioned bucket
    policy: aws.s3.BucketPolicy  # what a service delivering logs waits for: it checks the policy on setup


def create_private_bucket(name: str, bucket_name: str, key_arn: pulumi.Input[str], tags: dict[str, str],
                          parent: pulumi.Resource, purpose: str, object_lock: bool = False,
                          protect: bool = False) -> aws.s3.Bucket:
    """A bucket as the guardrails want every bucket: versioned, SSE-KMS with `key_arn`, private, TLS only."""
    return create_versioned_bucket(name, bucket_name, key_arn, tags, parent, purpose, object_lock, protect).bucket


def create_versioned_bucket(name: str, bucket_name: str, key_arn: pulumi.Input[str], tags: dict[str, str],
                            parent: pulumi.Resource, purpose: str, object_lock: bool = False, protect: bool = False,
                            provider: pulumi.ProviderResource | None = None,
                            extra_statements: Callable[[str], pulumi.Input[list[dict]]] | None = None) -> PrivateBucket:
    """create_private_bucket, with the versioning resource; `provider` puts it in another region;
    `extra_statements(bucket_arn)` adds to the bucket policy (e.g. a service that writes its logs there)."""
    child = pulumi.ResourceOptions(parent=parent, provider=provider)
    bucket = aws.s3.Bucket(
        name,
        bucket=bucket_name,
        object_lock_enabled=object_lock,
        tags={**tags, "Purpose": purpose},
        opts=pulumi.ResourceOptions(parent=parent, protect=protect, provider=provider),
    )
    versioning = aws.s3.BucketVersioning(
        f"{name}-versioning",
        bucket=bucket.id,
        versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(status="Enabled"),
        opts=child,
    )
    aws.s3.BucketServerSideEncryptionConfiguration(
        f"{name}-encryption",
        bucket=bucket.id,
        rules=[aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
            apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                sse_algorithm="aws:kms", kms_master_key_id=key_arn),
            bucket_key_enabled=True,
        )],
        opts=child,
    )
    public_access = aws.s3.BucketPublicAccessBlock(
        f"{name}-public-access",
        bucket=bucket.id,
        block_public_acls=True,
        block_public_policy=True,
        ignore_public_acls=True,
        restrict_public_buckets=True,
        opts=child,
    )
    policy = aws.s3.BucketPolicy(
        f"{name}-tls-only",
        bucket=bucket.id,
        policy=bucket.arn.apply(lambda arn: pulumi.Output.from_input(extra_statements(arn) if extra_statements else []).apply(
            lambda extra: json.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Sid": "DenyInsecureTransport",
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "s3:*",
                    "Resource": [arn, f"{arn}/*"],
                    "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                }, *extra],
            }, sort_keys=True))),
        # S3 rejects a bucket policy while the public-access block is being written.
        opts=pulumi.ResourceOptions(parent=parent, depends_on=[public_access], provider=provider),
    )
    return PrivateBucket(bucket, versioning, policy)
