"""A sandbox host: the host agent's platform (see infra/hostagent/agent.py DebianHost) for one host
of the local sandbox.

Files go under the host's root (mapping.Layout.host_root). Services are Debian's own systemd
units: the package's unit file from /lib/systemd/system plus the drop-ins the bundle wrote, read
with systemd's rules for what the daemons see (Environment=, EnvironmentFile= in order, $VAR and
${VAR} in ExecStart=, User=, ExecReload= with $MAINPID, KillMode=) and run as processes of the
sandbox. What it cannot do is systemd's supervision (Restart=, cgroups, notify readiness): the
agent's health gates, not the unit type, say when a service is up, on EC2 and here alike.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra.hostagent.envfile import read_environment_file
from infra.sandbox import mapping as m
from infra.topology import SecretNames

SYSTEM_UNITS = Path("/lib/systemd/system")
BUNDLE_UNITS = "/etc/systemd/system"  # the bundle's own units (a host path: under the host's root here)
# What systemd gives every service (systemd.exec(5), "Environment variables in spawned processes").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_STOP_TIMEOUT = 90.0  # systemd's DefaultTimeoutStopSec
# Packages that only matter on EC2: the AWS CLI (SSM secrets; the sandbox keeps its own), the
# file system tools for the EBS volume (a folder here).
EC2_ONLY_PACKAGES = frozenset({"awscli", "xfsprogs"})
# Timers the sandbox never arms: the backup job's tests run its service themselves (run_oneshot), when
# they choose, instead of on the hosts' schedule.
NOT_STARTED_SUFFIX = ".timer"
# The sandbox's stand-in for SSM generates these together: pgBackRest's TLS identity (key and certificate).
TLS_PAIR = ("pgbackrest_tls_key", "pgbackrest_tls_cert")


class UnitError(RuntimeError):
    pass


def unit_file_name(unit: str) -> tuple[str, str]:
    """(file name, instance) of a unit: `patroni` -> patroni.service; `x@full.service` -> x@.service, full."""
    name = unit if "." in unit else f"{unit}.service"
    stem, _, suffix = name.rpartition(".")
    if "@" in stem:
        prefix, _, instance = stem.partition("@")
        return f"{prefix}@.{suffix}", instance
    return name, ""


@dataclass
class Unit:
    name: str
    exec_start: str = ""
    exec_reload: str = ""
    environment: list[str] = field(default_factory=list)  # Environment= assignments, in order
    environment_files: list[str] = field(default_factory=list)  # EnvironmentFile= values ("-" = optional)
    user: str = ""
    group: str = ""
    kill_mode: str = "control-group"
    stop_timeout: float = DEFAULT_STOP_TIMEOUT


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|sec|min)?", value.strip())
    if not match:
        return DEFAULT_STOP_TIMEOUT
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def parse_unit(name: str, texts: list[str], specifiers: dict[str, str]) -> Unit:
    """The [Service] section of a unit file and its drop-ins, later files overriding earlier ones."""
    unit = Unit(name)
    for text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section != "[Service]" or "=" not in line:
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            value = re.sub(r"%([a-zA-Z%])", lambda s: specifiers.get(s.group(1), s.group(0)), value)
            if key == "Environment":
                unit.environment.extend(shlex.split(value))
            elif key == "EnvironmentFile":
                if value:
                    unit.environment_files.append(value)
                else:
                    unit.environment_files.clear()  # an empty assignment resets the list
            elif key == "ExecStart":
                unit.exec_start = value
            elif key == "ExecReload":
                unit.exec_reload = value
            elif key == "User":
                unit.user = value
            elif key == "Group":
                unit.group = value
            elif key == "KillMode":
                unit.kill_mode = value
            elif key in ("TimeoutSec", "TimeoutStopSec"):
                unit.stop_timeout = _seconds(value)
    if not unit.exec_start:
        raise UnitError(f"unit {name} has no ExecStart=")
    return unit


def expand_command(line: str, environment: dict[str, str]) -> list[str]:
    """ExecStart= words: `$VAR` alone splits into words, `${VAR}` is one word (systemd.service(5))."""
    words = []
    for word in shlex.split(line.lstrip("-@:+!")):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            words.extend(environment.get(alone.group(1), "").split())
            continue
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)",
                            lambda v: environment.get(v.group(1) or v.group(2), ""), word))
    return words


def _pem_pair(key, certificate) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def _certificate(common_name: str, public_key, issuer_name, signing_key, days: int, *, ca: bool = False,
                 dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = ()):
    """A certificate as pulumi-tls makes them for the program (infra/components/pki.py, infra/pki.py's uses)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        sans = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        builder = (builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
    return builder.sign(signing_key, hashes.SHA256())


def tls_identity(common_name: str, dns_names: list[str]) -> tuple[str, str]:
    """A self-signed certificate and its key (PEM), for server and client authentication: the sandbox's
    copy of what the program makes with pulumi-tls for pgBackRest."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(common_name, key.public_key(), None, key, 365, dns_names=tuple(dns_names))
    return _pem_pair(key, certificate)


def ca_identity(common_name: str) -> tuple[str, str]:
    """The sandbox's own certificate authority (certificate, key), as infra/components/pki.py makes the stack's."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return _pem_pair(key, _certificate(common_name, key.public_key(), None, key, 3650, ca=True))


def signed_identity(ca_cert_pem: str, ca_key_pem: str, common_name: str) -> tuple[str, str]:
    """A host's certificate and key signed by the sandbox's CA. Every sandbox host is 127.0.0.1 (the mapping sends
    each host's names there), so that address and `localhost` are the names a client verifies."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    ca_key = serialization.load_pem_private_key(ca_key_pem.encode(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(common_name, key.public_key(), ca_cert.subject, ca_key, 365,
                               dns_names=(m.LOOPBACK, "localhost"), ip_addresses=(m.LOOPBACK,))
    return _pem_pair(key, certificate)


def _parameter_key(parameter: str) -> str:
    """An SSM name (/betting/<env>/<name>, or a host's own /betting/<env>/hosts/<host>/<name>) -> its name below the
    environment; a bare name stays as it is."""
    return parameter.split("/", 3)[3] if parameter.startswith("/betting/") else parameter


def monitoring_web_config(password: str) -> str:
    """The web config for `password`, as the Monitoring component renders it from RandomPassword's bcrypt_hash."""
    import bcrypt

    from infra.render.webconfig import web_config

    return web_config(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode())


class SecretStore:
    """The sandbox's stand-in for SSM SecureString parameters: generated once, kept in its secrets dir."""

    _lock = threading.Lock()  # the hosts boot in parallel threads: one value per secret, one TLS pair

    def __init__(self, folder: Path, placeholders: dict[str, str]):
        self.folder, self.placeholders = folder, placeholders

    def _write(self, name: str, value: str) -> None:
        path = self.folder / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(value.rstrip("\n") + "\n")
        path.chmod(0o400)

    def _ca(self) -> tuple[str, str]:
        from infra import pki

        cert_path, key_path = self.folder / pki.CA_CERT_PARAMETER, self.folder / pki.CA_KEY_PARAMETER
        if not cert_path.exists():
            cert, key = ca_identity("betting sandbox CA")
            self._write(pki.CA_KEY_PARAMETER, key)
            self._write(pki.CA_CERT_PARAMETER, cert)
        return cert_path.read_text(), key_path.read_text()

    def get(self, parameter: str) -> str:
        from infra import pki

        name = _parameter_key(parameter)
        path = self.folder / name
        with self._lock:
            if not path.exists():
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                if name in TLS_PAIR:
                    from infra.render.pgbackrest import TLS_CLIENT_CN

                    # Every sandbox host is 127.0.0.1: pgBackRest checks the name it connects to (pgN-host).
                    cert, key = tls_identity(TLS_CLIENT_CN, [m.LOOPBACK, "localhost"])
                    self._write(TLS_PAIR[0], key)
                    self._write(TLS_PAIR[1], cert)
                elif name in (pki.CA_CERT_PARAMETER, pki.CA_KEY_PARAMETER):
                    self._ca()
                elif name.startswith("hosts/"):  # hosts/<host>/tls_key or tls_cert: the pair, signed by the CA
                    host = name.split("/")[1]
                    cert, key = signed_identity(*self._ca(), common_name=host)
                    self._write(f"hosts/{host}/tls_key", key)
                    self._write(f"hosts/{host}/tls_cert", cert)
                elif name == SecretNames.MONITORING_WEB_CONFIG:  # pulumi-random's bcrypt_hash, rendered likewise
                    self._write(name, monitoring_web_config(self._generated(SecretNames.MONITORING_PASSWORD)))
                else:
                    self._generated(name)
            return path.read_text().rstrip("\n")

    def _generated(self, name: str) -> str:
        """A plain secret: its placeholder, else a random value; generated once (the caller holds the lock)."""
        path = self.folder / name
        if not path.exists():
            self._write(name, self.placeholders.get(name, secrets.token_urlsafe(24)))
        return path.read_text().rstrip("\n")

    def ca_file(self) -> Path:
        """The CA certificate, for clients on this machine (tests, health checks) verifying the sandbox's hosts."""
        from infra import pki

        self.get(pki.CA_CERT_PARAMETER)
        return self.folder / pki.CA_CERT_PARAMETER


class SandboxHost:
    """One host of the sandbox, as the agent sees it."""

    def __init__(self, layout: m.Layout, topology, host, secret_store: SecretStore,
                 spawn: Callable[..., int], process: Callable[[str], int | None], mapping: dict[bytes, bytes],
                 role_environment: dict[str, str] | None = None):
        """`role_environment`: what every process of the host gets where EC2 has the instance role (SandboxS3)."""
        self.layout, self.topology, self.host = layout, topology, host
        self.root = layout.host_root(host)
        self._secrets, self._spawn, self._process = secret_store, spawn, process
        self._mapping = mapping
        self._role_environment = dict(role_environment or {})
        self.as_root = os.geteuid() == 0

    # ---- files and packages ----------------------------------------------------------------
    def path(self, path: str) -> str:
        # A path read from a mapped file is under the root already (the agent's etcd join reads
        # ETCD_DATA_DIR from /etc/default/etcd): rooting it again would miss the member's data.
        if path.startswith(str(self.root) + "/"):
            return path
        return str(self.layout.host_path(self.host, path))

    def install(self, packages: list[str]) -> list[str]:
        """Packages are this machine's; their folders under /etc and /var are made in the host's root."""
        # What the image itself has: a /tmp anyone may write to (pgBackRest's lock path is under it).
        tmp = Path(self.path("/tmp"))
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)
        # And a /run, where HAProxy's unit puts its pid file and master socket.
        Path(self.path("/run")).mkdir(mode=0o755, exist_ok=True)
        for package in packages:
            if package in EC2_ONLY_PACKAGES:
                continue
            listing = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True)
            if listing.returncode != 0:
                raise UnitError(f"{self.host.name}: package {package} is not installed on this machine (run make system-deps)")
            for entry in listing.stdout.splitlines():
                if entry.startswith(("/etc/", "/var/")) and os.path.isdir(entry) and not os.path.islink(entry):
                    self._mirror_folder(entry)
        return []

    def _mirror_folder(self, folder: str) -> None:
        target = Path(self.path(folder))
        if target.exists():
            return
        target.mkdir(parents=True, exist_ok=True)
        stat = os.stat(folder)
        target.chmod(stat.st_mode & 0o7777)
        if self.as_root:
            os.chown(target, stat.st_uid, stat.st_gid)

    def mount(self, volume: dict) -> bool:
        Path(self.path(volume["mount"])).mkdir(parents=True, exist_ok=True)
        return False  # a folder, not a device: nothing was mounted

    def secret(self, parameter: str) -> str:
        return self._secrets.get(parameter)

    def chown(self, path: str, owner: str) -> None:
        if self.as_root:
            user, _, group = owner.partition(":")
            shutil.chown(path, user, group or user)

    def boot_command(self, command: str) -> None:
        # Kernel settings (sysctl, modules) belong to this machine, which the hosts share.
        print(f"{self.host.name}: boot command not run in the sandbox (shared kernel): {command}", flush=True)

    def daemon_reload(self) -> None:
        """Nothing to do: units are read afresh at every start, as systemd does after daemon-reload."""

    def psql(self, database: str, *args: str) -> str:
        """psql as the superuser over TCP to this host's PostgreSQL (the sandbox's socket folder is shared), with TLS
        verified against the sandbox's CA."""
        environment = {**os.environ, "PGPASSWORD": self._secrets.get(SecretNames.POSTGRES_SUPERUSER_PASSWORD),
                       "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(self._secrets.ca_file())}
        command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", m.LOOPBACK, "-p", str(self.layout.postgres(self.host)),
                   "-U", "postgres", "-d", database, *args]
        return subprocess.run(command, check=True, text=True, capture_output=True, env=environment).stdout

    def hostname(self) -> str:
        return self.host.name

    # ---- units -----------------------------------------------------------------------------
    def process_name(self, unit: str) -> str:
        return process_name(self.host.name, unit)

    def unit(self, name: str) -> Unit:
        """A unit as systemd loads it: the bundle's own file in /etc/systemd/system first (mapped with the
        bundle), else the package's in /lib/systemd/system; then the bundle's drop-ins; templates by instance."""
        file_name, instance = unit_file_name(name)
        own, package = Path(self.path(f"{BUNDLE_UNITS}/{file_name}")), SYSTEM_UNITS / file_name
        if own.exists():
            texts = [own.read_text()]
        elif package.exists():
            # The package's unit names host paths (/etc/default/NAME, data dirs): they are this host's.
            texts = [m.map_bytes(package.read_bytes(), self._mapping, self.root).decode()]
        else:
            raise UnitError(f"{self.host.name}: no unit file {package} (is its package installed?)")
        full_name = name if "." in name else f"{name}.service"
        drop_ins = Path(self.path(f"{BUNDLE_UNITS}/{full_name}.d"))
        # The bundle's drop-ins are mapped already (mapping twice changes nothing); the agent's own
        # (etcd's join) name host paths.
        texts += ([m.map_bytes(p.read_bytes(), self._mapping, self.root).decode() for p in sorted(drop_ins.glob("*.conf"))]
                  if drop_ins.is_dir() else [])
        prefix = full_name.rpartition(".")[0].partition("@")[0]
        return parse_unit(name, texts, {"H": self.host.name, "p": prefix, "n": full_name, "i": instance, "%": "%"})

    def _environment(self, unit: Unit) -> dict[str, str]:
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **self._role_environment}
        if unit.user:
            account = pwd.getpwnam(unit.user)
            env.update(USER=unit.user, LOGNAME=unit.user, HOME=self.path(account.pw_dir), SHELL=account.pw_shell)
        for assignment in unit.environment:
            key, _, value = assignment.partition("=")
            env[key] = value
        for entry in unit.environment_files:
            optional, path = entry.startswith("-"), entry.lstrip("-")
            try:
                env.update(read_environment_file(Path(path).read_text()))
            except FileNotFoundError:
                if not optional:
                    raise UnitError(f"{self.host.name}: {unit.name}: EnvironmentFile {path} is missing") from None
        return env

    def active(self, unit: str) -> bool:
        return unit.endswith(NOT_STARTED_SUFFIX) or self._process(self.process_name(unit)) is not None

    def run_oneshot(self, unit: str, timeout: float = 1800, arguments: list[str] | None = None) -> subprocess.CompletedProcess:
        """What `systemctl start UNIT` does for a Type=oneshot service (what its timer fires): ExecStart with
        the unit's environment, as its User=, waited for. Returns the exit status and the output.

        `arguments` replace what follows ExecStart's interpreter and script (`python3 backup.py ...`): the
        same program run by hand, e.g. `backup.py verify LABEL`, in the environment the unit gives it."""
        spec = self.unit(unit)
        env = self._environment(spec)
        argv = expand_command(spec.exec_start, env)
        if arguments is not None:
            argv = argv[:2] + list(arguments)
        if self.as_root and spec.user:
            argv = ["setpriv", f"--reuid={spec.user}", f"--regid={spec.group or spec.user}", "--init-groups", "--", *argv]
        return subprocess.run(argv, env=env, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, unit: str) -> None:
        if self.active(unit):
            return
        spec = self.unit(unit)
        env = self._environment(spec)
        argv = expand_command(spec.exec_start, env)
        user = spec.user if self.as_root else ""
        self._spawn(self.process_name(unit), argv, env, user, spec.group or user, self.root)

    def stop(self, unit: str) -> None:
        pid = self._process(self.process_name(unit))
        if pid is None:
            return
        spec = self.unit(unit)
        # KillMode=process signals the main process only (Patroni then stops PostgreSQL itself).
        kill = os.kill if spec.kill_mode == "process" else os.killpg
        kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + spec.stop_timeout
        while time.monotonic() < deadline and self._process(self.process_name(unit)) is not None:
            time.sleep(0.1)
        if self._process(self.process_name(unit)) is not None:
            os.killpg(pid, signal.SIGKILL)

    def restart(self, unit: str) -> None:
        self.stop(unit)
        self.start(unit)

    def reload(self, unit: str) -> None:
        pid = self._process(self.process_name(unit))
        spec = self.unit(unit)
        if pid is None:
            raise UnitError(f"{self.host.name}: {unit} is not running")
        if not spec.exec_reload:
            raise UnitError(f"{self.host.name}: Job type reload is not applicable for unit {unit}.service")
        subprocess.run(expand_command(spec.exec_reload, {**self._environment(spec), "MAINPID": str(pid)}), check=True)


# The process names the sandbox's drills, scripts and tests know the daemons by.
_PROCESS_NAMES = {
    "patroni": "{host}",
    "etcd": "{host}",
    "prometheus": "prometheus-{host}",
    "prometheus-alertmanager": "alertmanager-{host}",
    "prometheus-redis-exporter": "redis-exporter-{host}",
    "prometheus-postgres-exporter": "postgres-exporter-{host}",
    "prometheus-node-exporter": "node-exporter-{host}",
    "pgbouncer": "pgbouncer-{host}",
    "haproxy": "haproxy-{host}",
    "betting-pgbouncer-exporter": "pgbouncer-exporter-{host}",
}


def process_name(host: str, unit: str) -> str:
    return _PROCESS_NAMES.get(unit, "{host}-" + unit).format(host=host)
