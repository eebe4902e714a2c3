"""The default host id and the host claim's value (pure), and the sink's use of the claim."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import cast

import pytest

from agents.common.etcd import Etcd
from agents.common.schema import instance_key
from agents.common.validation import MAX_HOST_IN_SERVER_NAME, NAME_PATTERN
from agents.registrar.etcd_sink import EtcdSink
from agents.registrar.host_claim import HostIdTaken
from agents.registrar.identity import Engine, Holder, claim_key, default_host_id
from tests.unit.test_registrar_sink import PREFIX, FakeEtcd, make, until

ENGINE = Engine(id="PC6E:YH2L:K7PG:IKK7", name="web1.dc1.example.com", root_dir="/var/lib/docker")
SINCE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_default_host_id_is_the_first_label_and_a_hash_of_the_engine() -> None:
    host_id = default_host_id(ENGINE)
    assert re.fullmatch(r"web1-[0-9a-f]{12}", host_id)
    assert default_host_id(ENGINE) == host_id  # stable
    other_dc = ENGINE.model_copy(update={"id": "ZZZZ:YH2L:K7PG:IKK7", "name": "web1.dc2"})
    assert default_host_id(other_dc) != host_id
    # Same /etc/docker/key.json (a second engine, a cloned VM), other data root.
    second_engine = ENGINE.model_copy(update={"root_dir": "/srv/docker2"})
    assert default_host_id(second_engine) != host_id


@pytest.mark.parametrize(
    "name", ["", ".", "-_-", "a" * 200, "héllo wörld", "x\ny%z#\"'", "_lead", "12345"]
)
def test_default_host_id_always_fits_names_and_server_names(name: str) -> None:
    host_id = default_host_id(ENGINE.model_copy(update={"name": name}))
    assert re.fullmatch(NAME_PATTERN, host_id)
    assert len(host_id) <= MAX_HOST_IN_SERVER_NAME


def test_claim_key_is_under_hosts() -> None:
    assert claim_key("/pf", "web1-abc") == "/pf/hosts/web1-abc"


def test_a_claim_is_ours_when_it_names_the_same_engine() -> None:
    ours = Holder.of(ENGINE, "web1", 10, SINCE)
    restarted = Holder.parse(Holder.of(ENGINE, "web1", 99, SINCE).to_json())
    assert restarted is not None and restarted.same_engine(ours)
    elsewhere = Holder.of(ENGINE.model_copy(update={"root_dir": "/other"}), "web1", 10, SINCE)
    assert not elsewhere.same_engine(ours)
    assert "pid 10 on web1" in ours.describe() and "web1.dc1.example.com" in ours.describe()


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"null",
        b"{}",
        b"\xff\xfe",
        b'{"pid": "1"}',
        Holder.of(ENGINE, "h", 1, SINCE)
        .to_json()
        .replace(b'"hostname":"h"', b'"hostname":"h\\nx"'),
    ],
)
def test_anything_else_in_a_claim_is_not_a_holder(value: bytes) -> None:
    assert Holder.parse(value) is None


def test_hostile_names_are_made_plain_words_in_our_own_claim() -> None:
    odd = Holder.of(ENGINE.model_copy(update={"name": "a b\nc"}), "h%1\n", 1, SINCE)
    assert (odd.engine_name, odd.hostname) == ("a-b-c", "h-1-")
    assert Holder.parse(odd.to_json()) == odd


def sink_with(fake: FakeEtcd, claim: Callable[[int], Awaitable[None]]) -> EtcdSink:
    return EtcdSink(cast(Etcd, fake), prefix=PREFIX, host_id="h1", ttl=3, claim=claim)


async def test_nothing_is_written_on_a_lease_before_its_claim() -> None:
    fake = FakeEtcd()
    claimed: list[int] = []
    gate = asyncio.Event()

    async def claim(lease: int) -> None:
        await gate.wait()
        claimed.append(lease)

    sink = sink_with(fake, claim)
    task = asyncio.create_task(sink.run())
    try:
        a = make(1)
        sink.replace_all({a.container_id: [a]})
        await until(lambda: sink.keeper.lease_id is not None)
        await asyncio.sleep(0.1)
        assert fake.log == []
        gate.set()
        await until(lambda: instance_key(PREFIX, a) in fake.kv)
        first = sink.keeper.lease_id
        assert first is not None and claimed == [first]
        fake.expire(first)  # a lost lease: the claim is made again on the new one
        sink.keeper.mark_lost()
        await until(lambda: len(claimed) == 2 and claimed[1] != first)
        await until(lambda: fake.kv.get(instance_key(PREFIX, a), (b"", 0))[1] == claimed[1])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_refused_claim_ends_the_sink_before_any_write() -> None:
    async def claim(_lease: int) -> None:
        raise HostIdTaken("host id h1 is held by pid 1 on elsewhere")

    fake = FakeEtcd()
    sink = sink_with(fake, claim)
    sink.replace_all({})
    with pytest.raises(HostIdTaken):
        async with asyncio.timeout(3):
            await sink.run()
    assert fake.log == []


def test_any_info_document_makes_an_engine() -> None:
    for info in ({}, {"ID": None, "Name": 5}, {"ID": "x" * 999, "Name": "n" * 999}):
        assert re.fullmatch(NAME_PATTERN, default_host_id(Engine.from_info(info)))
