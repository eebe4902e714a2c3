"""What to write so etcd holds this host's registrations: puts and deletes. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agents.common.schema import (
    Instance,
    SchemaError,
    parse_entry,
    parse_key,
)


@dataclass(frozen=True, slots=True)
class WritePlan:
    puts: list[str]
    deletes: list[str]


def reconcile(
    desired: Mapping[str, Instance],
    actual: Mapping[str, Instance | bytes | None],
    prefix: str,
    host_id: str,
) -> WritePlan:
    """What to write so etcd holds ``desired`` for this host.

    ``actual`` maps keys found in etcd to their value: an Instance, raw bytes
    (parsed here), or None for "present but must be rewritten" (on another
    lease). Keys of other hosts, and keys that are not ours to judge, are
    never deleted.
    """
    puts = [
        key
        for key, instance in desired.items()
        if not _holds(prefix, key, actual.get(key), instance)
    ]
    deletes = [key for key in actual if key not in desired and owned_by(prefix, key, host_id)]
    return WritePlan(sorted(puts), sorted(deletes))


def _holds(prefix: str, key: str, value: Instance | bytes | None, wanted: Instance) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes):
        try:
            value = parse_entry(prefix, key, value)
        except SchemaError:
            return False
    return value.same_registration(wanted)


def owned_by(prefix: str, key: str, host_id: str) -> bool:
    """Whether ``key`` is a registration written by ``host_id`` (ownership = host segment)."""
    try:
        return parse_key(prefix, key)[1] == host_id
    except SchemaError:
        return False
