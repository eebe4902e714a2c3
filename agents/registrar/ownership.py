"""Which changes to this host's keys in etcd are its own writes: the self-healing core.

The registrar watches every key it owns (one etcd watch per key, from the
revision it wrote it at). Each event on such a key is judged here: one that
is not the registrar's own write (a delete, or a put of another value or on
another lease: ``etcdctl del --prefix``, a restore, another writer) means the
key must be put back. No I/O here.

A write in flight makes events ambiguous (its watch event may arrive before
its answer): an event that looks foreign during a write is remembered and
settled when the write's revision is known. At most one write per key is in
flight at a time (the sink writes each key once per round).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Change(Enum):
    DELETED = "deleted"
    CHANGED = "changed"
    UNKNOWN = "unknown"  # the watch's history was compacted away


@dataclass(slots=True)
class _Owned:
    value: bytes  # the value last sent
    lease: int  # the lease it was sent on
    revision: int = 0  # etcd's revision of the last acknowledged put; 0: none yet
    writing: bool = True
    foreign: int = 0  # revision of a foreign change seen during the write, 0: none
    foreign_change: Change = Change.CHANGED


class Ownership:
    """This host's keys, what it last wrote to each, and at which revision."""

    def __init__(self) -> None:
        self._keys: dict[str, _Owned] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def sending(self, key: str, value: bytes, lease: int) -> None:
        """A put of ``key`` is about to be sent."""
        owned = self._keys.get(key)
        if owned is None:
            self._keys[key] = _Owned(value, lease)
        else:
            owned.value, owned.lease, owned.writing = value, lease, True
            owned.foreign = 0

    def sent(self, key: str, revision: int) -> Change | None:
        """The put was acknowledged at ``revision``; a change to answer, if one
        that is not ours came after it while it was in flight."""
        owned = self._keys.get(key)
        if owned is None:
            return None  # released meanwhile (withdrawn)
        owned.revision = max(owned.revision, revision)
        owned.writing = False
        late, owned.foreign = owned.foreign, 0
        return owned.foreign_change if late > revision else None

    def unsent(self, key: str) -> None:
        """The put failed: the key stays pending and is sent again anyway."""
        owned = self._keys.get(key)
        if owned is None:
            return
        owned.writing, owned.foreign = False, 0
        if owned.revision == 0:
            del self._keys[key]  # never written: nothing to guard yet

    def adopt(self, key: str, value: bytes, lease: int, revision: int) -> None:
        """etcd already holds our value (found when reconciling): guard it as written."""
        self._keys[key] = _Owned(value, lease, revision, writing=False)

    def release(self, key: str) -> None:
        """No longer ours to guard (withdrawn, or about to be deleted by us)."""
        self._keys.pop(key, None)

    def clear(self) -> None:
        self._keys.clear()

    def newest(self) -> int:
        """The highest revision etcd gave any of our writes (0: none)."""
        return max((owned.revision for owned in self._keys.values()), default=0)

    def watch_from(self, key: str) -> int | None:
        """The revision a (new) watch of ``key`` starts at; None: nothing to watch yet."""
        owned = self._keys.get(key)
        if owned is None or owned.revision == 0:
            return None
        return owned.revision + 1

    def judge(self, key: str, revision: int, value: bytes | None, lease: int = 0) -> Change | None:
        """An event of ``key`` at ``revision`` (``value`` None: a delete).

        The change to answer now by putting the key back, or None: ours, old
        news, not ours to guard, or to be settled when the write in flight is
        acknowledged (:meth:`sent`).
        """
        owned = self._keys.get(key)
        if owned is None or revision <= owned.revision:
            return None
        if value is not None and value == owned.value and lease == owned.lease:
            return None  # our write (perhaps still in flight), or the very same value
        change = Change.DELETED if value is None else Change.CHANGED
        if owned.writing:
            if revision > owned.foreign:
                owned.foreign, owned.foreign_change = revision, change
            return None
        return change

    def compacted(self, key: str) -> Change | None:
        """The watch of ``key`` could not start (its history is compacted): put it back
        to be sure, unless a write of it is in flight already."""
        owned = self._keys.get(key)
        if owned is None or owned.writing:
            return None
        return Change.UNKNOWN
