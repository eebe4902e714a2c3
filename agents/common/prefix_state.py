"""The etcd prefix as seen through list + watch events: pure, no I/O.

Events in, state out: :class:`PrefixState` keeps every valid instance of the
prefix (each entry parsed by :func:`parse_entry`; one that does not parse is
reported once per key and revision and left out), the create revision of
each key, and why the state last became empty; :meth:`PrefixState.take_batch`
hands the whole state over as a :class:`Snapshot`. The discoverer and the
catalog read etcd through it (:mod:`agents.common.prefix_source`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from agents.common.logging import get_logger
from agents.common.schema import Instance, SchemaError, parse_entry, services_prefix

log = get_logger("pilotfish.prefix")

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

_V = TypeVar("_V")


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


class Overlay(Mapping[str, _V]):
    """A read-only mapping: ``base`` with the entries of ``delta`` over it (None: deleted).

    Neither is changed after it is built, so it is a snapshot, made in
    O(len(delta)) instead of a copy of the whole state.
    """

    __slots__ = ("_base", "_delta", "_len")

    def __init__(self, base: Mapping[str, _V], delta: dict[str, _V | None], length: int) -> None:
        self._base, self._delta, self._len = base, delta, length

    def __getitem__(self, key: str) -> _V:
        if key in self._delta:
            value = self._delta[key]
            if value is None:
                raise KeyError(key)
            return value
        return self._base[key]

    def get(self, key: str, default: Any = None) -> Any:
        value = self._delta.get(key, _MISSING) if self._delta else _MISSING
        if value is _MISSING:
            return self._base.get(key, default)
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        if key in self._delta:
            return self._delta[key] is not None
        return key in self._base

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        delta = self._delta
        yield from (key for key in self._base if key not in delta)
        yield from (key for key, value in delta.items() if value is not None)


_MISSING = object()


class _Published(Generic[_V]):
    """Hands out snapshots of a dict that keeps changing: the last full copy
    plus the keys changed since, as an :class:`Overlay`; a new full copy once
    more than about sqrt(2n) keys changed. With one change per snapshot, that
    bound makes a snapshot cost O(sqrt(n)) on average instead of O(n)."""

    def __init__(self) -> None:
        self.base: dict[str, _V] = {}
        self.changed: set[str] = set()
        self.stale = True  # base is not the live dict less ``changed``: copy in full

    def snapshot(self, live: dict[str, _V]) -> Mapping[str, _V]:
        if self.stale or len(self.changed) > max(64, math.isqrt(2 * len(live))):
            self.base, self.changed, self.stale = dict(live), set(), False
        if not self.changed:
            return self.base
        delta = {key: live.get(key) for key in self.changed}
        return Overlay(self.base, delta, len(live))

    def reset(self) -> None:
        self.stale = True


def _text(key: bytes | str) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else key


class PrefixState:
    """The service prefix as seen through list + watch events; pure, no I/O."""

    def __init__(
        self,
        prefix: str,
        report_bad: BadEntryReporter | None = None,
        ranges: Sequence[str] = (),
    ) -> None:
        """``ranges``: the key prefixes watched separately (one per service of a
        ``--services`` filter); each has its own revision, since events of two
        watches may arrive out of order between them, and resumes from it.
        Empty: one range. ``revision`` is then the highest revision applied:
        etcd sends the events of the watches of one stream in revision order
        once they are synced (it serializes them on one channel), so every
        change at or before it is applied too; while a watch re-created far
        behind catches up (~100 ms after a reconnect) it may be ahead of it."""
        self.prefix = prefix
        self.ranges = tuple(ranges)
        # range -> the revision its events are applied up to
        self.range_revisions: dict[str, int] = dict.fromkeys(self.ranges, 0)
        self.report_bad = report_bad or log_bad_entry
        self.instances: dict[str, Instance] = {}
        self.created: dict[str, int] = {}  # key -> create_revision of each instance
        self.refused: dict[str, str] = {}  # key -> why its value does not parse
        self.keys: dict[str, int] = {}
        self.revision = 0
        self.reconnected_at: float | None = None
        self.empty_cause: EmptyCause | None = None
        self._hosts: Counter[str] = Counter()  # host -> live instances, kept incrementally
        self._published_instances: _Published[Instance] = _Published()
        self._published_created: _Published[int] = _Published()
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
        self.range_revisions = dict.fromkeys(self.ranges, revision)
        self._open_revision = 0
        if self.instances:
            self.empty_cause = None
        elif had_instances:
            self.empty_cause = "relist"
        # else: still empty, for the reason it already was (None at startup).
        self._relisted = True
        self._published_instances.reset()
        self._published_created.reset()
        self._touch()

    def apply(
        self, raw_key: bytes | str, value: bytes | None, revision: int, create_revision: int = 0
    ) -> None:
        """One watch event: a put (``value`` set) or a delete (``value`` None)."""
        key = _text(raw_key)
        watched = self._range_of(key)
        if revision < (self.revision if watched is None else self.range_revisions[watched]):
            return  # replayed by a resumed watch: already applied
        if watched is not None:
            self.range_revisions[watched] = revision
        if revision != self._open_revision:
            # The first event of a revision: remember how many hosts were live
            # before it, to tell a wipe from one host's lease expiring.
            self._open_revision = revision
            self._hosts_before_revision = len(self._hosts)
        self.revision = max(self.revision, revision)
        self._changed.add(key)
        self._published_instances.changed.add(key)
        self._published_created.changed.add(key)
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

    def resume_revision(self, watched: str) -> int:
        """The revision the watch of range ``watched`` resumes from."""
        return self.range_revisions.get(watched, self.revision) + 1

    def _range_of(self, key: str) -> str | None:
        if not self.ranges or not key.startswith(base := services_prefix(self.prefix)):
            return None
        watched = f"{base}{key[len(base) :].partition('/')[0]}/"
        return watched if watched in self.range_revisions else None

    # -- output ------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Changes arrived since the last :meth:`take_batch`."""
        return self._first_change_at is not None

    def take_batch(self) -> Snapshot:
        snapshot = Snapshot(
            instances=self._published_instances.snapshot(self.instances),
            created=self._published_created.snapshot(self.created),
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
                self.report_bad(key, revision, str(error))
            return None


def log_bad_entry(key: str, revision: int, reason: str) -> None:
    log.warning(
        "skipping etcd entry that does not parse", key=key, revision=revision, reason=reason
    )
