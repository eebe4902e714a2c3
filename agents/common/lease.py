"""An agent's one lease, kept alive at TTL/3 and replaced when lost.

The registrar puts every key of its host on one; a discoverer puts its status
key on its own. A refresh of an expired lease returns TTL 0, it does not raise: that is how
a lease lost while etcd or this process was away is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable

# The discoverer forks HAProxy; gRPC's fork handlers are not needed (the child
# execs at once) and only print a warning on every fork. Set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


from agents.common.backoff import Backoff
from agents.common.etcd import Etcd, EtcdError
from agents.common.logging import OnceEvery, describe, get_logger

log = get_logger("pilotfish.etcd")


class LeaseKeeper:
    """One lease for the life of an agent, kept alive at TTL/3.

    If the lease is lost (expired while etcd or this process was away), a new
    one is granted and ``on_new_lease`` is awaited, so the owner can re-put
    every key on it.
    """

    def __init__(
        self,
        etcd: Etcd,
        ttl: int,
        on_new_lease: Callable[[int], Awaitable[None]],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.on_new_lease = on_new_lease
        self.on_error = on_error or (lambda _e: None)
        self.lease_id: int | None = None
        self.last_refresh = 0.0
        # Why the last grant or refresh failed; "" once etcd answered again.
        self.error = ""
        self._lost = asyncio.Event()
        self._quiet = OnceEvery(30.0)

    @property
    def interval(self) -> float:
        return max(self.ttl / 3, 0.5)

    @property
    def lost(self) -> bool:
        """The lease is known to be gone; a new one is being granted."""
        return self._lost.is_set()

    def mark_lost(self) -> None:
        """Called by the owner when a put says ``lease not found``."""
        self._lost.set()

    async def acquire(self) -> int:
        """Grant a fresh lease (retrying until etcd answers) and announce it."""
        backoff = Backoff(initial=0.1, maximum=2.0)
        while True:
            try:
                self.lease_id = await self.etcd.grant(self.ttl)
                break
            except EtcdError as exc:
                self._report("lease grant failed", exc)
                await backoff.wait()
        self._recovered()
        self.last_refresh = time.monotonic()
        self._lost.clear()
        log.info("lease granted", lease=hex(self.lease_id), ttl=self.ttl)
        await self.on_new_lease(self.lease_id)
        return self.lease_id

    async def run(self) -> None:
        if self.lease_id is None:
            await self.acquire()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_wait()):
                    await self._lost.wait()
            if self._lost.is_set():
                log.warning("lease lost, granting a new one", lease=hex(self.lease_id or 0))
                await self.acquire()
                continue
            await self._refresh_once()

    def _next_wait(self) -> float:
        # After a failure, retry sooner than TTL/3 so a short outage does not
        # let the lease expire.
        if self._quiet.active("refresh"):
            return min(self.interval, 0.5)
        return self.interval

    async def _refresh_once(self) -> None:
        assert self.lease_id is not None
        try:
            remaining = await self.etcd.refresh(self.lease_id)
        except EtcdError as exc:
            self._report("lease refresh failed", exc)
            return
        self._recovered()
        if remaining <= 0:
            self._lost.set()
        else:
            self.last_refresh = time.monotonic()

    def _report(self, what: str, exc: BaseException) -> None:
        self.error = f"{what}: {describe(exc)}"
        self.on_error(exc)
        if self._quiet.should_log("refresh"):
            log.warning(what + ", retrying", error=describe(exc))

    def _recovered(self) -> None:
        self.error = ""
        held = self._quiet.clear("refresh")
        if held:
            log.info("etcd reachable again", retries=held + 1)

    async def revoke(self) -> None:
        if self.lease_id is not None:
            await self.etcd.revoke(self.lease_id)
            self.lease_id = None
