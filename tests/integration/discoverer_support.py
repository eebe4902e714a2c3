"""Helpers for the discoverer's integration tests and benchmark.

Upstreams are tiny asyncio HTTP servers answering their id; requests go
through HAProxy's consumer port; an :class:`EtcdProxy` sits between the
discoverer and etcd so a test can cut the discoverer off while etcd itself
keeps running (to make changes and compact behind its back).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agents.common.schema import Instance, instance_key

_ids = itertools.count(1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def new_container_id() -> str:
    return f"{next(_ids):06x}{int(time.time() * 1000) & 0xFFFFFF:06x}".ljust(12, "0")


def make_instance(
    service: str, upstream_port: int, private_port: int, host: str = "host-a", **extra: Any
) -> Instance:
    return Instance(
        service=service,
        host_id=host,
        address="127.0.0.1",
        port=upstream_port,
        private_port=private_port,
        container_id=extra.pop("container_id", None) or new_container_id(),
        **extra,
    )


class Upstream:
    """An HTTP server on 127.0.0.1 answering its name; counts its requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.requests = 0
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            now = time.monotonic()
            self.requests += 1
            self.first_request_at = self.first_request_at or now
            self.last_request_at = now
            body = self.name.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def request(port: int, host: str = "127.0.0.1", within: float = 2.0) -> str | None:
    """One HTTP request on a new connection: the answering upstream's name, or None."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = await reader.read(-1)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    return body.decode(errors="replace")


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 10.0, interval: float = 0.01
) -> float:
    """Wait until ``check()`` is true; the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


async def answered_by(port: int, name: str, tries: int = 20) -> bool:
    """Some request among ``tries`` is answered by ``name`` (round robin)."""
    for _ in range(tries):
        if await request(port) == name:
            return True
    return False


async def never_answered_by(port: int, name: str, tries: int = 20) -> bool:
    for _ in range(tries):
        if await request(port) == name:
            return False
    return True


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"chunked" in head.lower():
        body = _dechunk(body)
    return status, body.decode()


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


async def healthz(admin_port: int) -> tuple[int, dict[str, Any]]:
    status, body = await http_get(admin_port, "/healthz")
    return status, json.loads(body)


async def metric(admin_port: int, name: str) -> float | None:
    """One sample's value from /metrics (``name`` may include labels)."""
    _, body = await http_get(admin_port, "/metrics")
    for line in body.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return None


class EtcdProxy:
    """A TCP relay to etcd that a test can cut (connections dropped, new ones refused)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(dst)
            dst.transport.abort()


def proc_children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                children.append(int(entry.name))
    return children


def proc_tree(pid: int) -> list[int]:
    result = [pid]
    for child in proc_children(pid):
        result += proc_tree(child)
    return result


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def key_of(prefix: str, instance: Instance) -> str:
    return instance_key(prefix, instance)
