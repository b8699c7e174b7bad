"""An S3-compatible endpoint on loopback for the sandbox's backups: moto's server app over TLS, with IAM
enforcement, recording every request it answers. Used by the backup tests and bench/backup.py (moto is a
development dependency: nothing on a host imports this).

    endpoint = S3Endpoint(state_dir, port).start()
    admin = endpoint.admin()                        # a boto3 client that may do anything
    keys = endpoint.user("pg", policy_json)         # credentials that carry exactly that policy
    endpoint.enforce()                              # from now on every request is signed and authorized
    ...
    endpoint.stop(); endpoint.start()               # the same state on the same port again

Two things a real client would trip over in werkzeug's TLS server are fixed here: connections are closed
with a TLS close_notify (werkzeug closes the socket, OpenSSL 3 clients such as pgBackRest then report
"unexpected eof while reading" on every response), and TCP_NODELAY is set (else each request waits out
the peer's delayed ACK: about 45 ms instead of 5).
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from infra.sandbox.mapping import LOOPBACK, SandboxS3

REGION = "eu-west-1"
ACRONYMS = {"Id": "ID", "KmsMasterKeyId": "KMSMasterKeyID", "SseAlgorithm": "SSEAlgorithm"}
# Header values worth keeping per request (lower-case WSGI names): what the IAM check needs to see.
RECORDED_HEADERS = ("HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION", "HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION_AWS_KMS_KEY_ID",
                    "HTTP_AUTHORIZATION")


def test_certificate(folder: Path, names: tuple[str, ...] = (LOOPBACK, "localhost")) -> tuple[Path, Path]:
    """A self-signed server certificate for `names` (as DNS names too: pgBackRest matches the host it
    connects to against DNS names only) and its key; returns (cert, key) paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandbox-s3")])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "s3-cert.pem", folder / "s3-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.chmod(0o644)  # the hosts' processes (postgres) read it as their CA file
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class Request:
    method: str
    path: str  # as sent, percent-encoded
    query: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # only for a multi-object delete (POST ?delete): the keys it names

    @property
    def access_key(self) -> str:
        auth = self.headers.get("HTTP_AUTHORIZATION", "")
        return auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""


class S3Endpoint:
    def __init__(self, folder: Path, port: int):
        self.folder, self.port = Path(folder), port
        self.cert, self.key = test_certificate(self.folder)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None
        self._app = None
        self._admin_keys: dict[str, str] | None = None

    # ---- the server ------------------------------------------------------------------------------------
    def _recording_app(self, environ, start_response):
        status: list[int] = []

        def recording_start(code, headers, exc_info=None):
            status.append(int(code.split(" ", 1)[0]))
            return start_response(code, headers, exc_info)

        body = b""
        if environ["REQUEST_METHOD"] == "POST" and "delete" in environ.get("QUERY_STRING", ""):
            import io

            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)
        result = self._app(environ, recording_start)
        with self._lock:
            self.requests.append(Request(
                method=environ["REQUEST_METHOD"],
                path=environ.get("RAW_URI", environ.get("PATH_INFO", "")).split("?", 1)[0],
                query=environ.get("QUERY_STRING", ""),
                status=status[0] if status else 0,
                headers={k: environ[k] for k in RECORDED_HEADERS if k in environ},
                body=body,
            ))
        return result

    def start(self) -> S3Endpoint:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import ThreadedWSGIServer

        if self._app is None:  # one app for the endpoint's life: a restart keeps moto's state
            self._app = DomainDispatcherApplication(create_backend_app)

        class Server(ThreadedWSGIServer):
            def get_request(self):
                connection, address = super().get_request()
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return connection, address

            def shutdown_request(self, request):
                try:
                    request.unwrap()  # close_notify before the socket closes
                except (OSError, ValueError):
                    pass
                super().shutdown_request(request)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert), str(self.key))
        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args, **kwargs):  # the endpoint keeps its own record (self.requests)
                pass

        try:
            self._server = Server(LOOPBACK, self.port, self._recording_app, QuietHandler, ssl_context=context)
        except OSError as error:
            raise OSError(error.errno, f"S3 endpoint: cannot listen on {LOOPBACK}:{self.port} ({error.strerror}); "
                                       "another run of the backup tests or bench on these ports?") from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    # ---- IAM -------------------------------------------------------------------------------------------
    def _auth(self, count: str) -> None:
        import requests

        requests.post(f"{self.url}/moto-api/reset-auth", data=count.encode(), verify=str(self.cert), timeout=10)

    def enforce(self) -> None:
        """Every request from now on must be signed by a known key and allowed by its policy."""
        self._auth("0")

    def relax(self) -> None:
        self._auth("inf")

    def client(self, service: str, keys: dict[str, str] | None = None):
        import boto3

        keys = keys or {"AccessKeyId": "setup", "SecretAccessKey": "setup"}
        return boto3.client(service, region_name=REGION, endpoint_url=self.url, verify=str(self.cert),
                            aws_access_key_id=keys["AccessKeyId"], aws_secret_access_key=keys["SecretAccessKey"])

    def user(self, name: str, policy: str) -> dict[str, str]:
        """An IAM user whose only policy is `policy`; its access key (AccessKeyId, SecretAccessKey)."""
        iam = self.client("iam", self._admin_keys)
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="policy", PolicyDocument=policy)
        return iam.create_access_key(UserName=name)["AccessKey"]

    def create_admin(self) -> dict[str, str]:
        self._admin_keys = self.user("admin", json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        return self._admin_keys

    def admin(self, service: str = "s3"):
        return self.client(service, self._admin_keys)

    def sandbox_s3(self, keys: dict[str, str]) -> SandboxS3:
        return SandboxS3(port=self.port, ca_file=str(self.cert), access_key_id=keys["AccessKeyId"],
                         secret_access_key=keys["SecretAccessKey"])

    def requests_by(self, keys: dict[str, str]) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.access_key == keys["AccessKeyId"]]


def moto_policy(policy: str) -> tuple[str, list[str]]:
    """`policy` as moto 5.2 can enforce it, and each change made, said in words.

    moto evaluates a statement's Condition only against values it is handed, and it hands none for S3,
    so any condition denies: ListBucket's `s3:prefix` condition is dropped (the tests check the prefix of
    every listing against the rendered policy themselves). moto authorizes a multi-object delete
    (POST ?delete) as DeleteObject on the bucket, where AWS checks DeleteObject on each key: the bucket's
    ARN is added beside the object ARNs of a DeleteObject grant."""
    document = json.loads(policy)
    changes, added = [], []
    for statement in document["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        if "Condition" in statement and any(a.startswith("s3:") for a in actions):
            changes.append(f"dropped the condition {json.dumps(statement['Condition'], sort_keys=True)} of {actions}")
            del statement["Condition"]
        if "s3:DeleteObject" in actions:
            buckets = sorted({r.split("/", 1)[0] for r in statement["Resource"] if r.startswith("arn:aws:s3:::")})
            added.append({"Effect": "Allow", "Action": ["s3:DeleteObject"], "Resource": buckets})
            changes.append(f"allowed s3:DeleteObject on {buckets} itself (moto's multi-object delete)")
    document["Statement"] += added
    return json.dumps(document, sort_keys=True), changes


# ---- the backup bucket as the program declares it -----------------------------------------------------
def pascal(value):
    """The provider's camelCase properties as S3's API names them."""
    if isinstance(value, list):
        return [pascal(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            name = key[0].upper() + key[1:]
            out[ACRONYMS.get(name, name)] = pascal(item)
        return out
    return value


def bucket_config(evaluation, bucket: str) -> dict[str, dict]:
    """The program's settings resources of `bucket` (versioning, encryption, lifecycle...), by type."""
    return {r.type.split(":")[-1]: r.props for r in evaluation.resources
            if r.props.get("bucket") == bucket and r.type != "aws:s3/bucket:Bucket"}


def host_policy(evaluation, host: str) -> str:
    """The PostgreSQL host's instance-role policy as the program renders it."""
    return next(r.props["policy"] for r in evaluation.resources if r.name == f"postgres-{host}-access")


def declare_bucket(s3, kms, evaluation, bucket: str, alias: str) -> str:
    """Create the bucket with the program's versioning, encryption and lifecycle; returns its KMS key's ARN."""
    key_arn = kms.create_key(Description="backups")["KeyMetadata"]["Arn"]
    kms.create_alias(AliasName=alias, TargetKeyId=key_arn)
    config = bucket_config(evaluation, bucket)
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=pascal(config["BucketVersioning"]["versioningConfiguration"]))
    (rule,) = pascal(config["BucketServerSideEncryptionConfiguration"]["rules"])
    rule["ApplyServerSideEncryptionByDefault"]["KMSMasterKeyID"] = key_arn  # the program's is an offline ARN
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [rule]})
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={
        "Rules": pascal(config["BucketLifecycleConfiguration"]["rules"])})
    return key_arn


def backup_endpoint(folder: Path, port: int, stack: str, config: dict[str, str]) -> tuple[S3Endpoint, dict, str]:
    """An endpoint with the stack's backup bucket and a user carrying the PostgreSQL hosts' rendered policy
    (as moto can enforce it), IAM enforced from then on: (endpoint, that user's keys, the rendered policy)."""
    from infra.engine import evaluate
    from infra.settings import load_settings
    from infra.topology import build_topology

    topology = build_topology(load_settings(config, stack))
    evaluation = evaluate(stack, config)
    policy = host_policy(evaluation, topology.postgres[0].name)  # every member's is the same but for its bundles
    endpoint = S3Endpoint(folder, port).start()
    try:
        endpoint.create_admin()
        declare_bucket(endpoint.admin("s3"), endpoint.admin("kms"), evaluation, topology.backup_bucket,
                       topology.backup_key_alias)
        keys = endpoint.user("pg-hosts", moto_policy(policy)[0])
        endpoint.enforce()
    except BaseException:
        endpoint.stop()
        raise
    return endpoint, keys, policy
