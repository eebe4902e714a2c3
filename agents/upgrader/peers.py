"""What the upgrader reads of and asks from the other agents, through etcd.

TEMPORARY SHIM: the drain requests and the discoverers' status keys are built
beside the upgrader (agents/common/drains.py, agents/common/consumers.py);
until they are merged these are local versions with the same signatures,
reading the same keys. Delete this module's bodies and re-export those once
they exist.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agents.common.etcd import Etcd
from agents.common.logging import OnceEvery, get_logger
from agents.common.schema import SchemaError, parse_key

log = get_logger("pilotfish.upgrader")
_bad = OnceEvery(300.0)
MAX_STATUS_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class DiscovererStatus:
    id: str
    revision: int
    services: tuple[str, ...] = ()
    serves_all: bool = False
    draining: dict[str, int] = field(default_factory=dict)

    def serves(self, service: str) -> bool:
        return self.serves_all or service in self.services


def drain_key(prefix: str, container_id: str) -> str:
    return f"{prefix}/drains/{container_id}"


async def request_drain(etcd: Etcd, prefix: str, container_id: str, reason: str) -> None:
    value = {"version": 1, "reason": reason, "requested_at": datetime.now(UTC).isoformat()}
    await etcd.put(drain_key(prefix, container_id), json.dumps(value).encode())


async def cancel_drain(etcd: Etcd, prefix: str, container_id: str) -> None:
    await etcd.delete(drain_key(prefix, container_id))


def _parse_status(key: str, value: bytes) -> DiscovererStatus | None:
    try:
        if len(value) > MAX_STATUS_BYTES:
            raise ValueError("too large")
        data = json.loads(value)
        draining = data.get("draining") or {}
        return DiscovererStatus(
            id=str(data["id"]),
            revision=int(data["revision"]),
            services=tuple(str(s) for s in data.get("services") or ()),
            serves_all=data.get("serves_all") is True,
            draining={str(k): int(v) for k, v in draining.items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        if _bad.should_log(key):
            log.warning("discoverer status refused", key=key, error=str(error))
        return None


async def read_statuses(etcd: Etcd, prefix: str) -> dict[str, DiscovererStatus]:
    _revision, items = await etcd.get_prefix(f"{prefix}/discoverers/")
    statuses = {}
    for item in items:
        status = _parse_status(item.key.decode(errors="replace"), item.value)
        if status is not None:
            statuses[status.id] = status
    return statuses


def stragglers(
    statuses: Mapping[str, DiscovererStatus], service: str, min_revision: int
) -> list[str]:
    return sorted(
        status_id
        for status_id, status in statuses.items()
        if status.serves(service) and status.revision < min_revision
    )


def sessions_left(
    statuses: Mapping[str, DiscovererStatus], instance_keys: Iterable[str]
) -> dict[str, int]:
    keys = set(instance_keys)
    left: dict[str, int] = {}
    for status_id, status in statuses.items():
        total = sum(n for key, n in status.draining.items() if key in keys)
        if total:
            left[status_id] = total
    return left


async def instance_keys_of(etcd: Etcd, prefix: str, container_id: str) -> dict[str, int]:
    _revision, items = await etcd.get_prefix(f"{prefix}/services/")
    found = {}
    for item in items:
        key = item.key.decode(errors="replace")
        try:
            _service, _host, container, _port = parse_key(prefix, key)
        except SchemaError:
            continue
        if container == container_id:
            found[key] = item.mod_revision
    return found
