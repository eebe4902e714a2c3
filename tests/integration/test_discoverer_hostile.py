"""Issue 9: hostile or malformed registrations, against the real etcd and HAProxy.

Tests for the discoverer's findings 1 (IPv6 scope text), 2 (naive
registered_at), 3 (long host ids), 4 (port ownership and listener mode) and
9 (listeners that cannot bind, or that an instance points back at). Each
runs the discoverer in-process (``serve()``, its own HAProxy and state
directory) with the helpers of ``test_discoverer_agent``; every request goes
to 127.0.0.1.

The behaviour specified here: a malformed or hostile value under a
well-formed key is *quarantined* (one log line naming the key, the gauge
``pilotfish_discoverer_quarantined`` on ``/metrics``, and
``"quarantined": [{"key": ..., "reason": ...}]`` in ``/healthz``, which stays
200 / ``"ok": true``); every other service keeps getting its updates; the
configuration on disk only holds lines of ``CONFIG_GRAMMAR``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from discoverer_support import (
    answered_by,
    eventually,
    healthz,
    make_instance,
    metric,
    never_answered_by,
    request,
)
from structlog.testing import capture_logs
from test_discoverer_agent import (
    Running,
    discoverer,
    endpoint_of,
    routable,
    upstreams,
    writer,
)

from agents.common.schema import Instance, instance_key
from agents.discoverer.config import grammar_violations
from tests.stack import free_port

pytestmark = pytest.mark.integration

QUARANTINED_GAUGE = "pilotfish_discoverer_quarantined"


# -- helpers ---------------------------------------------------------------------------


def raw_value(instance: Instance, **fields: Any) -> bytes:
    """The instance's JSON with some fields replaced by raw (possibly hostile) values."""
    data = instance.model_dump(mode="json")
    data.update(fields)
    return json.dumps(data).encode()


async def quarantine(d: Running) -> dict[str, str]:
    """``/healthz``'s quarantined keys → reasons (asserting the endpoint is 200 / ok)."""
    status, health = await healthz(d.admin_port)
    assert status == 200 and health.get("ok") is True, health
    entries = health.get("quarantined", [])
    assert isinstance(entries, list), health
    return {entry["key"]: entry["reason"] for entry in entries}


async def wait_quarantined(d: Running, key: str, within: float = 10.0) -> str:
    """Wait until ``key`` is listed as quarantined in ``/healthz``; its reason."""
    deadline = time.monotonic() + within
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert not d.task.done(), f"the discoverer exited: {d.task}"
        status, health = await healthz(d.admin_port)
        for entry in health.get("quarantined", []) or []:
            # Listed, and /healthz ok with it (a discoverer still starting is not yet ok).
            if entry.get("key") == key and status == 200 and health.get("ok") is True:
                reason = entry.get("reason")
                assert isinstance(reason, str) and reason.strip(), entry
                return reason
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"{key!r} not quarantined with /healthz ok within {within}s; last /healthz: {health}"
    )


async def wait_released(d: Running, key: str, within: float = 10.0) -> None:
    """Wait until ``key`` is no longer listed as quarantined."""
    deadline = time.monotonic() + within
    while key in await quarantine(d):
        assert time.monotonic() < deadline, f"{key!r} still quarantined after {within}s"
        await asyncio.sleep(0.02)


def config_text(d: Running) -> str:
    return (Path(d.settings.state_dir) / "haproxy.cfg").read_text()


def assert_config_in_grammar(d: Running) -> str:
    text = config_text(d)
    assert grammar_violations(text) == [], grammar_violations(text)
    return text


class ConfigWatch:
    """Reads haproxy.cfg every few milliseconds while running; keeps every bad line seen."""

    def __init__(self, d: Running) -> None:
        self.path = Path(d.settings.state_dir) / "haproxy.cfg"
        self.violations: list[str] = []
        self.reads = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConfigWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            try:
                text = self.path.read_text()
            except OSError:
                text = ""
            self.reads += 1
            self.violations += [
                line for line in grammar_violations(text) if line not in self.violations
            ]
            await asyncio.sleep(0.005)


def assert_alive(d: Running) -> None:
    assert not d.task.done(), f"the discoverer exited: {d.task!r}"


def logged_keys(logs: list[dict[str, Any]]) -> set[str]:
    return {str(entry["key"]) for entry in logs if "key" in entry}


async def _refused(port: int) -> bool:
    return refused(port)


def refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


# -- finding 1: IPv6 scope text carrying configuration -------------------------------------


async def test_ipv6_scope_with_newlines_is_quarantined_never_rendered(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    good_port, evil_port, late_port, injected_port = (free_port() for _ in range(4))
    hostile = f"fe80::1%x\nglobal\n    stats socket ipv4@127.0.0.1:{injected_port} level admin"
    async with upstreams("good", "late") as up, writer(endpoint_of(etcd), prefix) as w:
        await w.put(make_instance("good", up["good"].port, good_port))
        with capture_logs() as logs:
            async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
                await routable(good_port, "good")
                async with ConfigWatch(d) as watch:
                    # One as a new service (it would need a reload), one in an existing backend.
                    new_service = make_instance("evil", up["good"].port, evil_port)
                    in_backend = make_instance("good", up["good"].port, good_port, host="host-x")
                    keys = [instance_key(prefix, i) for i in (new_service, in_backend)]
                    for key, instance in zip(keys, (new_service, in_backend), strict=True):
                        await w.raw(key, raw_value(instance, address=hostile))
                    for key in keys:
                        await wait_quarantined(d, key)
                    # A new well-formed service: the configuration is rendered and reloaded.
                    await w.put(make_instance("late", up["late"].port, late_port))
                    await routable(late_port, "late")
                assert watch.violations == [] and watch.reads > 0, watch.violations
                assert await answered_by(good_port, "good")
                text = assert_config_in_grammar(d)
                assert "stats socket ipv4@" not in text and "fe80" not in text, text
                assert f"bind 127.0.0.1:{evil_port}" not in text, text
                assert refused(injected_port), "the injected admin socket is listening"
                assert await metric(d.admin_port, QUARANTINED_GAUGE) == 2
                assert_alive(d)
        assert set(keys) <= logged_keys(logs), logged_keys(logs)


# -- finding 2: a registered_at without a time zone -----------------------------------------


async def test_naive_registered_at_is_quarantined_and_others_keep_routing(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    good_port, naive_port, other_port = free_port(), free_port(), free_port()
    async with (
        upstreams("good", "good2", "other", "naive") as up,
        writer(endpoint_of(etcd), prefix) as w,
    ):
        await w.put(make_instance("good", up["good"].port, good_port))
        naive_service = make_instance("naive", up["naive"].port, naive_port)
        naive_in_good = make_instance("good", up["naive"].port, good_port, host="host-n")
        keys = [instance_key(prefix, i) for i in (naive_service, naive_in_good)]
        async with discoverer(tmp_path / "first", endpoint_of(etcd), prefix) as d:
            await routable(good_port, "good")
            for key, instance in zip(keys, (naive_service, naive_in_good), strict=True):
                await w.raw(key, raw_value(instance, registered_at="2024-01-01T00:00:00"))
            for key in keys:
                await wait_quarantined(d, key)
            # Updates keep flowing: a new service (reload) and a new instance (runtime).
            await w.put(make_instance("other", up["other"].port, other_port))
            await routable(other_port, "other")
            await w.put(make_instance("good", up["good2"].port, good_port, host="host-b"))
            await routable(good_port, "good2")
            assert await never_answered_by(good_port, "naive")
            assert refused(naive_port)
            assert_config_in_grammar(d)
            assert_alive(d)
        # The first HAProxy's workers are gone before the second discoverer starts,
        # so what answers below is the second one's.
        for port in (good_port, other_port):
            await eventually(lambda port=port: _refused(port), within=10)
        # A discoverer started while the keys exist starts and routes the others.
        async with discoverer(tmp_path / "second", endpoint_of(etcd), prefix) as d2:
            await routable(good_port, "good", within=15)
            await routable(good_port, "good2")
            await routable(other_port, "other")
            for key in keys:
                await wait_quarantined(d2, key)
            assert await metric(d2.admin_port, QUARANTINED_GAUGE) == 2
            # Its owner fixes the value: routed, and out of quarantine.
            await w.put(naive_in_good)
            await routable(good_port, "naive")
            await wait_released(d2, keys[1])
            assert keys[0] in await quarantine(d2)
            assert_alive(d2)


# -- finding 3: a host id of 46 to 63 characters --------------------------------------------


async def test_long_host_ids_are_routed_and_do_not_stall_other_services(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    long_port, other_port, third_port = free_port(), free_port(), free_port()
    # Valid names (NAME_PATTERN allows 63) sharing their first 60 characters: the
    # shortened server names must still differ.
    host_1 = "longhostname-" + "x" * 47 + "-01"
    host_2 = "longhostname-" + "x" * 47 + "-02"
    host_3 = "h" * 46
    assert (len(host_1), len(host_2), len(host_3)) == (63, 63, 46)
    async with (
        upstreams("l1", "l2", "l3", "o1", "o2", "t1") as up,
        writer(endpoint_of(etcd), prefix) as w,
    ):
        await w.put(make_instance("other", up["o1"].port, other_port))
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(other_port, "o1")
            for name, host in (("l1", host_1), ("l2", host_2), ("l3", host_3)):
                await w.put(make_instance("longhost", up[name].port, long_port, host=host))
            for name in ("l1", "l2", "l3"):
                await routable(long_port, name)
            # Another service changed afterwards gets its update at once (no stall).
            await w.put(make_instance("other", up["o2"].port, other_port, host="host-b"))
            took = await routable(other_port, "o2", within=5)
            assert took < 1.0, f"the other service's update took {took:.2f}s"
            await w.put(make_instance("third", up["t1"].port, third_port))
            await routable(third_port, "t1")
            longhost = f"{prefix}/services/longhost/"
            assert not [k for k in await quarantine(d) if k.startswith(longhost)]
            assert_config_in_grammar(d)
            assert_alive(d)


# -- finding 4: port ownership and listener mode --------------------------------------------


async def _sync(w: Any, up: dict[str, Any], name: str) -> None:
    """A new bystander service, waited for: everything put before it is applied.

    A new service needs a reload, and a reload renders the whole current
    catalog: once the bystander answers, listener changes put before it are
    live too (a runtime-only change could be waited for before them).
    """
    port = free_port()
    await w.put(make_instance(f"bystander-{name}", up[name].port, port, host=f"host-{name}"))
    await routable(port, name, within=15)


async def test_port_owner_keeps_its_port_when_its_registrar_rewrites_registered_at(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port, b_private = free_port(), free_port()
    now = datetime.now(UTC)
    async with (
        upstreams("A", "B", "s1", "s2") as up,
        writer(endpoint_of(etcd), prefix) as w,
    ):
        a = make_instance("alpha", up["A"].port, port, registered_at=now)
        await w.put(a)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(port, "A")
            # B comes later (a higher create_revision) but its registrar's clock says
            # it is older: the clock must not decide.
            b = make_instance(
                "beta", up["B"].port, b_private, frontend_port=port,
                registered_at=now - timedelta(days=1),
            )  # fmt: skip
            await w.put(b)
            await _sync(w, up, "s1")
            assert await never_answered_by(port, "B"), "B took A's port by its registered_at"
            # A's registrar restarts and rewrites A's key with a newer time.
            await w.put(a.model_copy(update={"registered_at": now + timedelta(hours=1)}))
            await _sync(w, up, "s2")
            assert await answered_by(port, "A")
            assert await never_answered_by(port, "B"), "A's rewrite handed its port to B"
            assert_config_in_grammar(d)
            assert_alive(d)


async def test_port_owner_keeps_its_port_while_it_has_any_instance(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port, b_private = free_port(), free_port()
    async with (
        upstreams("A1", "A2", "B", "s1", "s2") as up,
        writer(endpoint_of(etcd), prefix) as w,
    ):
        a1 = make_instance("alpha", up["A1"].port, port)
        await w.put(a1)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(port, "A1")
            await w.put(make_instance("beta", up["B"].port, b_private, frontend_port=port))
            await _sync(w, up, "s1")
            # A's oldest instance is replaced by a newer one (registered after B).
            a2 = make_instance("alpha", up["A2"].port, port, host="host-b")
            await w.put(a2)
            await routable(port, "A2")
            await w.delete(a1)
            await _sync(w, up, "s2")
            assert await never_answered_by(port, "A1")
            assert await answered_by(port, "A2")
            assert await never_answered_by(port, "B"), "B took the port while A had an instance"
            # A has no instance left: the port is free, B gets it.
            await w.delete(a2)
            try:
                await routable(port, "B", within=15)
            except AssertionError:
                raise AssertionError(
                    f"B never got the freed port: {await healthz(d.admin_port)}"
                ) from None
            assert_config_in_grammar(d)
            assert_alive(d)


async def test_instance_whose_mode_differs_from_its_listener_is_quarantined(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    async with upstreams("tcp1", "http1", "s1") as up, writer(endpoint_of(etcd), prefix) as w:
        first = make_instance("alpha", up["tcp1"].port, port, mode="tcp")
        await w.put(first)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(port, "tcp1")
            other_mode = make_instance("alpha", up["http1"].port, port, host="host-b", mode="http")
            await w.put(other_mode)
            await _sync(w, up, "s1")
            assert await never_answered_by(port, "http1"), "an http instance routed on tcp"
            reason = await wait_quarantined(d, instance_key(prefix, other_mode))
            assert "mode" in reason or "http" in reason, reason
            assert instance_key(prefix, first) not in await quarantine(d)
            assert await answered_by(port, "tcp1")
            # The tcp instance goes (a redeploy that changed pilotfish.mode): the
            # service's remaining instance gives the listener its mode, on the same port.
            await w.delete(first)
            try:
                await routable(port, "http1", within=15)
            except AssertionError:
                raise AssertionError(
                    f"the http instance never took over: {await healthz(d.admin_port)}"
                ) from None
            await wait_released(d, instance_key(prefix, other_mode))
            assert_config_in_grammar(d)
            assert_alive(d)


# -- finding 9 (second half): a registration pointing a frontend at itself -------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::ffff:127.0.0.1"])
async def test_instance_pointing_at_its_own_listener_is_quarantined(
    etcd: Any, prefix: str, tmp_path: Path, address: str
) -> None:
    """Consumer frontends bind 127.0.0.1; each of these addresses reaches that
    listener from the consumer host (0.0.0.0 and the IPv4-mapped address too),
    so HAProxy would connect to itself, connection after connection."""
    good_port, loop_port = free_port(), free_port()
    async with upstreams("good", "s1") as up, writer(endpoint_of(etcd), prefix) as w:
        await w.put(make_instance("good", up["good"].port, good_port))
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(good_port, "good")
            looping = make_instance("loop", loop_port, loop_port).model_copy(
                update={"address": address}
            )
            await w.put(looping)
            await _sync(w, up, "s1")
            reason = await wait_quarantined(d, instance_key(prefix, looping))
            # 0.0.0.0 is refused by the schema (HAProxy would connect a server
            # there to the client's own destination); the others by the catalog.
            expected = ("does not name one host",) if address == "0.0.0.0" else ("own listener",)
            assert any(text in reason for text in expected), reason
            began = time.monotonic()
            await request(loop_port, within=3.0)  # a 503 or a refusal, at once
            assert time.monotonic() - began < 2.0, "a request to the looping service hung"
            assert await answered_by(good_port, "good")
            assert_alive(d)


# -- finding 9: a listener that cannot bind ------------------------------------------------


@pytest.mark.parametrize(
    "via", ["private_port", "frontend_port", "frontend_port, taken after the discoverer's check"]
)
async def test_listener_that_cannot_bind_is_quarantined_and_reloads_go_on(
    etcd: Any, prefix: str, tmp_path: Path, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third case skips the sink's own pre-reload bind check (as if the port
    were taken between that check and the reload): HAProxy's failed reload must
    name the listener, and the reload go on without it."""
    if "after" in via:
        # The sink's own check, as the sink module names it (an error here means
        # it moved: point this at its new name, do not drop the case).
        from agents.discoverer.haproxy import sink

        monkeypatch.setattr(sink, "bind_error", lambda address, port: None)
    good_port, taken, y_port, x_private = free_port(), free_port(), free_port(), free_port()
    # A plain listening socket, no SO_REUSEPORT: HAProxy cannot bind next to it.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", taken))
    blocker.listen()
    try:
        async with upstreams("good", "x", "y") as up, writer(endpoint_of(etcd), prefix) as w:
            await w.put(make_instance("good", up["good"].port, good_port))
            async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
                await routable(good_port, "good")
                if via == "private_port":
                    x = make_instance("xsvc", up["x"].port, taken)
                else:
                    x = make_instance("xsvc", up["x"].port, x_private, frontend_port=taken)
                await w.put(x)
                reason = await wait_quarantined(d, instance_key(prefix, x), within=15)
                # Y, added afterwards, gets its listener: reloads still work.
                await w.put(make_instance("ysvc", up["y"].port, y_port))
                try:
                    await routable(y_port, "y", within=15)
                except AssertionError:
                    raise AssertionError(
                        f"Y never got its listener: {await healthz(d.admin_port)}"
                    ) from None
                assert re.search(r"bind|in use", reason, re.I), reason
                assert await answered_by(good_port, "good")
                status, health = await healthz(d.admin_port)
                assert status == 200 and health["ok"] is True, health
                assert await metric(d.admin_port, QUARANTINED_GAUGE) == 1
                text = assert_config_in_grammar(d)
                assert f":{taken}\n" not in text, "the listener that cannot bind is still rendered"
                assert_alive(d)
                # Freeing the port later is not required to bring X back (issue 9): not tested.
    finally:
        blocker.close()
