"""``pilotfish register``: Docker events → desired registrations → etcd.

Every event is a hint to look at one container again (one inspect), except
the ones that must not wait: stop/kill mark the container's registrations
``draining`` and wait (briefly) for etcd to have it before the next event of
that container is handled, so the watcher sees the drain before the delete;
die, pause and destroy withdraw without asking Docker anything.

Events of one container are handled in order, in its own lane; different
containers do not wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agents.common.access import ensure_access
from agents.common.admin import AdminServer
from agents.common.container import ContainerInfo
from agents.common.docker_events import (
    INSPECT,
    ContainerEvent,
    DockerSource,
    DockerUnavailable,
    RunningContainers,
)
from agents.common.etcd import Etcd
from agents.common.logging import describe, get_logger
from agents.common.settings import RegistrarSettings
from agents.common.systemd import notify, watchdog_loop
from agents.registrar.drain_watch import DrainWatch, gone_drains
from agents.registrar.etcd_sink import EtcdSink, SinkHooks
from agents.registrar.host_claim import HostClaim
from agents.registrar.identity import Engine, Holder, default_host_id
from agents.registrar.labels import Refusal, desired_instances, draining

log = get_logger("pilotfish.registrar")

# A kill with one of these (or a stop) means the process is going away; other
# signals (HUP to reload, USR1 …) leave the registration alone.
STOP_SIGNALS = frozenset({"2", "3", "9", "15", "SIGINT", "SIGQUIT", "SIGKILL", "SIGTERM"})
INSPECT_ACTIONS = frozenset({"start", "unpause", "health_status", "restart", "rename", INSPECT})
WITHDRAW_ACTIONS = frozenset({"die", "pause", "destroy"})
# How long a stop/kill waits for etcd to hold the drain before the die may
# delete it: long enough for a healthy etcd, short enough not to stall the lane.
DRAIN_WRITE_WAIT = 1.0
# /healthz names at most this many refusals (the metrics count them all).
MAX_LISTED = 100


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ns = "pilotfish_registrar"
        self.events = Counter(
            f"{ns}_events", "Docker events handled", ["action"], registry=self.registry
        )
        self.registrations = Gauge(
            f"{ns}_registrations",
            "Instances this host should have registered",
            registry=self.registry,
        )
        self.pending = Gauge(
            f"{ns}_pending_writes", "Keys not yet written to etcd", registry=self.registry
        )
        self.etcd_errors = Counter(f"{ns}_etcd_errors", "Failed etcd calls", registry=self.registry)
        self.reconnects = Counter(
            f"{ns}_reconnects",
            "Reconnections after losing a peer",
            ["peer"],
            registry=self.registry,
        )
        self.leases = Counter(
            f"{ns}_leases_granted", "Leases granted (1 + lost leases)", registry=self.registry
        )
        self.refusals = Counter(
            f"{ns}_refusals", "Labels or variables refused", registry=self.registry
        )
        self.restored = Counter(
            f"{ns}_keys_restored",
            "Keys put back after they were deleted or changed in etcd behind our back",
            registry=self.registry,
        )
        self.quarantined = Counter(
            f"{ns}_quarantined_keys",
            "Registrations etcd refused for good (not retried until they change)",
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{ns}_event_to_etcd_seconds",
            "From the Docker event to the etcd write acknowledged",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        for peer in ("docker", "etcd"):
            self.reconnects.labels(peer)


class Registrar:
    def __init__(
        self,
        settings: RegistrarSettings,
        docker: DockerSource,
        sink: EtcdSink,
        metrics: Metrics,
        drains: DrainWatch | None = None,
    ) -> None:
        self.settings = settings
        self.docker = docker
        self.sink = sink
        self.metrics = metrics
        # Drain requests in etcd (pilotfish drain): their containers register draining.
        self.drains = drains
        # Containers seen on this host by this process (their drain requests are
        # deleted when Docker no longer knows them).
        self._known: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Bumped on every snapshot: a lane that inspected before it is stale.
        self.generation = 0
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._draining: set[str] = set()
        self._refusals_logged: dict[str, set[Refusal]] = {}
        self._docker_outages = 0

    # --- the event loop ---------------------------------------------------------------

    async def run(self) -> None:
        if self.drains is not None:
            # Drained containers must never be registered up first (a restart
            # would route new connections to them for a moment).
            await self.drains.loaded.wait()
        async with contextlib.aclosing(self.docker.stream()) as stream:
            async for item in stream:
                if isinstance(item, RunningContainers):
                    self._apply_snapshot(item)
                elif isinstance(item, ContainerEvent):
                    self._dispatch(item)

    async def close(self) -> None:
        lanes = [*self._lanes.values(), *self._background]
        for lane in lanes:
            lane.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)

    def _apply_snapshot(self, snapshot: RunningContainers) -> None:
        self.generation += 1
        if self.docker.reconnects > self._docker_outages:
            self.metrics.reconnects.labels("docker").inc(
                self.docker.reconnects - self._docker_outages
            )
            self._docker_outages = self.docker.reconnects
        running = {c.id for c in snapshot.containers}
        self._known |= running
        self._draining &= running
        for gone in set(self._refusals_logged) - running:
            del self._refusals_logged[gone]
        self.sink.replace_all({c.id: self._desired(c) for c in snapshot.containers})
        self._update_gauges()
        log.info(
            "docker snapshot applied",
            containers=len(snapshot.containers),
            registrations=len(self.sink.desired),
        )
        self._in_background(self._delete_gone_drains(running))

    # --- drain requests ----------------------------------------------------------------

    def drain_changed(self, container_id: str) -> None:
        """A drain request of ``container_id`` came or went: look at it again, in its lane."""
        if container_id in self._known or self.sink.instances_of(container_id):
            self._dispatch(ContainerEvent(INSPECT, container_id, time.time_ns(), {}))

    def _drain_requested(self, container_id: str) -> bool:
        return self.drains is not None and container_id in self.drains.requested

    async def _delete_gone_drains(self, running: set[str]) -> None:
        """Delete the drain requests of this host's containers that were destroyed."""
        if self.drains is None:
            return
        await self.sink.synced.wait()  # the containers it found in etcd are known then
        known = self._known | self.sink.containers_found
        candidates = {c for c in self.drains.requested if c in known and c not in running}
        exists = {}
        for container_id in sorted(candidates):
            with contextlib.suppress(DockerUnavailable):
                exists[container_id] = await self.docker.inspect(container_id) is not None
        await self.drains.delete(gone_drains(self.drains.requested, known, exists))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- events -----------------------------------------------------------------------

    def _dispatch(self, event: ContainerEvent) -> None:
        self._known.add(event.container_id)
        self.metrics.events.labels(event.action).inc()
        previous = self._lanes.get(event.container_id)
        lane = asyncio.create_task(self._in_lane(previous, event, self.generation))
        self._lanes[event.container_id] = lane
        lane.add_done_callback(functools.partial(self._lane_done, event.container_id))

    def _lane_done(self, container_id: str, lane: asyncio.Task[None]) -> None:
        if self._lanes.get(container_id) is lane:
            del self._lanes[container_id]

    async def _in_lane(
        self, previous: asyncio.Task[None] | None, event: ContainerEvent, generation: int
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await self._handle(event, generation)
        except DockerUnavailable:
            pass  # the stream notices too: it reconnects and resyncs everything
        except Exception:
            log.exception(
                "event handling failed", action=event.action, container=event.container_id[:12]
            )
        finally:
            self._update_gauges()

    # --- one event --------------------------------------------------------------------

    async def _handle(self, event: ContainerEvent, generation: int) -> None:
        container_id = event.container_id
        if event.action in INSPECT_ACTIONS:
            if event.action in ("start", "restart"):
                self._draining.discard(container_id)
            container = await self.docker.inspect(container_id)
            if generation != self.generation:
                return  # a snapshot taken after this inspect already decided
            instances = self._desired(container) if container else []
            self.sink.set_container(container_id, instances, event.time_ns)
        elif event.action == "stop" or (
            event.action == "kill" and event.attributes.get("signal", "15") in STOP_SIGNALS
        ):
            await self._drain(container_id, event.time_ns)
        elif event.action in WITHDRAW_ACTIONS:
            if event.action != "pause":
                self._draining.discard(container_id)
                self._refusals_logged.pop(container_id, None)
            self.sink.set_container(container_id, [], event.time_ns)
            if event.action == "destroy":
                if self.drains is not None and container_id in self.drains.requested:
                    self._in_background(self.drains.delete([container_id]))
                self._known.discard(container_id)

    async def _drain(self, container_id: str, since_ns: int) -> None:
        self._draining.add(container_id)
        current = self.sink.instances_of(container_id)
        if not current or all(i.state == "draining" for i in current):
            return
        keys = self.sink.set_container(container_id, draining(current), since_ns)
        if not await self.sink.wait_written(keys, within=DRAIN_WRITE_WAIT):
            log.warning("drain not yet in etcd, going on", container=container_id[:12])

    def _desired(self, container: ContainerInfo) -> list[Any]:
        instances, refusals = desired_instances(container, self.settings, datetime.now(UTC))
        self._log_refusals(container.id, refusals)
        drained = container.id in self._draining or self._drain_requested(container.id)
        if drained and container.state == "running":
            return draining(instances)
        return instances

    def _log_refusals(self, container_id: str, refusals: list[Refusal]) -> None:
        # One line per refusal, not one per health check of the same container.
        seen = self._refusals_logged.setdefault(container_id, set())
        for refusal in refusals:
            if refusal not in seen:
                seen.add(refusal)
                self.metrics.refusals.inc()
                log.warning(
                    "label refused",
                    container=refusal.container_name or refusal.container_id[:12],
                    container_id=refusal.container_id[:12],
                    label=refusal.label,
                    reason=refusal.reason,
                    skipped=refusal.skipped,
                )

    def _update_gauges(self) -> None:
        self.metrics.registrations.set(len(self.sink.desired))
        self.metrics.pending.set(self.sink.backlog)

    # --- health -----------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, object]]:
        keeper = self.sink.keeper
        problem = etcd_problem(
            lease_id=keeper.lease_id,
            lease_age=time.monotonic() - keeper.last_refresh,
            ttl=keeper.ttl,
            lease_error=keeper.error,
            write_error=self.sink.last_error if self.sink.failing else "",
            watch_error=self.sink.watches.error,
        )
        etcd_ok = not problem
        details: dict[str, object] = {
            "host_id": self.settings.host_id,
            "docker": {
                "connected": self.docker.connected,
                "reconnects": self.docker.reconnects,
                "error": self.docker.last_error,
            },
            "etcd": {
                "ok": etcd_ok,
                "lease": keeper.lease_id,
                "error": problem,
                "writes_refused": bool(self.sink.refused),  # by etcd's access control
                "watched_keys": self.sink.watches.watched,
                "restored_keys": self.sink.restored_total,
            },
            "registrations": len(self.sink.desired),
            "pending_writes": self.sink.backlog,
            "drain_requests": {
                "count": len(self.drains.requested) if self.drains else 0,
                "error": self.drains.error if self.drains else "",
            },
            # Refused one by one: the rest of the host is not held up by them.
            "quarantined": self.quarantined()[:MAX_LISTED],
        }
        return self.docker.connected and etcd_ok, details

    def quarantined(self) -> list[dict[str, str]]:
        """What was not registered as asked: keys etcd refused, labels we refused."""
        entries = [
            {"key": key, "reason": reason} for key, reason in sorted(self.sink.quarantined.items())
        ]
        for container_id in sorted(self._refusals_logged):
            for refusal in sorted(self._refusals_logged[container_id], key=_refusal_order):
                entries.append(
                    {
                        "container": container_id[:12],
                        "name": refusal.container_name,
                        "label": refusal.label,
                        "reason": refusal.reason,
                        "skipped": refusal.skipped,
                    }
                )
        return entries


def etcd_problem(
    *,
    lease_id: int | None,
    lease_age: float,
    ttl: float,
    lease_error: str,
    write_error: str,
    watch_error: str,
) -> str:
    """What is wrong between this registrar and etcd right now; "" if nothing.

    Any failed call says so at once (a lease refresh that failed or hung past
    its deadline, a write, the key watches' stream), not a TTL later: the
    lease may still be alive, but etcd does not answer.
    """
    if lease_id is None:
        return lease_error or "no lease granted yet"
    for error in (lease_error, write_error, watch_error):
        if error:
            return error
    if lease_age >= ttl:
        return f"lease not refreshed for {lease_age:.1f}s (TTL {ttl:g}s)"
    return ""


def _refusal_order(refusal: Refusal) -> tuple[str, str]:
    return refusal.label, refusal.reason


def _hooks(metrics: Metrics) -> SinkHooks:
    leases = 0

    def on_new_lease(_lease: int) -> None:
        nonlocal leases
        leases += 1
        metrics.leases.inc()
        if leases > 1:
            metrics.reconnects.labels("etcd").inc()

    return SinkHooks(
        on_written=lambda _key, seconds: metrics.latency.observe(seconds),
        on_error=lambda _error: metrics.etcd_errors.inc(),
        on_new_lease=on_new_lease,
        on_recovered=lambda: metrics.reconnects.labels("etcd").inc(),
        on_quarantined=lambda _key: metrics.quarantined.inc(),
        on_restored=lambda _key: metrics.restored.inc(),
    )


async def serve(settings: RegistrarSettings, stop: asyncio.Event) -> None:
    metrics = Metrics()
    async with Etcd(settings) as etcd, DockerSource(settings.docker_host) as docker:
        engine = await _engine_unless_stopped(docker, stop)
        if engine is None:
            return
        settings = settings.model_copy(
            update={"host_id": settings.host_id or default_host_id(engine)}
        )
        claim = _host_claim(etcd, settings, engine)
        sink = EtcdSink(
            etcd,
            prefix=settings.prefix,
            host_id=settings.host_id,
            ttl=settings.ttl,
            hooks=_hooks(metrics),
            claim=claim.make,
            previous_lease=lambda: claim.taken_over_lease,
        )
        registrar = Registrar(settings, docker, sink, metrics)
        drains = DrainWatch(
            etcd, settings.prefix, registrar.drain_changed, lambda _e: metrics.etcd_errors.inc()
        )
        registrar.drains = drains
        admin = AdminServer(settings.admin_address, registrar.health, metrics.registry)
        await admin.start()
        log.info(
            "registrar started",
            host_id=settings.host_id,
            host_ip=settings.host_ip,
            prefix=settings.prefix,
            docker=settings.docker_host,
            etcd=etcd.target,
        )
        try:
            await _until_stopped(
                stop,
                _write_once_allowed(etcd, settings, sink),
                drains.run(),
                registrar.run(),
                _ready_when_synced(sink),
                watchdog_loop(lambda: registrar.health()[0]),
            )
        finally:
            await registrar.close()
            if settings.deregister_on_exit:
                await _deregister(sink)
            await admin.stop()
    log.info("registrar stopped", deregistered=settings.deregister_on_exit)


async def _engine_unless_stopped(docker: DockerSource, stop: asyncio.Event) -> Engine | None:
    """Docker's identity, waiting for Docker; None if told to stop meanwhile."""
    asking = asyncio.create_task(docker.engine())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([asking, stopping], return_when=asyncio.FIRST_COMPLETED)
    for task in (asking, stopping):
        task.cancel()
    await asyncio.gather(asking, stopping, return_exceptions=True)
    return asking.result() if not asking.cancelled() else None


def _host_claim(etcd: Etcd, settings: RegistrarSettings, engine: Engine) -> HostClaim:
    holder = Holder.of(engine, socket.gethostname(), os.getpid(), datetime.now(UTC))
    return HostClaim(etcd, settings.prefix, settings.host_id, holder)


async def _write_once_allowed(etcd: Etcd, settings: RegistrarSettings, sink: EtcdSink) -> None:
    """Write to etcd once this user's rights are proven (AccessDenied ends the agent).

    Docker is followed meanwhile: the desired state is ready when etcd answers.
    """
    await ensure_access(etcd, "registrar", [settings.prefix])
    await sink.run()


async def _ready_when_synced(sink: EtcdSink) -> None:
    await sink.synced.wait()
    notify("READY=1")


async def _until_stopped(stop: asyncio.Event, *loops: Coroutine[Any, Any, None]) -> None:
    """Run ``loops`` until ``stop`` is set; a loop that dies is a bug: re-raise it."""
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(loop) for loop in loops]
    stopper = asyncio.create_task(stop.wait())
    try:
        while True:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                return
            for task in done:
                tasks.remove(task)
                task.result()  # raises what killed it; a clean return is fine
    finally:
        for task in [stopper, *tasks]:
            task.cancel()
        await asyncio.gather(stopper, *tasks, return_exceptions=True)


# The lease revoke on exit (--deregister-on-exit) gets this long: one RPC of a
# few ms when etcd answers; the lease expires by itself within the TTL if not.
DEREGISTER_WITHIN = 0.7


async def _deregister(sink: EtcdSink) -> None:
    try:
        async with asyncio.timeout(DEREGISTER_WITHIN):
            await sink.deregister()
        log.info("lease revoked: this host's registrations are gone")
    except Exception as error:  # the lease expires by itself within the TTL anyway
        log.warning("could not revoke the lease", error=describe(error))
