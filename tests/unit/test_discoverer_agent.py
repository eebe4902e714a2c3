"""The supervisor loop with a scripted source and a recording sink."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from typing import Any

from structlog.testing import capture_logs

from agents.common.prefix_state import EmptyCause, PrefixState, Snapshot
from agents.common.schema import Instance, instance_key
from agents.common.settings import DiscovererSettings
from agents.discoverer.agent import Discoverer
from agents.discoverer.model import Catalog

PREFIX = "/pf"


def inst(n: int, service: str = "web", host: str = "host-a", **extra: Any) -> Instance:
    return Instance(
        service=service,
        host_id=host,
        address="127.0.0.1",
        port=30000 + n,
        private_port=8000 + n if "frontend_port" not in extra else 80,
        container_id=f"{n:012x}",
        **extra,
    )


def snap(*instances: Instance, cause: EmptyCause | None = None, relisted: bool = False) -> Snapshot:
    return Snapshot(
        instances={instance_key(PREFIX, i): i for i in instances},
        created={instance_key(PREFIX, i): n + 1 for n, i in enumerate(instances)},
        refused={},
        revision=1,
        relisted=relisted,
        changed=None,
        empty_cause=cause,
        first_change_at=0.0,
        reconnected_at=None,
        added=instances,
    )


class ScriptedSource:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Snapshot] = asyncio.Queue()

    async def updates(self) -> AsyncGenerator[Snapshot, None]:
        while True:
            yield await self.queue.get()

    def status(self) -> dict[str, object]:
        return {"watching": True}

    @property
    def pending(self) -> bool:
        return not self.queue.empty()

    async def wait_for_changes(self, at_most: float) -> None:
        deadline = asyncio.get_running_loop().time() + at_most
        while self.queue.empty() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


class RecordingSink:
    def __init__(self, failures: int = 0) -> None:
        self.started: list[Catalog] = []
        self.applied: list[Catalog] = []
        self.failures = failures
        self.closed = False

    async def start(self, catalog: Catalog) -> None:
        self.started.append(catalog)

    async def apply(self, catalog: Catalog) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("haproxy restarting")
        self.applied.append(catalog)

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self, stop_haproxy: bool = False) -> None:
        self.closed = True

    def healthy(self) -> tuple[bool, dict[str, object]]:
        return True, {"worker_pid": 1}

    def refused(self) -> dict[tuple[str, str | None], str]:
        return {}


def settings(**kw: Any) -> DiscovererSettings:
    return DiscovererSettings(admin_address="off", **kw)


async def run_with(
    source: ScriptedSource, sink: RecordingSink, **kw: Any
) -> tuple[Discoverer, asyncio.Task[None]]:
    agent = Discoverer(settings(**kw), source, sink)
    return agent, asyncio.create_task(agent.run())


async def until(predicate: Any, within: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_first_snapshot_starts_then_applies() -> None:
    source, sink = ScriptedSource(), RecordingSink()
    agent, task = await run_with(source, sink)
    assert not agent.health()[0]  # not started yet
    source.queue.put_nowait(snap(inst(1), relisted=True))
    await until(lambda: sink.started)
    source.queue.put_nowait(snap(inst(1), inst(2)))
    await until(lambda: sink.applied)
    assert set(sink.applied[-1]["web"].servers) == {inst(1).server_name, inst(2).server_name}
    ok, details = agent.health()
    assert ok and details["instances"] == 2 and details["services"] == 1
    await stop(task)


async def test_services_filter() -> None:
    source, sink = ScriptedSource(), RecordingSink()
    _, task = await run_with(source, sink, services="web,api")
    source.queue.put_nowait(snap(inst(1, "web"), inst(2, "api"), inst(3, "db")))
    await until(lambda: sink.started)
    assert set(sink.started[0]) == {"web", "api"}
    await stop(task)


async def test_wipe_alarm_holds_and_recovers() -> None:
    source, sink = ScriptedSource(), RecordingSink()
    agent, task = await run_with(source, sink)
    a, b = inst(1, host="host-a"), inst(2, host="host-b")
    source.queue.put_nowait(snap(a, b))
    await until(lambda: sink.started)
    source.queue.put_nowait(snap(cause="wipe"))
    await until(lambda: len(sink.applied) == 1)
    assert len(sink.applied[0]["web"].servers) == 2
    ok, details = agent.health()
    assert not ok and details["empty_prefix_alarm"] is True and details["held_instances"] == 2
    assert agent.metrics.empty_prefix_alarm._value.get() == 1
    source.queue.put_nowait(snap(a))  # host-a is back, host-b not yet: still held
    await until(lambda: len(sink.applied) == 2)
    assert set(sink.applied[1]["web"].servers) == {a.server_name, b.server_name}
    assert agent.guard.alarm
    c = inst(3, host="host-b")
    source.queue.put_nowait(snap(a, c))  # every host is back: serve what etcd holds
    await until(lambda: len(sink.applied) == 3)
    assert set(sink.applied[2]["web"].servers) == {a.server_name, c.server_name}
    assert agent.health()[0]
    assert agent.metrics.empty_prefix_alarm._value.get() == 0
    await stop(task)


async def test_apply_failure_is_retried_and_logged_once() -> None:
    source, sink = ScriptedSource(), RecordingSink(failures=3)
    agent, task = await run_with(source, sink)
    source.queue.put_nowait(snap(inst(1)))
    await until(lambda: sink.started)
    with capture_logs() as logs:
        source.queue.put_nowait(snap(inst(1), inst(2)))
        await until(lambda: sink.applied, within=5)
    events = [e["event"] for e in logs]
    assert events.count("HAProxy update failed, retrying") == 1
    assert "HAProxy updated again" in events
    assert agent.health()[0]
    await stop(task)


async def test_conflicts_quarantined_and_logged_once() -> None:
    source, sink = ScriptedSource(), RecordingSink()
    agent, task = await run_with(source, sink)
    early = datetime.now(UTC) - timedelta(seconds=5)
    a = inst(1, "web", frontend_port=80, registered_at=early)
    b = inst(2, "api", frontend_port=80)
    with capture_logs() as logs:
        source.queue.put_nowait(snap(a, b))
        source.queue.put_nowait(snap(a, b))
        await until(lambda: sink.applied)
    quarantined = [e for e in logs if e["event"] == "quarantined"]
    key = instance_key(PREFIX, b)
    assert [(e["key"], e["reason"]) for e in quarantined] == [(key, "port 80 is used by web")]
    assert set(sink.applied[-1]) == {"web"}
    ok, health = agent.health()
    assert ok and health["quarantined"] == [
        {"key": key, "stage": "catalog", "reason": "port 80 is used by web"}
    ]
    await stop(task)


async def test_changed_keys_are_not_trusted_across_a_held_state() -> None:
    """Snapshots from a real PrefixState: after the guard held the last state,
    the next live snapshot's changed keys do not describe what the builder saw."""
    state = PrefixState(PREFIX)
    source, sink = ScriptedSource(), RecordingSink()
    agent, task = await run_with(source, sink)
    a, b, c, d = inst(1, host="host-a"), inst(2, host="host-b"), inst(3), inst(4)

    def entry(i: Instance) -> tuple[str, bytes]:
        return instance_key(PREFIX, i), i.to_json()

    def served() -> set[str]:
        return set(agent.catalog["web"].servers) if "web" in agent.catalog else set()

    state.replace(4, [(*entry(a), 1, 1), (*entry(b), 2, 2)])
    source.queue.put_nowait(state.take_batch())
    await until(lambda: sink.started)
    state.apply(entry(a)[0], None, 5)  # one revision removes both hosts' keys: a wipe
    state.apply(entry(b)[0], None, 5)
    source.queue.put_nowait(state.take_batch())
    await until(lambda: agent.guard.alarm)
    assert served() == {a.server_name, b.server_name}  # held
    e = inst(5, host="host-b")
    state.apply(*entry(c), 6)
    state.apply(*entry(e), 6)
    source.queue.put_nowait(state.take_batch())
    await until(lambda: not agent.guard.alarm)
    assert served() == {c.server_name, e.server_name}  # the held ones are gone
    state.apply(entry(c)[0], None, 7)
    state.apply(*entry(d), 7)
    source.queue.put_nowait(state.take_batch())
    await until(lambda: served() == {d.server_name, e.server_name})
    await stop(task)
