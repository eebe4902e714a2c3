"""The discoverer's status key: ``<prefix>/discoverers/<id>``, on its own lease.

It tells the upgrader and ``pilotfish drain --wait`` what this discoverer has
applied to HAProxy: the etcd revision (every change of a served service at or
before it is in HAProxy), the services it routes, and the sessions left on
its draining servers. The pure part (:func:`applied_state`,
:func:`build_status`) decides what the status is; :class:`StatusPublisher`
writes it on change only, leading edge at once, bursts coalesced to one put
per ``--status-interval``; while a draining server still has sessions, they
are read again every :data:`SESSIONS_EVERY_S`. A put etcd refuses is logged
once per outage and retried; routing never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from agents import __version__
from agents.common.backoff import Backoff
from agents.common.etcd import Etcd, EtcdError, is_lease_not_found
from agents.common.lease import LeaseKeeper
from agents.common.logging import OnceEvery, describe, get_logger
from agents.common.schema import (
    MAX_STATUS_DRAINING,
    MAX_STATUS_SERVICES,
    DiscovererStatus,
    Instance,
    discoverer_key,
)
from agents.common.validation import MAX_NAME
from agents.discoverer.model import Catalog

log = get_logger("pilotfish.discoverer.status")

# The status key's lease: a dead discoverer's key is gone within this long.
STATUS_TTL = 10
SESSIONS_EVERY_S = 0.2
# How often an applied revision is checked for being in HAProxy (a reload pending).
_SETTLE_POLL_S = 0.05

Server = tuple[str, str]  # (backend, server name)


@dataclass(frozen=True, slots=True)
class Applied:
    """What a successful apply put into HAProxy."""

    revision: int
    services: tuple[str, ...]  # sorted
    draining: Mapping[str, Server] = field(default_factory=dict)  # instance key -> its server


def applied_state(
    revision: int,
    instances: Mapping[str, Instance],
    catalog: Catalog,
    service_filter: Collection[str],
) -> Applied:
    """The state after ``catalog`` (built from ``instances`` at ``revision``) was applied.

    Services: the ones routed now, and with ``--services`` every one named
    (a named service with no instance yet is served as soon as one appears).
    Draining: the instances in state draining that HAProxy has as servers.
    """
    services = sorted(set(catalog) | set(service_filter))[:MAX_STATUS_SERVICES]
    draining: dict[str, Server] = {}
    for key, instance in instances.items():  # every snapshot: one pass, no sort
        if instance.state != "draining":
            continue
        service = catalog.get(instance.service)
        if service is None or instance.server_name not in service.servers:
            continue  # not routed here (filtered out, quarantined)
        draining[key] = (instance.service, instance.server_name)
    kept = sorted(draining)[:MAX_STATUS_DRAINING]
    return Applied(revision, tuple(services), {key: draining[key] for key in kept})


def build_status(
    discoverer_id: str,
    applied: Applied,
    serves_all: bool,
    sessions: Mapping[Server, int],
    now: datetime,
) -> DiscovererStatus:
    """The status to publish; a draining server whose sessions are unknown counts 0."""
    return DiscovererStatus(
        id=discoverer_id,
        agent_version=__version__,
        revision=applied.revision,
        services=applied.services,
        serves_all=serves_all,
        draining={key: max(0, sessions.get(server, 0)) for key, server in applied.draining.items()},
        updated_at=now,
    )


def same_status(a: DiscovererStatus | None, b: DiscovererStatus) -> bool:
    """Equal in everything but the time (no put needed)."""
    return a is not None and a.model_dump(exclude={"updated_at"}) == b.model_dump(
        exclude={"updated_at"}
    )


def default_discoverer_id(hostname: str, admin_address: str, stats_address: str) -> str:
    """``<hostname>-<admin port>`` (or the stats port): unique per consumer host and
    discoverer, since two discoverers on one host cannot share either port."""
    port = next(
        (
            address.rpartition(":")[2]
            for address in (admin_address, stats_address)
            if address != "off" and address.rpartition(":")[2].isdigit()
        ),
        "0",
    )
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", hostname.split(".")[0]).lstrip("_.-")
    host = host[: MAX_NAME - len(port) - 1].rstrip("_.-") or "discoverer"
    return f"{host}-{port}"


class SessionReader(Protocol):
    """What the publisher needs from the HAProxy side."""

    @property
    def settled(self) -> bool:
        """Everything handed to apply() is in HAProxy (no reload pending, view in sync)."""
        ...

    async def sessions(self, servers: Collection[Server]) -> dict[Server, int]: ...


class StatusPublisher:
    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        discoverer_id: str,
        *,
        service_filter: Collection[str],
        haproxy: SessionReader,
        interval: float = 0.2,
        ttl: int = STATUS_TTL,
    ) -> None:
        self.etcd = etcd
        self.key = discoverer_key(prefix, discoverer_id)
        self.discoverer_id = discoverer_id
        self.service_filter = frozenset(service_filter)
        self.haproxy = haproxy
        self.interval = interval
        self.keeper = LeaseKeeper(etcd, ttl, self._on_new_lease)
        self.published: DiscovererStatus | None = None
        self.error = ""  # why the last put failed, "" once one succeeded
        self._pending: Applied | None = None  # applied, not yet known to be in HAProxy
        self._applied: Applied | None = None  # in HAProxy
        self._sessions: dict[Server, int] = {}
        self._last_put = -1e9
        self._force = False  # a new lease: put again even if unchanged
        self._wake = asyncio.Event()
        self._quiet = OnceEvery(60.0)

    # -- input (the discoverer's loop; never blocks) --------------------------------

    def applied(self, revision: int, instances: Mapping[str, Instance], catalog: Catalog) -> None:
        """Called after ``catalog`` (from the snapshot at ``revision``) was applied."""
        self._pending = applied_state(revision, instances, catalog, self.service_filter)
        self._wake.set()

    def status(self) -> dict[str, object]:
        """For /healthz."""
        return {
            "key": self.key,
            "published_revision": self.published.revision if self.published else None,
            "error": self.error or None,
        }

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        keeper = asyncio.create_task(self.keeper.run(), name="status-lease")
        backoff = Backoff(initial=0.2, maximum=5.0)
        try:
            while True:
                await self._sleep()
                try:
                    await self._publish_once()
                    backoff.reset()
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # etcd or HAProxy away: retry, routing goes on
                    self._failed(error)
                    await backoff.wait()
                    self._wake.set()
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _sleep(self) -> None:
        wait: float | None = None
        if self._pending is not None:
            wait = _SETTLE_POLL_S
        if any(n > 0 for n in self._sessions.values()):
            wait = min(wait or SESSIONS_EVERY_S, SESSIONS_EVERY_S)
        if wait is None:
            await self._wake.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
        self._wake.clear()

    async def _publish_once(self) -> None:
        if self._pending is not None and self.haproxy.settled:
            self._applied, self._pending = self._pending, None
        applied = self._applied
        if applied is None or self.keeper.lease_id is None:
            return
        wanted = set(applied.draining.values())
        self._sessions = await self.haproxy.sessions(wanted) if wanted else {}
        status = build_status(
            self.discoverer_id,
            applied,
            not self.service_filter,
            self._sessions,
            datetime.now(UTC),
        )
        if same_status(self.published, status) and not self._force:
            return
        # Coalesce: at most one put per interval (the first of a burst at once).
        wait = self._last_put + self.interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
            self._wake.set()  # look again: more may have changed meanwhile
            return
        await self._put(status)

    async def _put(self, status: DiscovererStatus) -> None:
        lease = self.keeper.lease_id
        self._force = False
        self._last_put = time.monotonic()
        try:
            await self.etcd.put(self.key, status.to_json(), lease=lease)
        except EtcdError as error:
            self._force = True
            if is_lease_not_found(error):
                self.keeper.mark_lost()
            raise
        self.published = status
        if self.error:
            held = self._quiet.clear("put")
            log.info("discoverer status published again", key=self.key, retries=held + 1)
            self.error = ""

    async def _on_new_lease(self, _lease: int) -> None:
        self._force = True
        self._wake.set()

    def _failed(self, error: BaseException) -> None:
        self.error = f"status: {describe(error)}"
        if self._quiet.should_log("put"):
            log.warning(
                "could not publish the discoverer status, retrying (routing goes on)",
                key=self.key,
                error=describe(error),
            )
