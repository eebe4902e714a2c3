"""Read an etcd prefix: list it, then watch it, forever.

- List at revision R, watch from R + 1. Never polls.
- A broken watch (etcd gone, a frozen member cut off by gRPC keepalive, a
  timeout, a stream that just ends) is resumed from the last revision seen + 1
  after a backoff, so every change is replayed; the outage is logged once.
- A watch refused because its revision was compacted falls back to a full
  re-list, which replaces the whole state.

:class:`EtcdSource` is the thin I/O loop around the pure
:class:`~agents.common.prefix_state.PrefixState`; the discoverer and the
catalog each run one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Collection
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from agents.common.backoff import Backoff
from agents.common.etcd import Etcd, RevisionCompacted
from agents.common.logging import OnceEvery, describe, get_logger
from agents.common.prefix_state import PrefixState, Snapshot, log_bad_entry
from agents.common.schema import services_prefix

log = get_logger("pilotfish.prefix")


@dataclass(frozen=True, slots=True)
class SourceMetrics:
    watch_restarts: Counter  # label: reason (error: resumed; compacted: re-listed)
    relists: Counter
    bad_entries: Counter
    watch_events: Counter
    watching: Gauge


def source_metrics(registry: CollectorRegistry, namespace: str) -> SourceMetrics:
    """The source's metrics, named ``<namespace>_...`` in ``registry``."""
    return SourceMetrics(
        watch_restarts=Counter(
            f"{namespace}_watch_restarts",
            "etcd watches restarted, by reason (error: resumed at last revision + 1; "
            "compacted: re-list)",
            ["reason"],
            registry=registry,
        ),
        relists=Counter(f"{namespace}_relists", "full lists of the prefix", registry=registry),
        bad_entries=Counter(
            f"{namespace}_bad_entries",
            "etcd entries skipped because they do not parse",
            registry=registry,
        ),
        watch_events=Counter(
            f"{namespace}_watch_events", "etcd watch events received", registry=registry
        ),
        watching=Gauge(
            f"{namespace}_etcd_watching", "1 while the etcd watch is established", registry=registry
        ),
    )


class EtcdSource:
    """Yields a :class:`Snapshot` after each batch of etcd changes.

    Batching: a pump task applies every event to :class:`PrefixState` as it
    arrives and wakes the consumer. A lone event is handed over at once; events
    that arrive while the consumer is busy (a burst) are all folded into its
    next snapshot, so 1,000 changes cost a few applies, not 1,000.
    """

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        *,
        backoff: Backoff | None = None,
        quiet_interval: float = 60.0,
        metrics: SourceMetrics | None = None,
        services: Collection[str] = (),
    ) -> None:
        """``services``: watch only these services' keys (one etcd watch per
        service, ``<prefix>/services/<name>/``); empty: the whole prefix."""
        self.etcd = etcd
        self.key_prefix = services_prefix(prefix)
        self.ranges = [f"{self.key_prefix}{name}/" for name in sorted(services)]
        # A private registry unless the agent passes its own.
        self.metrics = metrics or source_metrics(CollectorRegistry(), "pilotfish_prefix")
        self.state = PrefixState(prefix, self._bad_entry, self.ranges)
        self.backoff = backoff or Backoff(initial=0.1, maximum=2.0)
        self.watching = False
        self.listed = False  # the first full list succeeded
        self.last_error: str | None = None
        self.outage_since: float | None = None
        self.restarts = 0
        self._quiet = OnceEvery(quiet_interval)
        self._changed = asyncio.Event()

    def status(self) -> dict[str, object]:
        status: dict[str, object] = {
            "watching": self.watching,
            "revision": self.state.revision,
            "keys": len(self.state.keys),
            "instances": len(self.state.instances),
            "restarts": self.restarts,
        }
        if self.last_error is not None:
            status["last_error"] = self.last_error
        if self.outage_since is not None:
            status["outage_seconds"] = round(time.monotonic() - self.outage_since, 1)
        return status

    def _bad_entry(self, key: str, revision: int, reason: str) -> None:
        self.metrics.bad_entries.inc()
        log_bad_entry(key, revision, reason)

    @property
    def pending(self) -> bool:
        return self.state.pending

    async def wait_for_changes(self, at_most: float) -> None:
        """Return after ``at_most`` seconds, or as soon as changes are pending."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + at_most
        while not self.state.pending and (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    await self._changed.wait()
            except TimeoutError:
                return
            if not self.state.pending:  # woken for something else: do not spin
                await asyncio.sleep(min(left, 0.05))

    async def updates(self) -> AsyncGenerator[Snapshot, None]:
        """The first snapshot is the initial list; then one per batch of changes."""
        pump = asyncio.create_task(self._run(), name="etcd-source")
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                if pump.done():
                    pump.result()  # the pump never ends on its own: surface its crash
                    raise RuntimeError("etcd source stopped")
                if self.state.pending:
                    yield self.state.take_batch()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _run(self) -> None:
        try:
            await self._list_and_watch()
        finally:
            self._set_watching(False)
            self._changed.set()  # wake the consumer so it sees the pump ended

    async def _list_and_watch(self) -> None:
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                await self._watch()
                # aetcd ends the iterator quietly on some stream errors
                # (unmapped gRPC codes): treat it like any other break.
                self._broken("watch stream ended", "ended")
            except RevisionCompacted as error:
                log.warning(
                    "etcd compacted past our revision, re-listing",
                    revision=self.state.revision,
                    compacted=error.compacted_revision,
                )
                self.metrics.watch_restarts.labels("compacted").inc()
                self.restarts += 1
                need_list = True
                continue  # no backoff: etcd is up, it just forgot the history
            except Exception as error:  # every etcd / gRPC failure: retry, never crash
                self._broken(describe(error), "error")
            await self.backoff.wait()

    async def _list(self) -> None:
        if self.ranges:
            revision, items = await self.etcd.get_prefixes(self.ranges)
        else:
            revision, items = await self.etcd.get_prefix(self.key_prefix)
        self.metrics.relists.inc()
        self.state.replace(
            revision, ((kv.key, kv.value, kv.mod_revision, kv.create_revision) for kv in items)
        )
        if not self.listed:
            self.listed = True
            log.info(
                "listed service prefix",
                prefix=self.key_prefix,
                services=len(self.ranges) or "all",
                revision=revision,
                keys=len(items),
                instances=len(self.state.instances),
            )
            if not items:
                log.warning(
                    "service prefix is empty: nothing to route yet (right --prefix?)",
                    prefix=self.key_prefix,
                )
        self._changed.set()

    async def _watch(self) -> None:
        if self.ranges:
            starts = {r: self.state.resume_revision(r) for r in self.ranges}
            events = self.etcd.watch_prefixes(starts, on_created=self._watch_created)
        else:
            start = self.state.revision + 1
            events = self.etcd.watch_prefix(self.key_prefix, start, on_created=self._watch_created)
        async for event in events:
            self.metrics.watch_events.inc()
            self.state.apply(event.key, event.value, event.revision, event.create_revision)
            self._changed.set()

    def _watch_created(self) -> None:
        self._set_watching(True)
        self.backoff.reset()
        self.last_error = None
        if self.outage_since is not None:
            self.state.reconnected_at = time.monotonic()
            held = self._quiet.clear("watch")
            log.info(
                "etcd watch restored",
                revision=self.state.revision,
                outage_seconds=round(time.monotonic() - self.outage_since, 2),
                retries=held + 1,
            )
            self.outage_since = None

    def _broken(self, reason: str, kind: str) -> None:
        self._set_watching(False)
        self.metrics.watch_restarts.labels(kind).inc()
        self.restarts += 1
        self.last_error = reason
        if self.outage_since is None:
            self.outage_since = time.monotonic()
        if self._quiet.should_log("watch"):
            log.warning(
                "etcd watch broken, resuming from the last revision seen",
                error=reason,
                resume_from=self.state.revision + 1,
            )

    def _set_watching(self, value: bool) -> None:
        self.watching = value
        self.metrics.watching.set(1 if value else 0)
