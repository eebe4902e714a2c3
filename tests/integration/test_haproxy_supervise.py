"""Attach to a running HAProxy; bring it back with the full state when it dies."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest

from tests.integration.upstreams import (
    HttpUpstream,
    catalog,
    eventually,
    free_port,
    http_once,
    running_sink,
    server,
    service,
    short_state_dir,
)

pytestmark = pytest.mark.integration


async def _serves(port: int, name: str) -> bool:
    return await http_once(port, within=0.5) == (200, name)


async def test_attach_same_catalog_sends_reads_only_and_restarts_dead_haproxy() -> None:
    a, b, n = [await HttpUpstream(x).start() for x in ("a", "b", "n")]
    web_port, other_port = free_port(), free_port()
    directory = short_state_dir()
    web = service("web", web_port, server("a", a.port, check=True),
                  server("b", b.port, weight=50))  # fmt: skip
    other = service("other", other_port, server("n", n.port))
    full = catalog(web, other)
    try:
        async with running_sink(catalog(web), state_dir=directory, stop=False) as first:
            # runtime-added servers and a reload: the state the second sink finds
            await first.sink.apply(full)
            await eventually(lambda: first.reloads == 1, within=5)
            drained = service("web", web_port, server("a", a.port, check=True),
                              server("b", b.port, weight=50, state="draining"))  # fmt: skip
            full = catalog(drained, other)
            await first.sink.apply(full)
            worker = first.sink.worker_pid
        # a restarted discoverer: same catalog → reads only, no reload
        async with running_sink(full, state_dir=directory, stop=True) as second:
            assert second.sink.worker_pid == worker
            assert second.writes() == 0 and second.reloads == 0
            assert second.commands("show servers") >= 1
            await asyncio.sleep(0.3)
            assert second.writes() == 0 and second.reloads == 0

            # the worker dies (SIGKILL): back with the full state within 1 s
            master = second.sink.master.pid
            assert master is not None and worker is not None
            killed = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            await eventually(lambda: second.sink.master.pid != master, within=2, interval=0.005)
            await eventually(lambda: _serves(other_port, "n"), within=1, interval=0.005)
            await eventually(lambda: _serves(web_port, "a"), within=1, interval=0.005)
            back = time.monotonic() - killed
            assert back < 1.0, back
            assert second.sink.healthy()[0]
            state = (await second.sink.admin.read(["show servers state web"]))[0]
            assert " b " in state  # the draining server is there, drained again
            assert {await http_once(web_port) for _ in range(6)} == {(200, "a")}
            print(f"worker SIGKILL → serving again in {back * 1000:.0f} ms")

            # the master dies (SIGKILL) too
            master = second.sink.master.pid
            assert master is not None
            killed = time.monotonic()
            os.kill(master, signal.SIGKILL)
            await eventually(lambda: second.sink.master.pid != master, within=2, interval=0.005)
            await eventually(lambda: _serves(other_port, "n"), within=1, interval=0.005)
            back = time.monotonic() - killed
            assert back < 1.0, back
            print(f"master SIGKILL → serving again in {back * 1000:.0f} ms")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        for u in (a, b, n):
            await u.stop()


async def test_attach_with_a_new_service_reloads_once() -> None:
    a, n = await HttpUpstream("a").start(), await HttpUpstream("n").start()
    web_port, new_port = free_port(), free_port()
    directory = short_state_dir()
    web = service("web", web_port, server("a", a.port))
    try:
        async with running_sink(catalog(web), state_dir=directory, stop=False):
            pass
        bigger = catalog(web, service("new", new_port, server("n", n.port)))
        async with running_sink(bigger, state_dir=directory, attach=True) as second:
            await eventually(lambda: second.reloads == 1, within=5)
            assert await http_once(new_port) == (200, "n")
            assert second.writes() == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        await a.stop()
        await n.stop()


async def test_attach_without_haproxy_fails_clearly() -> None:
    from agents.discoverer.haproxy import HaproxyError, HaproxySink
    from tests.integration.upstreams import settings_for

    directory = short_state_dir()
    sink = HaproxySink(settings_for(directory, attach=True))
    with pytest.raises(HaproxyError, match="attach"):
        await sink.start({})
    shutil.rmtree(directory, ignore_errors=True)
