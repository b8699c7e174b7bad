"""Stack files (stacks/Pulumi.<stack>.yaml) read the way the Pulumi engine hands config to a program."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from infra.settings import StackSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]


class StackFileError(ValueError):
    pass


def read_stack_file(stack: str, stacks_dir: Path = ROOT / "stacks") -> tuple[dict[str, str], list[str]]:
    """The stack's config as the engine passes it (strings; structured values as JSON), and which keys are secure."""
    path = stacks_dir / f"Pulumi.{stack}.yaml"
    if not path.exists():
        known = sorted(p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in stacks_dir.glob("Pulumi.*.yaml"))
        raise StackFileError(f"unknown stack {stack!r}: no {path.relative_to(ROOT)}; stacks: {', '.join(known)}")
    document = yaml.safe_load(path.read_text()) or {}
    config: dict[str, str] = {}
    secure: list[str] = []
    for key, value in (document.get("config") or {}).items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            secure.append(key)  # ciphertext of the stack's secrets provider: only the CLI can open it
            continue
        config[key] = value if isinstance(value, str) else json.dumps(value)
    return config, secure


def load_stack(stack: str, stacks_dir: Path = ROOT / "stacks") -> tuple[StackSettings, dict[str, str], list[str]]:
    """A stack file's validated settings, its raw config and its encrypted keys (SettingsError/StackFileError)."""
    config, secure = read_stack_file(stack, stacks_dir)
    return load_settings(config, stack), config, secure
