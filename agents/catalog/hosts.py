"""The hosts view: each registrar's claim ``<prefix>/hosts/<host-id>`` and its lease.

Read when asked, at most once per ``cache_for`` seconds however many browsers
ask: one range read of the claims and one LeaseTimeToLive per lease.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from agents.common.etcd import Etcd
from agents.common.validation import NAME_PATTERN
from agents.registrar.identity import Holder

_NAME_RE = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class Claim:
    lease_alive: bool
    ttl_left: int | None
    holder: str | None  # None: the value is not a registrar's claim


class HostClaims:
    def __init__(self, etcd: Etcd, prefix: str, cache_for: float = 1.0) -> None:
        self.etcd = etcd
        self.key_prefix = f"{prefix}/hosts/"
        self.cache_for = cache_for
        self._claims: dict[str, Claim] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def read(self) -> dict[str, Claim]:
        async with self._lock:  # one read serves every request waiting for it
            if time.monotonic() - self._read_at >= self.cache_for:
                self._claims = await self._fetch()
                self._read_at = time.monotonic()
            return self._claims

    async def _fetch(self) -> dict[str, Claim]:
        _revision, items = await self.etcd.get_prefix(self.key_prefix)
        found: dict[str, tuple[int, Holder | None]] = {}
        for item in items:
            host = item.key.decode(errors="replace").removeprefix(self.key_prefix)
            if _NAME_RE.fullmatch(host):  # anything else is not a host id
                found[host] = (item.lease, Holder.parse(item.value))
        leases = sorted({lease for lease, _ in found.values() if lease})
        ttls = dict(
            zip(leases, await asyncio.gather(*map(self.etcd.lease_ttl, leases)), strict=True)
        )
        claims = {}
        for host, (lease, holder) in found.items():
            ttl = ttls.get(lease, -1) if lease else None
            claims[host] = Claim(
                lease_alive=ttl is not None and ttl > 0,
                ttl_left=ttl if ttl is not None and ttl >= 0 else None,
                holder=holder.describe() if holder is not None else None,
            )
        return claims
