"""The admin endpoint: ``/healthz`` and Prometheus ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
)

from agents.common.logging import get_logger

log = get_logger("pilotfish.admin")

HealthCheck = Callable[[], tuple[bool, dict[str, object]]]


def process_registry() -> CollectorRegistry:
    """A registry for one agent, with the process and Python metrics in it."""
    registry = CollectorRegistry()
    registry.register(PROCESS_COLLECTOR)
    registry.register(PLATFORM_COLLECTOR)
    registry.register(GC_COLLECTOR)
    return registry


class AdminServer:
    """Serves health and metrics; ``address`` is ``host:port`` or ``off``."""

    def __init__(
        self, address: str, health: HealthCheck, registry: CollectorRegistry = REGISTRY
    ) -> None:
        self.address = address
        self.health = health
        self.registry = registry
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        if self.address == "off":
            return
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        # A request still in flight when the agent stops gets this long, not
        # aiohttp's default 60 s: a stopping agent must exit within 2 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        host, _, port = self.address.rpartition(":")
        site = web.TCPSite(self._runner, host or "0.0.0.0", int(port), reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        log.info("admin endpoint listening", address=f"{host}:{self.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok, details = self.health()
        return web.json_response({"ok": ok, **details}, status=200 if ok else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
