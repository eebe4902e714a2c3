"""Upstreams, clients and a sink harness for the HAProxy sink's integration tests.

Everything on 127.0.0.1 in the test process: HTTP upstreams answering their
own id (keep-alive, optional delay, or "empty": close without answering), a
TCP upstream writing its id, and bounded clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from prometheus_client import CollectorRegistry

from agents.common.settings import DiscovererSettings
from agents.discoverer.haproxy import HaproxySink
from agents.discoverer.metrics import SinkMetrics, new_metrics
from agents.discoverer.model import Catalog, Server, Service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Listener:
    """A server on a free 127.0.0.1 port; subclasses answer in ``_handle``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class HttpUpstream(_Listener):
    """HTTP/1.1 keep-alive server answering its name after ``delay`` seconds."""

    def __init__(self, name: str, delay: float = 0.0, behaviour: str = "ok") -> None:
        super().__init__(name)
        self.delay = delay
        self.behaviour = behaviour  # "ok" or "empty" (close without answering)
        self.requests = 0
        self.completed = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.behaviour == "empty":
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                body = self.name.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                self.completed += 1
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class TcpUpstream(_Listener):
    """Writes ``<name>\\n`` to every connection and closes it."""

    async def _handle(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write(f"{self.name}\n".encode())
            await writer.drain()
        writer.close()


async def tcp_ask(port: int, within: float = 2.0) -> str | None:
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    return line.decode().strip() or None


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str, bool]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode(errors="replace")
    status = int(head.split(" ", 2)[1])
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:] if line)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body.decode(errors="replace"), headers.get("connection", "") == "close"


async def http_once(port: int, within: float = 5.0) -> tuple[int, str] | None:
    """One request on a new connection: (status, body), or None on a failure."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                status, body, _ = await _read_response(reader)
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        return None
    return status, body


class KeepAliveClient:
    """Requests on one connection, reopened only when the server says `Connection: close`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.connections = 0

    async def request(self, within: float = 5.0) -> tuple[int, str] | None:
        try:
            async with asyncio.timeout(within):
                if self._conn is None:
                    self._conn = await asyncio.open_connection("127.0.0.1", self.port)
                    self.connections += 1
                reader, writer = self._conn
                writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                status, body, close = await _read_response(reader)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.close()
            return None
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


@dataclass
class Load:
    """Steady bounded load on a port: new-connection and keep-alive clients."""

    port: int
    rate: float = 100.0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _loop(self, kind: Literal["new", "keepalive"], period: float) -> None:
        client = KeepAliveClient(self.port)
        next_at = time.monotonic()
        while not self._stop.is_set():
            answer = await (http_once(self.port) if kind == "new" else client.request())
            if answer is not None and answer[0] == 200:
                self.ok += 1
            else:
                self.failed.append(f"{kind}: {answer}")
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        client.close()

    @contextlib.asynccontextmanager
    async def running(self, clients: int = 4) -> AsyncIterator[Load]:
        # Half new-connection, half keep-alive clients, sharing the rate.
        period = clients / self.rate
        kinds: list[Literal["new", "keepalive"]] = ["new", "keepalive"] * (clients // 2)
        tasks = [asyncio.create_task(self._loop(kind, period)) for kind in kinds]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], within: float = 10.0, interval: float = 0.01
) -> float:
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


def server(name: str, port: int, **extra: Any) -> Server:
    return Server(name=name, address="127.0.0.1", port=port, **extra)


def service(
    name: str, port: int, *servers: Server, mode: Literal["tcp", "http"] = "http"
) -> Service:
    return Service(name, port, mode, {s.name: s for s in servers})


def catalog(*services: Service) -> Catalog:
    return {s.name: s for s in services}


def settings_for(state_dir: str, **extra: Any) -> DiscovererSettings:
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "stats_address": f"127.0.0.1:{free_port()}",
        "reload_delay": 0.05,
        "reload_min_interval": 0.3,
        "drain_timeout": 3.0,
    }
    values.update(extra)
    return DiscovererSettings(**values)


@dataclass
class Harness:
    sink: HaproxySink
    settings: DiscovererSettings
    registry: CollectorRegistry
    metrics: SinkMetrics

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0

    def commands(self, verb: str) -> float:
        return self.count("pilotfish_discoverer_runtime_commands_total", verb=verb)

    def writes(self) -> float:
        """Runtime commands other than reads (show …)."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == "pilotfish_discoverer_runtime_commands_total" and not (
                    sample.labels["verb"].startswith("show")
                ):
                    total += sample.value
        return total

    @property
    def reloads(self) -> float:
        return self.count("pilotfish_discoverer_reloads_total")


def short_state_dir() -> str:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be too long.
    return tempfile.mkdtemp(prefix="pf-", dir="/tmp")


@contextlib.asynccontextmanager
async def running_sink(
    initial: Catalog, state_dir: str | None = None, stop: bool = True, **extra: Any
) -> AsyncIterator[Harness]:
    """A started sink with its supervision running; HAProxy stopped at the end."""
    own_dir = state_dir is None
    directory = state_dir or short_state_dir()
    settings = settings_for(directory, **extra)
    registry = CollectorRegistry()
    metrics = new_metrics(registry)
    sink = HaproxySink(settings, metrics)
    await sink.start(initial)
    supervisor = asyncio.create_task(sink.run())
    try:
        yield Harness(sink, settings, registry, metrics)
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        await sink.close(stop_haproxy=stop)
        if own_dir and stop:
            shutil.rmtree(directory, ignore_errors=True)
