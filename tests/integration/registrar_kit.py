"""Helpers for the registrar's integration tests: docker CLI, etcd views, the agent.

Kept apart from the stack fixtures (tests/stack.py, tests/conftest.py) so the
tests read as behaviours: run a container, watch the prefix, assert.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from agents.common.etcd import Etcd, EtcdError, WatchEvent
from agents.common.schema import Instance, parse_entry, services_prefix
from agents.common.settings import RegistrarSettings
from agents.registrar.agent import serve
from tests.conftest import TEST_LABELS

REPO = Path(__file__).resolve().parents[2]


def unique(name: str) -> str:
    return f"{name}{uuid.uuid4().hex[:8]}"


async def call(method: Callable[..., Any], *args: Any) -> Any:
    """Call a stack method whether it is sync (run in a thread) or async."""
    if asyncio.iscoroutinefunction(method):
        return await method(*args)
    return await asyncio.to_thread(method, *args)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(check: Callable[[], Any], within: float = 5.0, step: float = 0.02) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
        except EtcdError:  # the test's own client, while etcd comes back
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s: {check}")
        await asyncio.sleep(step)


@dataclass
class DockerCli:
    """The docker CLI against one engine; containers it starts are removed at the end."""

    url: str
    publish_ip: str = "127.0.0.1"
    started: list[str] = field(default_factory=list)

    async def __call__(self, *args: str, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            "docker",
            *args,
            env={**os.environ, "DOCKER_HOST": self.url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {err.decode().strip()}")
        return out.decode().strip()

    async def run(self, image: str, *options: str, ports: tuple[int, ...] = (8080,)) -> str:
        published = [f"-p{self.publish_ip}::{port}" for port in ports]
        name = unique("t")
        container_id = await self(
            "run", "-d", "--name", name, "-l", "pilotfish.test=1", *published, *options, image
        )
        self.started.append(container_id)
        return container_id

    async def run_api(
        self, image: str, labels: dict[str, str], name: str | None = None, port: int = 8080
    ) -> str:
        """``docker run`` through the API: labels of any size or content, no argv limits."""
        client = aiodocker.Docker(url=self.url)
        try:
            container = await client.containers.run(
                name=name or unique("t"),
                config={
                    "Image": image,
                    "Labels": {**labels, **TEST_LABELS},
                    "ExposedPorts": {f"{port}/tcp": {}},
                    "HostConfig": {
                        "PortBindings": {
                            f"{port}/tcp": [{"HostIp": self.publish_ip, "HostPort": ""}]
                        }
                    },
                },
            )
        finally:
            await client.close()
        self.started.append(container.id)
        return str(container.id)

    async def host_port(self, container_id: str, port: int = 8080) -> int:
        line = (await self("port", container_id, str(port))).splitlines()[0]
        return int(line.rpartition(":")[2])

    async def cleanup(self) -> None:
        if self.started:
            await self("rm", "-f", *self.started, check=False)
            self.started.clear()


class EtcdView:
    """Reads and watches one prefix through the project's own Etcd layer."""

    def __init__(self, endpoint: str, prefix: str, **credentials: str) -> None:
        self.prefix = prefix
        self.etcd = Etcd(
            RegistrarSettings(etcd_host=endpoint, prefix=prefix, etcd_timeout=2.0, **credentials)
        )
        self.events: list[WatchEvent] = []
        self._watch: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EtcdView:
        await self.etcd.__aenter__()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, EtcdError):
                await self._watch
        await self.etcd.close()

    async def instances(self, host_id: str | None = None) -> dict[str, Instance]:
        _rev, items = await self.etcd.get_prefix(services_prefix(self.prefix))
        found = {
            item.key.decode(): parse_entry(self.prefix, item.key, item.value) for item in items
        }
        return {k: v for k, v in found.items() if host_id is None or v.host_id == host_id}

    async def leases(self) -> dict[str, int]:
        _rev, items = await self.etcd.get_prefix(services_prefix(self.prefix))
        return {item.key.decode(): item.lease for item in items}

    async def of_container(self, container_id: str) -> dict[str, Instance]:
        return {k: v for k, v in (await self.instances()).items() if v.container_id == container_id}

    async def start_watch(self) -> None:
        revision, _ = await self.etcd.get_prefix(services_prefix(self.prefix))
        ready = asyncio.Event()

        async def watch() -> None:
            stream = self.etcd.watch_prefix(services_prefix(self.prefix), revision + 1)
            ready.set()
            async for event in stream:
                self.events.append(event)

        self._watch = asyncio.create_task(watch())
        await ready.wait()
        await asyncio.sleep(0.1)  # the watch is registered on the server

    def history(self, container_id: str) -> list[str]:
        """``up`` / ``draining`` / ``deleted`` for each event on the container's keys."""
        states = []
        for event in self.events:
            if container_id not in event.key.decode():
                continue
            if event.value is None:
                states.append("deleted")
            else:
                states.append(Instance.model_validate_json(event.value).state)
        return states


def settings_for(
    docker: DockerCli, etcd_endpoint: str, prefix: str, **overrides: Any
) -> RegistrarSettings:
    values: dict[str, Any] = {
        "docker_host": docker.url,
        "etcd_host": etcd_endpoint,
        "prefix": prefix,
        "host_id": unique("host"),
        "host_ip": docker.publish_ip,
        "ttl": 3,
        "etcd_timeout": 2.0,
        "admin_address": f"127.0.0.1:{free_port()}",
        "log_format": "json",
    }
    values.update(overrides)
    return RegistrarSettings(**values)


@contextlib.asynccontextmanager
async def registrar(settings: RegistrarSettings) -> AsyncIterator[asyncio.Event]:
    """The agent in-process, as a task; yields its stop event."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        yield stop
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task


async def registrar_process(
    settings: RegistrarSettings, stderr: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """``python -m agents register`` with the same settings, as flags."""
    flags = [
        f"--{name.replace('_', '-')}={value}"
        for name, value in settings.model_dump().items()
        if not isinstance(value, bool) and value is not None
    ]
    flags += [
        f"--{name.replace('_', '-')}"
        for name, value in settings.model_dump().items()
        if value is True
    ]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agents",
        "register",
        *flags,
        cwd=REPO,
        stderr=stderr,
    )


async def http_get(address: str, path: str = "/") -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


# --- fixtures (registered for this folder by conftest.py) ------------------------------
# They adapt the stack's session fixtures (tests/conftest.py) to what these tests use.


@pytest.fixture
async def docker(dockerd: Any) -> AsyncIterator[DockerCli]:
    cli = DockerCli(dockerd.url, publish_ip=dockerd.host_ip)
    yield cli
    await cli.cleanup()


@pytest.fixture
def etcd_endpoint(etcd: Any) -> str:
    return str(etcd.endpoint)


@pytest.fixture
def whoami(dockerd: Any) -> str:
    return str(dockerd.whoami)


@pytest.fixture
def whoami_health(dockerd: Any) -> str:
    return str(dockerd.whoami_health)


@pytest.fixture
def reg_prefix() -> str:
    return "/" + unique("reg")


@pytest.fixture
async def view(etcd_endpoint: str, reg_prefix: str) -> AsyncIterator[EtcdView]:
    async with EtcdView(etcd_endpoint, reg_prefix) as etcd_view:
        yield etcd_view
