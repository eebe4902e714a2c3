"""What to do to HAProxy to go from one catalog to another. Pure.

``current`` is what the running worker has (the sink's view, or one read back
from HAProxy), ``desired`` what it should serve. Instance changes become
runtime actions; only a change of the set of listeners (port, mode) — or of a
server's health check, which cannot be added at runtime to an existing server
— needs a reload.

A service that goes away: its servers are drained and removed at runtime at
once (like any removed instance, new connections stop immediately), and a
reload is requested to drop the listener. Until that reload the frontend stays
with an empty backend (TCP: connections closed, HTTP: 503), which is what a
service with no instance means anyway; the reload is rate-limited, not skipped,
so ports do not stay bound forever.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from agents.discoverer.model import Catalog, Server, Service


@dataclass(frozen=True, slots=True)
class AddServer:
    backend: str
    server: Server


@dataclass(frozen=True, slots=True)
class SetAddress:
    backend: str
    server: Server


@dataclass(frozen=True, slots=True)
class SetWeight:
    backend: str
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class SetReady:
    """Back to service from draining or maintenance."""

    backend: str
    name: str


@dataclass(frozen=True, slots=True)
class SetDrain:
    backend: str
    name: str


@dataclass(frozen=True, slots=True)
class RemoveServer:
    """drain → wait for connections (bounded) → maint → del (background)."""

    backend: str
    name: str


Action = AddServer | SetAddress | SetWeight | SetReady | SetDrain | RemoveServer

# Capacity first (adds, fixes, re-enables), withdrawals last: a replacement
# (new container in, old one out in the same batch) never leaves a gap.
_ORDER: dict[type, int] = {
    AddServer: 0,
    SetAddress: 1,
    SetReady: 2,
    SetWeight: 3,
    SetDrain: 4,
    RemoveServer: 5,
}


@dataclass(frozen=True, slots=True)
class Plan:
    reload: bool = False
    actions: tuple[Action, ...] = ()
    reasons: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.reload and not self.actions


def diff(current: Catalog, desired: Catalog, only: Collection[str] | None = None) -> Plan:
    """What turns ``current`` into ``desired``.

    ``only``: the services that may differ; the caller knows the others match
    (the HAProxy side, after a clean sync, passes the services whose catalog
    entry changed). None compares everything.
    """
    actions: list[Action] = []
    reasons: list[str] = []
    if only is not None:
        names = sorted(only)
        current = {n: current[n] for n in names if n in current}
        desired = {n: desired[n] for n in names if n in desired}
    for name, service in current.items():
        wanted = desired.get(name)
        if wanted is None:
            reasons.append(f"listener {service.bind_port}/{service.mode} of {name} went away")
            actions.extend(RemoveServer(name, s) for s in service.servers)
            continue
        if wanted.listener != service.listener:
            reasons.append(f"listener of {name} changed to {wanted.bind_port}/{wanted.mode}")
        actions.extend(_server_actions(service, wanted, reasons))
    for name, wanted in desired.items():
        if name not in current:
            # No backend in the running worker yet: the reload's config has its servers.
            reasons.append(f"new listener {wanted.bind_port}/{wanted.mode} for {name}")
    actions.sort(key=lambda a: _ORDER[type(a)])  # stable: keeps the per-server order
    return Plan(reload=bool(reasons), actions=tuple(actions), reasons=tuple(reasons))


def _server_actions(current: Service, desired: Service, reasons: list[str]) -> list[Action]:
    be = desired.name
    actions: list[Action] = []
    for name, want in desired.servers.items():
        have = current.servers.get(name)
        if have is None:
            actions.append(AddServer(be, want))
            continue
        if have.check != want.check:
            # `check` cannot be switched on for an existing server at runtime.
            reasons.append(f"health check of {be}/{name} changed")
        if (have.address, have.port) != (want.address, want.port):
            actions.append(SetAddress(be, want))
        if want.state == "up":
            if have.state != "up":
                # Weight is not compared while draining (rendered as 0): resend it.
                actions += [SetReady(be, name), SetWeight(be, name, want.weight)]
            elif have.weight != want.weight:
                actions.append(SetWeight(be, name, want.weight))
        elif have.state != "draining":
            actions.append(SetDrain(be, name))
    actions.extend(RemoveServer(be, n) for n in current.servers if n not in desired.servers)
    return actions
