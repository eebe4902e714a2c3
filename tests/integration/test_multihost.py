"""End to end: three Docker hosts, a 3-member etcd, two consumers, the agents as processes.

Each host is a dockerd of its own (the main engine and ``docker_hosts(2)``,
``docker_hosts(3)``), publishing on its own 127.0.N.1 (its HOST_IP) and running
``pilotfish register`` with its own host id. Two consumers each run
``pilotfish discover`` with its own HAProxy, frontends on 127.0.0.11 and
127.0.0.12 (one service port, two consumers). Whoami containers answer with
their 12-character hostname, so every response names the container (and so
the host) that served it.

Proved here, through requests and HAProxy's own stats page:
- both consumers reach instances on all three hosts;
- the etcd leader dies under load: no request fails, and a container started
  during the election reaches both consumers after it;
- a host dies (dockerd and registrar SIGKILLed): within the lease TTL (+ slack)
  both HAProxies have dropped its servers and no response comes from it, no
  request fails meanwhile (docker-proxy dies with dockerd: refused
  connections are retried on another server), and no server of the other
  hosts ever leaves HAProxy or stops being UP.

``PILOTFISH_KEEP_E2E_LOGS=1`` keeps the agents' logs (the path is in the
failure message).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from e2e_kit import (
    Agent,
    Consumer,
    Reply,
    discoverer_flags,
    fetch,
    free_port,
    registrar_flags,
    server_name,
    server_states,
    serving,
    wait_for,
)

from tests.stack import TEST_LABEL, Dockerd, EtcdCluster, StackError, make_base_dir

pytestmark = pytest.mark.integration

TTL = 3  # registrar lease TTL: a dead host's keys are gone this long after its last keep-alive
SLACK = 2.5  # etcd's expiry sweep (500 ms), the watch, the runtime API, a loaded 2-core machine
PER_HOST = 2
CONSUMER_IPS = ("127.0.0.11", "127.0.0.12")
RUN = uuid.uuid4().hex[:6]  # this module's containers and host ids


@dataclass
class Host:
    engine: Dockerd
    host_id: str
    registrar: Agent | None = None
    containers: list[str] = field(default_factory=list)

    def names(self) -> set[str]:
        return {server_name(self.host_id, cid) for cid in self.containers}

    def short_ids(self) -> set[str]:
        return {cid[:12] for cid in self.containers}


@dataclass
class World:
    hosts: list[Host]
    consumers: list[Consumer]
    discoverers: list[Agent]
    port: int  # the service's consumer port (pilotfish.port), on every consumer address
    cluster: EtcdCluster

    def targets(self) -> list[tuple[str, int]]:
        return [(consumer.bind, self.port) for consumer in self.consumers]

    def host_of(self, body: str) -> int | None:
        for index, host in enumerate(self.hosts):
            if body in host.short_ids():
                return index
        return None

    def agents(self) -> list[Agent]:
        return [h.registrar for h in self.hosts if h.registrar] + self.discoverers


# --- the world: hosts, containers, agents -----------------------------------------------------


def _run_args(port: int) -> list[str]:
    labels = {
        "pilotfish.service": "whoami",
        "pilotfish.mode": "http",  # retries + redispatch: a dead server costs no request
        "pilotfish.port": str(port),  # a port free on both consumer addresses
        TEST_LABEL: "1",
        f"{TEST_LABEL}.e2e": RUN,
    }
    return [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]


async def _docker(engine: Dockerd, *args: str) -> str:
    return await asyncio.to_thread(engine.docker, *args)


async def _start_containers(hosts: list[Host], port: int) -> None:
    async def one(host: Host) -> str:
        # The engine runs with --ip=<its HOST_IP>: "-p 8080" publishes there.
        return await _docker(
            host.engine, "run", "-d", *_run_args(port), "-p", "8080", host.engine.whoami
        )

    for host in hosts:
        host.containers = list(await asyncio.gather(*(one(host) for _ in range(PER_HOST))))


def _remove_containers(engine: Dockerd) -> None:
    with contextlib.suppress(StackError, OSError):
        engine.remove_test_containers(f"{TEST_LABEL}.e2e={RUN}")


async def _all_served(world: World) -> bool:
    wanted = set().union(*(h.names() for h in world.hosts))
    for consumer in world.consumers:
        states = await server_states(consumer.stats) or {}
        if not all(serving(states.get(name)) for name in wanted):
            return False
    return True


def _describe(world: World) -> str:
    return "\n".join(agent.tail(25) for agent in world.agents())


@pytest.fixture(scope="module")
async def world(
    dockerd: Dockerd, docker_hosts: Callable[[int], Dockerd], etcd_cluster: EtcdCluster
) -> AsyncIterator[World]:
    engines = [dockerd, docker_hosts(2), docker_hosts(3)]
    hosts = [Host(engine, f"e2e{index}-{RUN}") for index, engine in enumerate(engines, 1)]
    prefix = f"/pftest/e2e-{RUN}"
    port = free_port(*CONSUMER_IPS)
    logs = make_base_dir("e2e")
    world = World(hosts, [], [], port, etcd_cluster)
    try:
        await _start_containers(hosts, port)
        for host in hosts:
            flags = registrar_flags(
                etcd_cluster.etcd_host,
                prefix,
                host.host_id,
                host.engine.docker_host,
                host.engine.host_ip,
                TTL,
            )
            host.registrar = Agent.start(host.host_id, "register", flags, logs)
        for index, bind in enumerate(CONSUMER_IPS):
            state = logs / f"c{index}"
            consumer, flags = discoverer_flags(
                etcd_cluster.etcd_host, prefix, state, bind, drain_timeout=2
            )
            world.consumers.append(consumer)
            world.discoverers.append(Agent.start(f"c{index}", "discover", flags, logs, str(state)))
        try:
            await wait_for(lambda: _all_served(world), 60, 0.2, "every container in both HAProxies")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{_describe(world)}") from None
        yield world
    finally:
        for agent in world.agents():
            agent.stop()
        for host in hosts:
            with contextlib.suppress(StackError):
                host.engine.heal()  # the dead host: start it again to remove its containers
            _remove_containers(host.engine)
        if not os.environ.get("PILOTFISH_KEEP_E2E_LOGS"):  # agents' logs, for debugging
            shutil.rmtree(logs, ignore_errors=True)


# --- load and observation -------------------------------------------------------------------


async def steady_load(
    targets: list[tuple[str, int]], rate: float, duration: float
) -> list[tuple[float, Reply]]:
    """``rate`` requests/s per target for ``duration`` s, each on a fresh connection.

    Open loop: requests are sent on schedule whether or not earlier ones
    finished, so a stall shows as failures, not as a slower load.
    """
    start = time.monotonic()
    count = int(rate * duration)
    tasks: list[asyncio.Task[tuple[float, Reply]]] = []

    async def one(host: str, port: int) -> tuple[float, Reply]:
        sent = time.monotonic()
        return sent, await fetch(host, port, within=2.0)

    for i in range(count):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks += [asyncio.create_task(one(host, port)) for host, port in targets]
    return list(await asyncio.gather(*tasks))


class FlapWatch:
    """Polls both HAProxies' stats pages; records every moment a kept server is not serving."""

    def __init__(self, consumers: list[Consumer], keep: set[str], gone: set[str]) -> None:
        self.consumers = consumers
        self.keep = keep
        self.gone = gone
        self.violations: list[tuple[float, str, str, str]] = []
        self.gone_at: dict[str, float] = {}  # consumer → when none of ``gone`` was left
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> FlapWatch:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            for consumer in self.consumers:
                self._check(consumer, await server_states(consumer.stats, within=0.5))
            self.samples += 1
            await asyncio.sleep(0.05)

    def _check(self, consumer: Consumer, states: dict[str, str] | None) -> None:
        now = time.monotonic()
        if states is None:
            self.violations.append((now, consumer.bind, "stats page", "unreachable"))
            return
        for name in sorted(self.keep):
            if not serving(states.get(name)):
                self.violations.append((now, consumer.bind, name, states.get(name, "missing")))
        if consumer.bind not in self.gone_at and not self.gone & states.keys():
            self.gone_at[consumer.bind] = now


async def _answers_from(world: World, consumer: Consumer, short_id: str, tries: int = 60) -> bool:
    for _ in range(tries):
        if (await fetch(consumer.bind, world.port)).body == short_id:
            return True
    return False


# --- the tests ------------------------------------------------------------------------------


async def test_both_consumers_reach_every_host(world: World) -> None:
    for consumer in world.consumers:
        replies = [await fetch(consumer.bind, world.port) for _ in range(12 * PER_HOST)]
        assert all(reply.ok for reply in replies), replies
        served = {world.host_of(reply.body) for reply in replies}
        assert served == {0, 1, 2}, f"{consumer.bind} reached hosts {served}: {replies}"


async def test_etcd_leader_loss_fails_no_request(world: World) -> None:
    host = world.hosts[0]
    late = await _docker(
        host.engine, "create", *_run_args(world.port), "-p", "8080", host.engine.whoami
    )
    with FlapWatch(
        world.consumers, keep=set().union(*(h.names() for h in world.hosts)), gone=set()
    ) as watch:
        load = asyncio.create_task(steady_load(world.targets(), rate=50, duration=10))
        await asyncio.sleep(2)
        leader = await asyncio.to_thread(world.cluster.leader)
        killed_at = time.monotonic()
        await asyncio.to_thread(leader.kill, signal.SIGKILL)
        # Started during the election: its registration must survive it.
        marks: list[float] = []
        starting = asyncio.create_task(_docker(host.engine, "start", late))
        starting.add_done_callback(lambda _: marks.append(time.monotonic() - killed_at))
        await asyncio.to_thread(world.cluster.leader)
        elected_after = time.monotonic() - killed_at
        await starting
        host.containers.append(late)
        started_after = marks[0]
        new_name = server_name(host.host_id, late)
        for consumer in world.consumers:
            await wait_for(lambda c=consumer: _serves(c, new_name), 20, 0.05, new_name)
            assert await _answers_from(world, consumer, late[:12])
        appeared_after = time.monotonic() - killed_at
        replies = await load
    failed = [reply for _, reply in replies if not reply.ok]
    print(
        f"leader {leader.name} killed: new leader after {elected_after:.2f}s; a container "
        f"started then: docker start returned after {started_after:.2f}s, routed by both "
        f"consumers after {appeared_after:.2f}s; "
        f"{len(replies)} requests, {len(failed)} failed"
    )
    assert not failed, f"{len(failed)}/{len(replies)} failed: {failed[:5]}\n{_describe(world)}"
    # The new container's server was not there yet when the watch started.
    kept = set().union(*(h.names() for h in world.hosts)) - {new_name}
    flaps = [v for v in watch.violations if v[2] in kept or v[2] == "stats page"]
    assert not flaps, f"servers flapped during the election: {flaps[:10]}"


async def _serves(consumer: Consumer, name: str) -> bool:
    return serving((await server_states(consumer.stats) or {}).get(name))


async def test_dead_host_leaves_both_consumers_within_ttl(world: World) -> None:
    dead, living = world.hosts[2], world.hosts[:2]
    assert dead.registrar is not None
    keep = set().union(*(h.names() for h in living))
    window = TTL + SLACK
    with FlapWatch(world.consumers, keep=keep, gone=dead.names()) as watch:
        load = asyncio.create_task(steady_load(world.targets(), rate=50, duration=window + 3))
        await asyncio.sleep(1)
        killed_at = time.monotonic()
        dead.engine.kill(signal.SIGKILL)
        dead.registrar.kill()
        replies = await load
    late = [
        (sent - killed_at, reply.body)
        for sent, reply in replies
        if sent > killed_at + window and reply.body in dead.short_ids()
    ]
    last = max(
        (sent - killed_at for sent, reply in replies if reply.body in dead.short_ids()),
        default=None,
    )
    failed = [reply for _, reply in replies if not reply.ok]
    dropped = {bind: round(at - killed_at, 2) for bind, at in watch.gone_at.items()}
    print(
        f"host killed: last response from it at {last and round(last, 2)}s; HAProxy "
        f"dropped it after {dropped}s; "
        f"{len(replies)} requests, {len(failed)} failed; "
        f"{watch.samples} stats samples"
    )
    assert not late, f"the dead host still answered after {window}s: {late[:5]}"
    assert set(dropped) == set(CONSUMER_IPS), f"not dropped everywhere: {dropped}"
    assert all(after <= window for after in dropped.values()), dropped
    assert not watch.violations, f"living hosts' servers flapped: {watch.violations[:10]}"
    assert not failed, f"{len(failed)}/{len(replies)} failed: {failed[:5]}"
