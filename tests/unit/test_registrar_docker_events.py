"""Docker event lines → typed events (only the actions that change registrations)."""

from __future__ import annotations

import json

from agents.registrar.docker_source import _parse_event

CID = "ab" * 32


def line(action: str, **attributes: str) -> bytes:
    return json.dumps(
        {
            "Type": "container",
            "Action": action,
            "Actor": {"ID": CID, "Attributes": attributes},
            "timeNano": 1700000000123456789,
        }
    ).encode()


def test_start_event_is_typed_with_its_time() -> None:
    event = _parse_event(line("start", name="web"))
    assert event is not None
    assert (event.action, event.container_id, event.time_ns) == ("start", CID, 1700000000123456789)
    assert event.attributes == {"name": "web"}


def test_health_status_suffix_is_cut_off() -> None:
    event = _parse_event(line("health_status: healthy"))
    assert event is not None and event.action == "health_status"


def test_kill_keeps_its_signal() -> None:
    event = _parse_event(line("kill", signal="15"))
    assert event is not None and event.attributes["signal"] == "15"


def test_irrelevant_actions_and_garbage_are_dropped() -> None:
    assert _parse_event(line("exec_create: test -e /tmp/healthy")) is None
    assert _parse_event(line("attach")) is None
    assert _parse_event(b"{not json") is None
    assert _parse_event(json.dumps({"Action": "start"}).encode()) is None
