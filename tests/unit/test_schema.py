"""The contract: keys and values the registrar writes and the discoverer reads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.common.schema import (
    Instance,
    SchemaError,
    instance_key,
    parse_entry,
    parse_key,
    services_prefix,
)

PREFIX = "/pilotfish"


def make(**overrides: object) -> Instance:
    fields: dict[str, object] = {
        "service": "whoami",
        "host_id": "host-a",
        "address": "127.0.0.2",
        "port": 32768,
        "private_port": 8080,
        "container_id": "0123456789ab" * 2,
    }
    fields.update(overrides)
    return Instance.model_validate(fields)


def test_key_layout() -> None:
    instance = make()
    key = instance_key(PREFIX, instance)
    assert key == f"/pilotfish/services/whoami/host-a/{'0123456789ab' * 2}:8080"
    assert key.startswith(services_prefix(PREFIX))
    assert parse_key(PREFIX, key) == ("whoami", "host-a", "0123456789ab" * 2, 8080)


def test_round_trip() -> None:
    instance = make(tags=("a", "b"), attributes={"zone": "eu-1"}, state="draining")
    parsed = parse_entry(PREFIX, instance_key(PREFIX, instance), instance.to_json())
    assert parsed == instance
    assert json.loads(instance.to_json())["version"] == 1


def test_same_registration_ignores_time() -> None:
    first = make()
    second = make()
    assert first.same_registration(second)
    assert not first.same_registration(make(weight=5))


@pytest.mark.parametrize(
    "overrides",
    [
        {"service": "bad name"},
        {"service": "a\nbind :80"},
        {"service": "x" * 300},
        {"service": "q'uote"},
        {"service": "hash#"},
        {"address": "example.com"},
        {"address": "1.2.3.4\n"},
        {"port": 0},
        {"port": 70000},
        {"weight": 999},
        {"tags": ["has space"]},
        {"attributes": {"k": "v v"}},
        {"container_id": "NOTHEX"},
    ],
)
def test_rejects_what_could_reach_haproxy(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make(**overrides)


def test_value_must_match_key() -> None:
    instance = make()
    other_key = instance_key(PREFIX, make(service="other"))
    with pytest.raises(SchemaError, match="does not match"):
        parse_entry(PREFIX, other_key, instance.to_json())


@pytest.mark.parametrize("value", [b"not json", b"{}", b'{"version": 2}', b"\xff\xfe"])
def test_bad_values_raise_schema_error(value: bytes) -> None:
    with pytest.raises(SchemaError):
        parse_entry(PREFIX, instance_key(PREFIX, make()), value)


@pytest.mark.parametrize(
    "key",
    [
        "/pilotfish/services/whoami/host-a/zz:80",
        "/pilotfish/services/who ami/host-a/0123456789ab:80",
        "/other/services/whoami/host-a/0123456789ab:80",
        "/pilotfish/services/whoami/0123456789ab:80",
    ],
)
def test_bad_keys_raise_schema_error(key: str) -> None:
    with pytest.raises(SchemaError):
        parse_key(PREFIX, key)


@given(st.binary(max_size=300), st.text(max_size=120))
def test_parse_entry_never_crashes(value: bytes, key: str) -> None:
    try:
        instance = parse_entry(PREFIX, key, value)
    except SchemaError:
        return
    assert instance_key(PREFIX, instance) == key
