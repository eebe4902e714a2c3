"""``pilotfish upgrade`` on the real stack: dockerd, etcd, a registrar, a discoverer + HAProxy.

Each test has a service of its own (its own tag and consumer port); the
images are the whoami root filesystem imported again with another ENV (or a
health check that never passes), so "new" is a different image id that
answers the same way: with its container's short id, which tells the copies
apart through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from upgrader_kit import (
    HEALTHY,
    NEVER_HEALTHY,
    Load,
    World,
    admin_get,
    eventually,
    make_version,
    metric,
    point_tag,
    service,
    upgrade_world,
)

from tests.stack import Dockerd, Etcd

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


def _registered_names(world: World, service_name: str) -> set[str]:
    """The container names in the service's registrations (etcdctl)."""
    out = subprocess.run(
        ["etcdctl", f"--endpoints={world.etcd.endpoint}", "get", "--prefix", "--print-value-only",
         f"{world.prefix}/services/{service_name}/"],
        capture_output=True, text=True, timeout=10, env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout  # fmt: skip
    names = {json.loads(line)["container_name"] for line in out.splitlines() if line.strip()}
    return names if all(not n.endswith(".pilotfish-next") for n in names) else set()


@pytest.mark.parametrize("mode", ["http", "tcp"])
async def test_a_tag_event_upgrades_start_first_with_no_failed_request(
    world: World, mode: str
) -> None:
    """docker tag → replaced at once: routed before the old one drains; nobody notices.

    In TCP mode too: HAProxy cannot retry there, and the old process drops
    what it accepted on SIGTERM; it is drained before it gets the signal.
    """
    svc = service(world, "ev")
    old_image = make_version(world, svc, "v1", HEALTHY)
    new_image = make_version(world, svc, "v2", HEALTHY)
    point_tag(world, svc, "v1")
    name = svc.run("--env", "KEEP=me", mode=mode)
    untouched = svc.run(upgrade=None, mode=mode)  # no opt-in: never touched
    refused = svc.run(upgrade="sometimes", mode=mode)  # a bad label: refused, named
    await eventually(lambda: svc.routed(name, untouched, refused), 60, "all routed")
    old_id = svc.short_id(name)
    upgrader, admin = world.start_upgrader(interval=300)
    await eventually(lambda: admin_get(admin, "/healthz")[0] == 200, 30, "upgrader healthy")

    async with Load(world.consumer.bind, svc.port, rate=40).running() as load:
        await asyncio.sleep(1)
        point_tag(world, svc, "v2")
        took = await eventually(lambda: svc.runs(name, new_image), 60, "upgraded")
        await eventually(lambda: svc.routed(name), 20, "the new copy routed")
        await asyncio.sleep(1)
    print(f"{mode}: tag -> upgraded in {took:.2f}s; {len(load.replies)} requests")
    log = upgrader.log_path.read_text()
    assert "drain not complete" not in log, log
    assert not load.failed, f"{len(load.failed)} failed: {load.failed[:5]}\n{world.describe()}"
    assert old_id in load.bodies() and svc.short_id(name) in load.bodies()
    previous = svc.inspect(name + ".pilotfish-previous")
    assert previous is not None and previous["Id"][:12] == old_id  # type: ignore[index]
    assert not svc.running(name + ".pilotfish-previous")
    new = svc.inspect(name)
    assert new is not None
    env = new["Config"]["Env"]  # type: ignore[index]
    assert "KEEP=me" in env and "VERSION=v2" in env, env
    assert svc.image_of(untouched) == old_image and svc.image_of(refused) == old_image
    # The registrar saw the rename: the registration carries the name again.
    await eventually(lambda: name in _registered_names(world, svc.name), 10, "renamed")
    assert svc.names() == {name, name + ".pilotfish-previous", untouched, refused}
    _, body = admin_get(admin, "/metrics")
    assert metric(body, 'pilotfish_upgrader_upgrades_total{result="upgraded"}') == 1
    assert metric(body, "pilotfish_upgrader_refusals_total") == 1
    assert "label refused" in log and refused in log and "sometimes" in log


async def test_an_unhealthy_image_is_rolled_back_and_not_retried(world: World) -> None:
    """The new copy never gets healthy: removed; the old one never stopped serving."""
    svc = service(world, "bad")
    make_version(world, svc, "v1", HEALTHY)
    bad_image = make_version(world, svc, "v2", NEVER_HEALTHY)
    point_tag(world, svc, "v1")
    name = svc.run()
    await eventually(lambda: svc.routed(name), 60, "routed")
    old_id = svc.short_id(name)
    # A short interval: later passes see the same failed image and leave it alone.
    upgrader, admin = world.start_upgrader(interval=1, health_timeout=10)
    async with Load(world.consumer.bind, svc.port, rate=40).running() as load:
        await asyncio.sleep(1)
        point_tag(world, svc, "v2")
        failed = lambda: admin_get(admin, "/healthz")[1].count(bad_image) == 1  # noqa: E731
        await eventually(failed, 60, "failed")
        await asyncio.sleep(3)  # three more passes
    assert not load.failed, f"{len(load.failed)} failed: {load.failed[:5]}\n{world.describe()}"
    assert load.bodies() == {old_id}
    assert svc.names() == {name} and svc.short_id(name) == old_id
    _, health = admin_get(admin, "/healthz")
    failed = json.loads(health)["failed"]
    assert failed[0]["container"] == name and "unhealthy" in failed[0]["error"], failed
    _, body = admin_get(admin, "/metrics")
    assert metric(body, 'pilotfish_upgrader_upgrades_total{result="failed"}') == 1
    assert metric(body, 'pilotfish_upgrader_passes_total{trigger="interval"}') >= 2
    upgrader.stop()


async def test_periodic_pass_and_rollback_command(world: World) -> None:
    """A tag that moved while no upgrader listened is found by a pass; --rollback undoes it."""
    svc = service(world, "per")
    old_image = make_version(world, svc, "v1", HEALTHY)
    new_image = make_version(world, svc, "v2", HEALTHY)
    point_tag(world, svc, "v1")
    name = svc.run()
    await eventually(lambda: svc.routed(name), 60, "routed")
    point_tag(world, svc, "v2")  # nobody listens: only a pass finds it
    dry = await world.upgrade_once("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would upgrade {name}: tag {svc.tag} moved" in dry.stdout
    assert svc.image_of(name) == old_image
    async with Load(world.consumer.bind, svc.port, rate=40).running() as load:
        once = await world.upgrade_once("--once")
        assert once.returncode == 0, once.stderr
        assert svc.image_of(name) == new_image
        await eventually(lambda: svc.routed(name), 20, "the new copy routed")
        back = await world.upgrade_once(rollback=name)
        assert back.returncode == 0, back.stderr
        assert svc.image_of(name) == old_image
        await eventually(lambda: svc.routed(name), 20, "the old copy routed")
        await asyncio.sleep(0.5)
    assert not load.failed, f"{len(load.failed)} failed: {load.failed[:5]}\n{world.describe()}"
    assert svc.image_of(name + ".pilotfish-previous") == new_image
    again = await world.upgrade_once("--once")  # the tag still names v2: not brought back
    assert again.returncode == 0 and svc.image_of(name) == old_image
    assert "rolled back from" in again.stderr


async def test_fixed_host_port_is_skipped_unless_stop_first(world: World) -> None:
    svc = service(world, "fix")
    old_image = make_version(world, svc, "v1")
    new_image = make_version(world, svc, "v2")
    point_tag(world, svc, "v1")
    fixed = svc.run("-p", f"{world.engine.host_ip}:{svc.port + 1}:8080")
    gap = svc.run(
        "-p", f"{world.engine.host_ip}:{svc.port + 2}:8080",
        "--label", "pilotfish.upgrade.order=stop-first",
    )  # fmt: skip
    point_tag(world, svc, "v2")
    once = await world.upgrade_once("--once")
    assert once.returncode == 0, once.stderr
    skipped = [line for line in once.stderr.splitlines() if "fixed host port" in line]
    assert len(skipped) == 1 and fixed in skipped[0], once.stderr
    assert svc.image_of(fixed) == old_image
    assert svc.image_of(gap) == new_image and svc.running(gap)


async def test_once_exits_non_zero_when_an_upgrade_fails(world: World) -> None:
    svc = service(world, "once")
    make_version(world, svc, "v1")
    make_version(world, svc, "v2", NEVER_HEALTHY)
    point_tag(world, svc, "v1")
    name = svc.run()
    quiet = await world.upgrade_once("--once")
    assert quiet.returncode == 0, quiet.stderr
    point_tag(world, svc, "v2")
    failing = await world.upgrade_once("--once", health_timeout=10)
    assert failing.returncode == 1, failing.stderr
    assert "upgrade failed" in failing.stderr
    assert svc.names() == {name} and svc.running(name)


async def test_a_container_run_with_rm_is_upgraded_without_a_previous_copy(world: World) -> None:
    svc = service(world, "rm")
    make_version(world, svc, "v1")
    new_image = make_version(world, svc, "v2")
    point_tag(world, svc, "v1")
    name = svc.run("--rm")
    point_tag(world, svc, "v2")
    once = await world.upgrade_once("--once")
    assert once.returncode == 0, once.stderr
    assert svc.image_of(name) == new_image and svc.running(name)
    await eventually(lambda: asyncio.to_thread(lambda: svc.names() == {name}), 20, "old gone")
