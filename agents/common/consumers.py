"""The discoverers' published status, read: who routes what, at which revision.

``read_statuses`` lists ``<prefix>/discoverers/`` (each key lives on its
discoverer's lease, so only live discoverers are there); the rest is pure and
answers the two questions a drain or an upgrade waits on: which discoverers
have not applied a revision yet, and which still hold sessions on draining
instances.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agents.common.etcd import Etcd
from agents.common.logging import get_logger
from agents.common.schema import (
    DiscovererStatus,
    SchemaError,
    discoverers_prefix,
    parse_discoverer_status,
)

log = get_logger("pilotfish.consumers")

# (key, mod revision) of the bad values logged already: once each, however
# often a waiting caller reads them again. Bounded: cleared when full.
_REPORTED: set[tuple[str, int]] = set()
_MAX_REPORTED = 4096


async def read_statuses(etcd: Etcd, prefix: str) -> dict[str, DiscovererStatus]:
    """Discoverer id -> its status, for every live discoverer whose status parses.

    A value that does not parse is an unknown discoverer: logged once, left out.
    """
    _, items = await etcd.get_prefix(discoverers_prefix(prefix))
    return parse_statuses(prefix, ((i.key, i.value, i.mod_revision) for i in items))


def parse_statuses(
    prefix: str, entries: Iterable[tuple[bytes | str, bytes, int]]
) -> dict[str, DiscovererStatus]:
    """The statuses among (key, value, mod revision) entries; bad ones logged once, skipped."""
    statuses: dict[str, DiscovererStatus] = {}
    for raw_key, value, mod_revision in entries:
        try:
            status = parse_discoverer_status(prefix, raw_key, value)
        except SchemaError as error:
            _report(raw_key, mod_revision, str(error))
            continue
        statuses[status.id] = status
    return statuses


def stragglers(
    statuses: Mapping[str, DiscovererStatus], service: str, min_revision: int
) -> list[str]:
    """Ids of the discoverers serving ``service`` that have not applied ``min_revision``."""
    return sorted(
        status_id
        for status_id, status in statuses.items()
        if status.serves(service) and status.revision < min_revision
    )


def sessions_left(
    statuses: Mapping[str, DiscovererStatus], instance_keys: Iterable[str]
) -> dict[str, int]:
    """Discoverer id -> sessions it still has on ``instance_keys`` (summed), for
    every discoverer with at least one; empty when every connection is done.

    Only what the discoverers report for instances they hold as draining: pair
    it with :func:`stragglers` to know they have all applied the drain.
    """
    keys = set(instance_keys)
    left: dict[str, int] = {}
    for status_id, status in statuses.items():
        sessions = sum(n for key, n in status.draining.items() if key in keys)
        if sessions > 0:
            left[status_id] = sessions
    return dict(sorted(left.items()))


def _report(raw_key: bytes | str, mod_revision: int, reason: str) -> None:
    key = raw_key.decode(errors="replace") if isinstance(raw_key, bytes) else raw_key
    if (key[:600], mod_revision) in _REPORTED:
        return
    if len(_REPORTED) >= _MAX_REPORTED:
        _REPORTED.clear()
    _REPORTED.add((key[:600], mod_revision))
    log.warning("skipping discoverer status that does not parse", key=key[:600], reason=reason)
