"""Pulumi.yaml and the stack files, checked the way the Pulumi CLI checks them before it runs the
program (ValidateStackConfigAndApplyProjectConfig in pulumi/sdk/go/common/workspace): a stack
key of this project that Pulumi.yaml does not declare is an error, a declared key without a
default must be set, a value must match its declared type, and a secret must be encrypted."""

from __future__ import annotations

import pytest
import yaml

from infra.settings import OPTIONAL_SECRET_KEYS, PROJECT, SECRET_KEYS, StackSettings, load_settings
from tests.conftest import ROOT, STACKS, stack_config

PROJECT_FILE = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
DECLARED = PROJECT_FILE["config"]
SIMPLE_TYPES = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict}


def stack_values(stack: str) -> dict:
    raw = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())["config"]
    return {key.removeprefix(f"{PROJECT}:"): value for key, value in raw.items() if key.startswith(f"{PROJECT}:")}


def test_project_file_runs_the_program_from_the_venv():
    assert PROJECT_FILE["name"] == PROJECT
    assert PROJECT_FILE["main"] == "infra/" and PROJECT_FILE["stackConfigDir"] == "stacks"
    assert PROJECT_FILE["runtime"] == {"name": "python", "options": {"toolchain": "pip", "virtualenv": ".venv"}}
    assert (ROOT / "infra" / "__main__.py").exists()


def test_every_declaration_is_typed_and_described():
    for key, declaration in DECLARED.items():
        assert declaration["type"] in SIMPLE_TYPES, key
        assert declaration.get("description"), key
        if declaration["type"] == "array":
            assert declaration["items"]["type"] in SIMPLE_TYPES, key
        if declaration["type"] == "object":
            assert "default" not in declaration, f"{key}: the CLI stores a non-array default as text"


def test_declarations_are_exactly_the_settings_and_the_secrets():
    settings_keys = {f.alias or name for name, f in StackSettings.model_fields.items()} - {"stack", "region"}
    assert set(DECLARED) == settings_keys | set(SECRET_KEYS) | set(OPTIONAL_SECRET_KEYS)
    for key in SECRET_KEYS:
        assert DECLARED[key].get("secret") is True and "default" not in DECLARED[key]
    for key in OPTIONAL_SECRET_KEYS:  # empty unless set: the program demands it only with its setting
        assert DECLARED[key].get("secret") is True and DECLARED[key]["default"] == ""


def test_declared_defaults_agree_with_the_settings_defaults():
    for key, declaration in DECLARED.items():
        if "default" in declaration:
            if key in OPTIONAL_SECRET_KEYS:
                continue
            field = next(f for name, f in StackSettings.model_fields.items() if (f.alias or name) == key)
            assert field.default == declaration["default"], key


@pytest.mark.parametrize("stack", STACKS)
def test_stack_passes_the_cli_validation(stack):
    values = stack_values(stack)
    undeclared = set(values) - set(DECLARED)
    assert not undeclared, f"Stack '{stack}' uses configuration values {undeclared} which are not defined by the project"
    for key, declaration in DECLARED.items():
        if key in SECRET_KEYS + OPTIONAL_SECRET_KEYS:
            assert key not in values or set(values[key]) == {"secure"}, f"{key} must be set with --secret"
            continue
        if key not in values:
            assert "default" in declaration, f"Stack '{stack}' is missing configuration value '{key}'"
            continue
        assert isinstance(values[key], SIMPLE_TYPES[declaration["type"]]), f"{key} must be of type {declaration['type']}"


@pytest.mark.parametrize("stack", STACKS)
def test_cli_defaults_applied_load_the_same_settings(stack):
    """The CLI fills declared defaults into the config it hands the program; the result must not change."""
    config = stack_config(stack)
    for key, declaration in DECLARED.items():
        if "default" in declaration:
            config.setdefault(f"{PROJECT}:{key}", declaration["default"])
    assert load_settings(config, stack) == load_settings(stack_config(stack), stack)
