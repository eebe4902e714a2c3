"""What HAProxy should serve, as plain data: the discoverer's pure core.

``build_catalog`` (for a stream of states: ``CatalogBuilder``) turns the
registered instances into the desired routing table; the HAProxy side
(``diff`` → runtime commands / config) turns the difference between two
catalogs into actions. No I/O here.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agents.common.schema import Instance

# "maint" only appears in a view read back from HAProxy (a removal half done,
# or an added server never enabled); instances are only ever up or draining.
ServerState = Literal["up", "draining", "maint"]


@dataclass(frozen=True, slots=True)
class Server:
    name: str  # Instance.server_name: validated, unique per backend
    address: str  # IP literal
    port: int
    weight: int = 100
    check: bool = False
    state: ServerState = "up"


@dataclass(frozen=True, slots=True)
class Service:
    """One consumer frontend (a listening port) and its backend."""

    name: str
    bind_port: int
    mode: Literal["tcp", "http"] = "tcp"
    servers: dict[str, Server] = field(default_factory=dict)

    @property
    def listener(self) -> tuple[int, str]:
        """What a reload is needed to change: the port and the mode."""
        return (self.bind_port, self.mode)


Catalog = dict[str, Service]


@dataclass(frozen=True, slots=True)
class Conflict:
    """An instance that does not fit the catalog, with the reason (logged once).

    ``routed``: it is served anyway (it only wants another port than its
    service listens on); otherwise it is left out: quarantined.
    """

    key: str
    service: str
    server: str
    reason: str
    routed: bool = False


def server_of(instance: Instance) -> Server:
    return Server(
        name=instance.server_name,
        address=instance.address,
        port=instance.port,
        weight=instance.weight,
        check=instance.check,
        state=instance.state,
    )


def build_catalog(
    instances: Iterable[Instance], only: frozenset[str] = frozenset()
) -> tuple[Catalog, list[Conflict]]:
    """The routing table for ``instances``, given in the order they were created."""
    state = {str(n): i for n, i in enumerate(instances)}
    return CatalogBuilder(only).build(state, created={k: int(k) + 1 for k in state})


# The order in which instances claim listeners: etcd's create_revision first
# (no registrar can set or reset it), then names, so ties are deterministic.
Age = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class ListenRules:
    """What the builder must know of the consumer host to refuse a listener."""

    reserved_ports: Mapping[int, str] = field(default_factory=dict)  # port -> its user
    # The address consumer frontends bind: an instance at that address and its
    # own service's port would send HAProxy's traffic back to itself.
    bind_address: str | None = None


class CatalogBuilder:
    """The routing table for a stream of states; unchanged services are reused.

    Rules, in this order:

    1. A service that owned a port in the previous catalog keeps it while it
       has any instance that wants that port (the oldest such instance gives
       the listener's mode).
    2. Instances are visited oldest first (etcd create_revision); an instance
       of a service without a port claims its port if that is free and not
       reserved. A service with no free port is left out, every instance
       quarantined with the owner named.
    3. A placed service routes its instances whose mode is the listener's;
       one that only wants another port is routed and reported; another
       mode, a server name already taken or an address pointing at the
       service's own listener is quarantined.
    4. A service whose last instance went keeps its listener, with no
       server (HTTP: 503, TCP: closed), for ``retention`` seconds or until
       another service claims its port: scaling to zero and back needs no
       reload. ``build`` is then given ``now`` (monotonic seconds).

    ``build`` is given the whole state each time (key → instance, as the
    source's snapshots are) and finds what changed by identity, or is told
    which keys changed. When every changed service keeps its port, only those
    services are rebuilt. An unchanged service is the *same* :class:`Service`
    object as in the previous catalog, which lets the HAProxy side skip it.
    Catalogs share these objects: treat them as read-only.
    """

    def __init__(
        self,
        only: frozenset[str] = frozenset(),
        rules: ListenRules | None = None,
        retention: float = 0.0,
    ) -> None:
        self.only = only
        self.rules = rules or ListenRules()
        self.retention = retention
        self._previous: Catalog = {}
        self._retained: dict[str, tuple[Service, float]] = {}  # service -> (no servers, since)
        self._state: Mapping[str, Instance] = {}
        self._members: dict[str, dict[str, tuple[Age, Instance]]] = {}  # service -> key -> ...
        self._ordered: dict[str, list[tuple[Age, str, Instance]]] = {}  # oldest first
        # service -> (index of the instance that gave the listener, the Service, its conflicts)
        self._built: dict[str, tuple[int, Service, list[Conflict]]] = {}
        # The last placement: service -> (its port, the index in its ordered
        # list of the instance that gave the listener); port -> service; the
        # instances of services that got no port.
        self._placed: dict[str, tuple[int, int]] = {}
        self._port_owner: dict[int, str] = {}
        self._unplaced: list[Conflict] = []
        # The last assembled catalog, and the services of it that have conflicts.
        self._catalog: Catalog = {}
        self._own: dict[str, list[Conflict]] = {}

    def build(
        self,
        state: Mapping[str, Instance],
        changed: Collection[str] | None = None,
        created: Mapping[str, int] | None = None,
        now: float = 0.0,
    ) -> tuple[Catalog, list[Conflict]]:
        """The catalog of ``state``. ``changed``: the only keys where ``state``
        differs from the previous one (a promise; None: compare every key).
        ``created``: each key's etcd create_revision (missing: the key's order
        of arrival). ``now``: for the retention of emptied listeners."""
        touched = self._absorb(state, changed, created or {})
        touched = {s for s in touched if not self.only or s in self.only}
        for service in touched:
            self._built.pop(service, None)
            members = self._members.get(service)
            if members:
                ordered = sorted((age, key, i) for key, (age, i) in members.items())
                self._ordered[service] = ordered
            else:
                self._members.pop(service, None)
                self._ordered.pop(service, None)
        if all(self._keeps_port(service) for service in touched):
            for service in touched:
                port = self._placed[service][0]
                self._placed[service] = (port, self._first_at(service, port))
            catalog, conflicts = self._reassemble(touched)
        else:
            self._place()
            catalog, conflicts = self._assemble()
        return self._retain(catalog, now), conflicts

    @property
    def retention_ends_at(self) -> float | None:
        """When the first retained listener is due to go (``now``'s clock), if any."""
        if not self._retained:
            return None
        return min(since for _, since in self._retained.values()) + self.retention

    def _retain(self, catalog: Catalog, now: float) -> Catalog:
        """``catalog`` plus the listeners of services that just lost their last
        instance (or lost it less than ``retention`` ago), whose port is free."""
        if self.retention <= 0:
            return catalog
        taken = {service.bind_port for service in catalog.values()}
        retained: dict[str, tuple[Service, float]] = {}
        for name, (empty, since) in self._retained.items():
            expired = now - since >= self.retention
            if name not in catalog and empty.bind_port not in taken and not expired:
                retained[name] = (empty, since)
        for name, service in self._previous.items():
            gone = name not in catalog and name not in self._retained
            if gone and service.bind_port not in taken:
                retained[name] = (Service(name, service.bind_port, service.mode), now)
        self._retained = retained
        if retained:
            catalog = dict(sorted({**catalog, **{n: s for n, (s, _) in retained.items()}}.items()))
        self._previous = catalog
        return catalog

    def keys_of(self, service: str, server: str | None = None) -> list[str]:
        """The keys of ``service``'s instances (only ``server``'s, if given)."""
        members = self._members.get(service, {})
        return [k for k, (_, i) in members.items() if server in (None, i.server_name)]

    # -- state ---------------------------------------------------------------

    def _absorb(
        self,
        state: Mapping[str, Instance],
        keys: Collection[str] | None,
        created: Mapping[str, int],
    ) -> set[str]:
        """Take the new state in (only ``keys`` changed); the services whose instances changed."""
        old, self._state = self._state, state
        changed: set[str] = set()
        for key in state.keys() if keys is None else keys:
            before, instance = old.get(key), state.get(key)
            if before is instance:
                continue
            if before is not None:
                changed.add(self._drop(key, before))
            if instance is not None and (not self.only or instance.service in self.only):
                age = (created.get(key, 0), instance.service, instance.server_name)
                self._members.setdefault(instance.service, {})[key] = (age, instance)
                changed.add(instance.service)
        if keys is None:  # no promise: find the removed keys too
            for key in old.keys() - state.keys():
                changed.add(self._drop(key, old[key]))
        return changed

    def _drop(self, key: str, instance: Instance) -> str:
        self._members.get(instance.service, {}).pop(key, None)
        return instance.service

    # -- placement: which service listens on which port ------------------------

    def _first_at(self, service: str, port: int) -> int:
        """The index of the oldest instance of ``service`` that wants ``port`` (-1: none)."""
        ordered = self._ordered.get(service, [])
        return next((n for n, (_, _, i) in enumerate(ordered) if i.bind_port == port), -1)

    def _keeps_port(self, service: str) -> bool:
        """Whether ``service`` still holds the port it had, so placement is unchanged."""
        placed = self._placed.get(service)
        return placed is not None and self._first_at(service, placed[0]) >= 0

    def _place(self) -> None:
        previous = self._port_owner
        self._placed, self._port_owner, self._unplaced = {}, {}, []
        # 1. Owners keep their ports while they have an instance that wants them.
        for port, service in sorted(previous.items()):
            index = self._first_at(service, port)
            if index >= 0:
                self._claim(service, index, port)
        # 2. Every other service, in the order of its instances' ages.
        heap = [(ordered[0][0], name, 0) for name, ordered in self._ordered.items()
                if name not in self._placed]  # fmt: skip
        heapq.heapify(heap)
        waiting: dict[str, list[Conflict]] = {}
        while heap:
            _, name, index = heapq.heappop(heap)
            ordered = self._ordered[name]
            _, key, instance = ordered[index]
            taken = self._taken_by(instance.bind_port)
            if taken is None:
                self._claim(name, index, instance.bind_port)
                waiting.pop(name, None)
                continue
            reason = f"port {instance.bind_port} is {taken}"
            waiting.setdefault(name, []).append(Conflict(key, name, instance.server_name, reason))
            if index + 1 < len(ordered):
                heapq.heappush(heap, (ordered[index + 1][0], name, index + 1))
        self._unplaced = [c for conflicts in waiting.values() for c in conflicts]

    def _taken_by(self, port: int) -> str | None:
        if port in self.rules.reserved_ports:
            return f"reserved for {self.rules.reserved_ports[port]}"
        owner = self._port_owner.get(port)
        return None if owner is None else f"used by {owner}"

    def _claim(self, service: str, index: int, port: int) -> None:
        self._placed[service] = (port, index)
        self._port_owner[port] = service

    # -- the catalog -----------------------------------------------------------

    def _assemble(self) -> tuple[Catalog, list[Conflict]]:
        self._catalog, self._own = {}, {}
        for name in sorted(self._placed):
            service, own = self._service(name, self._placed[name][1])
            self._catalog[name] = service
            if own:
                self._own[name] = own
        return self._catalog, self._conflicts()

    def _reassemble(self, touched: Collection[str]) -> tuple[Catalog, list[Conflict]]:
        """The last catalog with only ``touched`` services rebuilt (placement
        unchanged: same services, same ports), without a pass over the others."""
        catalog = dict(self._catalog)  # same keys, same order
        for name in touched:
            catalog[name], own = self._service(name, self._placed[name][1])
            if own:
                self._own[name] = own
            else:
                self._own.pop(name, None)
        self._catalog = catalog
        return catalog, self._conflicts()

    def _conflicts(self) -> list[Conflict]:
        return [*self._unplaced, *(c for name in sorted(self._own) for c in self._own[name])]

    def _service(self, name: str, first: int) -> tuple[Service, list[Conflict]]:
        built = self._built.get(name)
        if built is not None and built[0] == first:
            return built[1], built[2]
        ordered = self._ordered[name]
        source = ordered[first][2]
        service = Service(name, source.bind_port, source.mode)
        conflicts: list[Conflict] = []
        taken: dict[str, str] = {}  # server name -> key
        for _, key, instance in ordered:
            reason = self._refusal(service, instance, taken)
            if reason is not None:
                conflicts.append(Conflict(key, name, instance.server_name, reason))
                continue
            if instance.bind_port != service.bind_port:
                reason = f"wants port {instance.bind_port}, service listens on {service.bind_port}"
                conflicts.append(Conflict(key, name, instance.server_name, reason, routed=True))
            taken[instance.server_name] = key
            service.servers[instance.server_name] = server_of(instance)
        self._built[name] = (first, service, conflicts)
        return service, conflicts

    def _refusal(
        self, service: Service, instance: Instance, taken: Mapping[str, str]
    ) -> str | None:
        if instance.mode != service.mode:
            return f"mode {instance.mode} differs from the listener's {service.mode}"
        if instance.server_name in taken:
            return f"server name {instance.server_name} is taken by {taken[instance.server_name]}"
        if self._points_at_itself(service, instance):
            return f"{instance.address}:{instance.port} is the service's own listener"
        return None

    def _points_at_itself(self, service: Service, instance: Instance) -> bool:
        if instance.port != service.bind_port or self.rules.bind_address is None:
            return False
        bind = ipaddress.ip_address(self.rules.bind_address)
        address = ipaddress.ip_address(instance.address)
        return address == bind or (bind.is_unspecified and address.is_loopback)
