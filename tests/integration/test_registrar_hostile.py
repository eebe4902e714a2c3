"""Nothing a container or a race can do stops the registrar (issue 9, finding 7).

Each test runs against the real dockerd and etcd; each one crashed, restart-
looped or failed the registrar before the fix named in its commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from registrar_kit import (
    DockerCli,
    EtcdView,
    eventually,
    http_get,
    registrar,
    settings_for,
    unique,
)

from agents.common import docker_events
from agents.common.etcd import Etcd
from agents.common.schema import Instance, instance_key
from agents.common.settings import RegistrarSettings
from agents.common.validation import MAX_TAGS, MAX_VALUE_BYTES
from agents.registrar.etcd_sink import EtcdSink
from tests.stack import Etcd as EtcdServer

pytestmark = pytest.mark.integration


async def healthz(address: str) -> tuple[int, dict[str, Any]]:
    status, body = await http_get(address, "/healthz")
    return status, json.loads(body)


async def healthy(address: str) -> dict[str, Any] | None:
    try:
        status, health = await healthz(address)
    except OSError:  # not listening yet
        return None
    return health if status == 200 else None


def instance(container_id: str, port: int = 8080) -> Instance:
    return Instance(
        service="raced",
        host_id="racer",
        address="127.0.0.1",
        port=30000 + port,
        private_port=port,
        container_id=container_id,
    )


# --- the etcd sink ------------------------------------------------------------------------


class _DiesWhilePutting(Etcd):
    """The real etcd client; ``on_put`` runs as a put leaves, in that same loop turn."""

    def __init__(self, settings: RegistrarSettings, on_put: Callable[[str], None]) -> None:
        super().__init__(settings)
        self.on_put = on_put

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        self.on_put(key)
        return await super().put(key, value, lease)


async def test_a_die_handled_while_a_put_is_on_its_way_does_not_end_the_sink(
    etcd_endpoint: str, reg_prefix: str, view: EtcdView
) -> None:
    first, second = instance("a" * 64), instance("b" * 64)
    sink: EtcdSink | None = None

    def die_of_second(key: str) -> None:
        # The second container dies while the flusher is writing the batch
        # that holds its key: the put of that key has not started yet.
        if key == instance_key(reg_prefix, first):
            assert sink is not None
            sink.set_container(second.container_id, [])

    settings = RegistrarSettings(etcd_host=etcd_endpoint, prefix=reg_prefix, etcd_timeout=2.0)
    async with _DiesWhilePutting(settings, die_of_second) as etcd:
        sink = EtcdSink(etcd, prefix=reg_prefix, host_id="racer", ttl=5)
        task = asyncio.create_task(sink.run())
        try:
            sink.replace_all({})
            await eventually(lambda: sink.synced.is_set())
            sink.set_container(first.container_id, [first])
            sink.set_container(second.container_id, [second])
            await eventually(lambda: sink.backlog == 0 or task.done())
            assert not task.done(), task.exception()
            keys = set(await view.instances())
            assert keys == {instance_key(reg_prefix, first)}
            assert not sink.failing
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture(scope="module")
def small_etcd(stack_dir: Path) -> Iterator[EtcdServer]:
    """An etcd that refuses requests over 8 KiB (its default is 1.5 MiB)."""
    with EtcdServer(stack_dir, unique("small"), extra_args=["--max-request-bytes=8192"]) as server:
        yield server


async def test_a_value_etcd_refuses_is_quarantined_and_the_rest_flows(
    small_etcd: EtcdServer, docker: DockerCli, reg_prefix: str, whoami: str
) -> None:
    settings = settings_for(docker, small_etcd.endpoint, reg_prefix)
    # ~11 KB of attributes: within the schema's bounds, over this etcd's limit.
    attributes = [f"-lpilotfish.attr.a{n:02d}={'v' * 250}" for n in range(40)]
    async with EtcdView(small_etcd.endpoint, reg_prefix) as view, registrar(settings):
        refused = await docker.run(whoami, *attributes)
        witness = await docker.run(whoami)
        await eventually(lambda: view.of_container(witness), within=10)
        health = await eventually(lambda: healthy(settings.admin_address), within=5)
        (entry,) = [e for e in health["quarantined"] if "key" in e]
        assert refused in entry["key"] and "too large" in entry["reason"]
        assert await view.of_container(refused) == {}
        late = await docker.run(whoami)  # writes keep flowing after the refusal
        await eventually(lambda: view.of_container(late), within=10)
        assert await healthy(settings.admin_address)


# --- what containers carry ---------------------------------------------------------------


async def test_oversized_labels_are_bounded_or_refused_where_they_enter(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    tags = ",".join(f"t{n}" for n in range(MAX_TAGS + 20))
    # 64 attributes of 255 characters: each one valid, together over 16 KiB.
    huge = [f"-lpilotfish.attr.{'k' * 50}{n:02d}={'v' * 255}" for n in range(64)]
    async with registrar(settings):
        many_tags = await docker.run(whoami, "-l", f"pilotfish.tags={tags}")
        too_big = await docker.run(whoami, *huge)
        witness = await docker.run(whoami)
        await eventually(lambda: view.of_container(witness), within=10)
        (registered,) = (await eventually(lambda: view.of_container(many_tags))).values()
        assert registered.tags == tuple(f"t{n}" for n in range(MAX_TAGS))
        assert await view.of_container(too_big) == {}
        health = await eventually(lambda: healthy(settings.admin_address))
        reasons = {e.get("container"): e["reason"] for e in health["quarantined"]}
        assert str(MAX_VALUE_BYTES) in reasons[too_big[:12]]
        assert str(MAX_TAGS) in reasons[many_tags[:12]]


@pytest.mark.parametrize("bound", ["within", "over"])
async def test_an_event_line_longer_than_aiohttp_allows_neither_reconnects_nor_is_lost(
    bound: str,
    monkeypatch: pytest.MonkeyPatch,
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    """Labels are copied into every event: a 1 MB label makes 1 MB event lines,
    twice what aiohttp reads as one line."""
    if bound == "over":  # dropped by the reader: the container is read again instead
        monkeypatch.setattr(docker_events, "MAX_EVENT_LINE", 256 * 1024)
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    async with registrar(settings):
        await eventually(lambda: healthy(settings.admin_address), within=5)
        long_lines = await docker.run_api(whoami, {"blob": "x" * 1_000_000})
        await eventually(lambda: view.of_container(long_lines), within=10)
        witness = await docker.run(whoami)
        await eventually(lambda: view.of_container(witness), within=10)
        await docker("rm", "-f", long_lines)
        await eventually(lambda: _not(view.of_container(long_lines)), within=10)
        health = await eventually(lambda: healthy(settings.admin_address))
        assert health["docker"]["reconnects"] == 0


async def _not(pending: Any) -> bool:
    return not await pending
