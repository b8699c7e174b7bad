"""Run the real Prometheus and Alertmanager from the rendered files on loopback.

Only hosts, ports and paths are mapped (targets to a local test exporter, secrets to a temporary
folder, receivers' URLs to a local webhook); routing, inhibition, rules and their `for` stay as
rendered. Both serve TLS and basic auth from the web config the Monitoring component renders
(infra/render/webconfig.py), with a CA and a 127.0.0.1 certificate made as the sandbox makes its own
(infra/sandbox/platform.py); `Stack.client` is a session with that CA and the credential.
Intervals are mapped only when a caller asks (the live test does, to stay short; the benchmark does not).
Used by tests/monitoring/test_live.py and bench/alert_latency.py.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
import yaml

from infra import pki
from infra.sandbox.platform import ca_identity, monitoring_web_config, signed_identity
from infra.topology import Paths, SecretNames
from tests.ports import port

PORT_RANGE = (port(29000), port(29999))  # this part's share of loopback ports
# Ports handed out but maybe not bound yet by their daemon: never hand them out twice in a process.
_issued: set[int] = set()
_issued_lock = threading.Lock()


def free_port() -> int:
    for _ in range(500):
        port = random.randint(*PORT_RANGE)
        with _issued_lock:
            if port in _issued:
                continue
            _issued.add(port)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Notification:
    at: float  # time.monotonic() on arrival
    path: str
    body: dict


class Webhook:
    """Records every POST: the stand-in for PagerDuty, Slack and the dead-man heartbeat."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Notification] = []
        self._lock = threading.Condition()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"raw": raw.decode(errors="replace")}
                with webhook._lock:
                    webhook.received.append(Notification(time.monotonic(), self.path, body))
                    webhook._lock.notify_all()
                # PagerDuty's Events API answers 202; Slack and webhooks 200.
                try:
                    self.send_response(202 if self.path.startswith("/pagerduty") else 200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"status": "success"}')
                except (BrokenPipeError, ConnectionResetError):
                    pass  # Alertmanager stopped while we answered: the notification is recorded already

            def log_message(self, *args):
                pass

        self._server = _Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def wait_for(self, predicate: Callable[[Notification], bool], timeout: float) -> Notification | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for notification in self.received:
                    if predicate(notification):
                        return notification
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def mentions(notification: Notification, alertname: str) -> bool:
    """Whether a PagerDuty, Slack or webhook payload is about `alertname` (and is a firing one)."""
    body = notification.body
    if "alerts" in body:  # webhook
        return any(a["labels"].get("alertname") == alertname and a["status"] == "firing" for a in body["alerts"])
    if "payload" in body:  # PagerDuty Events v2
        return body.get("event_action") == "trigger" and body["payload"]["summary"].startswith(alertname)
    attachments = body.get("attachments") or [{}]  # Slack
    return alertname in attachments[0].get("title", "") and "RESOLVED" not in attachments[0].get("title", "").upper()


class MetricsTarget:
    """A scrape target exposing whatever gauges the test sets; stop() makes it vanish like a dead exporter."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.port = free_port()
        self.metrics = dict(metrics)
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                lines = [f"{name} {value}" for name, value in sorted(target.metrics.items())]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _map_secret_paths(node, secrets_dir: Path):
    """Every string under Paths.SECRETS_DIR now points into the test's secrets folder."""
    if isinstance(node, dict):
        return {k: _map_secret_paths(v, secrets_dir) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_secret_paths(v, secrets_dir) for v in node]
    if isinstance(node, str) and node.startswith(Paths.SECRETS_DIR + "/"):
        return str(secrets_dir / node.removeprefix(Paths.SECRETS_DIR + "/"))
    return node


def map_alertmanager(config: dict, secrets_dir: Path, webhook: Webhook) -> dict:
    """Receivers to the local webhook: PagerDuty's URL, Slack's webhook files, the dead-man URL. Nothing else."""
    config = _map_secret_paths(config, secrets_dir)
    secrets_dir.mkdir(parents=True, exist_ok=True)
    config["global"]["pagerduty_url"] = webhook.url("pagerduty")
    # Nothing listens there: e-mail delivery is not under test (amtool covers the default route).
    config["global"]["smtp_smarthost"] = f"127.0.0.1:{free_port()}"
    for receiver in config["receivers"]:
        for pagerduty in receiver.get("pagerduty_configs", []):
            Path(pagerduty["routing_key_file"]).write_text("test-routing-key\n")
        for slack in receiver.get("slack_configs", []):
            Path(slack["api_url_file"]).write_text(webhook.url(receiver["name"]) + "\n")
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook.url(receiver["name"])
            credentials = hook.get("http_config", {}).get("authorization", {}).get("credentials_file")
            if credentials:
                Path(credentials).write_text("test-heartbeat-key\n")
    return config


def map_prometheus(
    config: dict,
    rules_dir: Path,
    alertmanager: str,
    targets: dict[str, list[tuple[str, str]]],
    intervals: dict[str, str] | None = None,
    secrets_dir: Path | None = None,
    plain_jobs: tuple[str, ...] = (),
    target_ca: dict[str, str] | None = None,
) -> dict:
    """Rule files, the Alertmanager and the scrape targets to loopback; `targets` maps a job to
    (address, instance) pairs; jobs not in it are dropped. Per-job scrape intervals are kept, and so are
    the jobs' and the alerting's scheme, CA and credential (their files to `secrets_dir`).
    `plain_jobs`: jobs whose test targets serve plain HTTP (exporters a test starts for their metric names; their TLS
    is tests/monitoring/test_exporter_tls_live.py's); `target_ca`: job -> the CA its targets' certificates chain to,
    where that is not this stack's own (the sandbox's hosts)."""
    config = _map_secret_paths(dict(config), secrets_dir) if secrets_dir is not None else dict(config)
    config["global"] = {**config["global"], **(intervals or {})}
    config["rule_files"] = [str(rules_dir / "*.yml")]
    rendered_alerting = {k: v for k, v in config["alerting"]["alertmanagers"][0].items() if k != "static_configs"}
    config["alerting"] = {"alertmanagers": [{**rendered_alerting, "static_configs": [{"targets": [alertmanager]}]}]}
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            mapped = {k: v for k, v in job.items() if k != "static_configs"}
            if job["job_name"] in plain_jobs:
                mapped.pop("scheme", None)
                mapped.pop("tls_config", None)
            elif target_ca and job["job_name"] in target_ca:
                mapped["tls_config"] = {**mapped.get("tls_config", {}), "ca_file": target_ca[job["job_name"]]}
            if intervals and "scrape_interval" in intervals:
                mapped.pop("scrape_interval", None)
            mapped["static_configs"] = [{"targets": [address], "labels": {"instance": instance}}
                                        for address, instance in targets[job["job_name"]]]
            jobs.append(mapped)
    config["scrape_configs"] = jobs
    return config


def map_rule_intervals(files: dict[str, bytes], interval: str) -> dict[str, bytes]:
    """Every rule group evaluated at `interval` (tests only, to keep them short)."""
    mapped = {}
    for path, content in files.items():
        if path.startswith("prometheus/rules/"):
            document = yaml.safe_load(content)
            for group in document["groups"]:
                group["interval"] = interval
            content = yaml.safe_dump(document, sort_keys=False).encode()
        mapped[path] = content
    return mapped


def map_rule_for(files: dict[str, bytes], alertname: str, duration: str) -> dict[str, bytes]:
    """One alert's `for` shortened (tests only: its length is promtool's to test, not a live run's)."""
    mapped, found = {}, False
    for path, content in files.items():
        if path.startswith("prometheus/rules/"):
            document = yaml.safe_load(content)
            for group in document["groups"]:
                for rule in group["rules"]:
                    if rule.get("alert") == alertname:
                        rule["for"], found = duration, True
            content = yaml.safe_dump(document, sort_keys=False).encode()
        mapped[path] = content
    if not found:
        raise KeyError(f"no alert {alertname} in the rendered rules")
    return mapped


@dataclass
class Stack:
    prometheus_url: str
    alertmanager_url: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    # The stack's CA and the monitoring credential: what every client of its API needs.
    client: requests.Session = field(default_factory=requests.Session)
    ca_file: Path | None = None
    web_config: Path | None = None

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, lines: int = 30) -> str:
        tails = (f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) for log in self.logs)
        return "\n".join(tails)


def write_tls(secrets_dir: Path) -> requests.Session:
    """The files a monitoring host has in its secrets folder (a CA, this host's key and certificate for 127.0.0.1,
    the monitoring password, the web config with its hash), and a client session trusting that CA with it."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = ca_identity("monitoring test CA")
    cert, key = signed_identity(ca_cert, ca_key, "monitoring-1")
    password = random.randbytes(18).hex()
    for name, content in ((pki.CA_CERT, ca_cert), (pki.HOST_CERT, cert), (pki.HOST_KEY, key),
                          (SecretNames.MONITORING_PASSWORD, password),
                          (SecretNames.MONITORING_WEB_CONFIG, monitoring_web_config(password))):
        (secrets_dir / name).write_text(content.rstrip("\n") + "\n")
        (secrets_dir / name).chmod(0o600)
    from scripts.monitoring_client import session

    return session(secrets_dir / pki.CA_CERT, password)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 20, client: requests.Session | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            if (client or requests).get(f"{url}/-/ready", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def start_stack(
    workdir: Path,
    files: dict[str, bytes],
    targets: dict[str, list[tuple[str, str]]],
    webhook: Webhook,
    intervals: dict[str, str] | None = None,
    prometheus_bin: str = "prometheus",
    alertmanager_bin: str = "prometheus-alertmanager",
    self_scrape: bool = False,
    plain_jobs: tuple[str, ...] = (),
    target_ca: dict[str, str] | None = None,
) -> Stack:
    """Write the mapped files under `workdir` and start Alertmanager, then Prometheus, on loopback.
    `self_scrape`: the jobs prometheus and alertmanager scrape this stack's two daemons (as monitoring-1)."""
    workdir.mkdir(parents=True, exist_ok=True)
    secrets_dir = workdir / "secrets"
    client = write_tls(secrets_dir)
    rules_dir = workdir / "rules"
    rules_dir.mkdir(exist_ok=True)
    for path, content in files.items():
        if path.startswith("prometheus/rules/"):
            (rules_dir / Path(path).name).write_bytes(content)

    am_port, prom_port = free_port(), free_port()
    am_config = map_alertmanager(yaml.safe_load(files["alertmanager/alertmanager.yml"]), secrets_dir, webhook)
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(am_config, sort_keys=False))
    if self_scrape:
        targets = {**targets, "prometheus": [(f"127.0.0.1:{prom_port}", "monitoring-1")],
                   "alertmanager": [(f"127.0.0.1:{am_port}", "monitoring-1")]}
    prom_config = map_prometheus(
        yaml.safe_load(files["prometheus/prometheus.yml"]), rules_dir, f"127.0.0.1:{am_port}", targets, intervals,
        secrets_dir, plain_jobs, target_ca,
    )
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(prom_config, sort_keys=False))

    web_config = secrets_dir / SecretNames.MONITORING_WEB_CONFIG
    stack = Stack(f"https://127.0.0.1:{prom_port}", f"https://127.0.0.1:{am_port}", client=client,
                  ca_file=secrets_dir / pki.CA_CERT, web_config=web_config)
    am_log, prom_log = workdir / "alertmanager.log", workdir / "prometheus.log"
    stack.logs = [am_log, prom_log]
    try:
        stack.processes.append(subprocess.Popen(
            [alertmanager_bin, f"--config.file={workdir / 'alertmanager.yml'}", f"--storage.path={workdir / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=", f"--web.config.file={web_config}"],
            stdout=am_log.open("w"), stderr=subprocess.STDOUT,
        ))
        wait_ready(stack.alertmanager_url, stack.processes[-1], client=client)
        stack.processes.append(subprocess.Popen(
            [prometheus_bin, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", f"--web.config.file={web_config}"],
            stdout=prom_log.open("w"), stderr=subprocess.STDOUT,
        ))
        wait_ready(stack.prometheus_url, stack.processes[-1], client=client)
    except Exception:
        stack.stop()
        raise
    return stack


def query(prometheus_url: str, expr: str, client: requests.Session | None = None) -> dict:
    response = (client or requests).get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
    return response.json()


def wait_scraped(prometheus_url: str, expr: str, timeout: float = 30, client: requests.Session | None = None) -> list:
    """Wait until `expr` returns samples (for example `pg_up == 1`); `client`: a Stack's (TLS and credential)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(prometheus_url, expr, client)
        if result.get("status") == "success" and result["data"]["result"]:
            return result["data"]["result"]
        time.sleep(0.2)
    raise TimeoutError(f"{expr} returned nothing within {timeout}s")
