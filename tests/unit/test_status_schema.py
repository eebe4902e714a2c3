"""Discoverer status and drain request values: strict, bounded, key and value agree."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.common.consumers import parse_statuses, sessions_left, stragglers
from agents.common.schema import (
    MAX_STATUS_BYTES,
    DiscovererStatus,
    DrainRequest,
    SchemaError,
    discoverer_key,
    drain_key,
    parse_discoverer_status,
    parse_drain_key,
    parse_drain_request,
)

PREFIX = "/pf"
CID = "ab" * 32
INSTANCE = f"/pf/services/web/host-a/{CID}:80"


def status(**overrides: object) -> DiscovererStatus:
    fields: dict[str, object] = {
        "id": "consumer-1",
        "agent_version": "0.1.0",
        "revision": 10,
        "services": ("web",),
        "serves_all": False,
    }
    fields.update(overrides)
    return DiscovererStatus.model_validate(fields)


def raw(**overrides: object) -> bytes:
    value = json.loads(status().to_json())
    value.update(overrides)
    return json.dumps(value).encode()


def test_status_round_trip() -> None:
    original = status(draining={INSTANCE: 3})
    key = discoverer_key(PREFIX, original.id)
    assert key == "/pf/discoverers/consumer-1"
    assert parse_discoverer_status(PREFIX, key.encode(), original.to_json()) == original


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("/pf/discoverers/other", raw(), "does not match"),
        ("/pf/discoverers/bad id", raw(), "is not <prefix>/discoverers/<id>"),
        ("/pf/discoverers/", raw(), "is not <prefix>/discoverers/<id>"),
        ("/other/discoverers/consumer-1", raw(), "is not <prefix>/discoverers/<id>"),
        ("/pf/discoverers/consumer-1", b"{not json", "Invalid JSON"),
        ("/pf/discoverers/consumer-1", b"[]", "value"),
        ("/pf/discoverers/consumer-1", raw(revision="10"), "revision"),
        ("/pf/discoverers/consumer-1", raw(revision=-1), "revision"),
        ("/pf/discoverers/consumer-1", raw(serves_all=1), "serves_all"),
        ("/pf/discoverers/consumer-1", raw(version=2), "version"),
        ("/pf/discoverers/consumer-1", raw(services=["<script>"]), "services"),
        ("/pf/discoverers/consumer-1", raw(agent_version="1 ; rm"), "agent_version"),
        ("/pf/discoverers/consumer-1", raw(draining={INSTANCE: -1}), "draining"),
        ("/pf/discoverers/consumer-1", raw(draining={"/pf/x": 1}), "not an instance key"),
        ("/pf/discoverers/consumer-1", raw(updated_at="2026-01-01T00:00:00"), "updated_at"),
        ("/pf/discoverers/consumer-1", b" " * (MAX_STATUS_BYTES + 1), "exceeds"),
        ("/pf/discoverers/" + "a" * 600, raw(), "longer than"),
    ],
)
def test_bad_status_is_refused_with_a_reason(key: str, value: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        parse_discoverer_status(PREFIX, key, value)


@given(st.binary(max_size=300))
def test_any_status_bytes_parse_or_raise_schema_error(value: bytes) -> None:
    with contextlib.suppress(SchemaError):
        parse_discoverer_status(PREFIX, "/pf/discoverers/consumer-1", value)


def test_drain_request_round_trip_and_key() -> None:
    key = drain_key(PREFIX, CID)
    assert key == f"/pf/drains/{CID}"
    assert parse_drain_key(PREFIX, key.encode()) == CID
    request = DrainRequest(reason="upgrade to v2 (ops)")
    assert parse_drain_request(PREFIX, key, request.to_json()) == request


@pytest.mark.parametrize(
    "key", [f"/pf/drains/{CID[:12]}", f"/pf/drains/{CID.upper()}", "/pf/drains/", "/pf/drainsx"]
)
def test_drain_key_must_name_a_full_container_id(key: str) -> None:
    with pytest.raises(SchemaError):
        parse_drain_key(PREFIX, key)
    with pytest.raises(SchemaError):
        drain_key(PREFIX, key.rpartition("/")[2])


@pytest.mark.parametrize(
    "value",
    [
        b"garbage",
        b'{"version": 1, "reason": "a\\nb"}',
        json.dumps({"reason": "x" * 200}).encode(),
        b"{" + b" " * 2000 + b"}",
        b'{"requested_at": "yesterday"}',
    ],
)
def test_bad_drain_value_is_refused(value: bytes) -> None:
    with pytest.raises(SchemaError):
        parse_drain_request(PREFIX, f"/pf/drains/{CID}", value)


def test_stragglers_are_the_serving_discoverers_behind() -> None:
    statuses = {
        "a": status(id="a", revision=5),
        "b": status(id="b", revision=12),
        "c": status(id="c", revision=1, services=("api",)),  # does not serve web
        "d": status(id="d", revision=3, services=(), serves_all=True),
    }
    assert stragglers(statuses, "web", 10) == ["a", "d"]
    assert stragglers(statuses, "web", 3) == []
    assert stragglers(statuses, "api", 2) == ["c"]


def test_sessions_left_sums_the_given_instances_per_discoverer() -> None:
    other = f"/pf/services/web/host-a/{CID}:81"
    unrelated = f"/pf/services/web/host-b/{'cd' * 32}:80"
    statuses = {
        "a": status(id="a", draining={INSTANCE: 2, other: 1, unrelated: 7}),
        "b": status(id="b", draining={INSTANCE: 0}),
        "c": status(id="c"),
    }
    assert sessions_left(statuses, [INSTANCE, other]) == {"a": 3}
    assert sessions_left(statuses, [unrelated]) == {"a": 7}
    assert sessions_left(statuses, []) == {}


def test_parse_statuses_skips_bad_values() -> None:
    good = status(updated_at=datetime(2026, 1, 1, tzinfo=UTC))
    entries = [
        ("/pf/discoverers/consumer-1", good.to_json(), 4),
        ("/pf/discoverers/evil", b"\x00" * 10, 5),
        (b"/pf/discoverers/x", b"{}", 6),
    ]
    assert parse_statuses(PREFIX, entries) == {"consumer-1": good}
