"""PostgreSQL parameters in the stack file (`patroni.parameters`): which names exist, which the program owns,
and whether a value is one PostgreSQL 15 accepts, from its own catalog (infra/pg_catalog.py). Pure.

A value is checked the way PostgreSQL parses it (guc.c): booleans, enums against their allowed values,
numbers with a unit converted to the parameter's own unit and held to its bounds. What is accepted is
rendered as given (booleans as on/off).
"""

from __future__ import annotations

import re

from infra.pg_catalog import SETTINGS

_BY_LOWER = {name.lower(): name for name in SETTINGS}

# What the rest of the program sets for reasons an override would break; each refused with its reason.
_REPLICATION = "replication, pg_rewind and Patroni need it as the program sets it"
_LOGS = "the audit-log shipper reads PostgreSQL's hourly files as the program names them"
_PATRONI = "Patroni sets it"
OWNED: dict[str, str] = {
    "archive_mode": "WAL archiving to the backups (pgBackRest)",
    "archive_command": "WAL archiving to the backups (pgBackRest)",
    "archive_library": "WAL archiving to the backups (pgBackRest)",
    "archive_timeout": "bounds the backups' RPO when writes are rare",
    "restore_command": "replicas and restores read WAL from the backups (pgBackRest)",
    "archive_cleanup_command": "pgBackRest expires WAL by the backups' retention",
    "wal_level": _REPLICATION,
    "wal_log_hints": _REPLICATION,
    "hot_standby": _REPLICATION,
    "max_wal_senders": "derived from patroni.nodes",
    "max_replication_slots": "derived from patroni.nodes",
    "wal_keep_size": _REPLICATION,
    "max_slot_wal_keep_size": _REPLICATION,
    "shared_preload_libraries": "pg_stat_statements and pgaudit are loaded on every member",
    "pgaudit.log": "the audit settings are `audit.*` in the stack file",
    "pgaudit.role": "the audit settings are `audit.*` in the stack file",
    "betting.audit_tables": "set from audit.tables",
    "max_connections": "set it with patroni.maxConnections",
    "unix_socket_directories": "the host agent, the exporter and the backup job connect through it",
    "listen_addresses": _PATRONI,
    "port": _PATRONI,
    "cluster_name": _PATRONI,
    "data_directory": _PATRONI,
    "config_file": _PATRONI,
    "hba_file": _PATRONI,
    "ident_file": _PATRONI,
    "synchronous_standby_names": "Patroni sets it from patroni.synchronousMode",
    "primary_conninfo": _PATRONI,
    "primary_slot_name": _PATRONI,
    "recovery_target": _PATRONI,
    "recovery_target_action": _PATRONI,
    "recovery_target_inclusive": _PATRONI,
    "recovery_target_lsn": _PATRONI,
    "recovery_target_name": _PATRONI,
    "recovery_target_time": _PATRONI,
    "recovery_target_timeline": _PATRONI,
    "recovery_target_xid": _PATRONI,
    "promote_trigger_file": _PATRONI,
    "logging_collector": _LOGS,
    "log_directory": _LOGS,
    "log_filename": _LOGS,
    "log_rotation_age": _LOGS,
    "log_rotation_size": _LOGS,
    "log_destination": _LOGS,
    "log_truncate_on_rotation": _LOGS,
}
assert set(OWNED) <= set(SETTINGS) | {"betting.audit_tables"}, sorted(set(OWNED) - set(SETTINGS))

# guc.c's units: memory in bytes, time in milliseconds.
_MEMORY_UNITS = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME_UNITS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_BASE = {"B": ("memory", 1), "kB": ("memory", 1024), "8kB": ("memory", 8192), "MB": ("memory", 1024**2),
         "us": ("time", 0.001), "ms": ("time", 1), "s": ("time", 1000), "min": ("time", 60_000)}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")
_TRUE = ("on", "true", "yes", "1")
_FALSE = ("off", "false", "no", "0")


class ParameterError(ValueError):
    pass


def canonical_name(name: str) -> str | None:
    """The catalog's spelling of a parameter name (names are case-insensitive), or None if PostgreSQL has none."""
    return _BY_LOWER.get(name.lower())


def in_unit(value, unit: str) -> float:
    """A number, or a string with one of guc.c's units, in `unit` (a parameter's own unit from the catalog)."""
    if isinstance(value, bool):
        raise ParameterError("expects a number")
    if isinstance(value, int | float):
        return float(value)
    match = _NUMBER.match(str(value))
    if not match:
        raise ParameterError("is not a number (with an optional unit)")
    number, suffix = float(match.group(1)), match.group(2)
    if not suffix:
        return number
    kind, base = _BASE.get(unit, (None, None))
    units = _MEMORY_UNITS if kind == "memory" else _TIME_UNITS if kind == "time" else {}
    if suffix not in units:
        allowed = ", ".join(units) if units else "none (a plain number)"
        raise ParameterError(f"unit {suffix!r} is not one of {allowed}")
    return number * units[suffix] / base


def check_value(name: str, value) -> str | int | float:
    """The value as rendered, if PostgreSQL 15 accepts it for `name`; else ParameterError saying what is allowed."""
    vartype, unit, low, high, enumvals, context = SETTINGS[name]
    if context == "internal":
        raise ParameterError("is read-only (fixed when PostgreSQL is built or the cluster initialised)")
    if vartype == "bool":
        text = {True: "on", False: "off"}.get(value, str(value).lower()) if isinstance(value, bool | str) else None
        if text not in _TRUE + _FALSE:
            raise ParameterError("expects on or off")
        return "on" if text in _TRUE else "off"
    if vartype == "enum":
        text = {True: "on", False: "off"}[value] if isinstance(value, bool) else str(value).lower()
        # PostgreSQL matches an enum's name case-insensitively; most are lower case, a few not (TLSv1.2).
        spelled = {option.lower(): option for option in enumvals}
        if text not in spelled:
            raise ParameterError(f"expects one of {', '.join(enumvals)}")
        return spelled[text]
    if vartype == "string":
        if not isinstance(value, str):
            raise ParameterError("expects a string")
        return value
    number = in_unit(value, unit)
    if vartype == "integer" and isinstance(value, float):
        raise ParameterError("expects an integer")
    if low is not None and number < low or high is not None and number > high:
        shown = f" {unit}" if unit else ""
        raise ParameterError(f"out of range: {low} to {high}{shown}")
    return value


def memory_mib(value, name: str) -> float:
    """A memory parameter's value in MiB (its own unit when the value has none)."""
    unit = SETTINGS[name][1]
    return in_unit(value, unit) * _BASE[unit][1] / 1024**2
