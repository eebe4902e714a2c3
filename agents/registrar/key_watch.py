"""One etcd watch per key this host owns, all multiplexed on the client's one watch stream.

Why not one watch of ``<prefix>/services/``, filtered here by host id: every
registrar would then receive every event of the fleet (1,000 hosts: every
registration change anywhere, on every host). Per-key watches cost etcd one
watcher per key and send a registrar only the events of its own keys; a
watch is created when a key is first written (from the revision after that
write, so nothing that happens after it is missed), and cancelled when the
key is withdrawn. Re-puts of a key (drain, new lease) keep its watch.

When the stream breaks (etcd away, a frozen member left by gRPC keepalive),
every watch ends; they are all re-created, with backoff, from the revision
after the last write of each key, so what happened meanwhile is replayed.
Until then :attr:`error` says why, for ``/healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from agents.common.backoff import Backoff
from agents.common.etcd import Etcd, EtcdError, RevisionCompacted, WatchEvent
from agents.common.logging import OnceEvery, describe, get_logger

log = get_logger("pilotfish.keywatch")


class KeyWatches:
    def __init__(
        self,
        etcd: Etcd,
        *,
        start_of: Callable[[str], int | None],
        on_event: Callable[[str, WatchEvent], None],
        on_compacted: Callable[[str], None],
        on_error: Callable[[BaseException], None] = lambda _error: None,
        after_break: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.etcd = etcd
        self.start_of = start_of  # where a key's watch starts; None: not (or no longer) ours
        self.on_event = on_event
        self.on_compacted = on_compacted
        self.on_error = on_error
        # Awaited before the watches are re-created after the stream broke
        # (the sink checks that etcd's history did not go back).
        self.after_break = after_break
        self._broke = False
        self._active: dict[str, int] = {}  # key -> watch id
        self._to_create: set[str] = set()
        self._to_cancel: list[int] = []
        self._wake = asyncio.Event()
        self._quiet = OnceEvery(30.0)
        self.error = ""  # why the watches are down, "" while they stand
        self.breaks = 0

    @property
    def watched(self) -> int:
        return len(self._active)

    def watch(self, key: str) -> None:
        """Make sure ``key`` is watched (from :attr:`start_of`)."""
        if key not in self._active and key not in self._to_create:
            self._to_create.add(key)
            self._wake.set()

    def unwatch(self, key: str) -> None:
        self._to_create.discard(key)
        watch_id = self._active.pop(key, None)
        if watch_id is not None:
            self._to_cancel.append(watch_id)
            self._wake.set()

    async def run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=2.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._settle()
            except EtcdError as error:
                self._failed(error)
                await backoff.wait()
                self._wake.set()
                continue
            backoff.reset()
            if self.error and not self._to_create:
                held = self._quiet.clear("watch")
                log.info("key watches back", watched=len(self._active), retries=held + 1)
                self.error = ""

    async def _settle(self) -> None:
        if self._broke and self.after_break is not None:
            await self.after_break()
        self._broke = False
        while self._to_cancel:
            watch_id = self._to_cancel.pop()
            with contextlib.suppress(EtcdError):  # gone with its stream already
                await self.etcd.cancel_watch(watch_id)
        while self._to_create:
            key = next(iter(self._to_create))
            start = self.start_of(key)
            if start is None:
                self._to_create.discard(key)
                continue
            watch_id = await self.etcd.watch_key(key, start, self._callback(key))
            if key in self._to_create:
                self._to_create.discard(key)
                self._active[key] = watch_id
            else:  # unwatched while etcd confirmed it
                self._to_cancel.append(watch_id)
                self._wake.set()

    def _callback(self, key: str) -> Callable[[WatchEvent | Exception], None]:
        def deliver(item: WatchEvent | Exception) -> None:
            if isinstance(item, WatchEvent):
                self.on_event(key, item)
            elif isinstance(item, RevisionCompacted):
                self._active.pop(key, None)
                self.on_compacted(key)  # puts it back; the put watches it again
            else:
                self._stream_broke(item)

        return deliver

    def _stream_broke(self, error: Exception) -> None:
        # Every watch on the stream got the same error: act on the first.
        if not self._active:
            return
        self.breaks += 1
        self._broke = True
        self._to_create.update(self._active)
        self._active.clear()
        self._failed(error)
        self._wake.set()

    def _failed(self, error: BaseException) -> None:
        self.error = f"key watch: {describe(error)}"
        self.on_error(error)
        if self._quiet.should_log("watch"):
            log.warning("key watches down, re-creating", error=describe(error))
