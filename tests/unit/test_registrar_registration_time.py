"""A registration keeps the time it was first made when its own registrar rewrites it."""

from __future__ import annotations

from datetime import timedelta

from agents.common.schema import Instance, instance_key
from agents.registrar.labels import draining
from tests.unit.test_registrar_sink import PREFIX, FakeEtcd, make, running, until


def written(fake: FakeEtcd, instance: Instance) -> Instance:
    return Instance.model_validate_json(fake.kv[instance_key(PREFIX, instance)][0])


async def test_a_rewrite_of_the_same_key_keeps_registered_at() -> None:
    fake = FakeEtcd()
    async with running(fake) as sink:
        first = make(1)
        sink.replace_all({first.container_id: [first]})
        await until(lambda: sink.backlog == 0 and instance_key(PREFIX, first) in fake.kv)
        later = first.registered_at + timedelta(minutes=5)
        healthier = first.model_copy(update={"health": "healthy", "registered_at": later})
        sink.set_container(first.container_id, [healthier])
        await until(lambda: written(fake, first).health == "healthy")
        sink.set_container(first.container_id, draining(sink.instances_of(first.container_id)))
        await until(lambda: written(fake, first).state == "draining")
        assert written(fake, first).registered_at == first.registered_at


async def test_after_a_restart_the_time_found_in_etcd_is_adopted() -> None:
    fake = FakeEtcd()
    before = make(1)
    fake.kv[instance_key(PREFIX, before)] = (before.to_json(), 7)  # the last run's lease
    async with running(fake) as sink:
        now = before.model_copy(update={"registered_at": before.registered_at + timedelta(hours=1)})
        sink.replace_all({now.container_id: [now]})
        await until(lambda: fake.kv[instance_key(PREFIX, before)][1] == sink.keeper.lease_id)
        assert written(fake, before).registered_at == before.registered_at
