"""Peers going away under the registrar: etcd (one node, a cluster member), dockerd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable
from typing import Any

import pytest
from registrar_kit import (
    DockerCli,
    EtcdView,
    call,
    eventually,
    http_get,
    registrar,
    settings_for,
    unique,
)

from tests.conftest import ETCD_PASSWORD, ETCD_USER

pytestmark = pytest.mark.integration


async def _keys_of(view: EtcdView, host_id: str) -> set[str]:
    return set(await view.instances(host_id))


@pytest.mark.parametrize("outage", ["shorter", "longer"])
async def test_etcd_outage_loses_nothing_and_converges_when_back(
    outage: str,
    etcd: Any,
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    ttl = 3
    settings = settings_for(docker, etcd_endpoint, reg_prefix, ttl=ttl)
    before = await docker.run(whoami)
    async with registrar(settings):
        await eventually(lambda: view.of_container(before))
        await call(etcd.stop)
        try:
            during = await docker.run(whoami)  # registered once etcd is back
            await asyncio.sleep(1.0 if outage == "shorter" else ttl + 2.0)
        finally:
            await call(etcd.start)
        await eventually(lambda: view.of_container(before), within=ttl + 2)
        await eventually(lambda: view.of_container(during), within=ttl + 2)
        # Both still there a TTL later: they hang on a live, kept-alive lease.
        await asyncio.sleep(ttl + 0.5)
        assert await view.of_container(before) and await view.of_container(during)


@pytest.mark.parametrize("how", ["kill", "freeze"])
async def test_cluster_member_lost_registration_goes_on(
    how: str, etcd_cluster: Any, docker: DockerCli, whoami: str
) -> None:
    endpoints = ",".join(member.endpoint for member in etcd_cluster.members)
    prefix = "/" + unique("reg")
    settings = settings_for(docker, endpoints, prefix, ttl=10)
    async with EtcdView(endpoints, prefix) as view, registrar(settings):
        first = await docker.run(whoami)
        await eventually(lambda: view.of_container(first))
        victim = etcd_cluster.members[0]
        if how == "kill":
            await call(victim.stop)
        else:
            os.kill(victim.pid, signal.SIGSTOP)
        try:
            second = await docker.run(whoami)
            # A frozen member is noticed by gRPC keepalive (~7 s), then calls move on.
            await eventually(lambda: view.of_container(second), within=20)
            assert await view.of_container(first)
        finally:
            if how == "kill":
                await call(victim.start)
            else:
                os.kill(victim.pid, signal.SIGCONT)


async def test_dockerd_restart_reconnects_resyncs_and_registers_new_containers(
    dockerd: Any,
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    async with registrar(settings):
        cid = await docker.run(whoami)
        await eventually(lambda: view.of_container(cid))
        await call(dockerd.restart)
        # Without live-restore the container is stopped with dockerd: the
        # resync after the reconnect withdraws it.
        await eventually(lambda: _gone_or_running(docker, view, cid), within=20)
        after = await docker.run(whoami)
        await eventually(lambda: view.of_container(after), within=10)


async def test_hung_dockerd_is_reported_and_events_flow_again_after_it(
    dockerd: Any,
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    """A frozen dockerd keeps the event stream open with nothing on it.

    Only the /_ping deadline tells it from a quiet host: the registrar must
    report it (so a supervisor can act), keep the registrations of containers
    that still run, and handle events again once dockerd answers.
    """
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    async with registrar(settings):
        cid = await docker.run(whoami)
        await eventually(lambda: view.of_container(cid))
        await eventually(lambda: _healthz(settings.admin_address, 200))
        dockerd.kill(signal.SIGSTOP)
        try:
            # /_ping every 5 s, each with a 5 s deadline.
            health = await eventually(
                lambda: _healthz(settings.admin_address, 503), within=15, step=0.25
            )
            assert health["docker"]["error"] == "_ping: TimeoutError"
            assert await view.of_container(cid)
        finally:
            dockerd.kill(signal.SIGCONT)
        await eventually(lambda: _healthz(settings.admin_address, 200), within=15, step=0.1)
        after = await docker.run(whoami)
        await eventually(lambda: view.of_container(after), within=10)
        await docker("rm", "-f", cid)
        await eventually(lambda: _not(view.of_container(cid)), within=10)


async def test_with_etcd_auth_registration_goes_on_after_etcd_forgets_the_token(
    docker: DockerCli, auth_etcd: Any, reg_prefix: str, whoami: str
) -> None:
    credentials = {"etcd_username": ETCD_USER, "etcd_password": ETCD_PASSWORD}
    settings = settings_for(docker, auth_etcd.endpoint, reg_prefix, **credentials)
    view = EtcdView(auth_etcd.endpoint, reg_prefix, **credentials)
    async with view, registrar(settings):
        first = await docker.run(whoami)
        await eventually(lambda: view.of_container(first))
        auth_etcd.stop()
        auth_etcd.start()  # a restarted etcd knows no token
        second = await docker.run(whoami)
        await eventually(lambda: view.of_container(second), within=10)
        assert await view.of_container(first)


async def _healthz(address: str, status: int) -> dict[str, Any] | None:
    code, body = await http_get(address, "/healthz")
    health: dict[str, Any] = json.loads(body)
    return health if code == status else None


async def _not(result: Awaitable[Any]) -> bool:
    return not await result


async def _gone_or_running(docker: DockerCli, view: EtcdView, cid: str) -> bool:
    running = await docker("inspect", "-f", "{{.State.Running}}", cid) == "true"
    return running == bool(await view.of_container(cid))
