"""The etcd side of the discoverer: list the service prefix, then watch it.

- List at revision R, watch from R + 1. Never polls.
- A broken watch (etcd gone, a frozen member cut off by gRPC keepalive, a
  timeout, a stream that just ends) is resumed from the last revision seen + 1
  after a backoff, so every change is replayed; the outage is logged once.
- A watch refused because its revision was compacted falls back to a full
  re-list, which replaces the whole state (the agent diffs catalogs anyway).
- Every entry goes through :func:`parse_entry`; one that does not parse is
  logged once per key and revision and left out. It never reaches HAProxy.

:class:`PrefixState` is the pure part (events in, state out), tested without
etcd; :class:`EtcdSource` is the thin I/O loop around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from agents.common.backoff import Backoff
from agents.common.etcd import Etcd, RevisionCompacted
from agents.common.logging import OnceEvery, describe, get_logger
from agents.common.schema import Instance, SchemaError, parse_entry, services_prefix

log = get_logger("pilotfish.discoverer.source")

WATCH_RESTARTS = PromCounter(
    "pilotfish_discoverer_watch_restarts",
    "etcd watches restarted, by reason (error: resumed at last revision + 1; compacted: re-list)",
    ["reason"],
)
RELISTS = PromCounter("pilotfish_discoverer_relists", "full lists of the service prefix")
BAD_ENTRIES = PromCounter(
    "pilotfish_discoverer_bad_entries", "etcd entries skipped because they do not parse"
)
WATCH_EVENTS = PromCounter("pilotfish_discoverer_watch_events", "etcd watch events received")
WATCHING = Gauge("pilotfish_discoverer_etcd_watching", "1 while the etcd watch is established")

# How the live state last became empty; the empty-prefix guard (guard.py)
# decides from it whether to hold the last known servers.
#   wipe:    one revision removed every instance, and they came from 2+ hosts
#            (delete --prefix, a restore, a wrong-prefix migration). A host's
#            lease expiry removes only that host's keys, so it is never a wipe.
#   relist:  a full list (after compaction) found nothing while we had
#            instances: how they went is unknown, so assume the worst.
#   deletes: ordinary removals (the last instance of a small deployment).
EmptyCause = Literal["wipe", "relist", "deletes"]

BadEntryReporter = Callable[[str, int, str], None]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole current state after one batch of changes."""

    instances: Mapping[str, Instance]  # key -> instance, valid entries only
    created: Mapping[str, int]  # key -> etcd create_revision, for every key of ``instances``
    refused: Mapping[str, str]  # key -> why its value was refused (entries that do not parse)
    revision: int  # the etcd revision this state reflects
    relisted: bool  # the state was replaced by a full list in this batch
    # The keys put or deleted since the previous snapshot (None: relisted,
    # anything may have changed), so the catalog need not compare every key.
    changed: frozenset[str] | None
    empty_cause: EmptyCause | None  # why ``instances`` is empty (None: not empty / startup)
    first_change_at: float  # time.monotonic() the oldest change of this batch arrived
    # time.monotonic() the watch last came back after an outage (None: never broke)
    reconnected_at: float | None
    added: tuple[Instance, ...]  # instances put (new or changed) in this batch


def _text(key: bytes | str) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else key


class PrefixState:
    """The service prefix as seen through list + watch events; pure, no I/O."""

    def __init__(self, prefix: str, report_bad: BadEntryReporter | None = None) -> None:
        self.prefix = prefix
        self.report_bad = report_bad or _log_bad_entry
        self.instances: dict[str, Instance] = {}
        self.created: dict[str, int] = {}  # key -> create_revision of each instance
        self.refused: dict[str, str] = {}  # key -> why its value does not parse
        self.keys: dict[str, int] = {}
        self.revision = 0
        self.reconnected_at: float | None = None
        self.empty_cause: EmptyCause | None = None
        self._hosts: Counter[str] = Counter()  # host -> live instances, kept incrementally
        self._reported: dict[str, int] = {}  # key -> revision whose bad value was logged
        self._open_revision = 0
        self._hosts_before_revision = 0
        self._reset_batch()

    # -- input -------------------------------------------------------------

    def replace(
        self, revision: int, entries: Iterable[tuple[bytes | str, bytes, int, int]]
    ) -> None:
        """A full list at ``revision``: (key, value, mod revision, create revision) of every key."""
        had_instances = bool(self.instances)
        self.instances, self.keys, self._hosts = {}, {}, Counter()
        self.created, self.refused = {}, {}
        for raw_key, value, mod_revision, create_revision in entries:
            key = _text(raw_key)
            self.keys[key] = mod_revision
            instance = self._parse(key, value, mod_revision)
            if instance is not None:
                self._add(key, instance, create_revision or mod_revision)
        self._reported = {k: r for k, r in self._reported.items() if k in self.keys}
        self.revision = revision
        self._open_revision = 0
        if self.instances:
            self.empty_cause = None
        elif had_instances:
            self.empty_cause = "relist"
        # else: still empty, for the reason it already was (None at startup).
        self._relisted = True
        self._touch()

    def apply(
        self, raw_key: bytes | str, value: bytes | None, revision: int, create_revision: int = 0
    ) -> None:
        """One watch event: a put (``value`` set) or a delete (``value`` None)."""
        if revision < self.revision:
            return  # replayed by a resumed watch: already applied
        if revision != self._open_revision:
            # The first event of a revision: remember how many hosts were live
            # before it, to tell a wipe from one host's lease expiring.
            self._open_revision = revision
            self._hosts_before_revision = len(self._hosts)
        self.revision = revision
        key = _text(raw_key)
        self._changed.add(key)
        had_instances = bool(self.instances)
        self._remove(key)
        self.refused.pop(key, None)
        if value is None:
            self.keys.pop(key, None)
            self._reported.pop(key, None)
        else:
            self.keys[key] = revision
            instance = self._parse(key, value, revision)
            if instance is not None:
                self._add(key, instance, create_revision or revision)
                self._added.append(instance)
        if self.instances:
            self.empty_cause = None
        elif had_instances:
            self.empty_cause = "wipe" if self._hosts_before_revision >= 2 else "deletes"
        self._touch()

    # -- output ------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Changes arrived since the last :meth:`take_batch`."""
        return self._first_change_at is not None

    def take_batch(self) -> Snapshot:
        snapshot = Snapshot(
            instances=dict(self.instances),
            created=dict(self.created),
            refused=dict(self.refused),
            revision=self.revision,
            relisted=self._relisted,
            changed=None if self._relisted else frozenset(self._changed),
            empty_cause=self.empty_cause,
            first_change_at=self._first_change_at or time.monotonic(),
            reconnected_at=self.reconnected_at,
            added=tuple(self._added),
        )
        self._reset_batch()
        return snapshot

    # -- internals ---------------------------------------------------------

    def _reset_batch(self) -> None:
        self._first_change_at: float | None = None
        self._relisted = False
        self._added: list[Instance] = []
        self._changed: set[str] = set()

    def _touch(self) -> None:
        if self._first_change_at is None:
            self._first_change_at = time.monotonic()

    def _add(self, key: str, instance: Instance, create_revision: int) -> None:
        self.instances[key] = instance
        self.created[key] = create_revision
        self._hosts[instance.host_id] += 1

    def _remove(self, key: str) -> None:
        self.created.pop(key, None)
        old = self.instances.pop(key, None)
        if old is not None:
            self._hosts[old.host_id] -= 1
            if self._hosts[old.host_id] <= 0:
                del self._hosts[old.host_id]

    def _parse(self, key: str, value: bytes, revision: int) -> Instance | None:
        try:
            return parse_entry(self.prefix, key, value)
        except SchemaError as error:
            self.refused[key] = str(error)
            # Once per key and revision: a re-list must not repeat the line.
            if self._reported.get(key) != revision:
                self._reported[key] = revision
                BAD_ENTRIES.inc()
                self.report_bad(key, revision, str(error))
            return None


def _log_bad_entry(key: str, revision: int, reason: str) -> None:
    log.warning(
        "skipping etcd entry that does not parse", key=key, revision=revision, reason=reason
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
    ) -> None:
        self.etcd = etcd
        self.key_prefix = services_prefix(prefix)
        self.state = PrefixState(prefix)
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
                WATCH_RESTARTS.labels("compacted").inc()
                self.restarts += 1
                need_list = True
                continue  # no backoff: etcd is up, it just forgot the history
            except Exception as error:  # every etcd / gRPC failure: retry, never crash
                self._broken(describe(error), "error")
            await self.backoff.wait()

    async def _list(self) -> None:
        revision, items = await self.etcd.get_prefix(self.key_prefix)
        RELISTS.inc()
        self.state.replace(
            revision, ((kv.key, kv.value, kv.mod_revision, kv.create_revision) for kv in items)
        )
        if not self.listed:
            self.listed = True
            log.info(
                "listed service prefix",
                prefix=self.key_prefix,
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
        start = self.state.revision + 1
        async for event in self.etcd.watch_prefix(
            self.key_prefix, start, on_created=self._watch_created
        ):
            WATCH_EVENTS.inc()
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
        WATCH_RESTARTS.labels(kind).inc()
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
        WATCHING.set(1 if value else 0)
