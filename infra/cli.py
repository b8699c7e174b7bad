"""`infra`: evaluate, render, diff and try the platform without the Pulumi CLI, a cloud or credentials;
roll hosts onto a new image with them.

  infra plan STACK [--json FILE]   resource inventory under the embedded mock engine, and the policy verdicts
                                   (exit 1 on a settings error or a mandatory policy violation)
  infra render STACK --out DIR     every rendered config file, one folder per service
  infra diff STACK [--exit-code]   changes against the committed snapshot plans/STACK.json
  infra sandbox up|down|status     run a stack's rendered configs as local processes
  infra roll STACK --role ROLE | --host NAME ... [--dry-run] [--timeout SECONDS]
                                   replace hosts one at a time through the Pulumi CLI (a new image or boot
                                   stub): handover, unprotect, pulumi up --replace, SSM health gate; the
                                   only command that needs the Pulumi CLI and AWS credentials
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from infra.engine import evaluate_stack, plan_document
from infra.plan_diff import PLANS_DIR, diff_plans, dumps_plan, load_plan, refresh_command
from infra.roll import DESCRIPTION as ROLL_DESCRIPTION
from infra.roll import add_arguments as add_roll_arguments
from infra.roll import command as roll_command
from infra.settings import SettingsError
from infra.stackfile import ROOT, StackFileError, load_stack
from infra.topology import build_topology
from policies.engine import evaluate as policy_evaluate

# Large documents that the inventory table summarises by size; the JSON plan keeps them whole.
_BULKY = {"userData", "policy", "assumeRolePolicy"}


def _summary(props: dict[str, Any], width: int = 110) -> str:
    parts = []
    for key, value in sorted(props.items()):
        if key in ("tags", "description"):
            continue
        if key in _BULKY and isinstance(value, str):
            parts.append(f"{key}=<{len(value)} bytes>")
        elif isinstance(value, (str, int, float, bool)):
            parts.append(f"{key}={value}")
        elif isinstance(value, (list, dict)):
            text = json.dumps(value, separators=(",", ":"), sort_keys=True)
            parts.append(f"{key}={text if len(text) <= 60 else text[:57] + '...'}")
    line = " ".join(parts)
    return line if len(line) <= width else line[: width - 3] + "..."


def print_inventory(document: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    resources = document["resources"]
    type_width = max(len(r["type"]) for r in resources)
    name_width = max(len(r["name"]) for r in resources)
    for r in resources:
        print(f"{r['type']:<{type_width}}  {r['name']:<{name_width}}  {_summary(r['props'])}", file=out)
    print(f"\n{len(resources)} resources in stack {document['stack']} ({document['environment']})", file=out)


def print_retention(document: dict[str, Any], settings, out=None) -> None:
    """How many days each Prometheus volume holds at the measured ingestion (infra/capacity.py), with a warning
    where that is under the time retention."""
    from infra import capacity

    out = out or sys.stdout
    source = capacity.DATA_FILE
    source = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    estimate = document["estimates"]["prometheus_retention"]
    prom = settings.monitoring.prometheus
    print(f"\nPrometheus retention (estimate from {source}, measured {capacity.load_figures()['measured']}): "
          f"each of {prom.replicas} replicas scrapes "
          f"{estimate['series']} series, {estimate['samples_per_second']:.0f} samples/s, "
          f"{estimate['bytes_per_day'] / 2**30:.2f} GiB/day; retentionSize {prom.retention_size} on a "
          f"{prom.volume.size_gib} GiB volume holds about {estimate['days_held']:.0f} days", file=out)
    if estimate["assumed_jobs"]:
        print(f"  assumed, not measured here: {', '.join(estimate['assumed_jobs'])}", file=out)
    if estimate["below_promise"]:
        print(f"  warning: under the time retention of {prom.retention_time}: raise monitoring.prometheus.volume.sizeGiB "
              "and retentionSize, or scrape fewer series", file=out)


def cmd_plan(args: argparse.Namespace) -> int:
    settings, evaluation = evaluate_stack(args.stack, Path(args.stacks_dir))
    document = plan_document(evaluation, settings)
    print_inventory(document)
    print_retention(document, settings)
    if evaluation.placeholder_secrets:
        print("secrets not readable offline, masked placeholders used (pulumi up requires them): "
              + ", ".join(evaluation.placeholder_secrets))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dumps_plan(document))
        print(f"plan written to {args.json}")
    violations = policy_evaluate(document["resources"], settings.environment, args.stack)
    blocking = [v for v in violations if v.mandatory]
    print(f"\npolicies: {len(blocking)} mandatory and {len(violations) - len(blocking)} advisory violations")
    for violation in violations:
        print(f"  {violation}")
    return 1 if blocking else 0


def cmd_diff(args: argparse.Namespace) -> int:
    settings, evaluation = evaluate_stack(args.stack, Path(args.stacks_dir))
    current = json.loads(dumps_plan(plan_document(evaluation, settings)))
    snapshot = load_plan(args.stack, Path(args.plans_dir))
    if snapshot is None:
        print(f"no snapshot {Path(args.plans_dir) / (args.stack + '.json')}; create it with: {refresh_command(args.stack)}")
    print(diff_plans(snapshot, current), end="")
    return 1 if args.exit_code and snapshot != current else 0


def cmd_render(args: argparse.Namespace) -> int:
    from infra.render.bundle import render_all

    settings, _, _ = load_stack(args.stack, Path(args.stacks_dir))
    files = render_all(settings, build_topology(settings))
    out = Path(args.out)
    for rel, content in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    print(f"{len(files)} files rendered for stack {args.stack} into {out}")
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from infra.sandbox.cli import main as sandbox_main

    return sandbox_main(args.rest)


def cmd_roll(args: argparse.Namespace) -> int:
    return roll_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infra", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stacks-dir", default=str(ROOT / "stacks"),
                        help="where Pulumi.<stack>.yaml files live (default: stacks/)")
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="resource inventory of a stack, offline")
    plan.add_argument("stack")
    plan.add_argument("--json", metavar="FILE", help="also write the plan as JSON (the snapshot format)")
    plan.set_defaults(func=cmd_plan)
    diff = commands.add_parser("diff", help="changes against the committed plan snapshot plans/STACK.json")
    diff.add_argument("stack")
    diff.add_argument("--plans-dir", default=str(PLANS_DIR))
    diff.add_argument("--exit-code", action="store_true", help="exit 1 when the plan differs from the snapshot")
    diff.set_defaults(func=cmd_diff)
    render = commands.add_parser("render", help="write every rendered config file of a stack")
    render.add_argument("stack")
    render.add_argument("--out", required=True, metavar="DIR")
    render.set_defaults(func=cmd_render)
    sandbox = commands.add_parser("sandbox", help="run a stack's rendered configs as local processes", add_help=False)
    sandbox.add_argument("rest", nargs=argparse.REMAINDER)
    sandbox.set_defaults(func=cmd_sandbox)
    roll = commands.add_parser("roll", help="replace hosts one at a time through the Pulumi CLI (new image or stub)",
                               description=ROLL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_roll_arguments(roll)
    roll.set_defaults(func=cmd_roll)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    if args.command == "sandbox":
        # argparse's REMAINDER cannot start with an option (`infra sandbox --port-base 26000 up dev`
        # would reach the sandbox reordered): everything after the command word goes as it was typed.
        args.rest = argv[argv.index("sandbox") + 1:]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return args.func(args)
    except (SettingsError, StackFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
