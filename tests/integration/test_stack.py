"""The test stack itself: engines publish and answer, etcd survives what tests do to it."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable

import aetcd
import pytest

from tests.stack import Dockerd, Etcd, EtcdCluster

pytestmark = pytest.mark.integration


def http_body(address: str, timeout: float = 5.0) -> str:
    """GET / from ``host:port``, retrying while the container's server comes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/", timeout=2) as response:
                body: bytes = response.read()
                return body.decode().strip()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_whoami(engine: Dockerd, labels: list[str], image: str | None = None) -> str:
    return engine.docker(
        "run", "-d", *labels, "-p", f"{engine.host_ip}::8080", image or engine.whoami
    )


def published(engine: Dockerd, container_id: str) -> str:
    return engine.docker("port", container_id, "8080").splitlines()[0]


def test_whoami_answers_on_its_published_port_and_its_own_address(
    dockerd: Dockerd, test_containers: list[str]
) -> None:
    cid = run_whoami(dockerd, test_containers)
    address = published(dockerd, cid)
    assert address.startswith(f"{dockerd.host_ip}:")
    assert http_body(address) == cid[:12]
    ip = dockerd.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid)
    assert http_body(f"{ip}:8080") == cid[:12]
    started = time.monotonic()
    dockerd.docker("stop", cid)
    assert time.monotonic() - started < 5  # PID 1 handles SIGTERM


def test_second_engine_publishes_on_its_own_address(
    docker_hosts: Callable[[int], Dockerd], dockerd: Dockerd, test_containers: list[str]
) -> None:
    second = docker_hosts(2)
    assert second.host_ip != dockerd.host_ip and second.bridge != dockerd.bridge
    cid = run_whoami(second, test_containers)
    try:
        assert http_body(published(second, cid)) == cid[:12]
    finally:
        second.docker("rm", "-f", cid)


def test_health_image_flips(dockerd: Dockerd, test_containers: list[str]) -> None:
    cid = run_whoami(dockerd, test_containers, dockerd.whoami_health)

    def status_becomes(expected: str) -> None:
        deadline = time.monotonic() + 10
        while (status := health(dockerd, cid)) != expected:
            assert time.monotonic() < deadline, f"health stayed {status}, not {expected}"
            time.sleep(0.1)

    status_becomes("unhealthy")
    dockerd.docker("exec", cid, "touch", "/tmp/healthy")
    status_becomes("healthy")
    dockerd.docker("exec", cid, "rm", "/tmp/healthy")
    status_becomes("unhealthy")


def health(engine: Dockerd, container_id: str) -> str:
    return engine.docker("inspect", "-f", "{{.State.Health.Status}}", container_id)


def test_engine_restart_keeps_containers_defined(
    docker_hosts: Callable[[int], Dockerd], test_containers: list[str]
) -> None:
    # On a secondary engine, so the main one is never restarted under other tests.
    engine = docker_hosts(2)
    cid = run_whoami(engine, test_containers)
    try:
        engine.kill()
        engine.restart()
        assert cid in engine.docker("ps", "-aq", "--no-trunc")
    finally:
        engine.docker("rm", "-f", cid)


def client(endpoint: str) -> aetcd.Client:
    host, _, port = endpoint.rpartition(":")
    return aetcd.Client(host=host, port=int(port))


async def test_etcd_put_get_and_back_after_a_restart(etcd: Etcd, prefix: str) -> None:
    async with client(etcd.endpoint) as c:
        await c.put(f"{prefix}/a".encode(), b"1")
        assert (await c.get(f"{prefix}/a".encode())).value == b"1"
    await asyncio.to_thread(etcd.stop)
    await asyncio.to_thread(etcd.start)
    async with client(etcd.endpoint) as c:
        assert (await c.get(f"{prefix}/a".encode())).value == b"1"


async def test_cluster_survives_its_leader_being_killed(
    etcd_cluster: EtcdCluster, prefix: str
) -> None:
    leader = await asyncio.to_thread(etcd_cluster.leader)
    leader.kill()
    other = next(m for m in etcd_cluster.members if m is not leader)
    key = f"{prefix}/after".encode()
    async with client(other.endpoint) as c:
        for _ in range(100):  # the put fails until a new leader is elected
            try:
                await c.put(key, b"ok")
                break
            except Exception:
                await asyncio.sleep(0.1)
        assert (await c.get(key)).value == b"ok"
    assert (await asyncio.to_thread(etcd_cluster.leader)) is not leader
    await asyncio.to_thread(leader.start)  # rejoins with its data
