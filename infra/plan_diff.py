"""Committed plan snapshots (plans/<stack>.json) and a readable diff against them.

A plan is the document `infra plan STACK --json FILE` writes: {"stack", "environment",
"resources": [{"type", "name", "parent", "props"}]}, resources sorted by (type, name), secrets
already masked as "[secret]". The snapshot is that document serialized one stable way, so the
same program always writes the same bytes and a review shows only what changed.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.stackfile import ROOT

PLANS_DIR = ROOT / "plans"
SECRET_MASK = "[secret]"
# Multi-line values (user data, policy documents) show at most this many diff lines each.
MAX_TEXT_DIFF_LINES = 40
MAX_VALUE_WIDTH = 100

Key = tuple[str, str]  # (type, name): a resource's identity in a plan


def plan_path(stack: str, plans_dir: Path = PLANS_DIR) -> Path:
    return plans_dir / f"{stack}.json"


def refresh_command(stack: str) -> str:
    return f"infra plan {stack} --json plans/{stack}.json"


def dumps_plan(document: Mapping[str, Any]) -> str:
    """The one serialization of a plan: resources sorted by (type, name), keys sorted, one trailing newline."""
    ordered = dict(document)
    ordered["resources"] = sorted(document.get("resources", []), key=lambda r: (r["type"], r["name"]))
    return json.dumps(ordered, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def save_plan(stack: str, document: Mapping[str, Any], plans_dir: Path = PLANS_DIR) -> Path:
    path = plan_path(stack, plans_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_plan(document))
    return path


def load_plan(stack: str, plans_dir: Path = PLANS_DIR) -> dict[str, Any] | None:
    """The committed snapshot of `stack`, or None when there is none yet."""
    path = plan_path(stack, plans_dir)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _index(document: Mapping[str, Any] | None) -> dict[Key, Mapping[str, Any]]:
    return {(r["type"], r["name"]): r for r in (document or {}).get("resources", [])}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested props as dotted paths: {"tags.Role": "monitoring", "rules[0].expiration.days": 90}."""
    if isinstance(value, Mapping) and value:
        result: dict[str, Any] = {}
        for key in sorted(value):
            result.update(flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return result
    if isinstance(value, list) and value:
        result = {}
        for index, item in enumerate(value):
            result.update(flatten(item, f"{prefix}[{index}]"))
        return result
    return {prefix: value} if prefix else {}


@dataclass
class ResourceChange:
    key: Key
    # (path, old, new); old or new is _ABSENT when the property was added or removed.
    properties: list[tuple[str, Any, Any]] = field(default_factory=list)


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


@dataclass
class PlanChanges:
    added: list[Mapping[str, Any]]
    removed: list[Mapping[str, Any]]
    changed: list[ResourceChange]
    unchanged: int

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def compare(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> PlanChanges:
    before, after = _index(old), _index(new)
    added = [after[k] for k in sorted(after.keys() - before.keys())]
    removed = [before[k] for k in sorted(before.keys() - after.keys())]
    changed, unchanged = [], 0
    for key in sorted(before.keys() & after.keys()):
        old_flat = flatten(before[key].get("props") or {}) | {"(parent)": before[key].get("parent")}
        new_flat = flatten(after[key].get("props") or {}) | {"(parent)": after[key].get("parent")}
        properties = [
            (path, old_flat.get(path, _ABSENT), new_flat.get(path, _ABSENT))
            for path in sorted(old_flat.keys() | new_flat.keys())
            if old_flat.get(path, _ABSENT) != new_flat.get(path, _ABSENT)
        ]
        if properties:
            changed.append(ResourceChange(key, properties))
        else:
            unchanged += 1
    return PlanChanges(added, removed, changed, unchanged)


def _show(value: Any) -> str:
    if isinstance(value, str) and "\n" in value:
        return f"<{len(value.splitlines())} lines>"
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= MAX_VALUE_WIDTH else text[: MAX_VALUE_WIDTH - 3] + "..."


def _as_lines(value: Any) -> list[str] | None:
    """Multi-line text, or a JSON document inside a string, as lines worth a line diff."""
    if not isinstance(value, str):
        return None
    if value.lstrip().startswith(("{", "[")):
        try:
            return json.dumps(json.loads(value), indent=2, sort_keys=True).splitlines()
        except json.JSONDecodeError:
            pass
    return value.splitlines() if "\n" in value else None


def _property_lines(path: str, old: Any, new: Any) -> Iterator[str]:
    if old is _ABSENT:
        yield f"    + {path}: {_show(new)}"
        return
    if new is _ABSENT:
        yield f"    - {path}: {_show(old)}"
        return
    old_lines, new_lines = _as_lines(old), _as_lines(new)
    if old_lines is not None and new_lines is not None:
        yield f"    ~ {path}:"
        body = list(difflib.unified_diff(old_lines, new_lines, lineterm="", n=1))[2:]  # drop the ---/+++ header
        for line in body[:MAX_TEXT_DIFF_LINES]:
            yield f"        {line}"
        if len(body) > MAX_TEXT_DIFF_LINES:
            yield f"        ... {len(body) - MAX_TEXT_DIFF_LINES} more diff lines"
        return
    yield f"    ~ {path}: {_show(old)} -> {_show(new)}"


def _estimate_lines(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The estimates beside the resources (e.g. the days a Prometheus volume holds) that changed."""
    lines = []
    for name in sorted(set(old) | set(new)):
        before, after = flatten(old.get(name) or {}), flatten(new.get(name) or {})
        for path in sorted(set(before) | set(after)):
            if before.get(path) != after.get(path):
                lines.append(f"~ estimate {name}.{path}: {_show(before.get(path))} -> {_show(after.get(path))}")
    return lines


def diff_plans(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """Added, removed and changed resources, property by property, in a stable order.

    `old` None means there is no snapshot yet: everything shows as added.
    """
    changes = compare(old, new)
    stack = new.get("stack", "?")
    lines = []
    estimates = _estimate_lines((old or {}).get("estimates", {}), new.get("estimates", {}))
    if changes.empty and not estimates:
        return f"stack {stack}: no changes ({changes.unchanged} resources match the snapshot)\n"
    for resource in changes.added:
        lines.append(f"+ {resource['type']}  {resource['name']}")
        for path, value in flatten(resource.get("props") or {}).items():
            lines.append(f"    {path}: {_show(value)}")
    for resource in changes.removed:
        lines.append(f"- {resource['type']}  {resource['name']}")
    for change in changes.changed:
        lines.append(f"~ {change.key[0]}  {change.key[1]}")
        for path, before, after in change.properties:
            lines.extend(_property_lines(path, before, after))
    lines.extend(estimates)
    lines.append("")
    lines.append(f"stack {stack}: {len(changes.added)} to add, {len(changes.removed)} to remove, "
                 f"{len(changes.changed)} to change, {changes.unchanged} unchanged")
    return "\n".join(lines) + "\n"


def current_plan(stack: str) -> dict[str, Any]:
    """The plan of the program as it is now, computed offline (what `infra plan STACK --json` writes)."""
    from infra.engine import evaluate_stack, plan_document

    settings, evaluation = evaluate_stack(stack)
    return json.loads(dumps_plan(plan_document(evaluation, settings)))


def main(argv: list[str] | None = None) -> int:
    """`python -m infra.plan_diff OLD.json NEW.json`: the diff between two plan files (CI: base branch vs pull request).

    A missing or empty OLD file counts as no snapshot (everything added).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.plan_diff", description=main.__doc__)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    old_text = args.old.read_text() if args.old.exists() else ""
    old = json.loads(old_text) if old_text.strip() else None
    print(diff_plans(old, json.loads(args.new.read_text())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
