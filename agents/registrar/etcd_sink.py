"""The etcd side: holds the desired registrations and makes etcd match them.

Writes never block the caller: :meth:`EtcdSink.set_container` updates the
desired state and wakes the flusher, which writes the changed keys on the
registrar's one lease with bounded concurrency. Nothing is written on a lease
before ``claim`` (the host id claim) has been made on it. While etcd is away, the
desired state is kept and the flusher retries with backoff; it converges
when etcd returns. On every new lease (startup, or the old one expired),
the flusher lists ``<prefix>/services/`` and reconciles this host's keys:
keys of containers that are gone are deleted, keys of running containers
are re-put on the new lease without ever being deleted.

A registration keeps the time it was first made while its key exists: a
rewrite (drain, health, a new lease, a restart of the registrar) carries it
over, from the desired state or from the value found in etcd.

A key etcd refuses for good (too large, …) is quarantined: dropped from the
writes, named in the log and in ``quarantined``, retried only when its value
changes. It never holds up the other keys nor makes the sink "failing".

Every key written is watched (agents.registrar.key_watch): a change this sink
did not make (``etcdctl del --prefix``, a restore, another writer) puts the
key back within milliseconds, with one log line per incident and
``on_restored`` per key. Which events are our own writes is decided in
agents.registrar.ownership, from the revision etcd gave each put.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from agents.common.backoff import Backoff
from agents.common.etcd import (
    Etcd,
    EtcdError,
    KeyValue,
    WatchEvent,
    is_lease_not_found,
    is_permission_denied,
    is_refused_for_good,
)
from agents.common.lease import LeaseKeeper
from agents.common.logging import OnceEvery, describe, get_logger
from agents.common.schema import (
    Instance,
    SchemaError,
    instance_key,
    parse_entry,
    parse_key,
    services_prefix,
)
from agents.registrar.key_watch import KeyWatches
from agents.registrar.ownership import Change, Ownership
from agents.registrar.reconcile import WritePlan, owned_by, reconcile

log = get_logger("pilotfish.sink")

# One log line per incident of keys put back: written once no key was put back
# for this long (or this long after the first, at most).
RESTORED_QUIET = 0.5
RESTORED_LOG_AT_MOST = 5.0


@dataclass
class SinkHooks:
    """Where the sink reports, for metrics (all optional)."""

    on_written: Callable[[str, float], None] = lambda _key, _seconds: None
    on_error: Callable[[BaseException], None] = lambda _error: None
    on_new_lease: Callable[[int], None] = lambda _lease: None
    on_recovered: Callable[[], None] = lambda: None
    on_quarantined: Callable[[str], None] = lambda _key: None
    on_restored: Callable[[str], None] = lambda _key: None


@dataclass
class _Pending:
    """Keys to write, and since when each change was wanted (ns, for latency)."""

    since: dict[str, int] = field(default_factory=dict)

    def mark(self, keys: Iterable[str], since_ns: int) -> None:
        for key in keys:
            self.since.setdefault(key, since_ns)


class EtcdSink:
    def __init__(
        self,
        etcd: Etcd,
        *,
        prefix: str,
        host_id: str,
        ttl: int,
        concurrency: int = 64,
        hooks: SinkHooks | None = None,
        claim: Callable[[int], Awaitable[None]] | None = None,
        previous_lease: Callable[[], int | None] | None = None,
    ) -> None:
        """``previous_lease``: the lease of this host's last registrar, if the
        claim just took it over (its keys are this host's keys)."""
        self.etcd = etcd
        self.prefix = prefix
        self.host_id = host_id
        self.concurrency = concurrency
        self.hooks = hooks or SinkHooks()
        self.keeper = LeaseKeeper(etcd, ttl, self._new_lease, self.hooks.on_error)
        self.claim = claim
        self.previous_lease = previous_lease or (lambda: None)
        self.lease: int | None = None  # the keeper's lease, once claimed: keys go on it
        self.desired: dict[str, Instance] = {}
        self._by_container: dict[str, set[str]] = {}
        # What etcd holds for this host on the current lease; None = present
        # but to be rewritten (another lease, or unreadable).
        self.written: dict[str, Instance | None] = {}
        self._pending = _Pending()
        self.quarantined: dict[str, str] = {}  # key -> why etcd refused its value
        self._loaded = False  # no deletes before the first Docker snapshot
        self._need_full_sync = True
        self._wake = asyncio.Event()
        self._round = asyncio.Event()
        self._quiet = OnceEvery(30.0)
        self.last_error = ""
        self.failing = False
        # etcd's access control refuses our writes (a role revoked, a wrong
        # prefix): said once per such outage, in /healthz until writes pass.
        self.refused = ""
        self.synced = asyncio.Event()  # the first full reconcile with etcd is done
        # Containers this host had keys of in etcd (at a full sync): ours even
        # if they are gone by now (the drain requests of destroyed ones are deleted).
        self.containers_found: set[str] = set()
        self.ownership = Ownership()
        self.watches = KeyWatches(
            etcd,
            start_of=self.ownership.watch_from,
            on_event=self._on_key_event,
            on_compacted=self._on_compacted,
            on_error=self.hooks.on_error,
            after_break=self._check_history,
        )
        self._restoring: dict[str, Change] = {}  # keys to put back, and why
        self._restored: collections.Counter[str] = collections.Counter()
        self._restored_first = self._restored_last = 0.0
        self._restored_log: asyncio.TimerHandle | None = None
        self.restored_total = 0

    # --- the desired state (synchronous: never waits for etcd) ---------------------

    def key_of(self, instance: Instance) -> str:
        return instance_key(self.prefix, instance)

    def instances_of(self, container_id: str) -> list[Instance]:
        return [self.desired[k] for k in sorted(self._by_container.get(container_id, ()))]

    def set_container(
        self, container_id: str, instances: list[Instance], since_ns: int | None = None
    ) -> list[str]:
        """Make ``instances`` the registrations of ``container_id``; the keys that change."""
        wanted = {self.key_of(i): self._keep_registered_at(i) for i in instances}
        old_keys = self._by_container.pop(container_id, set())
        changed = [k for k in old_keys if k not in wanted]
        for key in changed:
            del self.desired[key]
            self.quarantined.pop(key, None)
        for key, instance in wanted.items():
            current = self.desired.get(key)
            if current is None or not current.same_registration(instance):
                self.desired[key] = instance
                self.quarantined.pop(key, None)  # a new value gets a new chance
                changed.append(key)
        if wanted:
            self._by_container[container_id] = set(wanted)
        self._pending.mark(changed, since_ns or time.time_ns())
        if changed:
            self._wake.set()
        return changed

    def _keep_registered_at(self, instance: Instance) -> Instance:
        current = self.desired.get(self.key_of(instance))
        if current is None or current.registered_at == instance.registered_at:
            return instance
        return instance.model_copy(update={"registered_at": current.registered_at})

    def _adopt_registered_at(self, key: str, value: bytes) -> None:
        """A key this host wrote before (last run, last lease) keeps its time."""
        wanted = self.desired.get(key)
        if wanted is None:
            return
        try:
            found = parse_entry(self.prefix, key, value)
        except SchemaError:
            return
        if found.registered_at < wanted.registered_at:
            self.desired[key] = wanted.model_copy(update={"registered_at": found.registered_at})

    def replace_all(self, containers: dict[str, list[Instance]]) -> None:
        """A full Docker snapshot: everything not in it is withdrawn."""
        now = time.time_ns()
        for container_id in list(self._by_container):
            if container_id not in containers:
                self.set_container(container_id, [], now)
        for container_id, instances in containers.items():
            self.set_container(container_id, instances, now)
        # Keys written earlier but no longer desired by anyone.
        self._pending.mark((k for k in self.written if k not in self.desired), now)
        self._loaded = True
        self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._pending.since)

    # --- running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled, or until the host claim is refused (HostIdTaken)."""
        tasks = [
            asyncio.create_task(self.keeper.run(), name="lease-keeper"),
            asyncio.create_task(self._flush_forever(), name="etcd-flusher"),
            asyncio.create_task(self.watches.run(), name="key-watches"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._restored_log is not None:
                self._restored_log.cancel()
                self._log_restored()

    async def _new_lease(self, lease_id: int) -> None:
        # Everything written on the old lease is gone or going: list and
        # re-put on this one (no deletes for keys that stay desired).
        self.lease = None
        self.written.clear()
        self._need_full_sync = True
        self.hooks.on_new_lease(lease_id)
        if await self._claimed(lease_id):
            self.lease = lease_id
            self._wake.set()

    async def _claimed(self, lease_id: int) -> bool:
        """Make the claim on ``lease_id``, retrying etcd errors; False if the lease went."""
        backoff = Backoff(initial=0.1, maximum=2.0)
        while self.claim is not None:
            try:
                await self.claim(lease_id)
                break
            except EtcdError as error:
                if is_lease_not_found(error):
                    self.keeper.mark_lost()  # the keeper grants another and we come back
                    return False
                self._failed(error)
                await backoff.wait()
        return True

    async def _flush_forever(self) -> None:
        backoff = Backoff(initial=0.05, maximum=2.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._loaded or self.lease is None or self.keeper.lost:
                continue  # _new_lease wakes us
            try:
                if self._need_full_sync:
                    await self._full_sync()
                await self._flush()
            except Exception as error:  # a bug must not end the agent: retry
                if is_lease_not_found(error) and self.keeper.lost:
                    continue  # not etcd failing: the keeper grants another lease
                self._failed(error)
                await backoff.wait()
                self._wake.set()
                continue
            backoff.reset()
            self._recovered()

    async def _full_sync(self) -> None:
        lease = self.lease
        items = await self._keys_of_this_host()
        found: dict[str, Instance | bytes | None] = {}
        revisions: dict[str, tuple[bytes, int]] = {}
        for item in items:
            key = item.key.decode(errors="replace")
            if owned_by(self.prefix, key, self.host_id):
                self.containers_found.add(parse_key(self.prefix, key)[2])
                found[key] = item.value if item.lease == lease else None
                revisions[key] = item.value, item.mod_revision
                self._adopt_registered_at(key, item.value)
        plan = reconcile(self.desired, found, self.prefix, self.host_id)
        # Keys that already hold the desired value on this lease need no
        # write (they are guarded as they are); every other key found is to
        # be rewritten (None) or deleted.
        matching = set(found) - set(plan.puts) - set(plan.deletes)
        self.written = {k: self.desired[k] if k in matching else None for k in found}
        for key in matching:
            value, revision = revisions[key]
            self.ownership.adopt(key, value, lease or 0, revision)
            self.watches.watch(key)
        self._pending.mark([*plan.puts, *plan.deletes], time.time_ns())
        self._need_full_sync = False
        log.info(
            "reconciled with etcd",
            lease=hex(lease or 0),
            found=len(found),
            to_put=len(plan.puts),
            to_delete=len(plan.deletes),
        )

    async def _keys_of_this_host(self) -> list[KeyValue]:
        """This host's keys in etcd, with their values.

        After a restart, the keys on the previous run's lease and those it
        means to write: one lease lookup and a read of this host's keys,
        instead of the whole prefix (every host of the fleet) each time.
        Otherwise (first start, lost lease) the prefix's keys only, then the
        values of this host's.
        """
        wanted = self.desired.keys() | self.written.keys()
        previous = self.previous_lease()
        if previous is not None:
            leased = await self.etcd.lease_keys(previous)  # [] if it expired meanwhile
        else:
            _, listed = await self.etcd.get_prefix(services_prefix(self.prefix), keys_only=True)
            leased = [item.key.decode(errors="replace") for item in listed]
        ours = {k for k in leased if owned_by(self.prefix, k, self.host_id)} | wanted
        _, items = await self.etcd.get_keys(sorted(ours))
        return items

    async def _flush(self) -> None:
        """Write every pending key; a failure leaves the rest pending."""
        while self._pending.since and not self._need_full_sync:
            for key in self.quarantined.keys() & self._pending.since.keys():
                del self._pending.since[key]
            keys = list(self._pending.since)
            desired = {k: self.desired[k] for k in keys if k in self.desired}
            actual = {k: self.written[k] for k in keys if k in self.written}
            plan = reconcile(desired, actual, self.prefix, self.host_id)
            for key in set(keys) - set(plan.puts) - set(plan.deletes):
                self._pending.since.pop(key, None)  # already as wanted
            await self._write(plan)
            self._round.set()
            self._round = asyncio.Event()

    async def _write(self, plan: WritePlan) -> None:
        limit = asyncio.Semaphore(self.concurrency)
        lease = self.lease

        async def put(key: str) -> None:
            async with limit:
                # Read now: the container may have gone since the plan was made
                # (its key then stays pending, and the next round deletes it).
                instance = self.desired.get(key)
                if instance is None:
                    return
                value = instance.to_json()
                self.ownership.sending(key, value, lease or 0)
                try:
                    revision = await self.etcd.put(key, value, lease=lease)
                except BaseException as error:
                    self.ownership.unsent(key)
                    if isinstance(error, EtcdError):
                        if is_lease_not_found(error):
                            if lease == self.keeper.lease_id:  # not replaced already
                                self.keeper.mark_lost()
                        elif is_refused_for_good(error):
                            self._quarantine(key, describe(error))
                            return
                    raise
            late = self.ownership.sent(key, revision)
            self.written[key] = instance
            self._done(key, instance)
            self._count_restored(key)
            self.watches.watch(key)
            if late is not None:  # changed behind our back while we wrote it
                self._restore(key, late)

        async def delete(key: str) -> None:
            async with limit:
                self.ownership.release(key)  # our own delete is no foreign change
                self.watches.unwatch(key)
                self._restoring.pop(key, None)
                await self.etcd.delete(key)
            self.written.pop(key, None)
            self._done(key, None)

        results = await asyncio.gather(
            *(put(k) for k in plan.puts),
            *(delete(k) for k in plan.deletes),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # --- keys changed behind our back ----------------------------------------------------

    def _on_key_event(self, key: str, event: WatchEvent) -> None:
        change = self.ownership.judge(key, event.revision, event.value, event.lease)
        if change is not None:
            self._restore(key, change)

    async def _check_history(self) -> None:
        """After the watch stream broke: did etcd's history go back (a restore from a
        backup)? Then revisions no longer tell our writes apart: reconcile every key."""
        newest = self.ownership.newest()
        now = await self.etcd.revision()
        if now >= newest:
            return  # watches resume from each key's revision: the replay tells the rest
        log.warning(
            "etcd's revision went back (restored from a backup?): reconciling every key",
            revision=now,
            ours=newest,
        )
        self.ownership.clear()  # the full sync adopts or re-puts, and watches again
        self._need_full_sync = True
        self._wake.set()

    def _on_compacted(self, key: str) -> None:
        change = self.ownership.compacted(key)
        if change is not None:
            self._restore(key, change)

    def _restore(self, key: str, change: Change) -> None:
        """Put ``key`` back: etcd no longer holds what we wrote there."""
        if key not in self.desired or key in self.quarantined:
            return  # withdrawn meanwhile: its delete is pending anyway
        if change is Change.DELETED:
            self.written.pop(key, None)
        else:
            self.written[key] = None  # present, to be rewritten
        self._restoring.setdefault(key, change)
        self._pending.mark([key], time.time_ns())
        self._wake.set()

    def _count_restored(self, key: str) -> None:
        change = self._restoring.pop(key, None)
        if change is None:
            return
        self.restored_total += 1
        self.hooks.on_restored(key)
        self._restored[change.value] += 1
        now = self._restored_last = time.monotonic()
        if self._restored_log is None:
            self._restored_first = now
        else:
            self._restored_log.cancel()
        delay = min(RESTORED_QUIET, self._restored_first + RESTORED_LOG_AT_MOST - now)
        self._restored_log = asyncio.get_running_loop().call_later(
            max(delay, 0.0), self._log_restored
        )

    def _log_restored(self) -> None:
        self._restored_log = None
        counts, self._restored = self._restored, collections.Counter()
        if not counts:
            return
        log.warning(
            "registrations deleted or changed in etcd behind this registrar's back were put back",
            keys=sum(counts.values()),
            **{change: count for change, count in sorted(counts.items())},
            over_seconds=round(self._restored_last - self._restored_first, 3),
        )

    def _quarantine(self, key: str, reason: str) -> None:
        self.quarantined[key] = reason
        self._pending.since.pop(key, None)
        self.hooks.on_quarantined(key)
        log.warning("etcd refused a registration, quarantined", key=key, reason=reason)

    def _done(self, key: str, written: Instance | None) -> None:
        current = self.desired.get(key)
        still_wanted = (current is None and written is None) or (
            current is not None and written is not None and current.same_registration(written)
        )
        if not still_wanted:
            return  # a newer change arrived during the write: it stays pending
        since = self._pending.since.pop(key, None)
        if since is not None:
            self.hooks.on_written(key, (time.time_ns() - since) / 1e9)

    async def wait_written(self, keys: Iterable[str], within: float) -> bool:
        """Wait until etcd holds the desired value of ``keys`` (False on timeout)."""
        keys = list(keys)
        try:
            async with asyncio.timeout(within):
                while any(k in self._pending.since for k in keys):
                    await self._round.wait()
        except TimeoutError:
            return False
        return True

    def _failed(self, error: BaseException) -> None:
        self.failing = True
        self.last_error = describe(error)
        self.hooks.on_error(error)
        if isinstance(error, EtcdError) and is_permission_denied(error):
            if not self.refused:
                log.error(
                    "etcd refuses this registrar's writes: its user may not write the prefix; "
                    "registrations are kept and written once etcd allows it",
                    user=self.etcd.username,
                    prefix=self.prefix,
                    error=self.last_error,
                    pending=self.backlog,
                )
            self.refused = self.last_error
            return
        if not self._quiet.should_log("etcd"):
            return
        if isinstance(error, EtcdError):
            log.warning("etcd write failed, retrying", error=self.last_error, pending=self.backlog)
        else:
            log.error("etcd writes failed on a bug, retrying", pending=self.backlog, exc_info=error)

    def _recovered(self) -> None:
        if self.failing:
            self.hooks.on_recovered()
        self.failing = False
        self.synced.set()
        if self.refused:
            self.refused = ""
            log.info("etcd accepts this registrar's writes again")
        held = self._quiet.clear("etcd")
        if held:
            log.info("etcd writes flowing again", retries=held + 1)

    async def deregister(self) -> None:
        """Revoke the lease: every key of this host disappears at once."""
        await self.keeper.revoke()
