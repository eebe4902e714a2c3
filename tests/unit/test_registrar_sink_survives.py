"""The etcd sink keeps going whatever one key or one bug does (in-memory etcd)."""

from __future__ import annotations

import aetcd.exceptions

from agents.common.schema import instance_key
from tests.unit.test_registrar_sink import PREFIX, FakeEtcd, make, running, until


async def test_a_container_withdrawn_between_plan_and_put_is_skipped() -> None:
    fake = FakeEtcd()
    first, second = make(1, cid="aa" * 32), make(2, cid="bb" * 32)
    real_put = fake.put

    async with running(fake) as sink:

        async def put(key: str, value: bytes, lease: int | None = None) -> int:
            if key == instance_key(PREFIX, first):  # same loop turn as the batch's plan
                sink.set_container(second.container_id, [])
            return await real_put(key, value, lease)

        fake.put = put  # type: ignore[method-assign]
        sink.replace_all({})
        await sink.synced.wait()
        sink.set_container(first.container_id, [first])
        sink.set_container(second.container_id, [second])
        await until(lambda: sink.backlog == 0)
        assert set(fake.kv) == {instance_key(PREFIX, first)}
        assert not sink.failing


async def test_a_key_etcd_refuses_for_good_is_quarantined_until_it_changes() -> None:
    fake = FakeEtcd()
    big, small = make(1, cid="aa" * 32), make(2, cid="bb" * 32)
    real_put = fake.put

    async def put(key: str, value: bytes, lease: int | None = None) -> int:
        if key == instance_key(PREFIX, big) and b'"weight":100' in value:
            raise aetcd.exceptions.InvalidArgumentError("etcdserver: request is too large")
        return await real_put(key, value, lease)

    fake.put = put  # type: ignore[method-assign]
    async with running(fake) as sink:
        sink.replace_all({big.container_id: [big], small.container_id: [small]})
        await until(lambda: sink.backlog == 0)
        assert set(sink.quarantined) == {instance_key(PREFIX, big)}
        assert "too large" in sink.quarantined[instance_key(PREFIX, big)]
        assert set(fake.kv) == {instance_key(PREFIX, small)} and not sink.failing
        puts = len(fake.log)
        sink.replace_all({big.container_id: [big], small.container_id: [small]})
        await until(lambda: sink.backlog == 0)
        assert len(fake.log) == puts  # not retried while unchanged
        sink.set_container(big.container_id, [big.model_copy(update={"weight": 5})])
        await until(lambda: instance_key(PREFIX, big) in fake.kv)
        assert sink.quarantined == {}


async def test_a_bug_in_a_round_is_retried_instead_of_ending_the_sink() -> None:
    fake = FakeEtcd()
    real_get = fake.get_prefix
    failures = [RuntimeError("a bug")]

    async def get_prefix(prefix: str, keys_only: bool = False) -> tuple[int, list[object]]:
        if failures:
            raise failures.pop()
        return await real_get(prefix, keys_only)  # type: ignore[return-value]

    fake.get_prefix = get_prefix  # type: ignore[assignment]
    async with running(fake) as sink:
        a = make(1)
        sink.replace_all({a.container_id: [a]})
        await until(lambda: sink.failing)
        await until(lambda: instance_key(PREFIX, a) in fake.kv and not sink.failing)
