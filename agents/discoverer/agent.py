"""``pilotfish discover``: etcd source → catalog → HAProxy sink, supervised.

One loop: each snapshot from the source goes through the empty-prefix guard
and the catalog builder (only the services that changed are rebuilt) and is
applied to HAProxy. HAProxy is started with the
first real catalog (the initial list), never with an empty guess, so a
discoverer that cannot reach etcd at boot does not wipe an HAProxy that is
still serving. SIGTERM leaves HAProxy serving unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import CollectorRegistry

from agents.common.access import checked, ensure_access
from agents.common.admin import AdminServer, process_registry
from agents.common.backoff import Backoff
from agents.common.etcd import Etcd
from agents.common.logging import OnceEvery, describe, get_logger
from agents.common.prefix_source import EtcdSource, source_metrics
from agents.common.prefix_state import Snapshot
from agents.common.quarantine import Quarantine
from agents.common.schema import Instance
from agents.common.settings import DiscovererSettings
from agents.common.systemd import notify, watchdog_loop
from agents.discoverer.guard import EmptyPrefixGuard
from agents.discoverer.metrics import AgentMetrics, agent_metrics, new_metrics
from agents.discoverer.model import Catalog, CatalogBuilder, Conflict, ListenRules
from agents.discoverer.status import SessionReader as HaproxySinkLike
from agents.discoverer.status import StatusPublisher, default_discoverer_id

log = get_logger("pilotfish.discoverer")

# Told after each successful apply of a live state: (its etcd revision, its
# instances, the catalog now in HAProxy). The status publisher listens.
OnApplied = Callable[[int, Mapping[str, Instance], Catalog], None]

# Registration latency is only meaningful for fresh registrations; an old
# registered_at (a re-put after a lease loss) would pollute the histogram.
_FRESH_REGISTRATION_S = 60.0


class Sink(Protocol):
    """What the agent needs from the HAProxy side (agents.discoverer.haproxy)."""

    async def start(self, catalog: Catalog) -> None: ...
    async def apply(self, catalog: Catalog) -> None: ...
    async def run(self) -> None: ...
    async def close(self, stop_haproxy: bool = False) -> None: ...
    def healthy(self) -> tuple[bool, dict[str, object]]: ...
    def refused(self) -> Mapping[tuple[str, str | None], str]:
        """(service, server or None for all of it) -> why HAProxy could not take it."""
        ...


class Source(Protocol):
    def updates(self) -> AsyncGenerator[Snapshot, None]: ...
    def status(self) -> dict[str, object]: ...
    @property
    def pending(self) -> bool:
        """Changes arrived that no snapshot handed out yet."""
        ...

    async def wait_for_changes(self, at_most: float) -> None: ...


class Discoverer:
    """The supervisor loop, independent of how the source and sink are built."""

    def __init__(
        self,
        settings: DiscovererSettings,
        source: Source,
        sink: Sink,
        rules: ListenRules | None = None,
        metrics: AgentMetrics | None = None,
        on_applied: OnApplied | None = None,
    ) -> None:
        self.settings = settings
        self.on_applied = on_applied
        # A private registry unless serve() passes the agent's.
        self.metrics = metrics or agent_metrics(CollectorRegistry())
        self.source = source
        self.sink = sink
        self.guard = EmptyPrefixGuard(hold_for=settings.loss_hold)
        self.builder = CatalogBuilder(
            settings.service_filter,
            rules or listen_rules(settings),
            retention=settings.listener_retention,
        )
        self.quarantine = Quarantine(log, self.metrics.quarantined)
        self._built_live = False  # the builder's last state was a live snapshot
        self.started = False
        self.catalog: Catalog = {}
        self.served = 0
        self.last_apply_error: str | None = None
        self._conflicts: set[Conflict] = set()
        self._quiet = OnceEvery(60.0)
        self._supervisor: asyncio.Task[None] | None = None
        self._last: Snapshot | None = None  # the snapshot handled last

    # -- health ------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, object]]:
        # HAProxy refuses listeners in its reloader too, between two snapshots.
        self._quarantine_refused_by_haproxy()
        etcd = self.source.status()
        if self.started:
            haproxy_ok, haproxy = self.sink.healthy()
        else:
            haproxy_ok, haproxy = False, {"state": "waiting for the first etcd list"}
        if self.last_apply_error is not None:
            haproxy_ok = False
            haproxy = {**haproxy, "apply_error": self.last_apply_error}
        ok = bool(etcd.get("watching")) and haproxy_ok and not self.guard.alarm
        return ok, {
            "etcd": etcd,
            "haproxy": haproxy,
            "empty_prefix_alarm": self.guard.alarm,
            "empty_prefix_cause": self.guard.cause,
            "held_instances": self.guard.held,
            "instances": self.served,
            "services": len(self.catalog),
            "conflicts": len(self._conflicts),
            "quarantined_count": len(self.quarantine),
            "quarantined": self.quarantine.listing(),
        }

    # -- the loop ----------------------------------------------------------

    async def run(self) -> None:
        """Apply every snapshot until cancelled."""
        updates = self.source.updates()
        try:
            async with contextlib.aclosing(updates):
                while True:
                    if self._last is not None and await self._hold_ended():
                        await self._handle(self._last, replay=True)
                        continue
                    self._last = await anext(updates)
                    await self._handle(self._last)
        finally:
            if self._supervisor is not None:
                self._supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._supervisor

    async def _hold_ended(self) -> bool:
        """Whether the guard's hold time, or a retained listener's, ended before
        any change arrived (the last state is then to be handled again, without
        the held instances or the listener)."""
        while (release_at := self._next_timer()) is not None and not self.source.pending:
            left = release_at - time.monotonic()
            if left <= 0:
                return True
            await self.source.wait_for_changes(left)
        return False

    def _next_timer(self) -> float | None:
        timers = [t for t in (self.guard.release_at, self.builder.retention_ends_at) if t]
        return min(timers, default=None)

    async def _handle(self, snapshot: Snapshot, replay: bool = False) -> None:
        # The source logged each refused value once already.
        self.quarantine.replace("schema", snapshot.refused, announce=False)
        instances = self.guard.filter(
            snapshot.instances,
            snapshot.empty_cause,
            snapshot.created,
            now=time.monotonic(),
            reconnected_at=snapshot.reconnected_at,
        )
        self.metrics.empty_prefix_alarm.set(1 if self.guard.alarm else 0)
        # The snapshot's changed keys describe live state after live state;
        # around held (guarded) state the builder compares everything.
        live = instances is snapshot.instances
        changed = snapshot.changed if live and self._built_live else None
        self._built_live = live
        catalog, conflicts = self.builder.build(
            instances, changed, self.guard.created, now=time.monotonic()
        )
        self._log_conflicts(conflicts)
        done = await self._apply_until_done(catalog)
        self._quarantine_refused_by_haproxy()
        self.catalog = catalog
        self.served = sum(len(s.servers) for s in catalog.values())
        self.metrics.instances.set(self.served)
        self.metrics.services.set(len(catalog))
        self.metrics.batches.inc()
        if not replay:
            self._observe(snapshot)
        # Only a live state counts as applied at its revision: held (guarded)
        # servers are not what etcd says, and a failed apply applied nothing.
        if done and live and self.on_applied is not None:
            self.on_applied(snapshot.revision, snapshot.instances, catalog)

    async def _apply_until_done(self, catalog: Catalog) -> bool:
        """Apply ``catalog``; False if given up for a newer state (not applied)."""
        # HAProxy may be restarting: retry with backoff, but never hold on to
        # a catalog once a newer state is waiting: that one is applied instead
        # (it holds every change), so nothing can stall the updates behind it.
        backoff = Backoff(initial=0.1, maximum=2.0)
        while True:
            try:
                if self.started:
                    await self.sink.apply(catalog)
                else:
                    await self.sink.start(catalog)
                    self.started = True
                    self._supervisor = asyncio.create_task(self._supervise(), name="haproxy")
                    notify("READY=1")
                    log.info("HAProxy serving", services=len(catalog))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any HAProxy failure: keep trying, log once
                self.metrics.apply_errors.inc()
                self.last_apply_error = describe(error)
                if self._quiet.should_log("apply"):
                    log.error(
                        "HAProxy update failed, retrying",
                        error=self.last_apply_error,
                        exc_info=True,
                    )
                await self.source.wait_for_changes(backoff.next_delay())
                if self.source.pending:
                    return False
                continue
            if self.last_apply_error is not None:
                held = self._quiet.clear("apply")
                log.info("HAProxy updated again", retries=held + 1)
                self.last_apply_error = None
            return True

    async def _supervise(self) -> None:
        try:
            await self.sink.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Supervision is the sink's job; if it gives up, say so in /healthz
            # (sink.healthy) rather than take routing down with the agent.
            log.exception("HAProxy supervision stopped")

    def _observe(self, snapshot: Snapshot) -> None:
        self.metrics.apply_latency.observe(time.monotonic() - snapshot.first_change_at)
        if snapshot.relisted:
            return
        now = datetime.now(UTC)
        for instance in snapshot.added:
            if instance.service not in self.catalog:
                continue  # filtered out by --services or a conflict
            age = (now - instance.registered_at).total_seconds()
            if 0 <= age <= _FRESH_REGISTRATION_S:
                self.metrics.registration_latency.observe(age)

    def _log_conflicts(self, conflicts: list[Conflict]) -> None:
        current = set(conflicts)
        for conflict in current - self._conflicts:
            if conflict.routed:
                log.warning(
                    "instance conflicts with the catalog, routed anyway",
                    key=conflict.key,
                    service=conflict.service,
                    reason=conflict.reason,
                )
        self._conflicts = current
        self.metrics.conflicts.set(len(current))
        left_out = {c.key: c.reason for c in conflicts if not c.routed}
        self.quarantine.replace("catalog", left_out)

    def _quarantine_refused_by_haproxy(self) -> None:
        refused: dict[str, str] = {}
        for (service, server), reason in self.sink.refused().items():
            for key in self.builder.keys_of(service, server):
                refused[key] = reason
        self.quarantine.replace("haproxy", refused)


def listen_rules(settings: DiscovererSettings) -> ListenRules:
    """The ports a consumer frontend must not take on this host, and its bind address."""
    reserved: dict[int, str] = {}
    for address, user in (
        (settings.stats_address, "the HAProxy stats page"),
        (settings.admin_address, "the discoverer's admin endpoint"),
    ):
        port = address.rpartition(":")[2]
        if address != "off" and port.isdigit() and int(port) > 0:
            reserved[int(port)] = user
    return ListenRules(reserved_ports=reserved, bind_address=settings.bind_address)


async def serve(settings: DiscovererSettings, stop: asyncio.Event) -> None:
    """Run the discoverer until ``stop`` is set (SIGTERM / SIGINT)."""
    from agents.discoverer.haproxy import HaproxySink  # the HAProxy side, built separately

    registry = process_registry()
    etcd = Etcd(settings)
    source = EtcdSource(
        etcd,
        settings.prefix,
        metrics=source_metrics(registry, "pilotfish_discoverer"),
        services=settings.service_filter,
    )
    sink = HaproxySink(settings, new_metrics(registry))
    publisher = _status_publisher(settings, etcd, sink)
    discoverer = Discoverer(
        settings,
        source,
        sink,
        metrics=agent_metrics(registry),
        on_applied=publisher.applied if publisher else None,
    )

    def health() -> tuple[bool, dict[str, object]]:
        ok, details = discoverer.health()
        if publisher is not None:  # informational: routing does not depend on it
            details["status"] = publisher.status()
        return ok, details

    admin = AdminServer(settings.admin_address, health, registry)
    log.info(
        "discoverer starting",
        etcd=etcd.target,
        prefix=settings.prefix,
        services=sorted(settings.service_filter) or "all",
        status_key=publisher.key if publisher else None,
    )
    await admin.start()
    loop = asyncio.create_task(
        checked(
            ensure_access(
                etcd, "discoverer", [settings.prefix], publishes_status=publisher is not None
            ),
            discoverer.run(),
        ),
        name="discoverer",
    )
    status = asyncio.create_task(_publish(publisher), name="status")
    # Not discoverer.health(): an empty-prefix alarm must not get us restarted
    # (we hold the last known servers on purpose); a stuck loop or a dead HAProxy must.
    watchdog = asyncio.create_task(
        watchdog_loop(lambda: not loop.done() and sink.healthy()[0]), name="watchdog"
    )
    stopping = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait({loop, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loop.done() and not stop.is_set():
            loop.result()  # the loop only ends by failing: raise its error
    finally:
        for task in (loop, watchdog, stopping, status):
            task.cancel()
        await asyncio.gather(loop, watchdog, stopping, status, return_exceptions=True)
        # Always: start() may have been cancelled after HAProxy was already up.
        try:
            await sink.close(stop_haproxy=settings.stop_haproxy_on_exit)
        except Exception:
            log.exception("closing the HAProxy side failed")
        await admin.stop()
        await etcd.close()
        log.info("discoverer stopped", haproxy_left_running=not settings.stop_haproxy_on_exit)


def _status_publisher(
    settings: DiscovererSettings, etcd: Etcd, sink: HaproxySinkLike
) -> StatusPublisher | None:
    if not settings.publish_status:
        return None
    discoverer_id = settings.discoverer_id or default_discoverer_id(
        socket.gethostname(), settings.admin_address, settings.stats_address
    )
    return StatusPublisher(
        etcd,
        settings.prefix,
        discoverer_id,
        service_filter=settings.service_filter,
        haproxy=sink,
        interval=settings.status_interval,
        ttl=settings.status_ttl,
    )


async def _publish(publisher: StatusPublisher | None) -> None:
    """The status key, apart from routing: whatever happens to it, routing goes on."""
    if publisher is None:
        return
    try:
        await publisher.run()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("discoverer status publishing stopped")
