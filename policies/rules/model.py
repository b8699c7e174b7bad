"""What every rule sees: a plain resource (type, name, props) whose unknown values are one marker.

The same rule runs over three sources, and each has its own shape:
- pulumi_policy (preview / up): props behind a proxy that raises `UnknownValueError` on a value the
  engine does not know yet (an id, an ARN of a resource still to be created);
- the offline plan (`infra plan --json`): plain dicts, secrets replaced by "[secret]";
- the tests: plain dicts, possibly holding the engine's unknown sentinels.
`normalize` turns all three into plain dicts and lists with `UNKNOWN` where the value is not known,
so a rule skips what it cannot see instead of crashing or reporting a false violation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pulumi_policy import proxy

# The engine's wire sentinels for unknown values, one per type, as the policy SDK defines them.
UNKNOWN_SENTINELS = frozenset({
    proxy.UNKNOWN_BOOLEAN_VALUE, proxy.UNKNOWN_NUMBER_VALUE, proxy.UNKNOWN_STRING_VALUE, proxy.UNKNOWN_ARRAY_VALUE,
    proxy.UNKNOWN_ASSET_VALUE, proxy.UNKNOWN_ARCHIVE_VALUE, proxy.UNKNOWN_OBJECT_VALUE,
})
# How the offline plan (`infra plan --json`, infra/engine.py) writes an unknown value.
PLAN_UNKNOWN = "[unknown]"


class _Unknown:
    """A value the engine will only know after the update (shown during preview)."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<unknown until the update>"

    def __bool__(self) -> bool:
        raise TypeError("an unknown value has no truth value; test `is UNKNOWN` first")


UNKNOWN: Any = _Unknown()


def is_unknown(value: Any) -> bool:
    return value is UNKNOWN


def _unknown_value_error() -> type[Exception]:
    try:
        from pulumi_policy.proxy import UnknownValueError
    except ImportError:  # the offline plan does not need the policy SDK
        return _NeverRaised
    return UnknownValueError


class _NeverRaised(Exception):
    pass


def normalize(value: Any) -> Any:
    """Plain dicts/lists, `UNKNOWN` for every unknown value (proxy or sentinel)."""
    unknown_error = _unknown_value_error()
    return _normalize(value, unknown_error)


def _normalize(value: Any, unknown_error: type[Exception]) -> Any:
    if isinstance(value, str):
        return UNKNOWN if value in UNKNOWN_SENTINELS or value == PLAN_UNKNOWN else value
    if isinstance(value, float) and value.is_integer():
        return int(value)  # protobuf Structs carry every number as a float: 90 days arrives as 90.0
    if isinstance(value, Mapping):
        result = {}
        for key in list(iter(value)):
            try:
                item = value[key]
            except unknown_error:
                result[key] = UNKNOWN
                continue
            result[key] = _normalize(item, unknown_error)
        return result
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = []
        for index in range(len(value)):
            try:
                item = value[index]
            except unknown_error:
                items.append(UNKNOWN)
                continue
            items.append(_normalize(item, unknown_error))
        return items
    return value


@dataclass(frozen=True)
class Resource:
    """One resource as a rule sees it. `props` is normalized (plain values, `UNKNOWN`)."""

    type: str
    name: str
    props: Mapping[str, Any]
    urn: str = ""
    parent: str | None = None
    # Property name -> names/URNs of the resources it was computed from (the engine knows these
    # even when the value itself is still unknown during preview).
    property_dependencies: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.type.rsplit(':', 1)[-1]} {self.name!r}"

    @property
    def tags(self) -> Mapping[str, Any]:
        tags = self.props.get("tags")
        return tags if isinstance(tags, Mapping) else {}

    def get(self, *path: str | int) -> Any:
        return dig(self.props, *path)

    def refs(self) -> set[str]:
        """Every way another resource's input may name this one: its id under the mocks, its name, its URN."""
        return {self.name, f"{self.name}_id", self.urn} - {""}


@dataclass(frozen=True)
class Finding:
    """A violation as a rule reports it: the resource (None = the stack) and the full message."""

    resource: Resource | None
    message: str


def dig(value: Any, *path: str | int) -> Any:
    """value[path[0]][path[1]]...; None when a step is missing, UNKNOWN when a step is unknown."""
    for step in path:
        if value is UNKNOWN:
            return UNKNOWN
        if isinstance(step, int):
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                return None
            value = value[step]
        else:
            if not isinstance(value, Mapping) or step not in value:
                return None
            value = value[step]
    return value


def as_list(value: Any) -> list[Any]:
    """A property that the provider accepts as one block or a list of blocks, as a list (UNKNOWN stays one item)."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def message(resource: Resource | None, found: str, rule: str, requirement: str) -> str:
    """Every violation reads the same way: which resource, what was found, which rule and what it wants."""
    where = resource.label if resource is not None else "stack"
    return f"{where}: {found} [rule {rule}: {requirement}]"


def by_type(resources: Iterable[Resource], *types: str) -> list[Resource]:
    return [r for r in resources if r.type in types]


@dataclass(frozen=True)
class Rule:
    """A guardrail: a name (the policy name), what it wants, and a check over plain resources.

    kind "resource": `check(resource, config)` is called for every resource of `resource_types`.
    kind "stack": `check(resources, config)` sees the whole stack (joins across resources).
    Both yield `Finding`s. `config_schema` is JSON schema per property, each with a default.
    """

    name: str
    category: str  # retention | storage | security | compute
    description: str
    kind: str
    check: Any
    resource_types: tuple[str, ...] = ()
    config_schema: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    severity: str = "high"

    def config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults from the schema, then the stack's policy config on top (unknown keys ignored)."""
        values = {key: schema["default"] for key, schema in self.config_schema.items()}
        for key, value in (overrides or {}).items():
            if key in self.config_schema:
                # The engine hands config over as protobuf Struct values, where every number is a float.
                if self.config_schema[key].get("type") == "integer" and isinstance(value, float) and value.is_integer():
                    value = int(value)
                values[key] = value
        return values

    def run_resource(self, resource: Resource, overrides: Mapping[str, Any] | None = None) -> list[Finding]:
        if self.kind != "resource" or resource.type not in self.resource_types:
            return []
        return list(self.check(resource, self.config(overrides)))

    def run_stack(self, resources: Sequence[Resource], overrides: Mapping[str, Any] | None = None) -> list[Finding]:
        if self.kind != "stack":
            return []
        return list(self.check(list(resources), self.config(overrides)))


def attached_to(target: Resource, resources: Sequence[Resource], resource_type: str, prop: str) -> list[Resource] | Any:
    """Resources of `resource_type` whose `prop` points at `target` (a bucket's configuration, a volume's attachment).

    They point by value (the target's id under the mocks, its name, or for a bucket its `bucket`
    name) or, during preview when the id is unknown, through the engine's property dependencies.
    UNKNOWN when a candidate's pointer is unknown and carries no dependency: then nobody can tell.
    """
    names = target.refs() | ({target.props["bucket"]} if isinstance(target.props.get("bucket"), str) else set())
    matched, undetermined = [], False
    for candidate in resources:
        if candidate.type != resource_type:
            continue
        pointer = candidate.props.get(prop)
        dependencies = set(candidate.property_dependencies.get(prop, ()))
        if (isinstance(pointer, str) and pointer in names) or dependencies & target.refs():
            matched.append(candidate)
        elif pointer is UNKNOWN and not dependencies:
            undetermined = True
    if not matched and undetermined:
        return UNKNOWN
    return matched


def policy_document(value: Any) -> Mapping[str, Any] | None | Any:
    """A policy given as JSON text or a mapping, as a mapping; None when it is no JSON object, UNKNOWN when unknown."""
    if value is UNKNOWN:
        return UNKNOWN
    if isinstance(value, Mapping):
        return value
    if isinstance(value, str):
        try:
            document = json.loads(value)
        except json.JSONDecodeError:
            return None
        return document if isinstance(document, Mapping) else None
    return None


def policy_statements(document: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The statements of a policy document (one statement or a list)."""
    return [s for s in as_list(document.get("Statement")) if isinstance(s, Mapping)]
