"""The catalog's HTTP side: JSON API, Server-Sent Events and the static UI (aiohttp).

Read-only. Every response carries a Content-Security-Policy that allows no
inline script and no other origin; the UI inserts every value as text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, generate_latest
from prometheus_client import Counter as PromCounter

from agents.catalog.api import (
    ChangeEvent,
    ConsumerList,
    ConsumerOut,
    Environment,
    Environments,
    HostList,
    HostOut,
    QuarantineList,
    openapi,
)
from agents.catalog.consumers import DiscovererStatuses
from agents.catalog.hosts import HostClaims
from agents.catalog.state import ServiceIndex
from agents.common.logging import describe, get_logger

log = get_logger("pilotfish.catalog.http")

SSE_CLIENTS = Gauge("pilotfish_catalog_sse_clients", "browsers connected to /api/v1/events")
SSE_EVENTS = PromCounter("pilotfish_catalog_sse_events", "events sent to browsers")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
HEARTBEAT_S = 15.0


def static_dir() -> Path:
    return Path(str(resources.files("agents.catalog") / "static"))


class Env:
    """One environment (prefix): its index, its claims reader, and the wake-up of streams."""

    def __init__(
        self,
        index: ServiceIndex,
        claims: HostClaims | None,
        consumers: DiscovererStatuses | None = None,
    ) -> None:
        self.index = index
        self.claims = claims
        self.consumers = consumers
        self.watching: Callable[[], bool] = lambda: True
        self._changed = asyncio.Event()
        self._encoded: dict[int, bytes] = {}

    def notify(self) -> None:
        """Wake every stream waiting on this environment."""
        self._changed.set()
        self._changed = asyncio.Event()
        floor = self.index.floor
        for revision in [r for r in self._encoded if r <= floor]:
            del self._encoded[revision]

    @property
    def changed(self) -> asyncio.Event:
        return self._changed

    def encode(self, event: ChangeEvent) -> bytes:
        """One SSE frame, serialized once for every browser."""
        frame = self._encoded.get(event.revision)
        if frame is None:
            frame = self._encoded[event.revision] = sse_frame(event)
        return frame


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as error:
        error.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


def _json(body: bytes | str, revision: int, status: int = 200) -> web.Response:
    return web.Response(
        body=body.encode() if isinstance(body, str) else body,
        status=status,
        content_type="application/json",
        headers={"X-Etcd-Revision": str(revision), "Cache-Control": "no-store"},
    )


class CatalogServer:
    def __init__(self, envs: dict[str, Env], etcd_host: str) -> None:
        self.envs = envs
        self.default = next(iter(envs))
        self.etcd_host = etcd_host
        self.openapi = json.dumps(openapi()).encode()
        self._index_html = (static_dir() / "index.html").read_bytes()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_security_headers])
        get = app.router.add_get
        get("/", self._page)
        get("/api/v1/openapi.json", self._openapi)
        get("/api/v1/environments", self._environments)
        get("/api/v1/services", self._services)
        get("/api/v1/services/{name}", self._service)
        get("/api/v1/hosts", self._hosts)
        get("/api/v1/consumers", self._consumers)
        get("/api/v1/quarantined", self._quarantined)
        get("/api/v1/events", self._events)
        get("/healthz", self._healthz)
        get("/metrics", self._metrics)
        app.router.add_static("/static/", static_dir(), append_version=False)
        return app

    def health(self) -> tuple[bool, dict[str, object]]:
        ok = all(env.index.ready and env.watching() for env in self.envs.values())
        return ok, {
            "environments": {
                prefix: {
                    "ready": env.index.ready,
                    "watching": env.watching(),
                    "revision": env.index.revision,
                    "services": len(env.index.summaries),
                    "quarantined": len(env.index.refused),
                }
                for prefix, env in self.envs.items()
            }
        }

    def _env(self, request: web.Request) -> Env:
        prefix = request.query.get("prefix", self.default)
        env = self.envs.get(prefix)
        if env is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"no environment {prefix!r}"}),
                content_type="application/json",
            )
        return env

    async def _page(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._index_html, content_type="text/html", charset="utf-8")

    async def _openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.openapi, content_type="application/json")

    async def _environments(self, _request: web.Request) -> web.Response:
        body = Environments(
            etcd_host=self.etcd_host,
            environments=tuple(
                Environment(
                    prefix=prefix,
                    revision=env.index.revision,
                    ready=env.index.ready,
                    services=len(env.index.summaries),
                )
                for prefix, env in self.envs.items()
            ),
        )
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    async def _services(self, request: web.Request) -> web.Response:
        index = self._env(request).index
        name, tag, host = (request.query.get(k, "") for k in ("name", "tag", "host"))
        if not (name or tag or host):
            return _json(index.services_json(), index.revision)
        listing = index.services(name=name, tag=tag, host=host)
        return _json(listing.model_dump_json(), index.revision)

    async def _service(self, request: web.Request) -> web.Response:
        index = self._env(request).index
        detail = index.service(request.match_info["name"])
        if detail is None:
            body = json.dumps({"error": "no such service", "revision": index.revision})
            return _json(body, index.revision, status=404)
        return _json(detail.model_dump_json(), index.revision)

    async def _hosts(self, request: web.Request) -> web.Response:
        env = self._env(request)
        index = env.index
        try:
            claims = await env.claims.read() if env.claims is not None else {}
        except Exception as error:  # etcd away: still show what the instances say
            log.warning("reading host claims failed", error=describe(error))
            claims = {}
        counts = index.host_counts()
        rows = []
        for host in sorted(set(counts) | set(claims)):
            instances, containers, services = counts.get(host, (0, (), ()))
            claim = claims.get(host)
            rows.append(
                HostOut(
                    host_id=host,
                    instances=instances,
                    containers=len(containers),
                    container_ids=containers,
                    services=services,
                    claimed=claim is not None,
                    lease_alive=bool(claim and claim.lease_alive),
                    ttl_left=claim.ttl_left if claim else None,
                    holder=claim.holder if claim else None,
                )
            )
        body = HostList(prefix=index.prefix, revision=index.revision, hosts=tuple(rows))
        return _json(body.model_dump_json(), index.revision)

    async def _consumers(self, request: web.Request) -> web.Response:
        env = self._env(request)
        index = env.index
        try:
            statuses = await env.consumers.read() if env.consumers is not None else {}
        except Exception as error:  # etcd away: an empty list, the rest of the UI goes on
            log.warning("reading discoverer statuses failed", error=describe(error))
            statuses = {}
        rows = tuple(
            ConsumerOut(
                id=status.id,
                applied_revision=status.revision,
                behind=max(0, index.revision - status.revision),
                services=status.services,
                serves_all=status.serves_all,
                version=status.agent_version,
                draining=len(status.draining),
                sessions=sum(status.draining.values()),
                updated_at=status.updated_at,
            )
            for _, status in sorted(statuses.items())
        )
        body = ConsumerList(prefix=index.prefix, revision=index.revision, consumers=rows)
        return _json(body.model_dump_json(), index.revision)

    async def _quarantined(self, request: web.Request) -> web.Response:
        index = self._env(request).index
        body = QuarantineList(
            prefix=index.prefix,
            revision=index.revision,
            total=len(index.refused),
            entries=tuple(index.quarantined()),
        )
        return _json(body.model_dump_json(), index.revision)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        env = self._env(request)
        given = request.headers.get("Last-Event-ID") or request.query.get("since", "")
        last: int | None = int(given) if given.strip().isdigit() else None
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
                **SECURITY_HEADERS,
            }
        )
        await response.prepare(request)
        SSE_CLIENTS.inc()
        try:
            await response.write(b"retry: 1000\n\n")
            while not env.index.ready:
                await self._wait(env.changed)
            if last is None:  # a new client: from now on
                last = env.index.revision
                hello = ChangeEvent(revision=last, quarantined=len(env.index.refused))
                await response.write(sse_frame(hello, "hello"))
            while True:
                changed = env.changed  # taken before reading, so no wake-up is lost
                last = await self._send_since(response, env, last)
                if not await self._wait(changed):
                    await response.write(b": keep-alive\n\n")
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            SSE_CLIENTS.dec()
        return response

    async def _send_since(self, response: web.StreamResponse, env: Env, last: int) -> int:
        index = env.index
        events = index.since(last)
        if events is None:  # too old, or from another etcd: start over
            reset = ChangeEvent(revision=index.revision, reset=True, quarantined=len(index.refused))
            await response.write(sse_frame(reset))
            SSE_EVENTS.inc()
            return index.revision
        for event in events:
            await response.write(env.encode(event))
            SSE_EVENTS.inc()
        return max(last, index.revision)

    @staticmethod
    async def _wait(event: asyncio.Event) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HEARTBEAT_S):
                await event.wait()
                return True
        return False

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok, details = self.health()
        return web.json_response({"ok": ok, **details}, status=200 if ok else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def sse_frame(event: ChangeEvent, kind: str | None = None) -> bytes:
    kind = kind or ("reset" if event.reset else "change")
    return f"id: {event.revision}\nevent: {kind}\ndata: {event.model_dump_json()}\n\n".encode()
