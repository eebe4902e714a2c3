"""The Docker calls of an upgrade: a thin face over the engine API (aiodocker).

Every call has a deadline; a connection failure, a timeout or a 5xx surfaces
as :class:`DockerUnavailable` (the caller waits for the engine and starts
over), a 4xx as :class:`DockerRefused` (this container's upgrade fails).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiodocker
import aiohttp

from agents.common.docker_events import DockerSource, DockerUnavailable
from agents.common.logging import describe
from agents.upgrader.plan import Container, fixed_ports

# Pulls and stops take as long as they take; everything else is quick.
PULL_TIMEOUT = 600.0
STOP_GRACE = 15.0


class DockerRefused(Exception):
    """The engine answered with a 4xx: the request itself is wrong here."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def container_of(doc: Mapping[str, Any]) -> Container:
    config = doc.get("Config") or {}
    state = doc.get("State") or {}
    health = (state.get("Health") or {}).get("Status") or "none"
    return Container(
        id=str(doc.get("Id", "")),
        name=str(doc.get("Name", "")).lstrip("/"),
        image_ref=str(config.get("Image") or ""),
        image_id=str(doc.get("Image") or ""),
        labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
        state="paused" if state.get("Paused") else str(state.get("Status") or "exited"),
        health=str(health),
        fixed_ports=fixed_ports(doc.get("HostConfig") or {}),
    )


def split_reference(ref: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``tag``); tag "latest" if none."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


class Engine:
    def __init__(self, source: DockerSource) -> None:
        self.source = source

    async def _call(
        self,
        path: str,
        method: str = "GET",
        *,
        params: dict[str, Any] | None = None,
        data: Any = None,
        within: float | None = None,
    ) -> Any:
        try:
            async with asyncio.timeout(within or self.source.call_timeout):
                return await self.source.client._query_json(path, method, params=params, data=data)
        except aiodocker.DockerError as error:
            if 400 <= error.status < 500:
                raise DockerRefused(error.status, str(error.message)) from None
            raise DockerUnavailable(f"{path}: {error}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise DockerUnavailable(f"{path}: {describe(error)}") from None

    async def inspect(self, ref: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = await self._call(f"containers/{ref}/json")
        except DockerRefused as error:
            if error.status == 404:
                return None
            raise
        return doc

    async def all_containers(self) -> list[dict[str, Any]]:
        """Every container, running or not, inspected."""
        listing = await self._call("containers/json", params={"all": "1"})
        limit = asyncio.Semaphore(self.source.concurrency)

        async def inspect(container_id: str) -> dict[str, Any] | None:
            async with limit:
                return await self.inspect(container_id)

        found = await asyncio.gather(*(inspect(item["Id"]) for item in listing))
        return [doc for doc in found if doc is not None]

    async def image(self, ref: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = await self._call(f"images/{ref}/json")
        except DockerRefused as error:
            if error.status == 404:
                return None
            raise
        return doc

    async def registry_digest(self, ref: str) -> str:
        """The digest the tag names in its registry now, without pulling."""
        doc = await self._call(f"distribution/{ref}/json", within=30.0)
        return str((doc.get("Descriptor") or {}).get("digest") or "")

    async def pull(self, ref: str) -> None:
        name, tag = split_reference(ref)
        params = {"fromImage": name, "tag": tag}
        try:
            async with (
                asyncio.timeout(PULL_TIMEOUT),
                self.source.client._query(
                    "images/create", "POST", params=params, timeout=None
                ) as response,
            ):
                body = await response.read()
        except aiodocker.DockerError as error:
            raise DockerRefused(error.status, str(error.message)) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise DockerUnavailable(f"pull {ref}: {describe(error)}") from None
        for line in body.splitlines():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("error"):
                raise DockerRefused(500, f"pull {ref}: {message['error']}")

    async def create(self, name: str, body: Mapping[str, Any]) -> str:
        reply = await self._call("containers/create", "POST", params={"name": name}, data=body)
        return str(reply["Id"])

    async def connect(self, network: str, container_id: str, endpoint: Mapping[str, Any]) -> None:
        data = {"Container": container_id, "EndpointConfig": dict(endpoint)}
        await self._call(f"networks/{network}/connect", "POST", data=data)

    async def start(self, container_id: str) -> None:
        await self._call(f"containers/{container_id}/start", "POST", within=60.0)

    async def stop(self, container_id: str, grace: int | None = None) -> None:
        """Docker's stop: the container's own stop signal, then its own timeout (or ``grace``)."""
        params = {"t": str(grace)} if grace is not None else None
        if grace is None:
            doc = await self.inspect(container_id)
            grace = int(((doc or {}).get("Config") or {}).get("StopTimeout") or 10)
        await self._call(
            f"containers/{container_id}/stop", "POST", params=params, within=grace + STOP_GRACE
        )

    async def remove(self, container_id: str) -> None:
        try:
            await self._call(f"containers/{container_id}", "DELETE", params={"force": "1"})
        except DockerRefused as error:
            if error.status != 404:
                raise

    async def rename(self, container_id: str, name: str) -> None:
        await self._call(f"containers/{container_id}/rename", "POST", params={"name": name})
