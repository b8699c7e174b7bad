"""`infra sandbox up STACK | roll STACK | down | status`: run a stack's hosts as processes on 127.0.0.1.

`up` boots every host with the host agent applying its bundle, as EC2 instances do; `roll`
applies the stack's current bundles one host at a time in rollout order, as the SSM
associations do, and stops at the first host whose health gate fails (exit 1, one line naming
the host and the check)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from infra.hostagent.agent import ApplyError
from infra.sandbox.mapping import DEFAULT_PORT_BASE
from infra.sandbox.runner import ALL_SERVICES, Sandbox, SandboxError
from infra.settings import SettingsError
from infra.stackfile import StackFileError, load_stack

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = ROOT / ".sandbox"


def stack_settings(stack: str, stacks_dir: Path = ROOT / "stacks"):
    """A stack file's settings, loaded exactly as `infra plan` and the Pulumi program load them."""
    try:
        return load_stack(stack, stacks_dir)[0]
    except StackFileError as error:
        raise SandboxError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infra sandbox", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("INFRA_SANDBOX_DIR", DEFAULT_STATE_DIR)),
                        help="where configs, data and logs live (env INFRA_SANDBOX_DIR; default .sandbox/)")
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("INFRA_SANDBOX_PORT_BASE", DEFAULT_PORT_BASE)),
                        help="ports are port-base + offsets on 127.0.0.1 (env INFRA_SANDBOX_PORT_BASE; default 25000)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack's services (again: starts only what is not running)")
    up.add_argument("stack", help="dev, staging or prod")
    up.add_argument("--only", nargs="+", choices=ALL_SERVICES, default=list(ALL_SERVICES),
                    help="start only these groups (etcd always runs)")
    roll = sub.add_parser("roll", help="roll the stack's current settings through the running sandbox, one host at a time")
    roll.add_argument("stack", help="the running sandbox's stack, with changed settings")
    roll.add_argument("--gate-timeout", type=float, default=None,
                      help="seconds each host may take to be healthy again (default: the agent's, as on EC2)")
    sub.add_parser("down", help="stop everything and remove the data (logs stay)")
    sub.add_parser("status", help="what runs and where")
    return parser


def _print_endpoints(endpoints: dict[str, str]) -> None:
    width = max(map(len, endpoints), default=0)
    for name, url in endpoints.items():
        print(f"  {name:<{width}}  {url}")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    sandbox = Sandbox(args.state_dir, args.port_base)
    try:
        if args.command == "up":
            settings = stack_settings(args.stack)
            already = sandbox.running()
            endpoints = sandbox.up(settings, services=args.only)
            print(f"sandbox of stack {args.stack} {'already running' if already else 'up'} in {sandbox.layout.state_dir}")
            _print_endpoints(endpoints)
            print(f"  superuser password: {sandbox.layout.secrets_dir}/postgres_superuser_password")
            return 0
        if args.command == "roll":
            if not sandbox.running():
                raise SandboxError(f"no sandbox running in {sandbox.layout.state_dir}; start one with `infra sandbox up`")
            for report in sandbox.roll(stack_settings(args.stack), args.gate_timeout):
                print(f"{report.host}: healthy; {len(report.changed)} files changed; "
                      f"actions: {', '.join(report.actions) or 'none'}")
            return 0
        if args.command == "down":
            stopped = sandbox.down()
            print(f"stopped {len(stopped)} processes: {', '.join(stopped) or 'none were running'}")
            return 0
        running = sandbox.running()
        if not running:
            print(f"no sandbox running in {sandbox.layout.state_dir}")
            return 1
        print(f"sandbox of stack {sandbox.settings.stack} in {sandbox.layout.state_dir}")
        for name, proc in sorted(running.items()):
            print(f"  {name:<28} pid {proc.pid}")
        leader = sandbox.leader()
        print(f"  Patroni leader: {leader.name if leader else 'none'}")
        _print_endpoints(sandbox.endpoints())
        return 0
    except ApplyError as error:
        print(f"infra sandbox: rollout stopped: {error}", file=sys.stderr)
        return 1
    except (SandboxError, SettingsError) as error:
        print(f"infra sandbox: {error}", file=sys.stderr)
        return 2
