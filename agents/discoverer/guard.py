"""The loss guard: never turn every consumer into 503s at once.

Pure; time is passed in. The rule:

- **Hold** the last known instances, and raise the alarm, when the live
  state loses most of them in a way no ordinary failure does:
  - ``wipe``: one revision removed every instance, and they came from two
    or more hosts (``etcdctl del --prefix``, a restored or replaced cluster,
    the wrong prefix after a migration);
  - ``relist``: a full list (after compaction) found nothing while we had
    instances: how they went is unknown;
  - ``mass-loss``: within ``window`` seconds (of each other, or of the watch
    coming back after an outage) two or more hosts vanished and fewer than
    half of the instances are left. After an etcd outage, the registrars'
    leases expire in consecutive revisions before they can keep them alive:
    that is this case, not two hosts dying.
- While holding, serve the held instances with the live ones over them (a
  key that comes back replaces its held copy), and **let go** when every
  held host has at least as many live keys as it had, or ``hold_for``
  seconds passed (a registrar whose host really died never comes back).
- Otherwise serve the live state: one host dying, the last instance of a
  small deployment, hosts leaving slower than ``window``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agents.common.logging import get_logger
from agents.common.prefix_state import EmptyCause
from agents.common.schema import Instance

log = get_logger("pilotfish.discoverer.guard")

HoldCause = Literal["wipe", "relist", "mass-loss"]
HOLD_CAUSES: frozenset[EmptyCause] = frozenset({"wipe", "relist"})


@dataclass(frozen=True, slots=True)
class _State:
    instances: Mapping[str, Instance]
    created: Mapping[str, int]

    @property
    def per_host(self) -> Counter[str]:
        return Counter(i.host_id for i in self.instances.values())


class EmptyPrefixGuard:
    def __init__(self, hold_for: float = 22.5, window: float = 5.0) -> None:
        self.hold_for = hold_for
        self.window = window
        self.alarm = False
        self.cause: HoldCause | None = None
        self.created: Mapping[str, int] = {}  # create revisions of what filter() returned
        self._previous = _State({}, {})  # the live state served last
        # The largest live state in force within the window, and until when.
        self._peak = self._previous
        self._peak_until = 0.0
        self._held: _State | None = None
        self._held_per_host: Counter[str] = Counter()

    @property
    def held(self) -> int:
        """How many instances are served from memory instead of etcd."""
        return len(self._held.instances) if self._held is not None else 0

    @property
    def release_at(self) -> float | None:
        """When the current hold ends at the latest (None: not holding)."""
        return self._peak_until + self.hold_for if self._held is not None else None

    def filter(
        self,
        live: Mapping[str, Instance],
        cause: EmptyCause | None,
        created: Mapping[str, int] | None = None,
        *,
        now: float = 0.0,
        reconnected_at: float | None = None,
    ) -> Mapping[str, Instance]:
        """The instances to serve, given the live state and why it is empty.

        ``live`` (and ``created``, its keys' create revisions) may be kept:
        pass a snapshot nobody mutates later. :attr:`created` then holds the
        create revisions of what was returned. ``reconnected_at``: when the
        watch last came back after an outage (the window is then ``hold_for``:
        leases that the outage let lapse all expire within a TTL of it).
        """
        state = _State(live, created or {})
        if self._held is not None:
            return self._while_holding(state, now)
        self._update_peak(now, reconnected_at)
        hold = self._hold_cause(state, cause)
        if hold is not None:
            return self._start_holding(hold)
        return self._serve(state)

    def _update_peak(self, now: float, reconnected_at: float | None) -> None:
        after_outage = reconnected_at is not None and now - reconnected_at <= self.hold_for
        window = self.hold_for if after_outage else self.window
        # The previous state was in force until now.
        bigger = len(self._previous.instances) >= len(self._peak.instances)
        if bigger or now - self._peak_until > window:
            self._peak, self._peak_until = self._previous, now

    def _hold_cause(self, state: _State, cause: EmptyCause | None) -> HoldCause | None:
        peak = self._peak
        if not peak.instances:
            return None
        if not state.instances and cause in HOLD_CAUSES:
            return "wipe" if cause == "wipe" else "relist"
        # Counting hosts walks every instance: only when most are gone already,
        # so an ordinary change costs no pass over the whole state.
        if len(state.instances) * 2 >= len(peak.instances):
            return None
        lost_hosts = peak.per_host.keys() - state.per_host.keys()
        return "mass-loss" if len(lost_hosts) >= 2 else None

    def _start_holding(self, cause: HoldCause) -> Mapping[str, Instance]:
        held = self._peak
        self._held, self._held_per_host = held, held.per_host
        self.alarm, self.cause = True, cause
        log.error(
            "EMPTY-PREFIX ALARM: most instances vanished at once; "
            "keeping the last known servers (etcd wiped or restarted? wrong prefix?)",
            cause=cause,
            held=len(held.instances),
            hosts=len(self._held_per_host),
            hold_for=self.hold_for,
        )
        self.created = held.created
        return held.instances

    def _while_holding(self, state: _State, now: float) -> Mapping[str, Instance]:
        assert self._held is not None
        live_per_host = state.per_host
        back = all(live_per_host[h] >= n for h, n in self._held_per_host.items())
        if not back and now - self._peak_until <= self.hold_for:
            self.created = {**self._held.created, **state.created}
            return {**self._held.instances, **state.instances}
        log.warning(
            "empty-prefix alarm cleared: serving what etcd holds",
            reason="registrars re-registered" if back else f"held for {self.hold_for} s",
            instances=len(state.instances),
            held=len(self._held.instances),
        )
        self._held, self.alarm, self.cause = None, False, None
        self._peak, self._peak_until = state, now
        return self._serve(state)

    def _serve(self, state: _State) -> Mapping[str, Instance]:
        self._previous = state
        self.created = state.created
        return state.instances
