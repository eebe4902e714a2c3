"""``pilotfish upgrade`` killed mid-way, and with a registry (``--pull``).

Recovery reads Docker's state alone: the new copy's name
(``<name>.pilotfish-next``) and labels (what it replaces) say how far an
upgrade got; a restarted upgrader finishes or undoes it, leaving exactly one
serving copy.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest
from upgrader_kit import (
    HEALTHY,
    SLOW_HEALTH,
    Load,
    World,
    admin_get,
    eventually,
    make_version,
    point_tag,
    service,
    upgrade_world,
)

from tests.conftest import label_args
from tests.stack import Dockerd, Etcd, Registry, image_id

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(dockerd: Dockerd, etcd: Etcd) -> Iterator[World]:
    with upgrade_world(dockerd, etcd) as world:
        yield world


@pytest.fixture(autouse=True)
def _own_containers_only(world: World) -> Iterator[None]:
    yield
    for agent in world.agents:
        agent.stop()
    world.remove_services()


async def test_killed_while_the_new_copy_starts_then_restarted_leaves_one_copy(
    world: World,
) -> None:
    svc = service(world, "kill")
    old_image = make_version(world, svc, "v1", HEALTHY)
    make_version(world, svc, "v2", SLOW_HEALTH)  # stays "starting": the upgrade waits
    point_tag(world, svc, "v1")
    name = svc.run()
    await eventually(lambda: svc.routed(name), 60, "routed")
    upgrader, _admin = world.start_upgrader(health_timeout=120)
    async with Load(world.consumer.bind, svc.port, rate=40).running() as load:
        await asyncio.sleep(0.5)
        point_tag(world, svc, "v2")
        await eventually(
            lambda: asyncio.to_thread(svc.running, name + ".pilotfish-next"), 60, "new copy"
        )
        upgrader.kill()  # SIGKILL, mid-upgrade
        assert svc.names() == {name, name + ".pilotfish-next"}
        again = await world.upgrade_once("--once", health_timeout=3)
        await asyncio.sleep(0.5)
    # Recovered (the new copy removed), then tried again: it failed again.
    assert again.returncode == 1, again.stderr
    assert "unfinished upgrade found" in again.stderr and "roll_back" in again.stderr
    assert svc.names() == {name} and svc.running(name)
    assert svc.image_of(name) == old_image
    assert not load.failed, f"{len(load.failed)} failed: {load.failed[:5]}\n{world.describe()}"


async def test_restart_finishes_an_upgrade_whose_old_copy_was_stopped(world: World) -> None:
    """Killed after the old copy stopped, before the renames: the restart finishes it."""
    svc = service(world, "fin")
    old_image = make_version(world, svc, "v1")
    new_image = make_version(world, svc, "v2")
    point_tag(world, svc, "v1")
    name = svc.run()
    old_id = world.docker("inspect", "-f", "{{.Id}}", name)
    point_tag(world, svc, "v2")
    world.docker(
        "run", "-d", "--name", name + ".pilotfish-next", *label_args(),
        "--label", f"pilotfish.service={svc.name}", "--label", f"pilotfish.port={svc.port}",
        "--label", "pilotfish.upgrade=auto",
        "--label", f"pilotfish.upgrade.replaces={old_id}",
        "--label", f"pilotfish.upgrade.from-image={old_image}",
        "-p", "8080", svc.tag,
    )  # fmt: skip
    world.docker("stop", name)
    done = await world.upgrade_once("--once")
    assert done.returncode == 0, done.stderr
    assert "finish" in done.stderr
    assert svc.names() == {name, name + ".pilotfish-previous"}
    assert svc.running(name) and svc.image_of(name) == new_image
    assert not svc.running(name + ".pilotfish-previous")
    assert world.docker("inspect", "-f", "{{.Id}}", name + ".pilotfish-previous") == old_id
    await eventually(lambda: svc.routed(name), 30, "the finished copy routed")


async def test_pull_upgrades_when_the_registry_digest_moved(
    world: World, registry: Registry
) -> None:
    """--pull asks the registry (no download) and pulls only what moved."""
    svc = service(world, "reg")
    v1 = make_version(world, svc, "v1")
    v2 = make_version(world, svc, "v2")
    remote = f"{registry.address}/{svc.tag.replace(':live', '')}:live"
    world.docker("tag", v1, remote)
    world.docker("push", remote)
    svc.tag = remote
    name = svc.run()
    # The registry's tag moves; this engine's copy of the tag stays on v1.
    world.docker("tag", v2, remote)
    world.docker("push", remote)
    world.docker("tag", v1, remote)
    local = await world.upgrade_once("--once")
    assert local.returncode == 0, local.stderr
    assert svc.image_of(name) == v1, "without --pull only local tags count"
    pulled = await world.upgrade_once("--once", "--pull")
    assert pulled.returncode == 0, pulled.stderr
    assert "registry digest moved, pulling" in pulled.stderr
    assert svc.image_of(name) == v2 == image_id(world.engine, remote)
    still = await world.upgrade_once("--once", "--pull")
    assert still.returncode == 0 and "pulling" not in still.stderr, still.stderr


async def test_a_frozen_docker_is_reported_and_the_upgrader_resyncs(world: World) -> None:
    """dockerd stops answering: /healthz says so; once back, a moved tag is upgraded."""
    svc = service(world, "frz")
    make_version(world, svc, "v1")
    new_image = make_version(world, svc, "v2")
    point_tag(world, svc, "v1")
    name = svc.run()
    _upgrader, admin = world.start_upgrader()
    await eventually(lambda: admin_get(admin, "/healthz")[0] == 200, 30, "healthy")
    world.engine.kill(signal.SIGSTOP)
    try:
        # /_ping every 5 s, each with a 5 s deadline.
        await eventually(lambda: admin_get(admin, "/healthz")[0] == 503, 20, "reported")
        assert "_ping" in admin_get(admin, "/healthz")[1]
    finally:
        world.engine.kill(signal.SIGCONT)
    await eventually(lambda: admin_get(admin, "/healthz")[0] == 200, 30, "reconnected")
    point_tag(world, svc, "v2")
    await eventually(lambda: svc.runs(name, new_image), 60, "upgraded after the outage")


async def test_etcd_away_during_an_upgrade_keeps_the_old_copy(world: World) -> None:
    """No registration can be seen: the new copy is given up, the old one never stopped."""
    svc = service(world, "etd")
    old_image = make_version(world, svc, "v1")
    make_version(world, svc, "v2")
    point_tag(world, svc, "v1")
    name = svc.run()
    await eventually(lambda: svc.routed(name), 60, "routed")
    point_tag(world, svc, "v2")
    world.etcd.stop()
    try:
        once = await world.upgrade_once("--once", health_timeout=4, etcd_timeout=1)
    finally:
        world.etcd.start()
    assert once.returncode == 1, once.stderr
    assert "not registered in etcd" in once.stderr, once.stderr
    assert svc.names() == {name} and svc.running(name) and svc.image_of(name) == old_image
    await eventually(lambda: svc.routed(name), 30, "still routed")
