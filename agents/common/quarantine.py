"""Entries left out of service, each with the reason: the unit of failure.

One bad value must cost its own entry, never the catalog: whatever refuses an
entry (the schema, the catalog's rules, HAProxy) records it here under its
own name, and the agent logs it once, counts it and lists it in ``/healthz``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Gauge

# /healthz lists this many; the gauge counts them all.
LISTED = 100


class Quarantine:
    def __init__(self, log: Any, gauge: Gauge | None = None) -> None:
        self.log = log
        self.gauge = gauge
        self._by_stage: dict[str, dict[str, str]] = {}  # stage -> key -> reason

    def replace(self, stage: str, entries: Mapping[str, str], *, announce: bool = True) -> None:
        """``entries`` (key -> reason) are now all that ``stage`` refuses.

        A key newly refused, or refused for another reason, is logged once
        (``announce=False``: the stage already said so itself).
        """
        before = self._by_stage.get(stage, {})
        if announce:
            for key, reason in entries.items():
                if before.get(key) != reason:
                    self.log.warning("quarantined", key=key, stage=stage, reason=reason)
        released = before.keys() - entries.keys()
        if released:
            self.log.info("released from quarantine", stage=stage, keys=sorted(released)[:10])
        self._by_stage[stage] = dict(entries)
        if self.gauge is not None:
            self.gauge.set(len(self))

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._by_stage.values())

    def listing(self) -> list[dict[str, str]]:
        """The first :data:`LISTED` entries, by key, for ``/healthz``."""
        rows = [
            {"key": key, "stage": stage, "reason": reason}
            for stage, entries in self._by_stage.items()
            for key, reason in entries.items()
        ]
        return sorted(rows, key=lambda row: (row["key"], row["stage"]))[:LISTED]
