"""The etcd source against the real etcd: nothing missed across outages.

Each test drives a stream of puts/deletes and checks that the source's final
state equals etcd's own, exactly, after the watch was broken in some way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from discoverer_support import EtcdProxy, make_instance

from agents.common.backoff import Backoff
from agents.common.etcd import Etcd
from agents.common.prefix_source import EtcdSource
from agents.common.prefix_state import Snapshot
from agents.common.schema import Instance, instance_key, services_prefix
from agents.common.settings import CommonSettings

pytestmark = pytest.mark.integration


def settings(endpoint: str, prefix: str) -> CommonSettings:
    return CommonSettings(etcd_host=endpoint, prefix=prefix, etcd_timeout=2.0)


class Follower:
    """Runs ``EtcdSource.updates()`` in a task and keeps the latest snapshot."""

    def __init__(self, source: EtcdSource) -> None:
        self.source = source
        self.latest: Snapshot | None = None
        self.count = 0
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for snapshot in self.source.updates():
            self.latest = snapshot
            self.count += 1

    def keys(self) -> set[str]:
        return set(self.latest.instances) if self.latest else set()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def follow(endpoint: str, prefix: str) -> AsyncIterator[Follower]:
    async with Etcd(settings(endpoint, prefix)) as etcd:
        source = EtcdSource(etcd, prefix, backoff=Backoff(initial=0.05, maximum=0.5))
        follower = Follower(source)
        try:
            yield follower
        finally:
            await follower.close()


async def etcd_keys(etcd: Etcd, prefix: str) -> set[str]:
    _, items = await etcd.get_prefix(services_prefix(prefix))
    return {item.key.decode() for item in items}


async def converged(follower: Follower, etcd: Etcd, prefix: str, within: float) -> None:
    deadline = time.monotonic() + within
    expected = await etcd_keys(etcd, prefix)
    while follower.keys() != expected:
        assert time.monotonic() < deadline, (
            f"missing {expected - follower.keys()}, extra {follower.keys() - expected}"
        )
        await asyncio.sleep(0.02)


def instances(n: int, start: int = 0) -> list[Instance]:
    return [
        make_instance("web", 10000 + i, 8080, host=f"host{i % 3}", container_id=f"{i:012x}")
        for i in range(start, start + n)
    ]


async def put(etcd: Etcd, prefix: str, items: list[Instance]) -> None:
    for item in items:
        await etcd.put(instance_key(prefix, item), item.to_json())


async def test_list_then_watch_exact(etcd: Any, prefix: str) -> None:
    async with Etcd(settings(etcd.endpoint, prefix)) as writer:
        await put(writer, prefix, instances(20))
        async with follow(etcd.endpoint, prefix) as follower:
            await converged(follower, writer, prefix, 5)
            await put(writer, prefix, instances(20, 20))
            for item in instances(10):
                await writer.delete(instance_key(prefix, item))
            await converged(follower, writer, prefix, 5)
            assert follower.source.state.revision > 0


async def test_etcd_restart_misses_nothing(etcd: Any, prefix: str) -> None:
    async with Etcd(settings(etcd.endpoint, prefix)) as writer:
        await put(writer, prefix, instances(5))
        async with follow(etcd.endpoint, prefix) as follower:
            await converged(follower, writer, prefix, 5)
            restarts = follower.source.restarts
            etcd.stop()
            await asyncio.sleep(0.5)
            assert not follower.source.watching
            etcd.start()
            # Write at once: the source is probably still in backoff and must
            # replay these from its last revision + 1.
            for _ in range(50):
                try:
                    await put(writer, prefix, instances(5, 5))
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            for item in instances(3):
                await writer.delete(instance_key(prefix, item))
            await converged(follower, writer, prefix, 15)
            assert follower.source.restarts > restarts
            assert follower.source.watching


async def test_compaction_while_cut_off_relists(etcd: Any, prefix: str) -> None:
    host, _, port = str(etcd.endpoint).rpartition(":")
    proxy = EtcdProxy(host, int(port))
    await proxy.start()
    async with Etcd(settings(etcd.endpoint, prefix)) as writer:
        await put(writer, prefix, instances(5))
        async with follow(proxy.endpoint, prefix) as follower:
            await converged(follower, writer, prefix, 5)
            await proxy.cut()
            await asyncio.sleep(0.3)
            await put(writer, prefix, instances(5, 5))
            for item in instances(3):
                await writer.delete(instance_key(prefix, item))
            revision = await writer.put(
                instance_key(prefix, instances(1, 50)[0]), instances(1, 50)[0].to_json()
            )
            await writer.client.compact(revision)
            await proxy.start()
            await converged(follower, writer, prefix, 15)
            assert follower.latest is not None
            assert follower.source.state.revision >= revision
    await proxy.cut()


async def _cluster_case(etcd_cluster: Any, prefix: str, freeze: bool, member: int) -> None:
    # pick_first: the source's channel is on the first endpoint listed, so the
    # broken member goes first. (gRPC shares subchannels within a process: a
    # member restarted by an earlier test may still be in reconnect backoff,
    # hence a different member per case.)
    order = [member] + [i for i in range(len(etcd_cluster.endpoints)) if i != member]
    endpoints = ",".join(etcd_cluster.endpoints[i] for i in order)
    others = ",".join(etcd_cluster.endpoints[i] for i in order[1:])
    async with Etcd(settings(others, prefix)) as writer:
        await put(writer, prefix, instances(5))
        async with follow(endpoints, prefix) as follower:
            await converged(follower, writer, prefix, 5)
            # Settle the watch on the first member before breaking it.
            await put(writer, prefix, instances(1, 99))
            await converged(follower, writer, prefix, 5)
            restarts = follower.source.restarts
            (etcd_cluster.pause if freeze else etcd_cluster.kill)(member)
            try:
                started = time.monotonic()
                for batch in range(5):
                    for _ in range(100):
                        try:
                            await put(writer, prefix, instances(2, 100 + 2 * batch))
                            break
                        except Exception:
                            await asyncio.sleep(0.1)
                    await asyncio.sleep(0.5)
                await writer.delete(instance_key(prefix, instances(1)[0]))
                await converged(follower, writer, prefix, 30)
                took = time.monotonic() - started
                assert follower.source.watching
                assert follower.source.restarts > restarts  # it did move
            finally:
                (etcd_cluster.resume if freeze else etcd_cluster.start)(member)
    # Measured: keepalive notices a frozen member in ~7 s; a dead one at once.
    assert took < 20


async def test_cluster_member_killed_watch_moves(etcd_cluster: Any, prefix: str) -> None:
    await _cluster_case(etcd_cluster, prefix, freeze=False, member=0)


async def test_cluster_member_frozen_watch_moves(etcd_cluster: Any, prefix: str) -> None:
    await _cluster_case(etcd_cluster, prefix, freeze=True, member=1)
