"""Faults between the agents and etcd, on the real stack (issue 16).

- keys wiped behind the registrars' backs (``etcdctl del --prefix``) come back
  within 1 s, and a ``docker run`` after it takes no running container out
  of HAProxy;
- an etcd freeze (SIGSTOP) or death (SIGKILL) shorter than the TTL turns the
  registrar's ``/healthz`` 503 within seconds, naming the error, and 200
  again once etcd answers;
- two registrars frozen while etcd is down past their TTL, resumed a few
  seconds after etcd (their leases expire meanwhile, in two revisions): the
  discoverer holds the servers and raises its alarm, clears it when the
  registrars are back, and no request through HAProxy fails.

Registrars and discoverer run as processes (tests/integration/e2e_kit.py) on
two engines (the main one and ``docker_hosts(2)``) and the session's etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from e2e_kit import (
    Agent,
    Consumer,
    discoverer_flags,
    fetch,
    free_port,
    registrar_flags,
    server_name,
    server_states,
    serving,
    wait_for,
)
from registrar_kit import (
    DockerCli,
    EtcdView,
    call,
    eventually,
    http_get,
    registrar,
    settings_for,
)
from test_multihost import FlapWatch, steady_load

from agents.common.schema import services_prefix
from tests.stack import TEST_LABEL, Dockerd, make_base_dir, require_binary

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
PER_HOST = 2


@dataclass
class Fleet:
    prefix: str
    port: int
    engines: list[Dockerd]
    host_ids: list[str]
    registrars: list[Agent]
    discoverer: Agent
    consumer: Consumer
    containers: dict[int, list[str]] = field(default_factory=dict)  # engine index → ids

    def names(self) -> set[str]:
        return {
            server_name(self.host_ids[index], cid)
            for index, ids in self.containers.items()
            for cid in ids
        }

    def describe(self) -> str:
        return "\n".join(agent.tail(30) for agent in [*self.registrars, self.discoverer])

    async def run(self, index: int) -> str:
        labels = {
            "pilotfish.service": f"faults{RUN}",
            "pilotfish.mode": "http",
            "pilotfish.port": str(self.port),
            TEST_LABEL: "1",
            f"{TEST_LABEL}.faults": RUN,
        }
        args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
        engine = self.engines[index]
        cid = await asyncio.to_thread(
            engine.docker, "run", "-d", *args, "-p", "8080", engine.whoami
        )
        self.containers.setdefault(index, []).append(cid)
        return cid

    async def all_served(self) -> bool:
        states = await server_states(self.consumer.stats) or {}
        return all(serving(states.get(name)) for name in self.names())

    async def keys(self) -> int:
        async with EtcdView(self.etcd_host, self.prefix) as view:
            return len(await view.instances())

    etcd_host: str = ""


@contextlib.asynccontextmanager
async def fleet(
    etcd_host: str, engines: list[Dockerd], ttl: int, **discoverer: str | float
) -> AsyncIterator[Fleet]:
    prefix = f"/pftest/faults-{uuid.uuid4().hex[:6]}"
    logs = make_base_dir("faults")
    host_ids = [f"f{index}-{uuid.uuid4().hex[:6]}" for index in range(len(engines))]
    consumer, flags = discoverer_flags(etcd_host, prefix, logs / "c", **discoverer)
    world = Fleet(
        prefix,
        free_port("127.0.0.1"),
        engines,
        host_ids,
        [],
        Agent.start("c", "discover", flags, logs, str(logs / "c")),
        consumer,
        etcd_host=etcd_host,
    )
    try:
        for index, engine in enumerate(engines):
            for _ in range(PER_HOST):
                await world.run(index)
            reg = registrar_flags(
                etcd_host, prefix, host_ids[index], engine.docker_host, engine.host_ip, ttl
            )
            world.registrars.append(Agent.start(host_ids[index], "register", reg, logs))
        try:
            await wait_for(world.all_served, 60, 0.1, "every container in HAProxy")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{world.describe()}") from None
        yield world
    finally:
        for agent in [*world.registrars, world.discoverer]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.pid, signal.SIGCONT)
            agent.stop()
        for engine in engines:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(engine.remove_test_containers, f"{TEST_LABEL}.faults={RUN}")
        if not os.environ.get("PILOTFISH_KEEP_E2E_LOGS"):
            shutil.rmtree(logs, ignore_errors=True)


async def _discoverer_health(world: Fleet) -> dict[str, Any]:
    reply = await fetch(*_split(world.consumer.admin), "/healthz", within=1.0)
    return json.loads(reply.body) if reply.status in (200, 503) else {}


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- 1: keys wiped behind the registrars' backs ------------------------------------------------


async def test_wiped_keys_come_back_within_a_second_and_a_docker_run_takes_nothing_out(
    etcd: Any, dockerd: Dockerd, docker_hosts: Callable[[int], Dockerd]
) -> None:
    async with fleet(etcd.endpoint, [dockerd, docker_hosts(2)], ttl=15) as world:
        wanted = len(world.names())
        with FlapWatch([world.consumer], keep=world.names(), gone=set()) as watch:
            wiped_at = time.monotonic()
            await asyncio.to_thread(
                subprocess.run,
                [
                    require_binary("etcdctl"),
                    f"--endpoints={etcd.endpoint}",
                    *("del", "--prefix", services_prefix(world.prefix)),
                ],
                env={**os.environ, "ETCDCTL_API": "3"},
                check=True,
                capture_output=True,
                timeout=10,
            )
            try:
                await eventually(lambda: _count_is(world, wanted), within=5.0, step=0.01)
            except AssertionError:
                raise AssertionError(f"keys not back within 5 s\n{world.describe()}") from None
            back_after = time.monotonic() - wiped_at
            # The sequence of the incident: one more container after the wipe.
            late = await world.run(0)
            name = server_name(world.host_ids[0], late)
            await wait_for(
                lambda: _serves(world, name), 20, 0.05, "the container started after the wipe"
            )
            await asyncio.sleep(1.0)  # anything that would leave HAProxy has left by now
        restored = [_restored_lines(agent) for agent in world.registrars]
    print(
        f"wiped {wanted} keys: all back {back_after:.3f}s after etcdctl started; "
        f"registrar logs: {restored}; {watch.samples} stats samples"
    )
    assert back_after < 1.0, f"keys back only after {back_after:.2f}s"
    assert not watch.violations, f"servers left HAProxy: {watch.violations[:10]}"
    assert all(restored), f"a registrar did not say it put keys back: {restored}"


async def _count_is(world: Fleet, wanted: int) -> bool:
    return await world.keys() >= wanted


async def _serves(world: Fleet, name: str) -> bool:
    return serving((await server_states(world.consumer.stats) or {}).get(name))


def _restored_lines(agent: Agent) -> list[int]:
    """``keys`` of each "put back" line in the agent's JSON log."""
    found = []
    with contextlib.suppress(OSError):
        for line in agent.log_path.read_text(errors="replace").splitlines():
            if "put back" in line:
                with contextlib.suppress(ValueError):
                    found.append(int(json.loads(line).get("keys", 0)))
    return found


# --- 2: the registrar's health while etcd is away (shorter than the TTL) ---------------------


@pytest.mark.parametrize("how", ["freeze", "kill"])
async def test_registrar_health_turns_within_seconds_of_losing_etcd_and_back_after(
    how: str,
    etcd: Any,
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    ttl = 15
    settings = settings_for(docker, etcd_endpoint, reg_prefix, ttl=ttl)
    cid = await docker.run(whoami)
    async with registrar(settings):
        await eventually(lambda: view.of_container(cid))
        await eventually(lambda: _health_is(settings.admin_address, 200), within=5)
        lost_at = time.monotonic()
        await call(etcd.pause if how == "freeze" else etcd.kill)  # SIGSTOP / SIGKILL
        try:
            body = await eventually(lambda: _health_is(settings.admin_address, 503), within=9)
            unhealthy_after = time.monotonic() - lost_at
        finally:
            await call(etcd.resume if how == "freeze" else etcd.start)
        back_at = time.monotonic()
        await eventually(lambda: _health_is(settings.admin_address, 200), within=10)
        healthy_after = time.monotonic() - back_at
    print(
        f"etcd {how}: /healthz 503 after {unhealthy_after:.2f}s "
        f"({body['etcd']['error']!r}), 200 {healthy_after:.2f}s after etcd was back"
    )
    assert unhealthy_after < ttl - 5, "health must turn well before the lease could expire"
    assert body["etcd"]["error"], body


async def _health_is(address: str, status: int) -> dict[str, Any] | None:
    try:
        code, body = await http_get(address, "/healthz")
    except OSError:
        return None
    return json.loads(body) if code == status else None


# --- 3: registrars frozen through an etcd outage longer than their TTL -----------------------


async def test_registrars_frozen_past_their_ttl_while_etcd_was_down_fail_no_request(
    etcd: Any, dockerd: Dockerd, docker_hosts: Callable[[int], Dockerd]
) -> None:
    ttl = 3
    async with fleet(etcd.endpoint, [dockerd, docker_hosts(2)], ttl=ttl) as world:
        wanted = len(world.names())
        alarms: list[bool] = []

        async def watch_alarm() -> None:
            while True:
                health = await _discoverer_health(world)
                if "empty_prefix_alarm" in health:
                    alarms.append(bool(health["empty_prefix_alarm"]))
                await asyncio.sleep(0.1)

        alarm_task = asyncio.create_task(watch_alarm())
        # 20 requests/s on fresh connections, for longer than the whole sequence.
        load = asyncio.create_task(steady_load([("127.0.0.1", world.port)], 20, 22))
        try:
            await asyncio.sleep(1.0)
            for agent in world.registrars:
                os.kill(agent.pid, signal.SIGSTOP)
            await call(etcd.stop)
            await asyncio.sleep(ttl + 1)
            await call(etcd.start)
            restarted_at = time.monotonic()
            # etcd gives every lease a full TTL again when it starts: both expire
            # while their registrars are still frozen.
            await eventually(lambda: _count_is_zero(world), within=ttl + 8, step=0.1)
            expired_after = time.monotonic() - restarted_at
            await asyncio.sleep(1.0)
            for agent in world.registrars:
                os.kill(agent.pid, signal.SIGCONT)
            resumed_after = time.monotonic() - restarted_at
            await eventually(lambda: _count_is(world, wanted), within=10, step=0.05)
            await wait_for(world.all_served, 10, 0.1, "every container in HAProxy again")
            await wait_for(
                lambda: _alarm_is(world, False), 10, 0.1, "the discoverer's alarm cleared"
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{world.describe()}") from None
        finally:
            alarm_task.cancel()
        async with asyncio.timeout(30):
            replies = await load
    failed = [reply for _, reply in replies if not reply.ok]
    print(
        f"leases expired {expired_after:.1f}s after etcd restarted, registrars resumed "
        f"after {resumed_after:.1f}s; alarm seen: {any(alarms)}; "
        f"{len(replies)} requests, {len(failed)} failed"
    )
    assert any(alarms), "the discoverer never raised its alarm"
    assert not failed, f"{len(failed)}/{len(replies)} failed: {failed[:5]}"


async def _count_is_zero(world: Fleet) -> bool:
    return await world.keys() == 0


async def _alarm_is(world: Fleet, raised: bool) -> bool:
    health = await _discoverer_health(world)
    return "empty_prefix_alarm" in health and health["empty_prefix_alarm"] is raised
