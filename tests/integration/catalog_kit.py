"""Helpers for the catalog's tests: the agent in-process, its event stream, a browser.

The browser is Debian's chromium driven by Playwright (never a downloaded
browser); screenshots go to ``$PILOTFISH_TEST_ARTIFACTS/catalog`` (default
``test-artifacts/catalog`` in the repository).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from registrar_kit import REPO, eventually

from agents.catalog.agent import serve
from agents.common.etcd import Etcd
from agents.common.schema import Instance, instance_key
from agents.common.settings import CatalogSettings
from tests.stack import free_port, require_binary

ARTIFACTS = Path(os.environ.get("PILOTFISH_TEST_ARTIFACTS", REPO / "test-artifacts")) / "catalog"
CHROMIUM = "/usr/bin/chromium"


@dataclass
class Catalog:
    url: str
    settings: CatalogSettings
    http: aiohttp.ClientSession

    async def get(self, path: str, **params: str) -> tuple[int, Any, dict[str, str]]:
        async with self.http.get(self.url + path, params=params) as response:
            body = await response.read()
            data = json.loads(body) if response.content_type == "application/json" else body
            return response.status, data, dict(response.headers)

    async def json(self, path: str, **params: str) -> Any:
        status, data, _ = await self.get(path, **params)
        assert status == 200, (path, status, data)
        return data


@contextlib.asynccontextmanager
async def running_catalog(etcd_host: str, *prefixes: str) -> AsyncIterator[Catalog]:
    """``pilotfish catalog`` in-process on a port of its own, until the block ends."""
    settings = CatalogSettings(
        etcd_host=etcd_host,
        prefix=",".join(prefixes),
        address=f"127.0.0.1:{free_port()}",
        etcd_timeout=2.0,
        log_format="json",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    async with aiohttp.ClientSession() as http:
        catalog = Catalog(f"http://{settings.address}", settings, http)

        async def ready() -> bool:
            if task.done():
                task.result()
            with contextlib.suppress(aiohttp.ClientError):
                return (await catalog.get("/healthz"))[0] == 200
            return False

        try:
            await eventually(ready, within=10)
            yield catalog
        finally:
            stop.set()
            async with asyncio.timeout(5):
                await task


@dataclass
class Event:
    id: str
    kind: str
    data: Any


@dataclass
class EventStream:
    """``/api/v1/events`` read in a task; every event lands in ``events``."""

    catalog: Catalog
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventStream:
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    async def _read(self) -> None:
        url = self.catalog.url + "/api/v1/events"
        async with self.catalog.http.get(url, headers=self.headers, params=self.params) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                    continue
                if "data" in fields:
                    self.events.append(
                        Event(
                            fields.get("id", ""),
                            fields.get("event", "message"),
                            json.loads(fields["data"]),
                        )
                    )
                fields = {}


async def put_instances(
    etcd: Etcd, prefix: str, instances: list[Instance], tasks: int = 64
) -> None:
    """Put many instances with ``tasks`` puts in flight."""
    queue = list(instances)

    async def worker() -> None:
        while queue:
            instance = queue.pop()
            await etcd.put(instance_key(prefix, instance), instance.to_json())

    await asyncio.gather(*(worker() for _ in range(tasks)))


# --- the browser ------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    """Headless Debian chromium (``--no-sandbox``: the tests run as root)."""
    from playwright.async_api import async_playwright

    require_binary("chromium")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    """A fresh page; console errors and CSP violations are collected in ``page.problems``."""
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.problems = problems
    try:
        yield page
    finally:
        await context.close()


async def screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full_page)
    return path
