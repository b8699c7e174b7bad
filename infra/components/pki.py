"""CertificateAuthority: the stack's private CA and every TLS host's key and certificate (infra/pki.py says which),
made with pulumi-tls and stored as SSM SecureString parameters that the hosts read like their other secrets.

Renewal is a `pulumi up`: inside its early-renewal window a certificate is replaced, its parameter takes the new
value (a new parameter version), and the rollout, whose association carries the versions of every secret its role's
hosts read (infra/components/rollout.py), runs the agent on that role's hosts one at a time; the agent rewrites the
files and reloads the daemons that serve them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_tls as tls

from infra import pki
from infra.platforms.aws import create_secret_parameter
from infra.topology import Topology

ALGORITHM = {"algorithm": "ECDSA", "ecdsa_curve": "P256"}


@dataclass
class CertificateAuthorityArgs:
    environment: str
    topology: Topology
    key_arn: pulumi.Input[str]  # encrypts the parameters (the data key)
    registry: dict[str, aws.ssm.Parameter]  # AwsContext.secret_parameters: the rollout reads their versions


class CertificateAuthority(pulumi.ComponentResource):
    ca_certificate: pulumi.Output[str]
    parameters: dict[str, list[aws.ssm.Parameter]]  # host -> the parameters it reads (CA certificate, own pair)

    def __init__(self, name: str, args: CertificateAuthorityArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("betting:security:CertificateAuthority", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        organization = pki.organization(args.environment)
        ca_key = tls.PrivateKey(f"{name}-ca-key", **ALGORITHM, opts=child)
        ca_cert = tls.SelfSignedCert(
            f"{name}-ca-cert",
            private_key_pem=ca_key.private_key_pem,
            is_ca_certificate=True,
            subject=tls.SelfSignedCertSubjectArgs(common_name=f"{organization} CA", organization=organization),
            allowed_uses=list(pki.CA_USES),
            validity_period_hours=pki.CA_VALIDITY_HOURS,
            early_renewal_hours=pki.CA_EARLY_RENEWAL_HOURS,
            opts=child,
        )
        self.ca_certificate = ca_cert.cert_pem

        def parameter(suffix: str, secret: str, value: pulumi.Input[str]) -> aws.ssm.Parameter:
            return create_secret_parameter(f"{name}-{suffix}-parameter", args.environment, secret, pulumi.Output.secret(value),
                                           args.key_arn, self, registry=args.registry)

        ca_parameter = parameter("ca-cert", pki.CA_CERT_PARAMETER, ca_cert.cert_pem)
        parameter("ca-key", pki.CA_KEY_PARAMETER, ca_key.private_key_pem)  # no host reads it: the next `pulumi up` does
        self.parameters = {}
        for ident in pki.identities(args.topology):
            host = ident.host.name
            key = tls.PrivateKey(f"{name}-{host}-key", **ALGORITHM, opts=child)
            request = tls.CertRequest(
                f"{name}-{host}-request",
                private_key_pem=key.private_key_pem,
                subject=tls.CertRequestSubjectArgs(common_name=ident.common_name, organization=organization),
                dns_names=list(ident.dns_names),
                opts=child,
            )
            cert = tls.LocallySignedCert(
                f"{name}-{host}-cert",
                cert_request_pem=request.cert_request_pem,
                ca_private_key_pem=ca_key.private_key_pem,
                ca_cert_pem=ca_cert.cert_pem,
                allowed_uses=list(pki.HOST_USES),
                validity_period_hours=pki.HOST_VALIDITY_HOURS,
                early_renewal_hours=pki.HOST_EARLY_RENEWAL_HOURS,
                opts=child,
            )
            own = [parameter(f"{host}-key", ident.key_parameter, key.private_key_pem),
                   parameter(f"{host}-cert", ident.cert_parameter, cert.cert_pem)]
            self.parameters[host] = [ca_parameter, *own]

        self.register_outputs({"ca_certificate": self.ca_certificate})
