"""The HAProxy sink against a real HAProxy: start, runtime changes, drains, HTTP retries."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agents.discoverer import commands as cmd
from tests.integration.upstreams import (
    HttpUpstream,
    TcpUpstream,
    catalog,
    eventually,
    free_port,
    http_once,
    running_sink,
    server,
    service,
    tcp_ask,
)

pytestmark = pytest.mark.integration


def _listening() -> set[str]:
    """Local addresses of listening IPv4 TCP sockets, as /proc/net/tcp spells them."""
    table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {line.split()[1] for line in table if line.split()[3] == "0A"}


async def _bodies(port: int, n: int) -> list[str | None]:
    answers = [await http_once(port) for _ in range(n)]
    return [a[1] if a and a[0] == 200 else None for a in answers]


async def test_starts_from_template_with_stats_and_loopback_frontends() -> None:
    web, db = await HttpUpstream("w1").start(), await TcpUpstream("d1").start()
    web_port, db_port = free_port(), free_port()
    initial = catalog(
        service("web", web_port, server("w1", web.port)),
        service("db", db_port, server("d1", db.port), mode="tcp"),
    )
    async with running_sink(initial) as h:
        ok, details = h.sink.healthy()
        assert ok, details
        assert h.sink.worker_pid is not None
        config = (h.sink.dir / "haproxy.cfg").read_text()
        assert "master-worker" in config and f"bind 127.0.0.1:{web_port}" in config
        # stats page
        stats_port = int(h.settings.stats_address.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", stats_port)
        writer.write(b"GET /;csv HTTP/1.0\r\n\r\n")
        page = (await reader.read()).decode()
        writer.close()
        assert page.startswith("HTTP/1.1 200") and "fe_" in page
        # consumer frontends on 127.0.0.1 only
        assert await _bodies(web_port, 3) == ["w1"] * 3
        assert await tcp_ask(db_port) == "d1"
        listening = _listening()
        assert f"0100007F:{web_port:04X}" in listening
        assert f"00000000:{web_port:04X}" not in listening
    await web.stop()
    await db.stop()


async def test_new_instance_is_added_at_runtime_without_reload() -> None:
    a, b, c = [await HttpUpstream(n).start() for n in ("a", "b", "c")]
    port = free_port()
    base = service("web", port, server("a", a.port))
    async with running_sink(catalog(base)) as h:
        worker = h.sink.worker_pid
        began = time.monotonic()
        await h.sink.apply(catalog(replace(base, servers={**base.servers,
                                                           "b": server("b", b.port)})))  # fmt: skip
        add_ms = (time.monotonic() - began) * 1000
        assert set(await _bodies(port, 6)) == {"a", "b"}
        assert h.sink.worker_pid == worker and h.reloads == 0
        assert h.commands("add server") == 1 and h.commands("enable server") == 1
        print(f"add+enable server applied in {add_ms:.2f} ms")

        # with check=True the health check is enabled too
        checked = server("c", c.port, check=True)
        await h.sink.apply(catalog(replace(base, servers={**base.servers, "c": checked})))
        assert h.commands("enable health") == 1
        (state,) = await h.sink.admin.read(["show servers state web"])
        row = next(line.split() for line in state.splitlines() if " c " in line)
        assert int(row[13]) & 0x06 == 0x06  # srv_check_state: configured + enabled
        assert "c" in await _bodies(port, 6)
        assert h.sink.worker_pid == worker and h.reloads == 0
        # weight and address changes, also at runtime
        await h.sink.apply(catalog(replace(base, servers={**base.servers, "c": replace(
            checked, weight=7, port=b.port)})))  # fmt: skip
        assert h.commands("set server") >= 2 and h.reloads == 0
        assert "b" in await _bodies(port, 6)
    for u in (a, b, c):
        await u.stop()


async def test_draining_and_removal_let_in_flight_requests_finish() -> None:
    fast, slow = await HttpUpstream("fast").start(), await HttpUpstream("slow", delay=1.0).start()
    port = free_port()
    both = service("web", port, server("fast", fast.port), server("slow", slow.port))
    async with running_sink(catalog(both), drain_timeout=5.0) as h:
        worker = h.sink.worker_pid
        # draining: no new connection to it, at once
        slow_draining = server("slow", slow.port, state="draining")
        draining = replace(both, servers={**both.servers, "slow": slow_draining})
        await h.sink.apply(catalog(draining))
        before = slow.requests
        assert await _bodies(port, 10) == ["fast"] * 10
        assert slow.requests == before

        # back up, then an in-flight request on "slow" while it is removed
        await h.sink.apply(catalog(both))
        in_flight = [asyncio.create_task(http_once(port)) for _ in range(4)]
        await eventually(lambda: slow.requests > before, within=3)
        removed = replace(both, servers={"fast": both.servers["fast"]})
        began = time.monotonic()
        await h.sink.apply(catalog(removed))
        assert time.monotonic() - began < 0.1  # apply does not wait for the drain
        answers = await asyncio.gather(*in_flight)
        assert all(a is not None and a[0] == 200 for a in answers), answers
        assert "slow" in [a[1] for a in answers if a]
        await eventually(lambda: "slow" not in h.sink._view["web"].servers, within=3)
        assert time.monotonic() - began >= 0.5
        (state,) = await h.sink.admin.read(["show servers state web"])
        assert " slow " not in state
        assert h.commands("del server") >= 1 and h.sink.worker_pid == worker
    await fast.stop()
    await slow.stop()


async def test_drain_timeout_bounds_removal() -> None:
    fast, stuck = await HttpUpstream("fast").start(), await HttpUpstream("stuck", delay=30).start()
    port = free_port()
    both = service("web", port, server("fast", fast.port), server("stuck", stuck.port))
    async with running_sink(catalog(both), drain_timeout=0.5) as h:
        hanging = [asyncio.create_task(http_once(port, within=20)) for _ in range(2)]
        await eventually(lambda: stuck.requests > 0, within=3)
        began = time.monotonic()
        await h.sink.apply(catalog(replace(both, servers={"fast": both.servers["fast"]})))
        await eventually(lambda: "stuck" not in h.sink._view["web"].servers, within=5)
        took = time.monotonic() - began
        assert 0.4 <= took < 2.0, took
        assert h.commands("shutdown sessions") == 1
        await asyncio.gather(*hanging)
    await fast.stop()
    await stuck.stop()


async def test_http_retry_on_empty_response_and_redispatch() -> None:
    good, bad = (
        await HttpUpstream("good").start(),
        await HttpUpstream("bad", behaviour="empty").start(),
    )
    port = free_port()
    web = service("web", port, server("good", good.port), server("bad", bad.port))
    async with running_sink(catalog(web)):
        answers = await _bodies(port, 40)
        assert answers == ["good"] * 40
        assert bad.requests > 0  # the bad one was tried, and retried elsewhere
    await good.stop()
    await bad.stop()


def test_command_grammar_is_enforced() -> None:
    with pytest.raises(cmd.CommandError):
        cmd.validate_command("set server web/a state ready\nshutdown frontend x")
