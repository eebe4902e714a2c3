"""What HAProxy should serve, as plain data: the discoverer's pure core.

``build_catalog`` turns the registered instances into the desired routing
table; the HAProxy side (``diff`` → runtime commands / config) turns the
difference between two catalogs into actions. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    """An instance left out of the catalog, with the reason (logged once)."""

    service: str
    server: str
    reason: str


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
    """The routing table for ``instances`` (restricted to ``only`` if given).

    A service's listener (port, mode) is taken from its oldest instance, so a
    newcomer with a different label cannot move a port consumers already use.
    Two services that want one port: the one registered first keeps it.
    """
    catalog: Catalog = {}
    conflicts: list[Conflict] = []
    ordered = sorted(
        (i for i in instances if not only or i.service in only),
        key=lambda i: (i.registered_at, i.service, i.server_name),
    )
    ports: dict[int, str] = {}
    for instance in ordered:
        service = catalog.get(instance.service)
        if service is None:
            owner = ports.get(instance.bind_port)
            if owner is not None:
                conflicts.append(
                    Conflict(
                        instance.service,
                        instance.server_name,
                        f"port {instance.bind_port} is used by {owner}",
                    )
                )
                continue
            ports[instance.bind_port] = instance.service
            service = catalog[instance.service] = Service(
                instance.service, instance.bind_port, instance.mode
            )
        elif (instance.bind_port, instance.mode) != service.listener:
            conflicts.append(
                Conflict(
                    instance.service,
                    instance.server_name,
                    f"wants port {instance.bind_port}/{instance.mode}, service has "
                    f"{service.bind_port}/{service.mode}",
                )
            )
            # Still route to it: the listener is the service's, not the instance's.
        service.servers[instance.server_name] = server_of(instance)
    return catalog, conflicts
