"""A container's life as etcd sees it: drain before delete, pause, destroy, health."""

from __future__ import annotations

import pytest
from registrar_kit import (
    DockerCli,
    EtcdView,
    eventually,
    registrar,
    settings_for,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_stop_or_kill_drains_before_the_key_is_deleted(
    how: str, docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    async with registrar(settings_for(docker, etcd_endpoint, reg_prefix)):
        cid = await docker.run(whoami)
        await eventually(lambda: view.of_container(cid))
        await view.start_watch()
        await docker(how, cid)
        await eventually(lambda: view.history(cid)[-1:] == ["deleted"])
        assert view.history(cid) == ["draining", "deleted"]
        assert await view.of_container(cid) == {}


async def test_pause_withdraws_unpause_restores_destroy_leaves_nothing(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    async with registrar(settings_for(docker, etcd_endpoint, reg_prefix)):
        cid = await docker.run(whoami)
        await eventually(lambda: view.of_container(cid))
        await view.start_watch()
        await docker("pause", cid)
        await eventually(lambda: view.history(cid) == ["deleted"])
        await docker("unpause", cid)
        await eventually(lambda: view.history(cid) == ["deleted", "up"])
        (instance,) = (await view.of_container(cid)).values()
        assert instance.state == "up"
        await docker("rm", "-f", cid)
        await eventually(lambda: view.history(cid)[-1:] == ["deleted"])
        assert await view.of_container(cid) == {}


async def test_healthcheck_registers_only_when_healthy_and_withdraws_when_unhealthy(
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami_health: str,
) -> None:
    async with registrar(settings_for(docker, etcd_endpoint, reg_prefix)):
        await view.start_watch()
        cid = await docker.run(whoami_health)
        status = await docker("inspect", "-f", "{{.State.Health.Status}}", cid)
        assert status in ("starting", "unhealthy")
        await eventually(
            lambda: _health_is(docker, cid, "unhealthy"), within=10
        )  # nothing registered while starting / unhealthy
        assert view.history(cid) == []
        await docker("exec", cid, "touch", "/tmp/healthy")
        (instance,) = (await eventually(lambda: view.of_container(cid), within=10)).values()
        assert instance.health == "healthy" and instance.state == "up"
        await docker("exec", cid, "rm", "/tmp/healthy")
        await eventually(lambda: view.history(cid)[-1:] == ["deleted"], within=10)
        assert view.history(cid) == ["up", "deleted"]


async def _health_is(docker: DockerCli, cid: str, status: str) -> bool:
    return await docker("inspect", "-f", "{{.State.Health.Status}}", cid) == status
