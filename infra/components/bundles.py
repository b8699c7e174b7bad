"""HostBundles: the bucket of every host's bundle, one content-addressed object per host
(`bundles/<host>/<sha256>.json`, SSE-KMS) and the SSM parameter naming each host's current one.

A change to any rendered file, setting or rule changes a bundle's digest, hence its object key
and parameter value; no instance changes. The rollout (infra/components/rollout.py) carries the
digests to the hosts one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.bundle import bundle_key, digest, digest_parameter_name, render_bundle
from infra.hosts import HostSpec
from infra.platforms.aws import abort_incomplete_uploads_rule, create_private_bucket
from infra.settings import StackSettings
from infra.topology import Topology

OLD_BUNDLE_DAYS = 30  # a host that has not rolled yet keeps its local copy; S3 keeps replaced ones a while


@dataclass
class HostBundlesArgs:
    settings: StackSettings
    topology: Topology
    specs: tuple[HostSpec, ...]
    key_arn: pulumi.Input[str]
    tags: dict[str, str]


class HostBundles(pulumi.ComponentResource):
    bucket: aws.s3.Bucket
    digests: dict[str, str]  # host -> sha256 of its bundle, known before anything is created
    published: dict[str, list[pulumi.Resource]]  # host -> its bundle object and digest parameter

    def __init__(self, name: str, args: HostBundlesArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:delivery:HostBundles", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        environment = args.settings.environment
        self.bucket = create_private_bucket(f"{name}-bucket", args.topology.bundle_bucket, args.key_arn, args.tags, self,
                                            purpose="host-bundles")
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-bucket-lifecycle",
            bucket=self.bucket.id,
            rules=[aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="replaced-bundles",
                status="Enabled",
                filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix="bundles/"),
                noncurrent_version_expiration=aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
                    noncurrent_days=OLD_BUNDLE_DAYS),
            ), abort_incomplete_uploads_rule()],
            opts=child,
        )
        self.digests, self.published = {}, {}
        for spec in args.specs:
            host = spec.host.name
            content = render_bundle(spec, args.settings, args.topology)
            self.digests[host] = digest(content)
            obj = aws.s3.BucketObjectv2(
                f"{name}-{host}",
                bucket=self.bucket.id,
                key=bundle_key(host, self.digests[host]),
                content=content.decode(),
                content_type="application/json",
                server_side_encryption="aws:kms",
                kms_key_id=args.key_arn,
                tags={**args.tags, "Host": host},
                opts=child,
            )
            parameter = aws.ssm.Parameter(
                f"{name}-{host}-digest",
                name=digest_parameter_name(environment, host),
                type="String",
                value=self.digests[host],
                description=f"sha256 of {host}'s current bundle in s3://{args.topology.bundle_bucket}",
                # The parameter names an object only once the object exists.
                opts=pulumi.ResourceOptions(parent=self, depends_on=[obj]),
            )
            self.published[host] = [obj, parameter]

        self.register_outputs({"bucket": self.bucket.bucket, "digests": self.digests})
