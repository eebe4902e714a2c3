"""A source given ``services`` watches only their keys (real etcd).

A consumer of two services is not woken by changes of the others: no watch
event reaches it, and its state stays exactly etcd's keys of those services,
across a broken watch (resumed per service) and a compaction (re-listed).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from discoverer_support import EtcdProxy, make_instance

from agents.common.backoff import Backoff
from agents.common.etcd import Etcd
from agents.common.prefix_source import EtcdSource
from agents.common.schema import Instance, instance_key, services_prefix
from agents.common.settings import CommonSettings

pytestmark = pytest.mark.integration

SERVED = ("api", "web")


def settings(endpoint: str, prefix: str) -> CommonSettings:
    return CommonSettings(etcd_host=endpoint, prefix=prefix, etcd_timeout=2.0)


def instances(service: str, n: int, start: int = 0) -> list[Instance]:
    return [
        make_instance(service, 10000 + i, 8080, host=f"host{i % 3}", container_id=f"{i:012x}")
        for i in range(start, start + n)
    ]


async def put(etcd: Etcd, prefix: str, items: list[Instance]) -> int:
    revision = 0
    for item in items:
        revision = await etcd.put(instance_key(prefix, item), item.to_json())
    return revision


async def served_keys(etcd: Etcd, prefix: str) -> set[str]:
    _, items = await etcd.get_prefix(services_prefix(prefix))
    keys = {item.key.decode() for item in items}
    return {k for k in keys if k.split("/")[-3] in SERVED}


class Follower:
    def __init__(self, source: EtcdSource) -> None:
        self.source = source
        self.keys: set[str] = set()
        self.snapshots = 0
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for snapshot in self.source.updates():
            self.keys = set(snapshot.instances)
            self.snapshots += 1

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def converged(follower: Follower, writer: Etcd, prefix: str, within: float) -> None:
    deadline = time.monotonic() + within
    expected = await served_keys(writer, prefix)
    while follower.keys != expected:
        assert time.monotonic() < deadline, (
            f"missing {expected - follower.keys}, extra {follower.keys - expected}"
        )
        await asyncio.sleep(0.02)


def events(source: EtcdSource) -> float:
    return source.metrics.watch_events._value.get()


async def test_other_services_wake_nothing(etcd: Any, prefix: str) -> None:
    async with Etcd(settings(etcd.endpoint, prefix)) as writer:
        await put(writer, prefix, instances("web", 3) + instances("other", 3))
        # Not connected beforehand: the agent's client connects on its first call.
        reader = Etcd(settings(etcd.endpoint, prefix))
        source = EtcdSource(reader, prefix, services=SERVED)
        follower = Follower(source)
        try:
            await converged(follower, writer, prefix, 5)
            assert len(follower.keys) == 3
            before_events, before_snapshots = events(source), follower.snapshots
            # 200 changes of services it does not serve, then one of its own.
            for service in ("other", "zzz", "aaa", "apix", "web2"):
                await put(writer, prefix, instances(service, 40, 100))
            revision = await put(writer, prefix, instances("api", 1, 7))
            await converged(follower, writer, prefix, 5)
            assert events(source) - before_events == 1
            assert follower.snapshots - before_snapshots == 1
            assert source.state.revision == revision
        finally:
            await follower.close()
            await reader.close()


async def test_filtered_resume_and_compaction(etcd: Any, prefix: str) -> None:
    host, _, port = str(etcd.endpoint).rpartition(":")
    proxy = EtcdProxy(host, int(port))
    await proxy.start()
    async with Etcd(settings(etcd.endpoint, prefix)) as writer:
        await put(writer, prefix, instances("web", 4) + instances("api", 2))
        async with Etcd(settings(proxy.endpoint, prefix)) as reader:
            source = EtcdSource(
                reader, prefix, services=SERVED, backoff=Backoff(initial=0.05, maximum=0.3)
            )
            follower = Follower(source)
            try:
                await converged(follower, writer, prefix, 5)
                # A broken watch resumes each service from its own revision.
                await proxy.cut()
                await put(writer, prefix, instances("api", 3, 20) + instances("other", 5))
                for item in instances("web", 2):
                    await writer.delete(instance_key(prefix, item))
                await proxy.start()
                await converged(follower, writer, prefix, 15)
                relists = source.metrics.relists._value.get()
                # Compacted while cut off: re-listed, state replaced.
                await proxy.cut()
                await put(writer, prefix, instances("web", 2, 40))
                await writer.delete(instance_key(prefix, instances("api", 1, 20)[0]))
                revision = await put(writer, prefix, instances("other", 1, 60))
                await writer.client.compact(revision)
                await proxy.start()
                await converged(follower, writer, prefix, 15)
                assert source.metrics.relists._value.get() > relists
                assert source.state.revision >= revision
            finally:
                await follower.close()
    await proxy.cut()
