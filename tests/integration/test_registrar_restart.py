"""The registrar's own life: restart, kill -9, SIGTERM, --deregister-on-exit."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from registrar_kit import (
    DockerCli,
    EtcdView,
    eventually,
    http_get,
    registrar,
    registrar_process,
    settings_for,
)

pytestmark = pytest.mark.integration


async def test_restart_deletes_ghosts_and_never_deletes_running_containers_keys(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    settings = settings_for(docker, etcd_endpoint, reg_prefix, ttl=10)
    stays = await docker.run(whoami)
    goes = await docker.run(whoami)
    async with registrar(settings):
        await eventually(lambda: view.of_container(stays))
        await eventually(lambda: view.of_container(goes))
    old_leases = set((await view.leases()).values())
    await docker("rm", "-f", goes)  # while the registrar is down: no event seen
    await view.start_watch()
    async with registrar(settings):
        await eventually(lambda: view.history(goes) == ["deleted"])
        await eventually(lambda: _moved_to_new_lease(view, stays, old_leases))
        assert view.history(stays) == ["up"]  # re-put on the new lease, never deleted
        assert len(await view.of_container(stays)) == 1  # no duplicate


async def _moved_to_new_lease(view: EtcdView, cid: str, old: set[int]) -> bool:
    leases = [lease for key, lease in (await view.leases()).items() if cid in key]
    return len(leases) == 1 and leases[0] not in old


async def test_kill_9_lets_every_key_expire_with_the_lease(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    settings = settings_for(docker, etcd_endpoint, reg_prefix, ttl=2)
    cids = [await docker.run(whoami) for _ in range(2)]
    process = await registrar_process(settings)
    try:
        for cid in cids:
            await eventually(lambda cid=cid: view.of_container(cid), within=10)
        process.kill()
        killed_at = time.monotonic()
        await eventually(lambda: _none_left(view, settings.host_id), within=settings.ttl + 2)
        assert time.monotonic() - killed_at <= settings.ttl + 1.5
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _none_left(view: EtcdView, host_id: str) -> bool:
    return not await view.instances(host_id)


@pytest.mark.parametrize("deregister", [False, True])
async def test_sigterm_exits_within_2s_keys_stay_unless_deregister_on_exit(
    deregister: bool,
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    settings = settings_for(
        docker, etcd_endpoint, reg_prefix, ttl=30, deregister_on_exit=deregister
    )
    cid = await docker.run(whoami)
    process = await registrar_process(settings)
    try:
        await eventually(lambda: view.of_container(cid), within=10)
        await eventually(lambda: _admin_up(settings.admin_address), within=5)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        async with asyncio.timeout(2.0):
            code = await process.wait()
        assert code == 0 and time.monotonic() - started < 2.0
        left = await view.of_container(cid)
        assert (left == {}) is deregister
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _admin_up(address: str) -> bool:
    try:
        status, _ = await http_get(address, "/healthz")
    except OSError:
        return False
    return status == 200
