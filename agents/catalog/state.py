"""One environment's catalog, kept from the etcd source's snapshots. Pure.

:meth:`ServiceIndex.apply` takes each :class:`Snapshot` of the prefix source
and returns the change it makes (the services touched, by name), which the
server sends to every browser as one Server-Sent Event. The last
:data:`HISTORY` events are kept, so a client that reconnects with the last
revision it saw is sent exactly what it missed; one older than that is told
to fetch everything again (``reset``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from agents.catalog.api import (
    ChangeEvent,
    InstanceOut,
    Refused,
    ServiceDetail,
    ServiceList,
    ServiceSummary,
)
from agents.common.prefix_state import Snapshot
from agents.common.schema import Instance

HISTORY = 1024
# A change touching more services than this is sent as a reset: a browser
# re-fetches the list once instead of parsing an event of megabytes.
MAX_SERVICES_PER_EVENT = 200


def summarize(
    name: str, members: Mapping[str, Instance], created: Mapping[str, int]
) -> ServiceSummary:
    """The counts of one service; its port and mode are its oldest instance's."""
    oldest = min(members, key=lambda key: (created.get(key, 0), key))
    first = members[oldest]
    draining = sum(1 for i in members.values() if i.state == "draining")
    return ServiceSummary(
        name=name,
        mode=first.mode,
        port=first.bind_port,
        instances=len(members),
        serving=len(members) - draining,
        draining=draining,
        hosts=tuple(sorted({i.host_id for i in members.values()})),
        tags=tuple(sorted({t for i in members.values() for t in i.tags})),
    )


class ServiceIndex:
    """The services of one prefix, their summaries and the recent changes."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.revision = 0
        self.ready = False
        self.instances: Mapping[str, Instance] = {}
        self.created: Mapping[str, int] = {}
        self.refused: Mapping[str, str] = {}
        self.members: dict[str, dict[str, Instance]] = {}  # service -> key -> instance
        self.summaries: dict[str, ServiceSummary] = {}
        self.history: deque[ChangeEvent] = deque()
        # Every change after this revision is in ``history``.
        self.floor = 0
        self._list_json: bytes | None = None

    # -- input -------------------------------------------------------------

    def apply(self, snapshot: Snapshot) -> ChangeEvent | None:
        """Take one snapshot in; the change event it makes (None: the first list)."""
        before = self.summaries
        if snapshot.changed is None:
            touched = self._rebuild(snapshot)
        else:
            touched = self._update(snapshot, snapshot.changed)
        refused_changed = snapshot.refused != self.refused
        self.instances, self.created = snapshot.instances, snapshot.created
        self.refused = snapshot.refused
        self.revision = snapshot.revision
        self._list_json = None
        if not self.ready:
            self.ready = True
            self.floor = snapshot.revision
            return None
        # Every service with a key put or deleted, even if its counts did not
        # move (a weight, a tag): a browser showing it fetches it again.
        changes = {
            name: self.summaries.get(name)
            for name in sorted(touched)
            if name in self.summaries or name in before
        }
        if not changes and not refused_changed:
            return None
        event = ChangeEvent(
            revision=snapshot.revision,
            reset=len(changes) > MAX_SERVICES_PER_EVENT,
            services={} if len(changes) > MAX_SERVICES_PER_EVENT else changes,
            quarantined=len(self.refused),
        )
        self._remember(event)
        return event

    def _rebuild(self, snapshot: Snapshot) -> set[str]:
        members: dict[str, dict[str, Instance]] = {}
        for key, instance in snapshot.instances.items():
            members.setdefault(instance.service, {})[key] = instance
        touched = set(self.members) | set(members)
        self.members = members
        self.summaries = {
            name: summarize(name, group, snapshot.created) for name, group in members.items()
        }
        return touched

    def _update(self, snapshot: Snapshot, keys: Iterable[str]) -> set[str]:
        touched: set[str] = set()
        for key in keys:
            old = self.instances.get(key)
            new = snapshot.instances.get(key)
            if old is not None:
                touched.add(old.service)
                group = self.members.get(old.service)
                if group is not None:
                    group.pop(key, None)
            if new is not None:
                touched.add(new.service)
                self.members.setdefault(new.service, {})[key] = new
        self.summaries = dict(self.summaries)
        for name in touched:
            group = self.members.get(name)
            if group:
                self.summaries[name] = summarize(name, group, snapshot.created)
            else:
                self.members.pop(name, None)
                self.summaries.pop(name, None)
        return touched

    def _remember(self, event: ChangeEvent) -> None:
        self.history.append(event)
        while len(self.history) > HISTORY:
            self.floor = self.history.popleft().revision

    # -- output ------------------------------------------------------------

    def since(self, revision: int) -> list[ChangeEvent] | None:
        """The changes after ``revision``; None if they cannot be replayed (reset)."""
        if revision == self.revision:
            return []
        if not self.floor <= revision < self.revision:
            return None
        return [event for event in self.history if event.revision > revision]

    def services(self, name: str = "", tag: str = "", host: str = "") -> ServiceList:
        rows = sorted(self.summaries.values(), key=lambda s: s.name)
        needle = name.lower()
        if needle:
            rows = [s for s in rows if needle in s.name.lower()]
        if tag:
            rows = [s for s in rows if tag in s.tags]
        if host:
            rows = [s for s in rows if host in s.hosts]
        return ServiceList(
            prefix=self.prefix,
            revision=self.revision,
            ready=self.ready,
            total=len(self.summaries),
            quarantined=len(self.refused),
            services=tuple(rows),
        )

    def services_json(self) -> bytes:
        """The unfiltered list, serialized once per revision."""
        if self._list_json is None:
            self._list_json = self.services().model_dump_json().encode()
        return self._list_json

    def service(self, name: str) -> ServiceDetail | None:
        summary = self.summaries.get(name)
        if summary is None:
            return None
        group = self.members[name]
        rows = sorted(
            (InstanceOut.of(key, i, self.created.get(key, 0)) for key, i in group.items()),
            key=lambda row: (row.host_id, row.container_id, row.private_port),
        )
        return ServiceDetail(
            prefix=self.prefix, revision=self.revision, service=summary, instances=tuple(rows)
        )

    def quarantined(self, limit: int = 1000) -> list[Refused]:
        return [
            Refused(key=key, reason=reason) for key, reason in sorted(self.refused.items())[:limit]
        ]

    def host_counts(self) -> dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]]:
        """host id -> (instances, container ids, services)."""
        found: dict[str, tuple[set[str], set[str], list[int]]] = {}
        for instance in self.instances.values():
            containers, services, count = found.setdefault(instance.host_id, (set(), set(), [0]))
            containers.add(instance.container_id)
            services.add(instance.service)
            count[0] += 1
        return {
            host: (count[0], tuple(sorted(containers)), tuple(sorted(services)))
            for host, (containers, services, count) in found.items()
        }
