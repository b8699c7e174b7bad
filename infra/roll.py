"""`infra roll`: replace hosts one at a time through the Pulumi CLI, for a new image or boot stub.

A running host never takes a new `image` or stub by itself (instances ignore `ami` and
`userData`). For each host, in order, the roll:

1. postgres: runs `betting-agent handover` on it through SSM Run Command (a switchover on the
   leader, a no-op on a replica);
2. `pulumi state unprotect URN` when the state has the instance protected (prod's stateful hosts);
3. `pulumi up --replace URN --target URN --target-dependents --config betting-platform:rollHost=HOST`
   (rollHost drops ignore_changes on ami/userData for that host alone: the engine would otherwise
   take the old values from the state, even for --replace);
4. reads the new instance id from `pulumi stack export`, waits until SSM reports it Online, then
   runs `betting-agent check` on it through SSM until it passes or the timeout: the health gate.

Only then the next host. Whatever happens, `pulumi config rm betting-platform:rollHost` ends it
(`pulumi up --config` saves the key in the stack file). The first failed step stops the roll at
its host with one line, e.g. `pg-2: health check failed: ...`; later hosts stay untouched.

The plan (`plan_roll`) is pure: stack export + topology + selection -> steps. `Roller` runs it
with an injected command runner (the Pulumi CLI) and boto3 SSM client.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from infra.bundle import AGENT_COMMAND
from infra.settings import PROJECT
from infra.stackfile import ROOT, load_stack
from infra.topology import Host, Topology, build_topology

INSTANCE_TYPE = "aws:ec2/instance:Instance"
ROLES = ("etcd", "postgres", "clickhouse", "monitoring", "grafana")
# The component whose name prefixes each role's instances (infra/program.py): postgres-pg-1, monitoring-grafana-1.
COMPONENT = {"etcd": "postgres", "postgres": "postgres", "clickhouse": "clickhouse", "monitoring": "monitoring",
             "grafana": "monitoring"}
ROLL_HOST_KEY = f"{PROJECT}:rollHost"
PULUMI_ENV = "INFRA_PULUMI"  # the Pulumi CLI to run, if not `pulumi` on PATH

DEFAULT_TIMEOUT = 1800  # a new host's first boot: SSM agent, packages, bundle, a Patroni replica catching up
MIN_TIMEOUT = 60
HANDOVER_TIMEOUT = 900  # the agent itself waits up to 600 s for the new leader (GATE_TIMEOUT["patroni"])
CHECK_TIMEOUT = 300  # one `betting-agent check`: every gate once
DELIVERY_TIMEOUT = 600  # SSM's TimeoutSeconds: how long a command may wait to reach the instance
POLL_SECONDS = 5  # between reads of a running command
RETRY_SECONDS = 15  # between `Online` reads, and between health checks
RUNNING = {"Pending", "InProgress", "Delayed", "Cancelling"}  # any other invocation status is final

# `infra roll --help`: the module's summary and steps.
DESCRIPTION = (__doc__ or "").split("\n\nThe plan")[0]
HANDOVER_COMMAND = f"{AGENT_COMMAND} handover"
CHECK_COMMAND = f"{AGENT_COMMAND} check"


class RollInputError(ValueError):
    """Bad input: one line naming the setting and what is allowed. Nothing has been touched."""


class StepFailed(RuntimeError):
    """A step failed at a host: the roll stops there."""

    def __init__(self, host: str | None, step: str, reason: str):
        self.host, self.step, self.reason = host, step, reason
        super().__init__(f"{host}: {step} failed: {reason}" if host else f"{step} failed: {reason}")


# ---- the plan: pure --------------------------------------------------------------------------
@dataclass(frozen=True)
class StateInstance:
    """An EC2 instance as `pulumi stack export` records it."""

    urn: str
    name: str  # the Pulumi resource name, the URN's last part: postgres-pg-1
    instance_id: str
    protected: bool
    tags: dict[str, str]
    termination_protected: bool
    force_destroy: bool


@dataclass(frozen=True)
class HostRoll:
    host: Host
    urn: str
    instance_id: str  # the instance being replaced
    protected: bool

    @property
    def handover(self) -> bool:
        return self.host.role == "postgres"


def state_instances(export: Any) -> list[StateInstance]:
    """The live instances of a stack export (`deployment.resources[]`); pending deletes left out."""
    resources = (export.get("deployment") or {}).get("resources") if isinstance(export, dict) else None
    if not isinstance(resources, list):
        raise StepFailed(None, "pulumi stack export", "no deployment.resources in its output")
    found = []
    for resource in resources:
        if not isinstance(resource, dict) or resource.get("type") != INSTANCE_TYPE or resource.get("delete"):
            continue
        outputs, inputs = resource.get("outputs") or {}, resource.get("inputs") or {}
        tags = outputs.get("tags") or inputs.get("tags") or {}
        found.append(StateInstance(
            urn=resource["urn"],
            name=resource["urn"].split("::")[-1],
            instance_id=resource.get("id") or outputs.get("id") or "",
            protected=bool(resource.get("protect")),
            tags=tags if isinstance(tags, dict) else {},
            termination_protected=bool(outputs.get("disableApiTermination", inputs.get("disableApiTermination"))),
            force_destroy=bool(outputs.get("forceDestroy", inputs.get("forceDestroy"))),
        ))
    return found


def find_instance(instances: Sequence[StateInstance], host: Host, stack: str) -> StateInstance:
    """The host's instance: by its `Host` or `Name` tag, or its Pulumi name (infra/platforms/aws.py)."""
    name = f"{COMPONENT[host.role]}-{host.name}"
    matches = [i for i in instances
               if i.tags.get("Host") == host.name or i.tags.get("Name") == host.fqdn or i.name == name]
    if not matches:
        raise StepFailed(host.name, "stack state", f"no {INSTANCE_TYPE} named {name} or tagged Host={host.name} in "
                                                   f"`pulumi stack export --stack {stack}`; is the stack deployed?")
    if len(matches) > 1:
        raise StepFailed(host.name, "stack state", "several instances match: " + ", ".join(m.urn for m in matches))
    if not matches[0].instance_id:
        raise StepFailed(host.name, "stack state", f"{matches[0].urn} has no instance id")
    return matches[0]


def select_hosts(topology: Topology, stack: str, role: str | None, names: Sequence[str] | None) -> list[Host]:
    """--role: the role's hosts in topology order; --host (repeated): those hosts, in the order given."""
    if bool(role) == bool(names):
        raise RollInputError("roll: give --role ROLE or --host NAME (repeatable), not both; roles: " + ", ".join(ROLES))
    if role:
        if role not in ROLES:
            raise RollInputError(f"--role: unknown role {role!r}; allowed: {', '.join(ROLES)}")
        return [h for h in topology.hosts if h.role == role]
    by_name = {h.name: h for h in topology.hosts}
    selected: list[Host] = []
    for name in names or ():
        if name not in by_name:
            raise RollInputError(f"--host: no host {name!r} in stack {stack}; allowed: {', '.join(by_name)}")
        if by_name[name] in selected:
            raise RollInputError(f"--host: {name} given twice")
        selected.append(by_name[name])
    return selected


def plan_roll(stack: str, export: Any, hosts: Sequence[Host]) -> list[HostRoll]:
    """What to replace, from the state: each host's URN, instance id and protect flag."""
    instances = state_instances(export)
    plans = []
    for host in hosts:
        instance = find_instance(instances, host, stack)
        if instance.termination_protected and not instance.force_destroy:
            raise StepFailed(host.name, "precondition", "the state has termination protection without forceDestroy, so "
                             "the provider would refuse to delete the instance; record forceDestroy first with a full "
                             f"`pulumi up` (make up STACK={stack})")
        plans.append(HostRoll(host, instance.urn, instance.instance_id, instance.protected))
    return plans


def export_args(stack: str) -> list[str]:
    return ["stack", "export", "--stack", stack]


def unprotect_args(stack: str, urn: str) -> list[str]:
    return ["state", "unprotect", urn, "--stack", stack, "--yes"]


def up_args(stack: str, host: str, urn: str) -> list[str]:
    # The policy pack runs on every update of this project (Makefile, CI), a roll's included.
    return ["up", "--stack", stack, "--yes", "--replace", urn, "--target", urn, "--target-dependents",
            "--config", f"{ROLL_HOST_KEY}={host}",
            "--policy-pack", "policies", "--policy-pack-config", f"policies/config/{stack}.json"]


def config_rm_args(stack: str) -> list[str]:
    return ["config", "rm", ROLL_HOST_KEY, "--stack", stack]


def full_up_command(stack: str) -> str:
    return (f"make up STACK={stack}   (pulumi up --stack {stack} --policy-pack policies "
            f"--policy-pack-config policies/config/{stack}.json)")


def _aws_send_command(region: str, instance_id: str, command: str) -> str:
    parameters = json.dumps({"commands": [command]}, separators=(",", ":"))
    return shlex.join(["aws", "ssm", "send-command", "--region", region, "--document-name", "AWS-RunShellScript",
                       "--instance-ids", instance_id, "--parameters", parameters])


def describe_plan(stack: str, region: str, pulumi: str, plans: Sequence[HostRoll], timeout: int) -> list[str]:
    """The commands a roll runs, in order, as an operator would type them (`--dry-run`)."""
    count = f"{len(plans)} host{'s' if len(plans) != 1 else ''}"
    lines = [f"dry run: nothing changes; `infra roll` would run, in order ({count}, one at a time):"]
    for plan in plans:
        name = plan.host.name
        lines.append(f"{name} ({plan.instance_id}{', protected' if plan.protected else ''}):")
        if plan.handover:
            lines.append(f"  {_aws_send_command(region, plan.instance_id, HANDOVER_COMMAND)}"
                         "   # and get-command-invocation until done; a no-op on a replica")
        if plan.protected:
            lines.append(f"  {shlex.join([pulumi, *unprotect_args(stack, plan.urn)])}")
        lines.append(f"  {shlex.join([pulumi, *up_args(stack, name, plan.urn)])}")
        lines.append(f"  {shlex.join([pulumi, *export_args(stack)])}   # the new instance id")
        lines.append(f"  aws ssm describe-instance-information --region {region} "
                     "--filters Key=InstanceIds,Values=<new id>   # until PingStatus is Online")
        lines.append(f"  {_aws_send_command(region, '<new id>', CHECK_COMMAND)}"
                     f"   # until it succeeds, at most {timeout} s after the up")
    lines.append("finally:")
    lines.append(f"  {shlex.join([pulumi, *config_rm_args(stack)])}")
    return lines


# ---- running it ------------------------------------------------------------------------------
@dataclass
class Result:
    returncode: int
    stdout: str  # captured output (`stack export`)
    output: str  # what it printed, at least the last lines: the reason of a failure


CommandRunner = Callable[[Sequence[str], bool], Result]  # (argv, capture) -> Result


class ProcessRunner:
    """Runs the Pulumi CLI in the project directory; streams its output unless captured."""

    def __init__(self, out: TextIO, cwd: Path = ROOT):
        self.out, self.cwd = out, cwd

    def __call__(self, argv: Sequence[str], capture: bool) -> Result:
        try:
            if capture:
                done = subprocess.run(list(argv), cwd=self.cwd, capture_output=True, text=True)
                return Result(done.returncode, done.stdout, done.stderr)
            tail: deque[str] = deque(maxlen=50)
            with subprocess.Popen(list(argv), cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) as process:
                assert process.stdout is not None
                for line in process.stdout:
                    self.out.write("    | " + line)
                    self.out.flush()
                    tail.append(line.rstrip())
            return Result(process.returncode, "", "\n".join(tail))
        except OSError as error:
            return Result(127, "", f"cannot run {argv[0]}: {error}")


def failure_reason(result: Result) -> str:
    """Exit code and the most telling line: the first specific `error:` line, else the last line."""
    lines = [line.strip() for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line and line != "error: update failed"]
    line = errors[0] if errors else (lines[-1] if lines else "no output")
    return f"exit {result.returncode}: {line[:300]}"


def _ssm_error(error: Exception) -> str:
    return str(error).strip()[:300] or type(error).__name__


def _invocation_reason(host: str, invocation: dict) -> str:
    """The agent's last line (it names the host; the roll's own line does too): stderr first on a failure."""
    streams = ["StandardOutputContent", "StandardErrorContent"]
    if invocation.get("Status") != "Success":
        streams.reverse()
    for stream in streams:
        lines = [line.strip() for line in (invocation.get(stream) or "").splitlines() if line.strip()]
        if lines:
            return lines[-1].removeprefix(f"{host}: ")[:300]
    return f"{invocation.get('Status')} ({invocation.get('StatusDetails')}), exit {invocation.get('ResponseCode')}"


@dataclass
class Roller:
    stack: str
    region: str
    pulumi: str  # the executable to run
    ssm: Any  # a boto3 SSM client
    run: CommandRunner
    out: TextIO
    timeout: int = DEFAULT_TIMEOUT
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    unprotected: list[str] = field(default_factory=list)  # hosts whose protect flag this roll lifted
    replaced: list[str] = field(default_factory=list)  # hosts that have a new instance

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    # pulumi
    def pulumi_run(self, host: str | None, step: str, args: list[str], capture: bool = False) -> Result:
        result = self.run([self.pulumi, *args], capture)
        if result.returncode != 0:
            raise StepFailed(host, step, failure_reason(result))
        return result

    def export(self, host: str | None = None) -> dict:
        result = self.pulumi_run(host, "pulumi stack export", export_args(self.stack), capture=True)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as error:
            raise StepFailed(host, "pulumi stack export", f"its output is not JSON ({error})") from None

    # SSM
    def ssm_command(self, host: str, step: str, instance_id: str, command: str, execution_timeout: int,
                    deadline: float) -> tuple[bool, str]:
        """Run `command` on the instance through Run Command; (succeeded, reason) once it has ended."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            sent = self.ssm.send_command(
                InstanceIds=[instance_id], DocumentName="AWS-RunShellScript", TimeoutSeconds=DELIVERY_TIMEOUT,
                Comment=f"infra roll {self.stack}: {host} {step}"[:100],
                Parameters={"commands": [command], "executionTimeout": [str(execution_timeout)]})
        except (BotoCoreError, ClientError) as error:
            raise StepFailed(host, step, f"ssm send-command to {instance_id}: {_ssm_error(error)}") from None
        command_id = sent["Command"]["CommandId"]
        status = "not delivered yet"
        while True:
            try:
                invocation = self.ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
                status = invocation["Status"]
                if status not in RUNNING:
                    return status == "Success", _invocation_reason(host, invocation)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") != "InvocationDoesNotExist":  # not registered yet
                    raise StepFailed(host, step, f"ssm get-command-invocation: {_ssm_error(error)}") from None
            except BotoCoreError as error:
                raise StepFailed(host, step, f"ssm get-command-invocation: {_ssm_error(error)}") from None
            if self.clock() >= deadline:
                raise StepFailed(host, step, f"command {command_id} on {instance_id} still {status} at the deadline")
            self.sleep(POLL_SECONDS)

    def wait_online(self, host: str, instance_id: str, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        status = "not registered"
        while True:
            try:
                answer = self.ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])
            except (BotoCoreError, ClientError) as error:
                raise StepFailed(host, "SSM registration", f"ssm describe-instance-information: {_ssm_error(error)}") from None
            found = answer.get("InstanceInformationList") or []
            status = found[0].get("PingStatus", "unknown") if found else "not registered"
            if status == "Online":
                return
            if self.clock() >= deadline:
                raise StepFailed(host, "SSM registration", f"{instance_id} not Online in SSM after {self.timeout} s "
                                                           f"({status})")
            self.sleep(RETRY_SECONDS)

    def wait_healthy(self, host: str, instance_id: str, deadline: float) -> None:
        while True:
            ok, reason = self.ssm_command(host, "health check", instance_id, CHECK_COMMAND, CHECK_TIMEOUT, deadline)
            if ok:
                return
            self.say(f"{host}: not healthy yet: {reason}")
            if self.clock() >= deadline:
                raise StepFailed(host, "health check", f"{reason} (still failing {self.timeout} s after the replacement)")
            self.sleep(RETRY_SECONDS)

    def preflight(self, plans: Sequence[HostRoll]) -> None:
        """SSM answers with these credentials and region, before anything changes."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.ssm.describe_instance_information(
                Filters=[{"Key": "InstanceIds", "Values": [p.instance_id for p in plans]}])
        except (BotoCoreError, ClientError) as error:
            raise StepFailed(None, f"SSM in {self.region}", _ssm_error(error)) from None

    # one host
    def roll_host(self, plan: HostRoll) -> str:
        name = plan.host.name
        if plan.handover:
            self.say(f"{name}: betting-agent handover on {plan.instance_id} (a no-op on a replica)")
            ok, reason = self.ssm_command(name, "handover", plan.instance_id, HANDOVER_COMMAND, HANDOVER_TIMEOUT,
                                          self.clock() + HANDOVER_TIMEOUT + 60)
            if not ok:
                raise StepFailed(name, "handover", reason)
            self.say(f"{name}: {reason}")
        if plan.protected:
            self.say(f"{name}: pulumi state unprotect {plan.urn}")
            self.pulumi_run(name, "pulumi state unprotect", unprotect_args(self.stack, plan.urn))
            self.unprotected.append(name)
        self.say(f"{name}: pulumi up --replace {plan.urn} (rollHost={name})")
        self.pulumi_run(name, "pulumi up", up_args(self.stack, name, plan.urn))
        self.replaced.append(name)
        deadline = self.clock() + self.timeout
        new = find_instance(state_instances(self.export(name)), plan.host, self.stack)
        if new.instance_id == plan.instance_id:
            self.replaced.remove(name)
            raise StepFailed(name, "pulumi up", f"the state still has instance {plan.instance_id}: nothing was replaced")
        self.say(f"{name}: new instance {new.instance_id}; waiting for SSM to report it Online")
        self.wait_online(name, new.instance_id, deadline)
        self.say(f"{name}: {new.instance_id} Online; betting-agent check until it passes (at most {self.timeout} s)")
        self.wait_healthy(name, new.instance_id, deadline)
        return new.instance_id

    def execute(self, plans: Sequence[HostRoll]) -> int:
        """Roll `plans` in order; 0 when every host came back healthy, else 1 with one line on stderr."""
        self.unprotected, self.replaced = [], []
        rolled: list[str] = []
        failure: StepFailed | None = None
        current: str | None = None
        try:
            self.preflight(plans)
            for plan in plans:
                current = plan.host.name
                new_id = self.roll_host(plan)
                rolled.append(current)
                self.say(f"{current}: healthy on {new_id}")
        except StepFailed as error:
            failure = error
        except KeyboardInterrupt:  # Pulumi got the same SIGINT and has cancelled its update
            failure = StepFailed(current, "roll", "interrupted")
        finally:  # whatever happened: the stack file must not keep rollHost
            cleanup = self.run([self.pulumi, *config_rm_args(self.stack)], False)
        if cleanup.returncode == 0:
            self.say(f"removed {ROLL_HOST_KEY} from stack {self.stack}")
        elif failure is None:
            failure = StepFailed(None, f"pulumi config rm {ROLL_HOST_KEY}", failure_reason(cleanup))
        else:
            self.say(f"pulumi config rm {ROLL_HOST_KEY} --stack {self.stack} failed ({failure_reason(cleanup)}): run it "
                     "by hand, else the next pulumi up still lets that host take a new image")
        protect = f": puts protect back on {', '.join(self.unprotected)}" if self.unprotected else ""
        if failure is None:
            self.say(f"rolled {len(rolled)} hosts of stack {self.stack}, each healthy before the next: {', '.join(rolled)}")
            self.say(f"next: {full_up_command(self.stack)}{protect}")
            return 0
        print(str(failure), file=sys.stderr, flush=True)
        names = [p.host.name for p in plans]
        if failure.host in names:
            at = names.index(failure.host)
            self.say(f"stopped at {failure.host}; rolled: {', '.join(rolled) or 'none'}; untouched: "
                     f"{', '.join(names[at + 1:]) or 'none'}")
            rest = names[at:]
            if failure.host in self.replaced:
                self.say(f"{failure.host} was replaced but is not healthy: see `sudo betting-agent check` on it")
                rest = names[at + 1:]
            if rest:
                self.say(f"after fixing it, go on with: infra roll {self.stack} " + " ".join(f"--host {n}" for n in rest))
        self.say(f"then: {full_up_command(self.stack)}{protect}")
        return 1


# ---- the command -----------------------------------------------------------------------------
def ssm_client(region: str):
    """The SSM client a roll uses (a seam for tests)."""
    import boto3

    return boto3.client("ssm", region_name=region)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def clock() -> float:
    return time.monotonic()


def _timeout(value: str) -> int:
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < MIN_TIMEOUT:
        raise RollInputError(f"--timeout: a whole number of seconds, {MIN_TIMEOUT} or more; found {value!r}")
    return seconds


def resolve_pulumi(value: str | None) -> tuple[str, str]:
    """(as given, the executable): --pulumi, else $INFRA_PULUMI, else `pulumi` on PATH."""
    given = value or os.environ.get(PULUMI_ENV) or "pulumi"
    found = shutil.which(given)
    if not found:
        raise RollInputError(f"--pulumi: {given!r} not found (on PATH, or set --pulumi / {PULUMI_ENV} to the Pulumi "
                             "CLI, 3.190 or newer)")
    return given, found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stack")
    parser.add_argument("--role", help=f"every host of this role, in topology order: {', '.join(ROLES)}")
    parser.add_argument("--host", action="append", metavar="NAME", help="this host (repeatable; in the order given)")
    parser.add_argument("--timeout", default=str(DEFAULT_TIMEOUT), metavar="SECONDS",
                        help=f"how long a new host may take to be Online and pass its check (default {DEFAULT_TIMEOUT})")
    parser.add_argument("--pulumi", metavar="PATH", help=f"the Pulumi CLI (default ${PULUMI_ENV}, else pulumi on PATH)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands it would run; change nothing")


def command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`infra roll`: StackFileError/SettingsError propagate to the CLI, which prints them in one line."""
    out = out or sys.stdout
    try:
        settings, _, _ = load_stack(args.stack, Path(args.stacks_dir))
        hosts = select_hosts(build_topology(settings), args.stack, args.role, args.host)
        timeout = _timeout(args.timeout)
        given, executable = resolve_pulumi(args.pulumi)
    except RollInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    roller = Roller(stack=args.stack, region=settings.region, pulumi=executable, ssm=None, run=ProcessRunner(out),
                    out=out, timeout=timeout, sleep=sleep, clock=clock)
    try:
        plans = plan_roll(args.stack, roller.export(), hosts)
    except StepFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.dry_run:
        for line in describe_plan(args.stack, settings.region, given, plans, timeout):
            print(line, file=out)
        return 0
    roller.ssm = ssm_client(settings.region)
    return roller.execute(plans)
