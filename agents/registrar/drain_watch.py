"""Drain requests (``<prefix>/drains/<container-id>``) as the registrar sees them.

One watch of ``<prefix>/drains/`` per registrar: listed at R, watched from
R + 1, resumed after a broken stream from the last revision seen + 1, listed
again after a compaction. Drain requests are rare and small, so every
registrar follows all of them and acts on the ones naming its containers.

:class:`DrainRequests` (pure) keeps which containers are asked to drain; a
key that names no container is logged once and ignored, a value that does
not parse still counts (only the key's existence matters) and is logged
once. :func:`gone_drains` (pure) says which requests to delete: those of
containers this host had and Docker no longer knows (destroyed).
:class:`DrainWatch` is the I/O loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterable, Mapping

from agents.common.backoff import Backoff
from agents.common.etcd import Etcd, EtcdError, RevisionCompacted
from agents.common.logging import OnceEvery, describe, get_logger
from agents.common.schema import (
    SchemaError,
    drain_key,
    drains_prefix,
    parse_drain_key,
    parse_drain_request,
)

log = get_logger("pilotfish.registrar.drains")

# Keys logged as bad already, with the revision: once each, however often listed.
_MAX_REPORTED = 4096


class DrainRequests:
    """Which containers have a drain request; pure, fed by list and watch events."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.requested: set[str] = set()
        self.revision = 0
        self._reported: dict[str, int] = {}

    def replace(self, revision: int, entries: Iterable[tuple[bytes, bytes, int]]) -> set[str]:
        """A full list at ``revision`` (key, value, mod revision); the containers that changed."""
        before = self.requested
        self.requested = set()
        for key, value, mod_revision in entries:
            container_id = self._container(key, value, mod_revision)
            if container_id is not None:
                self.requested.add(container_id)
        self.revision = revision
        return before ^ self.requested

    def apply(self, key: bytes, value: bytes | None, revision: int) -> str | None:
        """One watch event; the container whose drain state changed, if any."""
        if revision < self.revision:
            return None  # replayed by a resumed watch
        self.revision = revision
        if value is None:
            container_id = self._container(key, None, revision)
            if container_id is None or container_id not in self.requested:
                return None
            self.requested.discard(container_id)
            return container_id
        container_id = self._container(key, value, revision)
        if container_id is None or container_id in self.requested:
            return None
        self.requested.add(container_id)
        return container_id

    def _container(self, key: bytes, value: bytes | None, revision: int) -> str | None:
        try:
            container_id = parse_drain_key(self.prefix, key)
        except SchemaError as error:
            self._report(key, revision, str(error), "ignoring a drain key that names no container")
            return None
        if value is not None:
            try:
                parse_drain_request(self.prefix, key, value)
            except SchemaError as error:
                self._report(key, revision, str(error), "drain request value does not parse")
        return container_id

    def _report(self, key: bytes, revision: int, reason: str, what: str) -> None:
        text = key.decode(errors="replace")[:600]
        if self._reported.get(text) == revision:
            return
        if len(self._reported) >= _MAX_REPORTED:
            self._reported.clear()
        self._reported[text] = revision
        log.warning(what, key=text, revision=revision, reason=reason)


def gone_drains(
    requested: Collection[str], known_here: Collection[str], exists: Mapping[str, bool]
) -> set[str]:
    """The drain requests to delete: containers of this host (``known_here``) that
    Docker says no longer exist. Another host's containers are never ours to judge."""
    return {c for c in requested if c in known_here and exists.get(c) is False}


class DrainWatch:
    """Lists and watches ``<prefix>/drains/``; calls ``on_change(container_id)``."""

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        on_change: Callable[[str], None],
        on_error: Callable[[BaseException], None] = lambda _error: None,
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.state = DrainRequests(prefix)
        self.on_change = on_change
        self.on_error = on_error
        self.loaded = asyncio.Event()  # the first list is in
        self.error = ""
        self._quiet = OnceEvery(30.0)

    @property
    def requested(self) -> set[str]:
        return self.state.requested

    async def run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=2.0)
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                await self._watch(backoff)
                self._broken(EtcdError("drain watch stream ended"))
            except RevisionCompacted:
                need_list = True
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:  # etcd away: resume from the last revision seen
                self._broken(error)
            await backoff.wait()

    async def _list(self) -> None:
        revision, items = await self.etcd.get_prefix(drains_prefix(self.prefix))
        changed = self.state.replace(revision, ((i.key, i.value, i.mod_revision) for i in items))
        self.loaded.set()
        for container_id in sorted(changed):
            self.on_change(container_id)

    async def _watch(self, backoff: Backoff) -> None:
        def created() -> None:
            backoff.reset()
            if self.error:
                held = self._quiet.clear("watch")
                log.info("drain watch restored", retries=held + 1)
                self.error = ""

        stream = self.etcd.watch_prefix(
            drains_prefix(self.prefix), self.state.revision + 1, on_created=created
        )
        async for event in stream:
            container_id = self.state.apply(event.key, event.value, event.revision)
            if container_id is not None:
                self.on_change(container_id)

    def _broken(self, error: BaseException) -> None:
        self.error = f"drain watch: {describe(error)}"
        self.on_error(error)
        if self._quiet.should_log("watch"):
            log.warning("drain watch broken, resuming", error=describe(error))

    async def delete(self, container_ids: Iterable[str]) -> None:
        """Delete the drain requests of destroyed containers (best effort: retried at
        the next Docker snapshot if etcd is away)."""
        for container_id in sorted(container_ids):
            with contextlib.suppress(EtcdError):
                await self.etcd.delete(drain_key(self.prefix, container_id))
                log.info("drain request of a destroyed container deleted", container=container_id)
