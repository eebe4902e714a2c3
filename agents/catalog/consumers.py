"""The consumers view: each discoverer's status key ``<prefix>/discoverers/<id>``.

Read when asked, at most once per ``cache_for`` seconds however many browsers
ask: one range read. A value that does not parse is left out (logged once).
"""

from __future__ import annotations

import asyncio
import time

from agents.common.consumers import read_statuses
from agents.common.etcd import Etcd
from agents.common.schema import DiscovererStatus


class DiscovererStatuses:
    def __init__(self, etcd: Etcd, prefix: str, cache_for: float = 1.0) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.cache_for = cache_for
        self._statuses: dict[str, DiscovererStatus] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def read(self) -> dict[str, DiscovererStatus]:
        async with self._lock:  # one read serves every request waiting for it
            if time.monotonic() - self._read_at >= self.cache_for:
                self._statuses = await read_statuses(self.etcd, self.prefix)
                self._read_at = time.monotonic()
            return self._statuses
