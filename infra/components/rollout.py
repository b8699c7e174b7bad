"""Rollout: AWS Systems Manager carries a new bundle to the hosts of each role one at a time.

One Command document runs the host agent's `fetch-apply` (infra/hostagent/agent.py); one State
Manager association per role targets that role's instances with max_concurrency 1 and
max_errors 0. Its parameter is the role's digests, so a changed bundle updates the association,
and State Manager runs an updated association at once. The agent returns only when its host is
healthy again (a Patroni leader switches over first), so the first host that does not come back
stops the rollout with the others untouched; `pulumi up` waits for the outcome and fails with it.
Roles roll in order (etcd, then PostgreSQL, then the rest), never two quorum groups at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from infra.bundle import AGENT_COMMAND

ROLE_ORDER = ("etcd", "postgres", "clickhouse", "monitoring", "grafana")
# Long enough for every host of a role: a Patroni replica may need minutes to catch up after a restart.
ROLLOUT_TIMEOUT_SECONDS = {"etcd": 1200, "postgres": 3600}
DEFAULT_ROLLOUT_TIMEOUT_SECONDS = 1200
HOST_TIMEOUT_SECONDS = 1800
# Host names and hex digests only: nothing a shell could read as code reaches the command line.
DIGESTS_PATTERN = r'^\{("[a-z0-9-]+": "[0-9a-f]{64}"(, )?)+\}$'
SECRETS_PATTERN = r'^[0-9a-f]{64}$'


def apply_document(environment: str) -> str:
    return json.dumps({
        "schemaVersion": "2.2",
        "description": f"betting {environment}: apply this host's bundle with the host agent and wait until healthy",
        "parameters": {
            "digests": {"type": "String", "allowedPattern": DIGESTS_PATTERN,
                        "description": "JSON map of host name to the sha256 of its bundle"},
            # A renewed certificate changes no bundle: this digest of the role's secret versions re-runs the
            # association, and the agent rewrites the secret files and reloads what serves them.
            "secrets": {"type": "String", "allowedPattern": SECRETS_PATTERN,
                        "description": "sha256 of the role's secret parameter versions"},
        },
        "mainSteps": [{
            "action": "aws:runShellScript",
            "name": "applyBundle",
            "inputs": {"timeoutSeconds": str(HOST_TIMEOUT_SECONDS),
                       "runCommand": [f"{AGENT_COMMAND} fetch-apply --digests '{{{{ digests }}}}' "
                                      "--secrets '{{ secrets }}'"]},
        }],
    }, indent=1, sort_keys=True)


def digests_parameter(digests: dict[str, str]) -> str:
    return json.dumps(dict(sorted(digests.items())))


def secrets_revision(versions: dict[str, int | None]) -> str:
    """One digest of a host's secret parameters' versions, by name: what a rotated secret changes in the rollout."""
    return hashlib.sha256(json.dumps({k: v or 0 for k, v in sorted(versions.items())}).encode()).hexdigest()


def secrets_parameter(revisions: list[str]) -> str:
    """One digest of the role's hosts' secrets revisions (secrets_revision), in host order."""
    return hashlib.sha256(json.dumps(revisions).encode()).hexdigest()


@dataclass
class RolloutArgs:
    environment: str
    # role -> [(host name, instance id, digest)] in the role's host order
    hosts: dict[str, list[tuple[str, pulumi.Input[str], str]]]
    published: list[pulumi.Resource]  # the bundle objects and digest parameters the hosts fetch
    tags: dict[str, str]
    # host -> secrets_revision of every secret it reads (they change without a bundle: a renewal, a rotation)
    secret_revisions: dict[str, pulumi.Input[str]] = field(default_factory=dict)


class Rollout(pulumi.ComponentResource):
    document: aws.ssm.Document
    associations: dict[str, aws.ssm.Association]

    def __init__(self, name: str, args: RolloutArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:delivery:Rollout", name, None, opts)
        self.document = aws.ssm.Document(
            f"{name}-apply-bundle",
            name=f"betting-{args.environment}-apply-bundle",
            document_type="Command",
            document_format="JSON",
            content=apply_document(args.environment),
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.associations = {}
        previous: list[pulumi.Resource] = []
        for role in ROLE_ORDER:
            hosts = args.hosts.get(role, [])
            if not hosts:
                continue
            association = aws.ssm.Association(
                f"{name}-{role}",
                association_name=f"betting-{args.environment}-{role}",
                name=self.document.name,
                document_version=self.document.latest_version,
                targets=[aws.ssm.AssociationTargetArgs(key="InstanceIds", values=[instance for _, instance, _ in hosts])],
                parameters={
                    "digests": digests_parameter({host: d for host, _, d in hosts}),
                    "secrets": pulumi.Output.all(*(args.secret_revisions.get(host, "") for host, _, _ in hosts))
                    .apply(secrets_parameter),
                },
                max_concurrency="1",
                max_errors="0",
                compliance_severity="CRITICAL",
                # `pulumi up` waits for the role's rollout and fails when a host does not come back healthy.
                wait_for_success_timeout_seconds=ROLLOUT_TIMEOUT_SECONDS.get(role, DEFAULT_ROLLOUT_TIMEOUT_SECONDS),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[*args.published, *previous]),
            )
            self.associations[role] = association
            previous = [association]

        self.register_outputs({"document": self.document.name,
                               "associations": {role: a.association_name for role, a in self.associations.items()}})
