"""`infra roll` end to end: the command as an operator runs it, against a fake Pulumi CLI and SSM.

The Pulumi CLI is tests/fake_pulumi/pulumi, a script put first on PATH: it logs its argv, answers
`stack export` with a deployment built here from the program's own resources (real URNs, tags
and protect flags from the mock engine) and acts out unprotect, replacement (a new instance id)
and `config rm`. SSM is moto's (send_command, get_command_invocation: real botocore request
validation, commands recorded), wrapped by `SsmDouble` for what moto 5 cannot represent:
DescribeInstanceInformation is not implemented at all (so no instance can be Online), and every
invocation ends in Success (so no failed check or handover). The double answers those two.

What these tests cannot see: the real CLI's behaviour (program run, engine diff, ignore_changes
and rollHost taking effect, --target-dependents, protect, the policy pack, the provider replacing
the instance: tests/test_delivery.py checks the program's side under the mock engine), and real
SSM delivery (the agent never runs; an invocation is final at once; Online comes from the double).
No assertion depends on time: a fake clock advances on every sleep.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from infra import roll
from infra.cli import main
from infra.engine import evaluate
from infra.settings import PROJECT
from tests.conftest import ROOT, stack_config

FAKE_PULUMI_DIR = Path(__file__).parent / "fake_pulumi"
REGION = "eu-west-1"  # prod's aws:region
HANDOVER = "/usr/local/sbin/betting-agent handover"
CHECK = "/usr/local/sbin/betting-agent check"
POLICY = ["--policy-pack", "policies", "--policy-pack-config", "policies/config/prod.json"]


def instance_id(name: str) -> str:
    return "i-" + hashlib.sha256(name.encode()).hexdigest()[:17]


@pytest.fixture(scope="module")
def prod_export() -> dict:
    """`pulumi stack export` of a deployed prod: every resource the program registers, as the engine names it."""
    evaluation = evaluate("prod", stack_config("prod"))
    assert evaluation.error is None
    resources = [{"urn": "urn:pulumi:prod::betting-platform::pulumi:pulumi:Stack::betting-platform-prod",
                  "custom": False, "type": "pulumi:pulumi:Stack"}]
    for r in evaluation.resources:
        props = {k: ("[bundle]" if k == "content" else v) for k, v in r.props.items()}
        rid = instance_id(r.name) if r.type == roll.INSTANCE_TYPE else f"{r.name}-id"
        entry = {"urn": r.urn, "custom": r.custom, "type": r.type, "inputs": props,
                 "outputs": {**props, "id": rid} if r.custom else {}}
        if r.custom:
            entry["id"] = rid
        if r.options["protect"]:
            entry["protect"] = True
        resources.append(entry)
    return {"version": 3, "deployment": {"manifest": {"version": "v3.272.0"}, "resources": resources}}


# The program's names for the instances these tests roll (infra/program.py, infra/platforms/aws.py).
PULUMI_NAME = {"pg-1": "postgres-pg-1", "pg-2": "postgres-pg-2", "pg-3": "postgres-pg-3", "etcd-1": "postgres-etcd-1",
               "monitoring-2": "monitoring-monitoring-2", "grafana-1": "monitoring-grafana-1"}
COMPONENT_TYPE = {"postgres": "betting:postgres:PatroniCluster", "monitoring": "betting:monitoring:Monitoring"}


def urn(host: str) -> str:
    name = PULUMI_NAME[host]
    return f"urn:pulumi:prod::betting-platform::{COMPONENT_TYPE[name.split('-')[0]]}$aws:ec2/instance:Instance::{name}"


def old_id(host: str) -> str:
    return instance_id(PULUMI_NAME[host])


def new_id(host: str) -> str:
    """What the fake pulumi gives the replacement."""
    return "i-" + hashlib.sha256(old_id(host).encode()).hexdigest()[:17]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def clock(self) -> float:
        return self.now


class SsmDouble:
    """moto's SSM client, plus what moto cannot do: Online instances, and failed invocations.

    Every call is appended to the same log as the fake pulumi's, so the log is one timeline.
    """

    def __init__(self, client, log: Path, state: Path, failing: dict[tuple[str, str], str] | None = None):
        self.client, self.log, self.state = client, log, state
        self.failing = failing or {}  # (host, command) -> the agent's stderr line
        self.commands: dict[str, str] = {}

    def _write(self, **event) -> None:
        with self.log.open("a") as handle:
            handle.write(json.dumps({"who": "ssm", **event}) + "\n")

    def _hosts(self) -> dict[str, str]:
        """instance id -> host, from the fake's current state."""
        resources = json.loads(self.state.read_text())["deployment"]["resources"]
        return {r["id"]: r["outputs"]["tags"]["Host"] for r in resources if r["type"] == roll.INSTANCE_TYPE}

    def send_command(self, **kwargs):
        sent = self.client.send_command(**kwargs)
        command = kwargs["Parameters"]["commands"][0]
        self.commands[sent["Command"]["CommandId"]] = command
        self._write(call="send_command", instance=kwargs["InstanceIds"][0], command=command)
        return sent

    def get_command_invocation(self, **kwargs):
        invocation = self.client.get_command_invocation(**kwargs)
        command = self.commands[kwargs["CommandId"]]
        host = self._hosts().get(kwargs["InstanceId"])
        if (host, command) in self.failing:  # moto's invocations always succeed
            invocation = {**invocation, "Status": "Failed", "StatusDetails": "Failed", "ResponseCode": 1,
                          "StandardErrorContent": self.failing[(host, command)] + "\n"}
        elif command == HANDOVER:  # what the agent prints (moto's output is empty): pg-1 leads
            done = "switchover to pg-2" if host == "pg-1" else "not the leader; nothing to hand over"
            invocation = {**invocation, "StandardOutputContent": f"{host}: {done}\n"}
        self._write(call="result", instance=kwargs["InstanceId"], command=command, status=invocation["Status"])
        return invocation

    def describe_instance_information(self, Filters):  # noqa: N803 - boto3's parameter name
        # Not implemented by moto 5: an instance the state holds is a registered, Online managed instance.
        known = self._hosts()
        ids = Filters[0]["Values"]
        return {"InstanceInformationList": [{"InstanceId": i, "PingStatus": "Online"} for i in ids if i in known]}


class World:
    """The files the fake pulumi works on, and the SSM double's behaviour for one test."""

    def __init__(self, tmp_path: Path):
        self.log, self.state, self.config = tmp_path / "calls.jsonl", tmp_path / "state.json", tmp_path / "config.json"
        self.failing: dict[tuple[str, str], str] = {}  # (host, command) -> the agent's stderr line
        self.ssm_clients = 0

    def calls(self) -> list[tuple]:
        """The timeline: ("pulumi", *argv), ("send_command", instance, command), ("result", instance, command, status)."""
        events = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [("pulumi", *e["argv"]) if e["who"] == "pulumi"
                else (e["call"], e["instance"], e["command"], *([e["status"]] if "status" in e else []))
                for e in events]

    def export(self) -> dict:
        return json.loads(self.state.read_text())


@pytest.fixture
def world(tmp_path, monkeypatch, prod_export):
    """The fake pulumi first on PATH with a deployed prod, moto's SSM behind the double, a fake clock."""
    w = World(tmp_path)
    w.log.write_text("")
    w.state.write_text(json.dumps(prod_export))
    w.config.write_text("{}")
    monkeypatch.setenv("PATH", f"{FAKE_PULUMI_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(roll.PULUMI_ENV, raising=False)
    monkeypatch.setenv("FAKE_PULUMI_LOG", str(w.log))
    monkeypatch.setenv("FAKE_PULUMI_STATE", str(w.state))
    monkeypatch.setenv("FAKE_PULUMI_CONFIG", str(w.config))
    monkeypatch.delenv("FAKE_PULUMI_FAIL_UP", raising=False)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    clock = FakeClock()
    monkeypatch.setattr(roll, "sleep", clock.sleep)
    monkeypatch.setattr(roll, "clock", clock.clock)
    with mock_aws():
        w.moto = boto3.client("ssm", region_name=REGION)

        def ssm_client(region: str) -> SsmDouble:
            assert region == REGION  # the stack's aws:region
            w.ssm_clients += 1
            return SsmDouble(w.moto, w.log, w.state, w.failing)

        monkeypatch.setattr(roll, "ssm_client", ssm_client)
        yield w


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["roll", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


EXPORT = ("pulumi", "stack", "export", "--stack", "prod")
CONFIG_RM = ("pulumi", "config", "rm", f"{PROJECT}:rollHost", "--stack", "prod")


def host_calls(host: str, protected: bool = True, postgres: bool = False) -> list[tuple]:
    """What rolling one host runs, in order, when every step succeeds at once."""
    calls: list[tuple] = []
    if postgres:
        calls += [("send_command", old_id(host), HANDOVER), ("result", old_id(host), HANDOVER, "Success")]
    if protected:
        calls.append(("pulumi", "state", "unprotect", urn(host), "--stack", "prod", "--yes"))
    calls.append(("pulumi", "up", "--stack", "prod", "--yes", "--replace", urn(host), "--target", urn(host),
                  "--target-dependents", "--config", f"{PROJECT}:rollHost={host}", *POLICY))
    calls.append(EXPORT)
    calls += [("send_command", new_id(host), CHECK), ("result", new_id(host), CHECK, "Success")]
    return calls


# ---- a whole role ------------------------------------------------------------------------------
def test_postgres_role_rolls_one_host_at_a_time_each_handed_over_first(world, capsys):
    code, out, err = run(capsys, "prod", "--role", "postgres")
    assert (code, err) == (0, "")
    # The exact timeline: each host handed over, unprotected, replaced and healthy before the next is touched.
    assert world.calls() == [EXPORT, *host_calls("pg-1", postgres=True), *host_calls("pg-2", postgres=True),
                             *host_calls("pg-3", postgres=True), CONFIG_RM]
    assert json.loads(world.config.read_text()) == {}  # `up --config` saved rollHost; config rm took it out
    instances = {r["outputs"]["tags"]["Host"]: r for r in world.export()["deployment"]["resources"]
                 if r["type"] == roll.INSTANCE_TYPE}
    assert [instances[h]["id"] for h in ("pg-1", "pg-2", "pg-3")] == [new_id(h) for h in ("pg-1", "pg-2", "pg-3")]
    assert instances["etcd-1"]["id"] == old_id("etcd-1")  # nothing else replaced
    # moto received every Run Command as AWS-RunShellScript, with the delivery and execution timeouts.
    sent = world.moto.list_commands()["Commands"]
    assert len(sent) == 6 and {c["DocumentName"] for c in sent} == {"AWS-RunShellScript"}
    assert sorted(c["Parameters"]["commands"][0] for c in sent) == [CHECK] * 3 + [HANDOVER] * 3
    assert all(c["TimeoutSeconds"] == roll.DELIVERY_TIMEOUT and c["Parameters"]["executionTimeout"] for c in sent)
    assert "pg-1: switchover to pg-2" in out and "pg-2: not the leader; nothing to hand over" in out
    assert "rolled 3 hosts of stack prod, each healthy before the next: pg-1, pg-2, pg-3" in out
    assert "next: make up STACK=prod" in out and "puts protect back on pg-1, pg-2, pg-3" in out


def test_hosts_roll_in_the_order_given_and_only_protected_ones_are_unprotected(world, capsys):
    code, _, err = run(capsys, "prod", "--host", "grafana-1", "--host", "monitoring-2")
    assert (code, err) == (0, "")
    # grafana-1 is stateless: not protected in prod, so no unprotect; neither is a Patroni node: no handover.
    assert world.calls() == [EXPORT, *host_calls("grafana-1", protected=False), *host_calls("monitoring-2"), CONFIG_RM]


def test_a_new_host_is_checked_until_its_gate_passes(world, capsys, monkeypatch):
    """The first checks fail (the stub is still applying the bundle); the roll waits, then goes on."""
    results = iter(["Failed", "Failed"])
    original = SsmDouble.get_command_invocation

    def sometimes_failing(self, **kwargs):
        invocation = original(self, **kwargs)
        if self.commands[kwargs["CommandId"]] == CHECK:
            status = next(results, "Success")
            invocation = {**invocation, "Status": status,
                          "StandardErrorContent": "" if status == "Success" else "etcd-1: etcd: not healthy yet\n"}
        return invocation

    monkeypatch.setattr(SsmDouble, "get_command_invocation", sometimes_failing)
    code, out, err = run(capsys, "prod", "--host", "etcd-1")
    assert (code, err) == (0, "")
    checks = [c for c in world.calls() if c[0] == "send_command"]
    assert checks == [("send_command", new_id("etcd-1"), CHECK)] * 3
    assert out.count("etcd-1: not healthy yet: etcd: not healthy yet") == 2


# ---- failures stop at the host -----------------------------------------------------------------
def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_failing_health_check_stops_the_roll_at_that_host(world, capsys):
    world.failing[("pg-2", CHECK)] = "pg-2: patroni: pg-2: not streaming from pg-1"
    code, out, err = run(capsys, "prod", "--role", "postgres", "--timeout", "120")
    assert code == 1
    assert one_line(err) == ("pg-2: health check failed: patroni: pg-2: not streaming from pg-1 "
                             "(still failing 120 s after the replacement)")
    calls = world.calls()
    pg2 = host_calls("pg-2", postgres=True)[:-2]  # up to its first check
    assert calls[:1 + len(host_calls("pg-1", postgres=True)) + len(pg2)] == [EXPORT, *host_calls("pg-1", postgres=True),
                                                                               *pg2]
    checks = calls[1 + len(host_calls("pg-1", postgres=True)) + len(pg2):-1]
    assert len(checks) >= 4 and set(checks) == {("send_command", new_id("pg-2"), CHECK),
                                                 ("result", new_id("pg-2"), CHECK, "Failed")}  # retried until the timeout
    assert calls[-1] == CONFIG_RM  # always
    assert not [c for c in calls if urn("pg-3") in c or old_id("pg-3") in c]  # pg-3 untouched
    assert json.loads(world.config.read_text()) == {}
    assert "stopped at pg-2; rolled: pg-1; untouched: pg-3" in out
    assert "go on with: infra roll prod --host pg-3" in out


def test_a_failed_pulumi_up_stops_the_roll_and_names_the_provider_error(world, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_PULUMI_FAIL_UP", "postgres-pg-2")
    code, out, err = run(capsys, "prod", "--role", "postgres")
    assert code == 1
    assert one_line(err) == ("pg-2: pulumi up failed: exit 255: error: creating EC2 Instance: operation error EC2: "
                             "RunInstances, InsufficientInstanceCapacity")
    up_pg2 = host_calls("pg-2", postgres=True)[:-3]  # handover, unprotect, up; no export, no check
    assert world.calls() == [EXPORT, *host_calls("pg-1", postgres=True), *up_pg2, CONFIG_RM]
    assert "go on with: infra roll prod --host pg-2 --host pg-3" in out  # pg-2 was not replaced: again


def test_a_failed_handover_touches_nothing_of_that_host(world, capsys):
    world.failing[("pg-1", HANDOVER)] = "pg-1: switchover failed: pg-1: no healthy member to hand the leader role over to"
    code, _, err = run(capsys, "prod", "--role", "postgres")
    assert code == 1
    assert one_line(err) == ("pg-1: handover failed: switchover failed: pg-1: no healthy member to hand the leader "
                             "role over to")
    assert world.calls() == [EXPORT, ("send_command", old_id("pg-1"), HANDOVER),
                             ("result", old_id("pg-1"), HANDOVER, "Failed"), CONFIG_RM]
    assert all(r.get("protect") for r in world.export()["deployment"]["resources"]
               if r["type"] == roll.INSTANCE_TYPE and r["outputs"]["tags"]["Role"] == "postgres")


def test_ctrl_c_stops_at_the_host_and_still_removes_roll_host(world, capsys, monkeypatch):
    original = SsmDouble.send_command

    def interrupted(self, **kwargs):
        if kwargs["InstanceIds"] == [new_id("pg-1")]:
            raise KeyboardInterrupt  # the operator's Ctrl-C while pg-1's new instance is checked
        return original(self, **kwargs)

    monkeypatch.setattr(SsmDouble, "send_command", interrupted)
    code, out, err = run(capsys, "prod", "--role", "postgres")
    assert code == 1
    assert one_line(err) == "pg-1: roll failed: interrupted"
    assert world.calls()[-1] == CONFIG_RM and not [c for c in world.calls() if urn("pg-2") in c]
    assert "go on with: infra roll prod --host pg-2 --host pg-3" in out  # pg-1 has its new instance already


def test_ssm_refusing_the_credentials_stops_before_any_host(world, capsys, monkeypatch):
    from botocore.exceptions import ClientError

    def denied(self, **kwargs):
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not authorized to perform "
                                     "ssm:DescribeInstanceInformation"}}, "DescribeInstanceInformation")

    monkeypatch.setattr(SsmDouble, "describe_instance_information", denied)
    code, _, err = run(capsys, "prod", "--role", "etcd")
    assert code == 1
    assert one_line(err).startswith("SSM in eu-west-1 failed: An error occurred (AccessDeniedException)")
    assert world.calls() == [EXPORT, CONFIG_RM]


# ---- dry run and bad input ---------------------------------------------------------------------
def test_dry_run_prints_the_commands_and_runs_nothing(world, capsys, prod_export):
    code, out, err = run(capsys, "prod", "--role", "postgres", "--dry-run")
    assert (code, err) == (0, "")
    assert world.calls() == [EXPORT]  # the state is only read, to name the URNs
    assert world.ssm_clients == 0 and world.moto.list_commands()["Commands"] == []
    assert world.export() == prod_export and json.loads(world.config.read_text()) == {}
    lines = out.splitlines()
    up = (f"  pulumi up --stack prod --yes --replace {urn('pg-2')} --target {urn('pg-2')} --target-dependents "
          f"--config {PROJECT}:rollHost=pg-2 " + " ".join(POLICY))
    up = up.replace(urn("pg-2"), f"'{urn('pg-2')}'")  # shell-quoted: a URN holds a `$`
    assert up in lines
    handover = [n for n, line in enumerate(lines) if "betting-agent handover" in line]
    ups = [n for n, line in enumerate(lines) if line.startswith("  pulumi up ")]
    assert len(handover) == len(ups) == 3 and all(h < u for h, u in zip(handover, ups, strict=True))
    assert lines[-2:] == ["finally:", f"  pulumi config rm {PROJECT}:rollHost --stack prod"]


@pytest.mark.parametrize(("argv", "message"), [
    (["qa", "--role", "postgres"], "error: unknown stack 'qa': no stacks/Pulumi.qa.yaml; stacks: dev, prod, staging"),
    (["prod", "--role", "pg"], "error: --role: unknown role 'pg'; allowed: etcd, postgres, clickhouse, monitoring, grafana"),
    (["prod", "--host", "pg-9"], "error: --host: no host 'pg-9' in stack prod; allowed: etcd-1, etcd-2, etcd-3, pg-1, "
                                 "pg-2, pg-3, clickhouse-1, monitoring-1, monitoring-2, grafana-1"),
    (["prod", "--host", "pg-1", "--host", "pg-1"], "error: --host: pg-1 given twice"),
    (["prod"], "error: roll: give --role ROLE or --host NAME (repeatable), not both; roles: etcd, postgres, "
               "clickhouse, monitoring, grafana"),
    (["prod", "--role", "postgres", "--host", "pg-1"], "error: roll: give --role ROLE or --host NAME"),
    (["prod", "--role", "postgres", "--timeout", "soon"], "error: --timeout: a whole number of seconds, 60 or more; "
                                                          "found 'soon'"),
])
def test_bad_input_gets_one_line_naming_the_setting(world, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert one_line(err).startswith(message)
    assert world.calls() == []


def test_no_pulumi_on_path_gets_one_line(world, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, err = run(capsys, "prod", "--role", "postgres")
    assert (code, out) == (1, "")
    assert one_line(err) == ("error: --pulumi: 'pulumi' not found (on PATH, or set --pulumi / INFRA_PULUMI to the "
                             "Pulumi CLI, 3.190 or newer)")


def test_a_stack_the_backend_lacks_gets_the_cli_error_in_one_line(world, capsys):
    world.state.unlink()
    code, out, err = run(capsys, "prod", "--role", "etcd")
    assert (code, out) == (1, "")
    assert one_line(err) == "error: pulumi stack export failed: exit 255: error: no stack named 'prod' found"
    assert world.calls() == [EXPORT]


def test_termination_protection_without_force_destroy_in_the_state_is_refused_before_anything(world, capsys):
    """A state from before forceDestroy was recorded: the provider would fail the delete after the volume detached."""
    document = world.export()
    for resource in document["deployment"]["resources"]:
        if resource["type"] == roll.INSTANCE_TYPE:
            resource["outputs"].pop("forceDestroy", None)
            resource["inputs"].pop("forceDestroy", None)
    world.state.write_text(json.dumps(document))
    code, _, err = run(capsys, "prod", "--role", "etcd")
    assert code == 1
    assert one_line(err).startswith("error: etcd-1: precondition failed: the state has termination protection without "
                                    "forceDestroy")
    assert world.calls() == [EXPORT]


# ---- the plan, pure ----------------------------------------------------------------------------
def test_every_instance_is_found_by_its_program_name_and_by_its_tags(prod_export):
    from infra.settings import load_settings
    from infra.topology import build_topology

    topology = build_topology(load_settings(stack_config("prod"), "prod"))
    instances = roll.state_instances(prod_export)
    untagged = [roll.StateInstance(i.urn, i.name, i.instance_id, i.protected, {}, False, False) for i in instances]
    renamed = [roll.StateInstance(i.urn.replace("::", "::x", 2), "renamed", i.instance_id, i.protected, i.tags,
                                  False, False) for i in instances]
    for host in topology.hosts:
        by_name = roll.find_instance(untagged, host, "prod")
        assert by_name.name == f"{roll.COMPONENT[host.role]}-{host.name}"
        assert roll.find_instance(renamed, host, "prod").instance_id == by_name.instance_id


def test_a_pending_delete_in_the_state_is_not_the_host(prod_export):
    document = json.loads(json.dumps(prod_export))
    resources = document["deployment"]["resources"]
    pg1 = next(r for r in resources if r["urn"] == urn("pg-1"))
    resources.append({**pg1, "id": "i-0old", "delete": True})  # left by an interrupted delete-before-replace
    plans = roll.plan_roll("prod", document, [h for h in _prod_hosts() if h.name == "pg-1"])
    assert [(p.urn, p.instance_id, p.protected) for p in plans] == [(urn("pg-1"), old_id("pg-1"), True)]


def _prod_hosts():
    from infra.settings import load_settings
    from infra.topology import build_topology

    return build_topology(load_settings(stack_config("prod"), "prod")).hosts


def test_the_fake_pulumi_is_a_file_in_the_repository():
    fake = FAKE_PULUMI_DIR / "pulumi"
    assert fake.is_file() and os.access(fake, os.X_OK) and fake.resolve().is_relative_to(ROOT)
