"""The etcd layer on a real etcd: what aetcd alone does not do."""

from __future__ import annotations

import asyncio

import pytest

from agents.common.etcd import Etcd, LeaseKeeper
from agents.common.settings import CommonSettings
from tests.stack import Etcd as EtcdServer

pytestmark = pytest.mark.integration


def connect(server: EtcdServer) -> Etcd:
    return Etcd(CommonSettings(etcd_host=server.endpoint, etcd_timeout=2.0))


async def test_lists_a_prefix_larger_than_grpcs_default_message_cap(
    etcd: EtcdServer, prefix: str
) -> None:
    # 6 values of 1 MiB: 6 MiB in one range response (gRPC's default cap is 4 MiB).
    value = b"x" * (1 << 20)
    async with connect(etcd) as client:
        for n in range(6):
            await client.put(f"{prefix}/big/{n}", value)
        _revision, items = await client.get_prefix(f"{prefix}/big/")
    assert len(items) == 6


async def test_lease_keeper_replaces_an_expired_lease(etcd: EtcdServer, prefix: str) -> None:
    granted: list[int] = []
    first = asyncio.Event()

    async def on_new_lease(lease_id: int) -> None:
        granted.append(lease_id)
        await client.put(f"{prefix}/k", b"v", lease=lease_id)
        first.set()

    async with connect(etcd) as client:
        keeper = LeaseKeeper(client, ttl=2, on_new_lease=on_new_lease)
        task = asyncio.create_task(keeper.run())
        try:
            await asyncio.wait_for(first.wait(), 5)
            # Someone else revokes it (as expiry would): the keeper must notice
            # (a refresh of a dead lease answers TTL 0, it does not raise).
            await client.revoke(granted[0])
            for _ in range(100):
                if len(granted) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(granted) == 2, "the lost lease was not replaced"
            _revision, items = await client.get_prefix(f"{prefix}/k")
            assert [item.lease for item in items] == [granted[1]]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
