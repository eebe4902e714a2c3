"""Docker event lines → typed events (only the actions that change registrations)."""

from __future__ import annotations

import json

from agents.registrar.docker_source import LineSplitter, Overlong, _parse_event

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


def split(limit: int, *chunks: bytes) -> list[bytes | Overlong]:
    lines = LineSplitter(limit)
    return [line for chunk in chunks for line in lines.feed(chunk)]


def test_lines_are_joined_across_chunks_and_split_within_one() -> None:
    assert split(100, b'{"a":', b"1}\n{", b'"b":2}\n\n{"c"', b":3}\n") == [
        b'{"a":1}',
        b'{"b":2}',
        b'{"c":3}',
    ]


def test_a_line_over_the_limit_is_dropped_and_the_next_one_kept() -> None:
    event = line("start", blob="x" * 5000)
    over, after = split(1000, event[:700], event[700:3000], event[3000:] + b"\n", b"next\n")
    assert isinstance(over, Overlong) and after == b"next"
    assert over.size == len(event) and over.container_id == CID
    assert split(len(event), event + b"\n") == [event]  # at the limit: kept


def test_a_dropped_line_names_its_container_by_the_top_level_id() -> None:
    docker_order = json.dumps(
        {
            "status": "start",
            "id": CID,
            "Actor": {"ID": CID, "Attributes": {"id": "cd" * 32, "blob": "y" * 2000}},
        }
    ).encode()
    (over,) = split(100, docker_order + b"\n")
    assert isinstance(over, Overlong) and over.container_id == CID
    (anonymous,) = split(10, b'{"Action":"start","x":"' + b"z" * 50 + b'"}\n')
    assert isinstance(anonymous, Overlong) and anonymous.container_id is None
