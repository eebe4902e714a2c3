"""``pilotfish catalog``: one etcd source per environment, served over HTTP.

Each prefix is read by the discoverer's :class:`EtcdSource` (list at R, watch
from R + 1, resume, re-list after compaction); each snapshot it yields goes
into that environment's :class:`ServiceIndex`, and the change it makes wakes
every browser's event stream.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from agents.catalog.consumers import DiscovererStatuses
from agents.catalog.hosts import HostClaims
from agents.catalog.server import CatalogServer, Env
from agents.catalog.state import ServiceIndex
from agents.common.access import checked, ensure_access
from agents.common.etcd import Etcd
from agents.common.logging import get_logger
from agents.common.prefix_source import EtcdSource
from agents.common.settings import CatalogSettings
from agents.common.systemd import notify, watchdog_loop

log = get_logger("pilotfish.catalog")


async def follow(source: EtcdSource, env: Env, first_list: asyncio.Event | None = None) -> None:
    """Apply every snapshot of ``source`` to ``env`` until cancelled."""
    env.watching = lambda: source.watching
    async for snapshot in source.updates():
        env.index.apply(snapshot)
        env.notify()
        if first_list is not None and not first_list.is_set():
            first_list.set()


async def serve(settings: CatalogSettings, stop: asyncio.Event) -> None:
    """Run the catalog until ``stop`` is set (SIGTERM / SIGINT)."""
    etcd = Etcd(settings)
    envs: dict[str, Env] = {}
    sources: dict[str, EtcdSource] = {}
    for prefix in settings.prefixes:
        sources[prefix] = EtcdSource(etcd, prefix)
        envs[prefix] = Env(
            ServiceIndex(prefix), HostClaims(etcd, prefix), DiscovererStatuses(etcd, prefix)
        )
    server = CatalogServer(envs, etcd_host=settings.etcd_host)
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    host, _, port = settings.address.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port), reuse_address=True)
    await site.start()
    log.info(
        "catalog listening",
        address=f"http://{host or '127.0.0.1'}:{port}/",
        etcd=etcd.target,
        prefixes=settings.prefixes,
    )
    listed = {prefix: asyncio.Event() for prefix in envs}
    tasks = [
        asyncio.create_task(follow(sources[p], envs[p], listed[p]), name=f"catalog {p}")
        for p in envs
    ]
    tasks[0] = asyncio.create_task(
        checked(ensure_access(etcd, "catalog", settings.prefixes), tasks[0]), name="access"
    )
    ready = asyncio.create_task(_announce_ready(listed))
    # Alive while every source's loop runs (an etcd outage is not a reason to restart).
    watchdog = asyncio.create_task(watchdog_loop(lambda: not any(t.done() for t in tasks)))
    stopping = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopping:
                task.result()  # a source only ends by failing: raise its error
    finally:
        for task in (*tasks, ready, watchdog, stopping):
            task.cancel()
        await asyncio.gather(*tasks, ready, watchdog, stopping, return_exceptions=True)
        await runner.cleanup()
        await etcd.close()
        log.info("catalog stopped")


async def _announce_ready(listed: dict[str, asyncio.Event]) -> None:
    for event in listed.values():
        await event.wait()
    notify("READY=1")
    log.info("catalog ready: every environment listed", prefixes=sorted(listed))
