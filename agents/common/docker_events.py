"""The Docker side: a thin, typed face over aiodocker that never goes quiet.

:meth:`DockerSource.stream` subscribes to the event stream *first*, then lists
and inspects the running containers (so nothing that happens in between is
lost: registrator's race), yields one :class:`RunningContainers`, then one
:class:`ContainerEvent` per container event. When the stream ends — an error,
or silently, as it does when dockerd restarts (registrator #377) — or when
dockerd stops answering ``/_ping``, it reconnects with backoff and starts
over with a fresh snapshot. An outage is logged once, not once per retry.

Labels are copied into every event, so a container's event lines are as
long as its labels. The stream is split into lines here, up to
:data:`MAX_EVENT_LINE` each (aiohttp's own readline raises at 512 KiB and
took the registrar down); a longer line is dropped and its container read
again instead, without reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiodocker
import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from agents.common.backoff import Backoff
from agents.common.container import ContainerInfo, container_from_inspect
from agents.common.logging import OnceEvery, describe, get_logger
from agents.registrar.identity import Engine

log = get_logger("pilotfish.docker")

# Only these actions change what is registered; exec_* (health checks run
# one per interval), attach, resize… are dropped.
ACTIONS = frozenset(
    {
        "start",
        "unpause",
        "health_status",
        "stop",
        "kill",
        "die",
        "pause",
        "destroy",
        "restart",
        "rename",  # the name is in the registration (an upgrade renames its new copy)
    }
)
# Image events that can move a tag (the upgrader's; a stream asks for them
# with ``event_types=("container", "image")``).
IMAGE_ACTIONS = frozenset({"tag", "pull", "load", "import"})
# The action of the event made up for a container whose event line was dropped.
INSPECT = "inspect"
MAX_EVENT_LINE = 8 * 1024 * 1024
# dockerd writes "status" then "id" (and the Actor's "ID" before its
# Attributes): the container is named near the start of even a dropped line.
_HEAD = 4096
_CONTAINER_IN_HEAD = re.compile(rb'"(?:id|ID)"\s*:\s*"([0-9a-f]{64})"')


class DockerUnavailable(Exception):
    """dockerd did not answer (connection refused, reset, timeout, 5xx)."""


@dataclass(frozen=True, slots=True)
class RunningContainers:
    """Every running container, read right after the event stream opened."""

    containers: list[ContainerInfo]


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    action: str  # "start", "health_status" (its ": healthy" suffix is cut off), …
    container_id: str
    time_ns: int  # when dockerd emitted it (for the event → etcd latency)
    attributes: dict[str, str]


@dataclass(frozen=True, slots=True)
class ImageEvent:
    action: str  # "tag", "pull", "load" or "import"
    image: str  # the image id, or the reference pulled
    name: str  # the reference it names ("repo:tag"), "" if the event names none
    time_ns: int


@dataclass(frozen=True, slots=True)
class Overlong:
    """A line longer than the limit: its start, and how long it was."""

    head: bytes
    size: int

    @property
    def container_id(self) -> str | None:
        found = _CONTAINER_IN_HEAD.search(self.head)
        return found[1].decode() if found else None


class LineSplitter:
    """Bytes in, complete lines out; a line over ``limit`` bytes is not kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._line = bytearray()
        self._head = b""
        self._dropped: int | None = None  # bytes of the overlong line so far

    def feed(self, data: bytes) -> Iterator[bytes | Overlong]:
        start = 0
        while True:
            end = data.find(b"\n", start)
            self._take(data[start:] if end < 0 else data[start:end])
            if end < 0:
                return
            start = end + 1
            if self._dropped is not None:
                yield Overlong(self._head, self._dropped)
                self._dropped, self._head = None, b""
            elif self._line:
                yield bytes(self._line)
            self._line.clear()

    def _take(self, piece: bytes) -> None:
        if self._dropped is not None:
            self._dropped += len(piece)
            return
        self._line += piece
        if len(self._line) > self.limit:
            self._head, self._dropped = bytes(self._line[:_HEAD]), len(self._line)
            self._line.clear()


class DockerSource:
    def __init__(
        self,
        url: str,
        *,
        ping_interval: float = 5.0,
        call_timeout: float = 10.0,
        concurrency: int = 16,
        event_types: tuple[str, ...] = ("container",),
    ) -> None:
        self.url = url
        self.event_types = event_types
        self.ping_interval = ping_interval
        self.call_timeout = call_timeout
        self.concurrency = concurrency
        self.connected = False
        self.reconnects = 0
        self.last_error = ""
        self._client: aiodocker.Docker | None = None
        self._quiet = OnceEvery(60.0)

    @property
    def client(self) -> aiodocker.Docker:
        if self._client is None:
            self._client = aiodocker.Docker(url=self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def __aenter__(self) -> DockerSource:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # --- calls -----------------------------------------------------------------------

    async def _json(self, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            async with asyncio.timeout(self.call_timeout):
                return await self.client._query_json(path, params=params)
        except aiodocker.DockerError as error:
            if error.status == 404:
                raise
            raise DockerUnavailable(f"{path}: {error}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise DockerUnavailable(f"{path}: {describe(error)}") from None

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container as it is now; None if it no longer exists."""
        try:
            doc = await self._json(f"containers/{container_id}/json")
        except aiodocker.DockerError:
            return None
        return container_from_inspect(doc)

    async def running(self) -> list[ContainerInfo]:
        listing = await self._json("containers/json")
        limit = asyncio.Semaphore(self.concurrency)

        async def inspect(container_id: str) -> ContainerInfo | None:
            async with limit:
                return await self.inspect(container_id)

        found = await asyncio.gather(*(inspect(item["Id"]) for item in listing))
        return [c for c in found if c is not None]

    async def engine(self) -> Engine:
        """The engine's identity (``/info``); waits, with backoff, until dockerd answers."""
        backoff = Backoff(initial=0.1, maximum=5.0)
        while True:
            try:
                return Engine.from_info(await self._json("info"))
            except DockerUnavailable as error:
                self.last_error = str(error)
                if self._quiet.should_log("docker"):
                    log.warning("docker unavailable, waiting for it", error=str(error))
            await backoff.wait()

    async def ping(self) -> None:
        try:
            async with (
                asyncio.timeout(min(self.call_timeout, self.ping_interval)),
                self.client._query("_ping", versioned_api=False) as response,
            ):
                await response.read()
        except aiodocker.DockerError as error:
            raise DockerUnavailable(f"_ping: {error}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise DockerUnavailable(f"_ping: {describe(error)}") from None

    # --- the stream ------------------------------------------------------------------

    async def stream(
        self,
    ) -> AsyncGenerator[RunningContainers | ContainerEvent | ImageEvent, None]:
        """Snapshots and events, forever; reconnects by itself."""
        backoff = Backoff(initial=0.1, maximum=5.0)
        while True:
            try:
                async for item in self._one_connection():
                    backoff.reset()
                    yield item
                self._lost("event stream ended")
            except DockerUnavailable as error:
                self._lost(str(error))
            except (aiohttp.ClientError, HttpProcessingError, OSError, ValueError) as error:
                self._lost(f"event stream broke: {describe(error)}")
            await backoff.wait()

    async def _one_connection(
        self,
    ) -> AsyncGenerator[RunningContainers | ContainerEvent | ImageEvent, None]:
        params = {"filters": json.dumps({"type": list(self.event_types)})}
        try:
            async with self.client._query("events", params=params, timeout=None) as response:
                # The response headers mean dockerd has subscribed us: from
                # here on nothing is missed, so the listing below is safe.
                containers = await self.running()
                self._connected()
                yield RunningContainers(containers)
                async with _watchdog(self, response):
                    lines = LineSplitter(MAX_EVENT_LINE)
                    async for chunk in response.content.iter_any():
                        for line in lines.feed(chunk):
                            if isinstance(line, Overlong):
                                yield await self._overlong(line)
                            elif (event := _parse_event(line)) is not None:
                                yield event
        except aiodocker.DockerError as error:
            raise DockerUnavailable(f"events: {error}") from None
        finally:
            self.connected = False

    async def _overlong(self, line: Overlong) -> RunningContainers | ContainerEvent:
        """Read the container of a dropped line again (all of them if it is not named)."""
        container_id = line.container_id
        if self._quiet.should_log(f"overlong {container_id}"):
            log.warning(
                "docker event line too long, dropped; reading the container again",
                container=container_id[:12] if container_id else "unknown: all",
                bytes=line.size,
                limit=MAX_EVENT_LINE,
            )
        if container_id is None:
            return RunningContainers(await self.running())
        return ContainerEvent(INSPECT, container_id, time.time_ns(), {})

    def _connected(self) -> None:
        self.connected = True
        self.last_error = ""
        held = self._quiet.clear("docker")
        if held or self.reconnects:
            log.info("docker reachable again, resynced", retries=held + 1)

    def _lost(self, why: str) -> None:
        self.connected = False
        self.last_error = why
        self.reconnects += 1
        if self._quiet.should_log("docker"):
            log.warning("docker unavailable, reconnecting", error=why, url=self.url)


@contextlib.asynccontextmanager
async def _watchdog(source: DockerSource, response: aiohttp.ClientResponse) -> AsyncIterator[None]:
    """Close the stream when dockerd stops answering, so the reader wakes up.

    A hung dockerd (or a half-open socket) keeps the stream open with nothing
    on it; only a request with a deadline tells that apart from a quiet host.
    """

    async def watch() -> None:
        while True:
            await asyncio.sleep(source.ping_interval)
            try:
                await source.ping()
            except DockerUnavailable as error:
                source.last_error = str(error)
                # Wake the blocked readline, then drop the connection.
                response.content.set_exception(error)
                response.close()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _parse_event(line: bytes) -> ContainerEvent | ImageEvent | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if data.get("Type") == "image":
        return _image_event(data)
    action = str(data.get("Action") or data.get("status") or "").partition(":")[0]
    actor = data.get("Actor") or {}
    container_id = str(actor.get("ID") or data.get("id") or "")
    if action not in ACTIONS or not container_id:
        return None
    return ContainerEvent(
        action=action,
        container_id=container_id,
        time_ns=int(data.get("timeNano") or 0),
        attributes={str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()},
    )


def _image_event(data: dict[str, Any]) -> ImageEvent | None:
    action = str(data.get("Action") or data.get("status") or "")
    actor = data.get("Actor") or {}
    image = str(actor.get("ID") or data.get("id") or "")
    if action not in IMAGE_ACTIONS or not image:
        return None
    name = str((actor.get("Attributes") or {}).get("name") or "")
    return ImageEvent(action, image, name, int(data.get("timeNano") or 0))
