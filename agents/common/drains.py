"""Drain requests in etcd: ``<prefix>/drains/<container-id>`` (no lease).

The registrar of the container's host watches them and rewrites the
container's instances as ``draining`` (and ``up`` again once the key is gone);
``pilotfish drain`` / ``undrain`` and the upgrader write them through these
functions.
"""

from __future__ import annotations

from collections.abc import Mapping

from agents.common.etcd import Etcd
from agents.common.schema import (
    DrainRequest,
    Instance,
    SchemaError,
    State,
    drain_key,
    parse_entry,
    parse_key,
    services_prefix,
)

# key -> (its instance, None if the value does not parse; its mod revision)
Registrations = dict[str, tuple[Instance | None, int]]


async def request_drain(etcd: Etcd, prefix: str, container_id: str, reason: str) -> None:
    """Ask the container's registrar to mark its instances draining (idempotent).

    ``container_id`` is the full 64-hex id; ``reason`` must match the schema's
    allow-list (:class:`~pydantic.ValidationError` otherwise).
    """
    value = DrainRequest(reason=reason).to_json()
    await etcd.put(drain_key(prefix, container_id), value)


async def cancel_drain(etcd: Etcd, prefix: str, container_id: str) -> None:
    """Withdraw a drain request (nothing if there is none)."""
    await etcd.delete(drain_key(prefix, container_id))


async def instance_keys_of(etcd: Etcd, prefix: str, container_id: str) -> dict[str, int]:
    """The container's instance keys ``<prefix>/services/*/*/<container-id>:*``
    and the mod revision of each (the revision its current value was written at)."""
    found = await registrations_of(etcd, prefix, container_id)
    return {key: revision for key, (_, revision) in found.items()}


async def registrations_of(etcd: Etcd, prefix: str, container_id: str) -> Registrations:
    """The container's instance keys with their parsed values and mod revisions."""
    _, items = await etcd.get_prefix(services_prefix(prefix))
    found: Registrations = {}
    for item in items:
        key = item.key.decode(errors="replace")
        try:
            _, _, owner, _ = parse_key(prefix, key)
        except SchemaError:
            continue  # not an instance key: not this container's
        if owner != container_id:
            continue
        try:
            instance: Instance | None = parse_entry(prefix, key, item.value)
        except SchemaError:
            instance = None
        found[key] = (instance, item.mod_revision)
    return found


def revisions_to_apply(
    registrations: Mapping[str, tuple[Instance | None, int]], state: State
) -> dict[str, int] | None:
    """Service -> the revision its discoverers must have applied for every one of
    the container's instances to be in ``state`` (None: the registrar has not
    written them all in that state yet)."""
    wanted: dict[str, int] = {}
    for instance, revision in registrations.values():
        if instance is None or instance.state != state:
            return None
        wanted[instance.service] = max(wanted.get(instance.service, 0), revision)
    return wanted
