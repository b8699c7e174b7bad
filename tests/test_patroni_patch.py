"""dynamic_config_patch: the smallest PATCH /config body, compared the way Patroni 3.0.2 compares."""

from __future__ import annotations

import copy

import pytest

from infra.hostagent.patroni import dynamic_config_patch

# GET /config of the prod cluster as Patroni returns it (numbers stay numbers, 'on' stays a string).
CURRENT = {
    "ttl": 20, "loop_wait": 2, "retry_timeout": 9, "primary_start_timeout": 30,
    "maximum_lag_on_failover": 1048576, "synchronous_mode": True, "synchronous_mode_strict": False,
    "postgresql": {
        "use_pg_rewind": True, "use_slots": True,
        "parameters": {"max_connections": 400, "wal_level": "replica", "hot_standby": "on", "wal_keep_size": "1GB"},
    },
}


def patroni_patch_config(config: dict, data: dict) -> None:
    """What Patroni's PATCH /config does with a body (patroni.utils.patch_config, 3.0.2)."""
    for name, value in data.items():
        if value is None:
            config.pop(name, None)
        elif name in config:
            if isinstance(value, dict):
                if isinstance(config[name], dict):
                    patroni_patch_config(config[name], value)
                else:
                    config[name] = value
            elif str(config[name]) != str(value):
                config[name] = value
        else:
            config[name] = value


def test_nothing_to_patch_when_desired_matches():
    assert dynamic_config_patch(CURRENT, {"loop_wait": 2, "postgresql": {"parameters": {"max_connections": 400}}}) == {}
    assert dynamic_config_patch(CURRENT, {}) == {}


def test_numbers_and_their_strings_are_the_same_value():
    # Patroni keeps whichever type is stored when str() agrees, so comparing types would patch forever.
    assert dynamic_config_patch(CURRENT, {"loop_wait": "2", "postgresql": {"parameters": {"max_connections": "400"}}}) == {}
    stored_as_text = {"postgresql": {"parameters": {"max_connections": "400"}}}
    assert dynamic_config_patch(stored_as_text, {"postgresql": {"parameters": {"max_connections": 400}}}) == {}
    assert dynamic_config_patch(CURRENT, {"synchronous_mode": True}) == {}


def test_only_changed_keys_are_sent_nested_key_by_key():
    desired = {"loop_wait": 3, "ttl": 20, "postgresql": {"use_slots": True, "parameters": {
        "max_connections": 410, "wal_level": "replica", "work_mem": "8MB"}}}
    assert dynamic_config_patch(CURRENT, desired) == {
        "loop_wait": 3, "postgresql": {"parameters": {"max_connections": 410, "work_mem": "8MB"}}}


def test_none_removes_a_key_only_when_present():
    assert dynamic_config_patch(CURRENT, {"postgresql": {"parameters": {"hot_standby": None}}}) == {
        "postgresql": {"parameters": {"hot_standby": None}}}
    assert dynamic_config_patch(CURRENT, {"failsafe_mode": None, "postgresql": {"parameters": {"work_mem": None}}}) == {}
    assert dynamic_config_patch({"failsafe_mode": None}, {"failsafe_mode": None}) == {}


def test_a_missing_or_scalar_section_is_sent_whole_without_nulls():
    assert dynamic_config_patch(CURRENT, {"standby_cluster": {"host": "x", "port": None}}) == {"standby_cluster": {"host": "x"}}
    slots = {"a": {"type": "physical"}}
    assert dynamic_config_patch({"slots": "bad"}, {"slots": slots}) == {"slots": slots}
    assert dynamic_config_patch(CURRENT, {"standby_cluster": {"port": None}}) == {}


def test_values_that_differ_as_text_are_patched():
    assert dynamic_config_patch(CURRENT, {"synchronous_mode": "on"}) == {"synchronous_mode": "on"}
    assert dynamic_config_patch(CURRENT, {"failsafe_mode": False}) == {"failsafe_mode": False}  # absent: added


@pytest.mark.parametrize("desired", [
    {"loop_wait": 3, "maximum_lag_on_failover": 2097152},
    {"postgresql": {"parameters": {"max_connections": "410", "hot_standby": None, "work_mem": "8MB"}}},
    {"failsafe_mode": True, "postgresql": {"parameters": {"max_connections": 400}}},
    {"standby_cluster": {"host": "x", "port": None}, "ttl": "30"},
])
def test_patching_converges_in_one_step(desired):
    config = copy.deepcopy(CURRENT)
    patch = dynamic_config_patch(config, desired)
    patroni_patch_config(config, patch)
    assert dynamic_config_patch(config, desired) == {}
    # Keys desired does not name are untouched.
    for key in set(CURRENT) - set(desired):
        assert config[key] == CURRENT[key]
