"""Helpers of the upgrader's integration tests: a registrar, a discoverer, load, images.

The agents run as processes (``python -m agents ...``, tests/integration/e2e_kit.py),
exactly as deployed: one registrar for the main engine, one discoverer with
its HAProxy; each test runs its own service on its own consumer port, and
its own ``pilotfish upgrade`` (a daemon, or ``--once``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from e2e_kit import (
    REPO,
    Agent,
    Consumer,
    Reply,
    _argv,
    discoverer_flags,
    fetch,
    free_port,
    registrar_flags,
    server_states,
    serving,
    wait_for,
)

from tests.conftest import label_args
from tests.stack import Dockerd, Etcd, image_id, make_base_dir, make_whoami_variant, unique_prefix

# Healthy once httpd answers; a check every second, like a site's own.
HEALTHY = "HEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD wget -q -O /dev/null http://127.0.0.1:8080/"
NEVER_HEALTHY = "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD test -e /nonexistent"
# Stays "starting" (failures in the start period do not count): an upgrade waits.
SLOW_HEALTH = (
    "HEALTHCHECK --interval=1s --timeout=1s --retries=1 --start-period=120s "
    "CMD test -e /tmp/healthy"
)


@dataclass
class World:
    engine: Dockerd
    etcd: Etcd
    prefix: str
    host_id: str
    consumer: Consumer
    logs: Path
    registrar: Agent
    discoverer: Agent
    agents: list[Agent] = field(default_factory=list)
    services: list[str] = field(default_factory=list)

    def remove_services(self) -> None:
        """Remove the containers of every service so far: the next test's upgrader
        (one per engine, as deployed) must not find them."""
        for name in self.services:
            ids = self.docker("ps", "-aq", "--filter", f"label=pilotfish.service={name}").split()
            if ids:
                self.docker("rm", "-f", *ids)
        self.services.clear()

    def describe(self) -> str:
        return "\n".join(a.tail(30) for a in [self.registrar, self.discoverer, *self.agents])

    def upgrader_flags(self, **extra: str | float | bool) -> dict[str, str | int | float | bool]:
        return {
            "docker_host": self.engine.docker_host,
            "etcd_host": self.etcd.endpoint,
            "prefix": self.prefix,
            "admin_address": f"127.0.0.1:{free_port()}",
            "health_timeout": 30,
            "route_timeout": 20,
            "drain_timeout": 10,
            **extra,
        }

    def start_upgrader(self, **extra: str | float | bool) -> tuple[Agent, str]:
        """A ``pilotfish upgrade`` daemon; and its admin address."""
        flags = self.upgrader_flags(**extra)
        name = f"upgrade-{uuid.uuid4().hex[:6]}"
        agent = Agent.start(name, "upgrade", flags, self.logs)
        self.agents.append(agent)
        return agent, str(flags["admin_address"])

    async def upgrade_once(
        self, *args: str, **extra: str | float | bool
    ) -> subprocess.CompletedProcess[str]:
        """``pilotfish upgrade --once`` (or --dry-run, --rollback): its exit code and output."""
        argv = [*_argv("upgrade", self.upgrader_flags(**extra)), *args]
        return await asyncio.to_thread(
            subprocess.run, argv, cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PILOTFISH_LOG_FORMAT": "json"},
        )  # fmt: skip

    def docker(self, *args: str) -> str:
        return self.engine.docker(*args)


@contextlib.contextmanager
def upgrade_world(engine: Dockerd, etcd: Etcd) -> Iterator[World]:
    prefix = unique_prefix("upgrade")
    host_id = f"up-{uuid.uuid4().hex[:6]}"
    logs = make_base_dir("upg")
    flags = registrar_flags(etcd.endpoint, prefix, host_id, engine.docker_host, engine.host_ip, 5)
    registrar = Agent.start("registrar", "register", flags, logs)
    state = logs / "c"
    consumer, dflags = discoverer_flags(etcd.endpoint, prefix, state, drain_timeout=10)
    discoverer = Agent.start("discoverer", "discover", dflags, logs, str(state))
    world = World(engine, etcd, prefix, host_id, consumer, logs, registrar, discoverer)
    try:
        yield world
    finally:
        for agent in [*world.agents, registrar, discoverer]:
            agent.stop()
        shutil.rmtree(logs, ignore_errors=True)


# --- a service ---------------------------------------------------------------------------


@dataclass
class Service:
    world: World
    name: str
    port: int  # the consumer port
    tag: str  # the tag its containers run

    def run(self, *options: str, name: str | None = None, upgrade: str | None = "auto",
            mode: str = "http") -> str:  # fmt: skip
        labels = {"pilotfish.service": self.name, "pilotfish.port": str(self.port),
                  "pilotfish.mode": mode}  # fmt: skip
        if upgrade is not None:
            labels["pilotfish.upgrade"] = upgrade
        args = [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]
        container_name = name or f"{self.name}-{uuid.uuid4().hex[:4]}"
        self.world.docker(
            "run", "-d", "--name", container_name, *label_args(), *args, *options,
            "-p", "8080", self.tag,
        )  # fmt: skip
        return container_name

    def inspect(self, name: str) -> dict[str, object] | None:
        try:
            doc = json.loads(self.world.docker("inspect", name))[0]
        except Exception:
            return None
        return doc if isinstance(doc, dict) else None

    def image_of(self, name: str) -> str | None:
        doc = self.inspect(name)
        return str(doc["Image"]) if doc else None

    async def runs(self, name: str, image: str) -> bool:
        """``name`` runs ``image`` (the docker CLI in a thread: load shares the loop)."""
        return await asyncio.to_thread(self.image_of, name) == image

    def running(self, name: str) -> bool:
        doc = self.inspect(name)
        return bool(doc and doc["State"]["Running"])  # type: ignore[index]

    def names(self) -> set[str]:
        out = self.world.docker("ps", "-a", "--format", "{{.Names}}", "--filter",
                                f"label=pilotfish.service={self.name}")  # fmt: skip
        return set(out.split())

    def short_id(self, name: str) -> str:
        doc = self.inspect(name)
        assert doc is not None, name
        return str(doc["Id"])[:12]

    async def routed(self, *names: str) -> bool:
        """HAProxy serves every one of ``names`` (container names) and nothing else."""
        states = await server_states(self.world.consumer.stats) or {}
        ids = {await asyncio.to_thread(self.short_id, n) for n in names}
        mine = {s: st for s, st in states.items() if s.startswith(self.world.host_id + "_")}
        up = {s.split("_")[-2] for s, st in mine.items() if serving(st)}
        return ids <= up

    async def answer(self) -> Reply:
        return await fetch(self.world.consumer.bind, self.port)


def service(world: World, tag_base: str) -> Service:
    name = f"{tag_base}-{uuid.uuid4().hex[:4]}"
    world.services.append(name)
    return Service(world, name, free_port(), f"pf-upg-{name}:live")


def make_version(world: World, svc: Service, version: str, *changes: str) -> str:
    """An image ``pf-upg-<svc>:<version>``; its id."""
    name = svc.tag.replace(":live", f":{version}")
    make_whoami_variant(world.engine, name, f"ENV VERSION={version}", *changes)
    return image_id(world.engine, name)


def point_tag(world: World, svc: Service, version: str) -> None:
    world.docker("tag", svc.tag.replace(":live", f":{version}"), svc.tag)


# --- load ------------------------------------------------------------------------------------


@dataclass
class Load:
    """Open-loop GETs (fresh connection each) at ``rate``/s until stopped, at most ``limit`` s."""

    host: str
    port: int
    rate: float = 40.0
    limit: float = 90.0
    replies: list[tuple[float, Reply]] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        stop = asyncio.Event()
        task = asyncio.create_task(self._run(stop))
        try:
            yield self
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    async def _run(self, stop: asyncio.Event) -> None:
        start = time.monotonic()
        pending: list[asyncio.Task[None]] = []
        i = 0
        while not stop.is_set() and time.monotonic() - start < self.limit:
            pending.append(asyncio.create_task(self._one()))
            i += 1
            await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
        await asyncio.gather(*pending)

    async def _one(self) -> None:
        sent = time.monotonic()
        self.replies.append((sent, await fetch(self.host, self.port, within=3.0)))

    @property
    def failed(self) -> list[Reply]:
        return [r for _, r in self.replies if not r.ok]

    def bodies(self) -> set[str]:
        return {r.body for _, r in self.replies if r.ok}


async def eventually(check: object, within: float, what: str) -> float:
    async def probe() -> object:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        return result

    return await wait_for(probe, within, 0.1, what)


def admin_get(address: str, path: str) -> tuple[int, str]:
    """GET on an agent's admin endpoint: (status, body); (0, "") while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float:
    """The value of one sample line ``name`` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
