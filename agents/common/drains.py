"""Drain requests in etcd: ``<prefix>/drains/<container-id>`` (no lease).

The registrar of the container's host watches them and rewrites the
container's instances as ``draining`` (and ``up`` again once the key is gone);
``pilotfish drain`` / ``undrain`` and the upgrader write them through these
functions.
"""

from __future__ import annotations

from agents.common.etcd import Etcd
from agents.common.schema import (
    DrainRequest,
    SchemaError,
    drain_key,
    parse_key,
    services_prefix,
)


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
    _, items = await etcd.get_prefix(services_prefix(prefix))
    found: dict[str, int] = {}
    for item in items:
        key = item.key.decode(errors="replace")
        try:
            _, _, owner, _ = parse_key(prefix, key)
        except SchemaError:
            continue  # not an instance key: not this container's
        if owner == container_id:
            found[key] = item.mod_revision
    return found
