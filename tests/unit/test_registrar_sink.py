"""The etcd sink against an in-memory etcd: reconcile on a new lease, retries, no churn,
keys put back when they change behind its back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import aetcd.exceptions
import pytest

from agents.common.etcd import Etcd, KeyCallback, KeyValue, WatchEvent
from agents.common.schema import Instance, instance_key
from agents.registrar.etcd_sink import EtcdSink

PREFIX = "/pf"


class FakeEtcd:
    """Just enough of :class:`Etcd`: keys with leases, revisions and key watches,
    and switchable failures."""

    def __init__(self) -> None:
        self.kv: dict[str, tuple[bytes, int]] = {}
        self.log: list[tuple[str, str]] = []
        self.leases: dict[int, int] = {}
        self.next_lease = 100
        self.down = False
        self.request_count = 0
        self.rev = 1  # the store revision
        self.mod: dict[str, int] = {}
        self.history: list[WatchEvent] = []
        self.watches: dict[int, tuple[str, KeyCallback]] = {}
        self.next_watch = 1

    def _changed(self, key: str, value: bytes | None, lease: int = 0) -> int:
        """Record a change (the caller already changed ``kv``) and tell the key's watches."""
        self.rev += 1
        self.mod[key] = self.rev
        event = WatchEvent(key.encode(), value, self.rev, lease=lease)
        self.history.append(event)
        for watched, callback in list(self.watches.values()):
            if watched == key:
                callback(event)
        return self.rev

    def foreign_put(self, key: str, value: bytes, lease: int = 0) -> None:
        """Another writer (an operator, a restore) puts ``key``."""
        self.kv[key] = (value, lease)
        self._changed(key, value, lease)

    def foreign_delete(self, key: str) -> None:
        if self.kv.pop(key, None) is not None:
            self._changed(key, None)

    def break_watches(self) -> None:
        """The watch stream breaks (etcd went away): every watch ends."""
        watches, self.watches = self.watches, {}
        for _key, callback in watches.values():
            callback(aetcd.exceptions.ConnectionFailedError("stream broke"))

    async def watch_key(self, key: str, start_revision: int, on_event: KeyCallback) -> int:
        self._call()
        watch_id, self.next_watch = self.next_watch, self.next_watch + 1
        self.watches[watch_id] = (key, on_event)
        for event in self.history:
            if event.key == key.encode() and event.revision >= start_revision:
                on_event(event)
        return watch_id

    async def revision(self) -> int:
        self._call()
        return self.rev

    async def cancel_watch(self, watch_id: int) -> None:
        self._call()
        self.watches.pop(watch_id, None)

    def _call(self) -> None:
        self.request_count += 1
        if self.down:
            raise aetcd.exceptions.ConnectionFailedError("down")

    async def get_prefix(self, prefix: str, keys_only: bool = False) -> tuple[int, list[KeyValue]]:
        self._call()
        items = [
            KeyValue(k.encode(), b"" if keys_only else v, lease, self.mod.get(k, 1))
            for k, (v, lease) in self.kv.items()
            if k.startswith(prefix)
        ]
        return self.rev, items

    async def get_keys(self, keys: list[str]) -> tuple[int, list[KeyValue]]:
        self._call()
        items = [
            KeyValue(k.encode(), v, lease, self.mod.get(k, 1))
            for k, (v, lease) in self.kv.items()
            if k in keys
        ]
        return self.rev, items

    async def lease_keys(self, lease_id: int) -> list[str]:
        self._call()
        return [k for k, (_, lease) in self.kv.items() if lease == lease_id]

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        self._call()
        if lease is not None and lease not in self.leases:
            raise aetcd.exceptions.ClientError("etcdserver: requested lease not found")
        self.kv[key] = (value, lease or 0)
        self.log.append(("put", key))
        return self._changed(key, value, lease or 0)

    async def delete(self, key: str) -> bool:
        self._call()
        self.log.append(("delete", key))
        if self.kv.pop(key, None) is None:
            return False
        self._changed(key, None)
        return True

    async def grant(self, ttl: int) -> int:
        self._call()
        self.next_lease += 1
        self.leases[self.next_lease] = ttl
        return self.next_lease

    async def refresh(self, lease_id: int) -> int:
        self._call()
        return self.leases.get(lease_id, 0)

    async def revoke(self, lease_id: int) -> None:
        self._call()
        self.expire(lease_id)

    def expire(self, lease_id: int) -> None:
        self.leases.pop(lease_id, None)
        for key in [k for k, (_, lease) in self.kv.items() if lease == lease_id]:
            del self.kv[key]
            self._changed(key, None)


def make(port: int, host: str = "h1", cid: str = "ab" * 32) -> Instance:
    return Instance(
        service="web",
        host_id=host,
        address="10.0.0.1",
        port=30000 + port,
        private_port=port,
        container_id=cid,
    )


@contextlib.asynccontextmanager
async def running(fake: FakeEtcd, ttl: int = 3) -> AsyncIterator[EtcdSink]:
    sink = EtcdSink(cast(Etcd, fake), prefix=PREFIX, host_id="h1", ttl=ttl)
    task = asyncio.create_task(sink.run())
    try:
        yield sink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Any, within: float = 3.0) -> None:
    for _tick in range(int(within / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {within}s")


async def test_nothing_is_written_or_deleted_before_the_docker_snapshot() -> None:
    fake = FakeEtcd()
    ghost = make(1)
    fake.kv[instance_key(PREFIX, ghost)] = (ghost.to_json(), 7)
    async with running(fake) as sink:
        await until(lambda: sink.keeper.lease_id is not None)
        await asyncio.sleep(0.1)
        assert fake.log == []


async def test_startup_reconcile_deletes_ghosts_and_reputs_running_without_delete() -> None:
    fake = FakeEtcd()
    alive, ghost, other = make(1, cid="aa" * 32), make(2, cid="bb" * 32), make(3, host="h2")
    for instance in (alive, ghost, other):
        fake.kv[instance_key(PREFIX, instance)] = (instance.to_json(), 7)  # an old lease
    async with running(fake) as sink:
        sink.replace_all({alive.container_id: [alive]})
        await sink.synced.wait()
        lease = sink.keeper.lease_id
        assert fake.kv[instance_key(PREFIX, alive)][1] == lease
        assert instance_key(PREFIX, ghost) not in fake.kv
        assert instance_key(PREFIX, other) in fake.kv
        assert ("delete", instance_key(PREFIX, alive)) not in fake.log
        assert ("delete", instance_key(PREFIX, other)) not in fake.log


async def test_keys_already_on_the_lease_with_the_same_value_are_not_rewritten() -> None:
    fake = FakeEtcd()
    async with running(fake) as sink:
        a = make(1)
        sink.replace_all({a.container_id: [a]})
        await sink.synced.wait()
        writes = len(fake.log)
        later = a.model_copy(update={"registered_at": a.registered_at.replace(year=2030)})
        assert sink.set_container(a.container_id, [later]) == []
        sink.replace_all({a.container_id: [later]})
        await asyncio.sleep(0.1)
        assert len(fake.log) == writes


async def test_etcd_down_keeps_desired_state_and_converges_when_back() -> None:
    fake = FakeEtcd()
    async with running(fake) as sink:
        sink.replace_all({})
        await sink.synced.wait()
        fake.down = True
        a, b = make(1, cid="aa" * 32), make(2, cid="bb" * 32)
        sink.set_container(a.container_id, [a])
        sink.set_container(b.container_id, [b])
        await until(lambda: sink.failing)
        assert sink.backlog == 2
        fake.down = False
        await until(lambda: sink.backlog == 0)
        assert {instance_key(PREFIX, a), instance_key(PREFIX, b)} <= set(fake.kv)


async def test_lost_lease_is_replaced_and_every_key_reput() -> None:
    fake = FakeEtcd()
    async with running(fake, ttl=2) as sink:
        a = make(1)
        sink.replace_all({a.container_id: [a]})
        await sink.synced.wait()
        first = sink.keeper.lease_id
        assert first is not None
        fake.expire(first)  # as if etcd had been away longer than the TTL
        sink.keeper.mark_lost()
        await until(lambda: sink.keeper.lease_id != first and sink.backlog == 0)
        await until(
            lambda: fake.kv.get(instance_key(PREFIX, a), (b"", 0))[1] == sink.keeper.lease_id
        )


async def test_put_with_a_vanished_lease_marks_it_lost() -> None:
    fake = FakeEtcd()
    async with running(fake, ttl=30) as sink:
        sink.replace_all({})
        await sink.synced.wait()
        first = sink.keeper.lease_id
        assert first is not None
        fake.expire(first)
        a = make(1)
        sink.set_container(a.container_id, [a])
        await until(lambda: fake.kv.get(instance_key(PREFIX, a), (b"", 0))[1] not in (0, first))


async def test_wait_written_follows_the_write() -> None:
    fake = FakeEtcd()
    async with running(fake) as sink:
        sink.replace_all({})
        await sink.synced.wait()
        a = make(1)
        keys = sink.set_container(a.container_id, [a])
        assert await sink.wait_written(keys, within=1.0)
        fake.down = True
        keys = sink.set_container(a.container_id, [])
        assert not await sink.wait_written(keys, within=0.2)


@pytest.mark.parametrize("deleted_while_writing", [True, False])
async def test_a_change_during_a_write_is_not_lost(deleted_while_writing: bool) -> None:
    fake = FakeEtcd()
    gate = asyncio.Event()
    real_put = fake.put

    async def slow_put(key: str, value: bytes, lease: int | None = None) -> int:
        await gate.wait()
        return await real_put(key, value, lease)

    fake.put = slow_put  # type: ignore[method-assign]
    async with running(fake) as sink:
        sink.replace_all({})
        await sink.synced.wait()
        a = make(1)
        sink.set_container(a.container_id, [a])
        await asyncio.sleep(0.05)  # the put is in flight
        newer = [] if deleted_while_writing else [a.model_copy(update={"weight": 1})]
        sink.set_container(a.container_id, newer)
        gate.set()
        await until(lambda: sink.backlog == 0)
        key = instance_key(PREFIX, a)
        if deleted_while_writing:
            assert key not in fake.kv
        else:
            assert Instance.model_validate_json(fake.kv[key][0]).weight == 1
