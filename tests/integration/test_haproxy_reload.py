"""New listeners: coalesced, rate-limited reloads with the full state and no lost request."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.upstreams import (
    HttpUpstream,
    Load,
    catalog,
    eventually,
    free_port,
    http_once,
    running_sink,
    server,
    service,
)

pytestmark = pytest.mark.integration


async def test_new_service_reloads_with_full_state() -> None:
    a, b, n = [await HttpUpstream(x).start() for x in ("a", "b", "n")]
    web_port, new_port = free_port(), free_port()
    web = service("web", web_port, server("a", a.port))
    async with running_sink(catalog(web)) as h:
        first = h.sink.worker_pid
        # a runtime-added server, then a new service: the reloaded config keeps both
        web2 = service("web", web_port, server("a", a.port), server("b", b.port))
        await h.sink.apply(catalog(web2))
        began = time.monotonic()
        await h.sink.apply(catalog(web2, service("new", new_port, server("n", n.port))))
        await eventually(lambda: h.reloads == 1, within=5)
        took = time.monotonic() - began
        assert h.sink.worker_pid != first
        answer = await http_once(new_port)
        assert answer == (200, "n")
        bodies = {(await http_once(web_port) or (0, ""))[1] for _ in range(6)}
        assert bodies == {"a", "b"}
        config = (h.sink.dir / "haproxy.cfg").read_text()
        assert "server b 127.0.0.1" in config
        print(f"new service served {took * 1000:.0f} ms after apply "
              f"(reload {h.sink.healthy()[1]['last_reload_seconds']} s)")  # fmt: skip
    for u in (a, b, n):
        await u.stop()


async def test_fifty_new_services_under_load_cost_at_most_two_reloads() -> None:
    steady = await HttpUpstream("steady").start()
    extra = await HttpUpstream("extra").start()
    port = free_port()
    base = service("web", port, server("steady", steady.port))
    async with running_sink(catalog(base), reload_min_interval=0.5) as h:
        load = Load(port, rate=100)
        async with load.running(clients=4):
            await asyncio.sleep(0.5)
            # 50 new services arriving in 5 bursts within ~0.2 s
            services = [base]
            for burst in range(5):
                for i in range(10):
                    services.append(service(f"svc{burst}-{i}", free_port(),
                                            server("x", extra.port)))  # fmt: skip
                await h.sink.apply(catalog(*services))
                await asyncio.sleep(0.04)
            await eventually(lambda: not h.sink.healthy()[1]["reload_pending"], within=10)
            assert 1 <= h.reloads <= 2, h.reloads
            for s in services[1:]:
                assert await http_once(s.bind_port) == (200, "extra"), s.name
            # more reloads under the same load: new services one by one
            for i in range(6):
                services.append(service(f"late{i}", free_port(), server("x", extra.port)))
                await h.sink.apply(catalog(*services))
                await asyncio.sleep(0.6)
            await eventually(lambda: not h.sink.healthy()[1]["reload_pending"], within=10)
            await asyncio.sleep(0.5)
        reloads = h.reloads
    print(f"{reloads:.0f} reloads under load: {load.ok} ok, {len(load.failed)} failed")
    assert reloads >= 7
    assert load.ok > 300
    assert load.failed == []
    await steady.stop()
    await extra.stop()


async def test_removed_service_drops_its_listener() -> None:
    a = await HttpUpstream("a").start()
    keep, gone = free_port(), free_port()
    both = catalog(service("keep", keep, server("a", a.port)),
                   service("gone", gone, server("a", a.port)))  # fmt: skip
    async with running_sink(both) as h:
        assert await http_once(gone) == (200, "a")
        await h.sink.apply(catalog(service("keep", keep, server("a", a.port))))
        await eventually(lambda: h.reloads == 1, within=5)
        assert await http_once(gone) is None  # port closed
        assert await http_once(keep) == (200, "a")
    await a.stop()
