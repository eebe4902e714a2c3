"""The empty-prefix guard: never turn every consumer into 503s at once.

The rule (pure; the causes are computed in ``source.PrefixState``):

- The live state is not empty → serve it. If the alarm was on, it clears:
  the prefix came back, and from now on what etcd says is served.
- The live state is empty because ONE etcd revision removed every instance
  while they came from two or more hosts ("wipe": ``etcdctl del --prefix``,
  a restored or replaced cluster, the wrong prefix after a migration) → keep
  serving the last known instances and raise the alarm. A host's lease
  expiring removes only that host's keys (one lease per registrar), so it is
  never a wipe, even when that host held every instance.
- The live state is empty after a full re-list (after compaction) while we
  had instances ("relist"): the history is gone, we cannot tell how they
  went → hold and alarm.
- Otherwise (ordinary deletes or lease expiries, one revision at a time, or
  an empty prefix at startup) → serve the empty state: removing the last
  instance of a small deployment must still work.
"""

from __future__ import annotations

from collections.abc import Mapping

from agents.common.logging import get_logger
from agents.common.schema import Instance
from agents.discoverer.source import EmptyCause

log = get_logger("pilotfish.discoverer.guard")

HOLD_CAUSES: frozenset[EmptyCause] = frozenset({"wipe", "relist"})


class EmptyPrefixGuard:
    def __init__(self) -> None:
        self.alarm = False
        self.cause: EmptyCause | None = None
        self.created: Mapping[str, int] = {}
        self._last: Mapping[str, Instance] = {}  # the last non-empty live state served
        self._last_created: Mapping[str, int] = {}  # its keys' create revisions

    @property
    def held(self) -> int:
        """How many instances are served from memory instead of etcd."""
        return len(self._last) if self.alarm else 0

    def filter(
        self,
        live: Mapping[str, Instance],
        cause: EmptyCause | None,
        created: Mapping[str, int] | None = None,
    ) -> Mapping[str, Instance]:
        """The instances to serve, given the live state and why it is empty.

        ``live`` (and ``created``, its keys' create revisions) is kept as the
        fallback: pass a snapshot nobody mutates later. :attr:`created` is
        the create revisions of what was returned.
        """
        live_created = created or {}
        if live:
            if self.alarm:
                log.warning(
                    "service prefix has keys again: empty-prefix alarm cleared",
                    instances=len(live),
                    held=len(self._last),
                )
            self.alarm, self.cause, self._last = False, None, live
            self._last_created = self.created = live_created
            return live
        if cause in HOLD_CAUSES and self._last:
            if not self.alarm:
                log.error(
                    "EMPTY-PREFIX ALARM: every instance vanished at once; "
                    "keeping the last known servers (etcd wiped? wrong prefix?)",
                    cause=cause,
                    held=len(self._last),
                    hosts=len({i.host_id for i in self._last.values()}),
                )
            self.alarm, self.cause = True, cause
            self.created = self._last_created
            return self._last
        self.alarm, self.cause, self._last = False, None, live
        self._last_created = self.created = live_created
        return live
