"""Issue 9, property-based: no etcd value, however malformed or hostile, reaches
HAProxy's configuration or stops routing.

One discoverer (``serve()``, real etcd, real HAProxy) runs for the whole
module, with one well-formed service "good". Each hypothesis example writes
one to three values under well-formed keys: random bytes, random JSON, or a
valid Instance JSON with one or more fields replaced by hostile values
(newlines, ``%``, ``#``, quotes, spaces, long strings, odd unicode, naive and
aware times, huge / negative / float numbers, nested objects, lists for
strings). Then it changes the good service's weight and waits until HAProxy
shows it (so the discoverer has applied everything written before), and
asserts:

- the good service still routes (an HTTP request through its consumer port
  reaches its upstream);
- ``grammar_violations(haproxy.cfg) == []``;
- the discoverer runs, ``/healthz`` is 200 / ok, and the keys it lists as
  quarantined are all hostile keys of this example, never the good one;
  every key whose value the schema refuses is among them, and the gauge
  ``pilotfish_discoverer_quarantined`` counts them.

The hostile keys are deleted after every example. The discoverer runs on an
event loop of its own thread, so hypothesis drives plain synchronous examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from discoverer_support import answered_by, healthz, http_get, make_instance, metric
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from test_discoverer_agent import Running, Writer, discoverer, endpoint_of, upstreams, writer

from agents.common.schema import SchemaError, instance_key, parse_entry
from agents.discoverer.config import grammar_violations
from tests.stack import free_port, unique_prefix

pytestmark = pytest.mark.integration

T = TypeVar("T")

# -- the discoverer on a loop of its own -------------------------------------------------


class LoopThread:
    """An asyncio loop running in a daemon thread; ``run`` waits for one coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pf-prop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


# Where hostile values are written: (service, host id, container id). The
# private port is filled in at run time: its own reserved port for hx0-hx2,
# the good service's consumer port for "good" (an instance in the good
# backend) and "hxc" (a service wanting the good service's port), the stats
# page's and the admin endpoint's ports for "hxs" and "hxa".
SLOTS: list[tuple[str, str, str]] = [
    ("hx0", "host-h0", "a0a0a0a0a0a0"),
    ("hx1", "host-h1", "a1a1a1a1a1a1"),
    ("hx2", "h" * 63, "a2a2a2a2a2a2"),
    ("good", "evil-host", "a3a3a3a3a3a3"),
    ("hxc", "host-c", "a4a4a4a4a4a4"),
    # Services wanting the ports of HAProxy's stats page and of the admin endpoint.
    ("hxs", "host-s", "a5a5a5a5a5a5"),
    ("hxa", "host-a", "a6a6a6a6a6a6"),
]
GOOD_CONTAINER = "600d600d600d"
ANCHORS = 4
# A change to the good service reaches HAProxy within this (a reload in
# progress can hold it for a fraction of a second; a stall cannot).
UPDATE_WITHIN = 5.0


@dataclass
class Stage:
    loop: LoopThread
    d: Running
    w: Writer
    prefix: str
    good_port: int
    upstream_port: int
    ports: dict[str, int]
    weight: int = 100
    steps: int = 0
    slowest_update: float = 0.0
    quarantined_seen: set[str] = field(default_factory=set)

    def slot(self, index: int) -> tuple[str, dict[str, Any]]:
        """The key of a slot and a valid Instance (as JSON data) agreeing with it."""
        service, host, container = SLOTS[index]
        instance = make_instance(
            service, self.upstream_port, self.ports[service], host=host, container_id=container
        )
        return instance_key(self.prefix, instance), instance.model_dump(mode="json")

    def good(self, weight: int) -> Any:
        return make_instance(
            "good", self.upstream_port, self.good_port, container_id=GOOD_CONTAINER, weight=weight
        )


@pytest.fixture(scope="module")
def stage(etcd: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    prefix = unique_prefix("property")
    good_port = free_port()
    ports = {"hx0": free_port(), "hx1": free_port(), "hx2": free_port()}
    ports |= {"good": good_port, "hxc": good_port}
    loop = LoopThread()
    stack = contextlib.AsyncExitStack()

    async def setup() -> Stage:
        up = await stack.enter_async_context(upstreams("good"))
        w = await stack.enter_async_context(writer(endpoint_of(etcd), prefix))
        state = tmp_path_factory.mktemp("prop")
        d = await stack.enter_async_context(discoverer(state, endpoint_of(etcd), prefix))
        ports["hxs"] = int(d.settings.stats_address.rsplit(":", 1)[1])
        ports["hxa"] = d.admin_port
        s = Stage(loop, d, w, prefix, good_port, up["good"].port, ports)
        await w.put(s.good(s.weight))
        # Steady instances beside it, so that deleting an example's hostile
        # keys (up to 3 valid ones, on several hosts) never looks like a mass
        # loss to the discoverer's guard, which would rightly hold and alarm.
        for n in range(ANCHORS):
            anchor = make_instance("good", s.upstream_port, good_port, container_id=f"{n:012x}")
            await w.put(anchor)
        deadline = time.monotonic() + 20
        while not await answered_by(good_port, "good"):
            assert time.monotonic() < deadline, "the good service never routed"
            await asyncio.sleep(0.05)
        return s

    try:
        s = loop.run(setup(), 60)
        yield s
        print(
            f"\nproperty: {s.steps} steps passed, {len(s.quarantined_seen)} keys quarantined "
            f"at some step, slowest update of the good service {s.slowest_update:.3f}s"
        )
    finally:
        try:
            loop.run(stack.aclose(), 60)
        finally:
            loop.close()


# -- strategies -------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "", " ", "\n", "\r\n", "\t", "#", "%", "'", '"', "\\", "\x00", "a b", "a\nb", "a#b",
    "fe80::1%x\nglobal\n    stats socket ipv4@127.0.0.1:1 level admin",
    "fe80::1%eth0", "fe80::1%25x", "127.0.0.1\n", "127.0.0.1 check", "127.0.0.1:80",
    "127.0.0.1 weight 1\n    server x 1.2.3.4:80", "::ffff:127.0.0.1", "0x7f.0.0.1",
    "\nprogram p\n    command /bin/touch /tmp/pilotfish-pwned", "${HOME}", "%[env(HOME)]",
    "good", "x" * 64, "x" * 300, "x" * 10_000, "x" * 20_000, "é", "\u202e", "\ufeff",
    "\u2028", "\U0001f600", "\ufb01", "\uff21", "\u0663", "a\u0301", "\u00a0",
]  # fmt: skip
strings = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=40),
    st.text(alphabet=" \n\r\t#%'\"\\:;/.-_aA0é\u2028", max_size=30),
)
_zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-12))]
)
times = st.one_of(
    st.datetimes().map(lambda t: t.isoformat()),  # naive
    st.datetimes(timezones=_zones).map(lambda t: t.isoformat()),  # aware
    st.sampled_from(["2024-01-01T00:00:00", "2024-13-01T00:00:00Z", "yesterday", "1e309"]),
    # Valid, aware, and out of range once converted to UTC (astimezone raises).
    st.sampled_from(["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59"]),
)
# No valid port number (1..65535): a valid frontend_port would bind a port
# another test on this machine may be using.
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=0),
    st.integers(min_value=65536, max_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2**63, -(2**63) - 1, 10**300, 1.5, 80.0, True, False]),
)
json_any = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(
    strings, numbers, times, json_any, st.lists(strings, max_size=40),
    st.dictionaries(strings, strings, max_size=70),
)  # fmt: skip
FIELDS = [
    "version", "service", "host_id", "address", "port", "private_port", "protocol",
    "container_id", "container_name", "image", "image_id", "tags", "attributes", "health",
    "state", "mode", "weight", "check", "frontend_port", "registered_at", "unknown_field",
]  # fmt: skip
# Field-specific shapes on top of the generic ones.
SPECIFIC = {
    "registered_at": times,
    "tags": st.lists(strings, min_size=1, max_size=40),
    "attributes": st.dictionaries(strings, strings, min_size=1, max_size=70),
    "mode": st.sampled_from(["http", "tcp ", "HTTP", "health", "tcp\n"]),
    "state": st.sampled_from(["draining", "maint", "up\n", "down"]),
}


@st.composite
def hostile_write(draw: st.DrawFn) -> tuple[int, str, Any]:
    """(slot, kind, payload): raw bytes, JSON bytes, or field overrides of a valid value."""
    slot = draw(st.integers(min_value=0, max_value=len(SLOTS) - 1))
    kind = draw(st.sampled_from(["bytes", "json", "schema", "schema", "schema"]))
    if kind == "bytes":
        return slot, kind, draw(st.binary(max_size=300))
    if kind == "json":
        return slot, kind, draw(json_any)
    names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True))
    overrides = {}
    for name in names:
        shape = SPECIFIC.get(name)
        overrides[name] = draw(field_values if shape is None else st.one_of(shape, field_values))
    return slot, kind, overrides


def encode(stage: Stage, slot: int, kind: str, payload: Any) -> tuple[str, bytes]:
    key, base = stage.slot(slot)
    if kind == "bytes":
        return key, payload
    data = payload if kind == "json" else {**base, **payload}
    return key, json.dumps(data, allow_nan=True, ensure_ascii=False).encode()


# -- one step -------------------------------------------------------------------------


async def servers_state_weight(state_dir: str, server: str) -> int | None:
    """The good server's current weight as HAProxy's worker says (a fresh connection)."""
    reader, writer_ = await asyncio.open_unix_connection(str(Path(state_dir) / "admin.sock"))
    try:
        writer_.write(b"show servers state good\n")
        await writer_.drain()
        async with asyncio.timeout(2):
            text = (await reader.read()).decode(errors="replace")
    finally:
        writer_.close()
    header: list[str] = []
    for line in text.splitlines():
        if line.startswith("# "):
            header = line[2:].split()
            continue
        row = dict(zip(header, line.split(), strict=False))
        if row.get("srv_name") == server:
            return int(row["srv_uweight"])
    return None


async def step(stage: Stage, writes: dict[str, bytes]) -> None:
    d, w = stage.d, stage.w
    try:
        for key, value in writes.items():
            await w.raw(key, value)
        # The good service changes after them; once HAProxy has the change,
        # everything written before has gone through the discoverer.
        stage.weight = 1 + stage.weight % 256
        good = stage.good(stage.weight)
        await w.put(good)
        began = time.monotonic()
        deadline = began + UPDATE_WITHIN
        while True:
            assert not d.task.done(), f"the discoverer exited: {d.task!r}"
            with contextlib.suppress(OSError, TimeoutError):
                if await servers_state_weight(d.settings.state_dir, good.server_name) == (
                    stage.weight
                ):
                    break
            assert time.monotonic() < deadline, (
                f"the good service's update did not reach HAProxy within {UPDATE_WITHIN}s"
            )
            await asyncio.sleep(0.005)
        stage.slowest_update = max(stage.slowest_update, time.monotonic() - began)

        assert await answered_by(stage.good_port, "good"), "the good service no longer routes"
        stats_port = int(d.settings.stats_address.rsplit(":", 1)[1])
        status, page = await http_get(stats_port, "/;csv")
        assert status == 200 and page.startswith("# pxname"), (status, page[:200])
        config = (Path(d.settings.state_dir) / "haproxy.cfg").read_text()
        assert grammar_violations(config) == [], grammar_violations(config)

        status, health = await healthz(d.admin_port)
        assert status == 200 and health.get("ok") is True, health
        assert health["haproxy"]["master_alive"] is True, health
        listed = health.get("quarantined")
        assert isinstance(listed, list), f"/healthz has no quarantined list: {health}"
        quarantined = {entry["key"]: entry["reason"] for entry in listed}
        good_key = instance_key(stage.prefix, good)
        assert good_key not in quarantined, quarantined
        assert set(quarantined) <= set(writes), (
            f"quarantined keys this example did not write as hostile: "
            f"{set(quarantined) - set(writes)}"
        )
        for key, value in writes.items():
            try:
                parse_entry(stage.prefix, key, value)
            except SchemaError as error:
                assert key in quarantined, f"{key} refused by the schema ({error}), not quarantined"
        assert all(isinstance(r, str) and r for r in quarantined.values()), quarantined
        gauge = await metric(d.admin_port, "pilotfish_discoverer_quarantined")
        assert gauge == len(listed), (gauge, listed)  # a key may be listed once per stage
        stage.quarantined_seen |= set(quarantined)
        stage.steps += 1
    finally:
        for key in writes:
            with contextlib.suppress(Exception):
                await w.etcd.delete(key)


# -- the property ---------------------------------------------------------------------

_INJECTION = "fe80::1%x\nglobal\n    stats socket ipv4@127.0.0.1:1 level admin"


@settings(
    max_examples=30,
    deadline=timedelta(seconds=30),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: every example costs real I/O
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
@given(st.lists(hostile_write(), min_size=1, max_size=3))
@example([(3, "schema", {"address": _INJECTION}), (0, "schema", {"address": _INJECTION})])
@example([(0, "schema", {"registered_at": "2024-01-01T00:00:00"})])
@example([(4, "schema", {"registered_at": "2000-01-01T00:00:00+00:00"})])
@example([(5, "schema", {"tags": ["a"]}), (6, "schema", {"tags": ["b"]})])
@example([(3, "schema", {"mode": "http"}), (1, "bytes", b"\xff\xfe\x00")])
@example([(2, "json", [1, {"a": None}]), (0, "schema", {"tags": ["x" * 10_000]})])
@example(
    [
        (0, "schema", {"registered_at": "0001-01-01T00:00:00+23:59"}),
        (3, "schema", {"registered_at": "9999-12-31T23:59:59-23:59"}),
    ]
)
def test_no_value_reaches_the_config_or_stops_routing(
    stage: Stage, hostile: list[tuple[int, str, Any]]
) -> None:
    writes = dict(encode(stage, *entry) for entry in hostile)
    stage.loop.run(step(stage, writes), timeout=60)
