"""One replacement, start-first: the order is what makes it hitless.

1. the new copy is created from the old one's configuration and started;
2. it must be healthy, registered in etcd, and applied by every live
   discoverer that serves its service(s);
3. the old copy is drained (a drain request the registrar turns into its
   instances' ``draining`` state), every discoverer must have applied that
   and its connections must be done (bounded by ``--drain-timeout``);
4. only then does the old copy get its stop signal; the new copy takes its
   name and the old one is kept, stopped, as the previous version.

Anything that fails before step 4 removes the new copy and leaves the old one
serving (undrained if it was drained). Each step is visible in Docker's state
(names and the new copy's labels), so :meth:`Replacer.recover` can finish or
undo an upgrade whose upgrader was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agents.common.consumers import read_statuses
from agents.common.drains import (
    Registrations,
    cancel_drain,
    registrations_of,
    request_drain,
    revisions_to_apply,
)
from agents.common.etcd import Etcd, EtcdError
from agents.common.logging import describe, get_logger
from agents.common.schema import State
from agents.common.settings import UpgraderSettings
from agents.registrar.drain_command import Progress, progress_of
from agents.upgrader.docker import DockerRefused, Engine, container_of
from agents.upgrader.plan import (
    NEXT_SUFFIX,
    PREVIOUS_SUFFIX,
    Container,
    Recovery,
    clone_config,
    extra_networks,
    upgrade_labels,
)

log = get_logger("pilotfish.upgrader")

POLL = 0.1
# A copy that is removed or put back gets this long to stop.
DISCARD_STOP_TIMEOUT = 5
# How long an undrain waits for the discoverers before the copy that served
# meanwhile goes; and how long it keeps retrying etcd.
UNDRAIN_WITHIN = 15.0
DRAIN_REASON = "pilotfish upgrade"
# An unhealthy new copy fails at once only after this many failed checks in a
# row: one or two can be a slow check on a busy host, and Docker turns the
# copy healthy again at the next passing one. Otherwise --health-timeout.
UNHEALTHY_STREAK = 3


class StepFailed(Exception):
    """A step of the replacement did not succeed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str
    result: str  # "upgraded", "rolled back", "failed", "recovered"
    detail: str = ""
    seconds: float = 0.0


class Steps:
    """When each step of a replacement ended, in seconds from its start (for the log)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}

    def mark(self, step: str) -> None:
        self.seconds[f"{step}_s"] = round(time.monotonic() - self.started, 3)


class Replacer:
    def __init__(self, settings: UpgraderSettings, engine: Engine, etcd: Etcd) -> None:
        self.settings = settings
        self.engine = engine
        self.etcd = etcd
        self.prefix = settings.prefix
        self.etcd_error = ""

    # --- the procedure -------------------------------------------------------------------

    async def upgrade(self, old: Container, reason: str, stop_first: bool = False) -> Outcome:
        """Replace ``old`` by a copy running the image its tag names now."""
        started = time.monotonic()
        log.info("upgrade starting", container=old.name, reason=reason, stop_first=stop_first)
        doc = await self.engine.inspect(old.id)
        if doc is None:
            raise StepFailed("the container is gone")
        image = await self.engine.image(old.image_id)
        image_config = (image or {}).get("Config") or {}
        body = clone_config(doc, image_config, old.image_ref, upgrade_labels(old))
        temporary = old.name + NEXT_SUFFIX
        leftover = await self.engine.inspect(temporary)
        if leftover is not None:
            await self.engine.remove(str(leftover["Id"]))
        new_id = await self.engine.create(temporary, body)
        try:
            for network, endpoint in extra_networks(doc):
                await self.engine.connect(network, new_id, endpoint)
        except DockerRefused as error:
            await self._discard_new(new_id)
            raise StepFailed(f"network: {error}") from None

        async def discard() -> None:
            await self._discard_new(new_id)

        if stop_first:
            await self._switch_stop_first(old, new_id, discard)
        else:
            await self._switch(old, new_id, discard)
        return Outcome(old.name, "upgraded", reason, time.monotonic() - started)

    async def rollback(self, name: str) -> Outcome:
        """Bring back ``<name>.pilotfish-previous`` by the same start-first procedure."""
        started = time.monotonic()
        doc = await self.engine.inspect(name)
        if doc is None:
            raise StepFailed(f"no container {name}")
        current = container_of(doc)
        previous_doc = await self.engine.inspect(current.name + PREVIOUS_SUFFIX)
        if previous_doc is None:
            raise StepFailed(f"no previous version {current.name}{PREVIOUS_SUFFIX} kept")
        previous = container_of(previous_doc)
        if previous.running:
            raise StepFailed(f"{previous.name} is running: not a kept previous version")
        stop_first = bool(current.fixed_ports)
        log.info("rollback starting", container=current.name, to_image=previous.image_id[:19])
        await self.engine.rename(previous.id, current.name + NEXT_SUFFIX)

        async def put_back() -> None:
            await self._put_back_previous(previous.id, current.name)

        if stop_first:
            await self._switch_stop_first(current, previous.id, put_back)
        else:
            await self._switch(current, previous.id, put_back)
        return Outcome(current.name, "rolled back", previous.image_id, time.monotonic() - started)

    async def _switch(
        self, old: Container, new_id: str, discard: Callable[[], Awaitable[None]]
    ) -> None:
        drained = False
        steps = Steps()
        try:
            await self.engine.start(new_id)
            steps.mark("started")
            # Unknown (etcd away) counts as registered: better wait than route to nothing.
            old_registrations = await self._registrations(old.id)
            await self._wait_ready(new_id, expect_keys=old_registrations != {})
            steps.mark("ready")
            await self._wait_routed(new_id, self.settings.route_timeout, "route to the new copy")
            steps.mark("routed")
            await self._call_etcd(request_drain(self.etcd, self.prefix, old.id, DRAIN_REASON))
            drained = True
            await self._wait_drained(old.id)
            steps.mark("drained")
            await self.engine.stop(old.id)
            steps.mark("stopped")
        except (StepFailed, DockerRefused, EtcdError) as error:
            await self._undo(old.id, drained, discard)
            raise StepFailed(describe(error)) from None
        await self._finish(old.id, old.name, new_id)
        steps.mark("renamed")
        log.info("replaced", container=old.name, **steps.seconds)

    async def _switch_stop_first(
        self, old: Container, new_id: str, discard: Callable[[], Awaitable[None]]
    ) -> None:
        """The old copy stops before the new one starts: a gap the label accepted."""
        await self.engine.stop(old.id)
        try:
            await self.engine.start(new_id)
            await self._wait_ready(new_id, expect_keys=False)
        except (StepFailed, DockerRefused) as error:
            await discard()
            await self.engine.start(old.id)
            raise StepFailed(describe(error)) from None
        await self._finish(old.id, old.name, new_id)

    async def _finish(self, old_id: str | None, name: str, new_id: str) -> None:
        """The old copy is stopped: keep it as the previous version, give the new one the name."""
        if old_id is not None:
            await self._undrain_quietly(old_id)  # it must come back routable if started again
        previous_name = name + PREVIOUS_SUFFIX
        kept = await self.engine.inspect(previous_name)
        if kept is not None and kept["Id"] != old_id:
            await self.engine.remove(str(kept["Id"]))
        if old_id is not None:
            old_doc = await self.engine.inspect(old_id)
            if old_doc is not None and str(old_doc.get("Name", "")).lstrip("/") != previous_name:
                try:
                    await self.engine.rename(old_id, previous_name)
                except DockerRefused as error:
                    if error.status != 404:  # gone meanwhile (--rm): nothing to keep
                        raise
        await self.engine.rename(new_id, name)

    async def _undo(
        self, old_id: str, drained: bool, discard: Callable[[], Awaitable[None]]
    ) -> None:
        """The old copy keeps serving: route to it again first, then drop the new one."""
        if drained:
            await self._undrain(old_id)
        await discard()

    async def _discard_new(self, new_id: str) -> None:
        await self._stop_quietly(new_id)
        await self.engine.remove(new_id)

    async def _put_back_previous(self, previous_id: str, name: str) -> None:
        await self._stop_quietly(previous_id)
        await self.engine.rename(previous_id, name + PREVIOUS_SUFFIX)

    async def _stop_quietly(self, container_id: str) -> None:
        with contextlib.suppress(DockerRefused):  # gone, or not running
            await self.engine.stop(container_id, grace=DISCARD_STOP_TIMEOUT)

    # --- waiting for the new copy ---------------------------------------------------------

    async def _wait_ready(self, new_id: str, *, expect_keys: bool) -> None:
        """Running, healthy (if it has a health check), registered (if the old one was)."""
        deadline = time.monotonic() + self.settings.health_timeout
        while True:
            doc = await self.engine.inspect(new_id)
            if doc is None:
                raise StepFailed("the new copy was removed")
            new = container_of(doc)
            if new.state in ("exited", "dead"):
                code = (doc.get("State") or {}).get("ExitCode")
                raise StepFailed(f"the new copy exited (code {code})")
            streak = int(((doc.get("State") or {}).get("Health") or {}).get("FailingStreak") or 0)
            if new.health == "unhealthy" and streak >= UNHEALTHY_STREAK:
                raise StepFailed(f"the new copy is unhealthy ({streak} checks failed in a row)")
            ready = new.running and new.health in ("none", "healthy")
            if ready and (not expect_keys or await self._registered(new_id)):
                return
            if time.monotonic() > deadline:
                what = "registered in etcd" if ready else "running and healthy"
                if ready and self.etcd_error:
                    what += f" (etcd: {self.etcd_error})"
                within = self.settings.health_timeout
                raise StepFailed(f"the new copy was not {what} within {within:g}s")
            await asyncio.sleep(POLL)

    async def _wait_routed(self, container_id: str, within: float, what: str) -> None:
        """Every live discoverer serving the container's services routes to it (state up)."""
        deadline = time.monotonic() + within
        progress: Progress | None = None
        while True:
            progress = await self._progress(container_id, "up")
            if progress is not None and progress.done:
                return
            if time.monotonic() > deadline:
                late = progress.waiting_for() if progress else f"etcd: {self.etcd_error}"
                raise StepFailed(f"{what}: not applied within {within:g}s: {late}")
            await asyncio.sleep(POLL)

    async def _wait_drained(self, old_id: str) -> None:
        """The drain is applied everywhere and the old copy's connections are done.

        Bounded by ``--drain-timeout``: past it the old copy is stopped anyway
        (the new one is routed everywhere by now), and whoever lagged is named.
        """
        deadline = time.monotonic() + self.settings.drain_timeout
        progress: Progress | None = None
        while time.monotonic() < deadline:
            progress = await self._progress(old_id, "draining")
            if progress is not None and progress.done and not progress.sessions:
                return
            await asyncio.sleep(POLL)
        if progress is None:
            waiting_for = f"etcd: {self.etcd_error}"
        elif progress.done:
            waiting_for = f"sessions left: {progress.sessions}"
        else:
            waiting_for = progress.waiting_for()
        log.warning(
            "drain not complete within the drain timeout, stopping anyway",
            container=old_id[:12],
            waiting_for=waiting_for,
            drain_timeout=self.settings.drain_timeout,
        )

    async def _registrations(self, container_id: str) -> Registrations | None:
        """The container's instances in etcd; None if etcd did not answer."""
        try:
            found = await registrations_of(self.etcd, self.prefix, container_id)
        except EtcdError as error:
            self.etcd_error = describe(error)
            return None
        self.etcd_error = ""
        return found

    async def _registered(self, container_id: str) -> bool:
        found = await self._registrations(container_id)
        return bool(found) and revisions_to_apply(found or {}, "up") is not None

    async def _progress(self, container_id: str, state: State) -> Progress | None:
        """How far every discoverer got with the container's instances in ``state``.

        A container with no registration has nothing to wait for.
        """
        found = await self._registrations(container_id)
        if found is None:
            return None
        try:
            statuses = await read_statuses(self.etcd, self.prefix)
        except EtcdError as error:
            self.etcd_error = describe(error)
            return None
        if not found:
            return Progress(rewritten=True, revisions={}, behind={}, sessions={})
        return progress_of(revisions_to_apply(found, state), statuses, sorted(found))

    # --- etcd calls that must happen ------------------------------------------------------

    async def _call_etcd(self, call: Awaitable[None]) -> None:
        try:
            await call
        except EtcdError as error:
            self.etcd_error = describe(error)
            raise StepFailed(f"etcd: {describe(error)}") from None

    async def _undrain(self, container_id: str) -> None:
        """Cancel the drain and wait (bounded) until every discoverer routes to it again."""
        await self._undrain_quietly(container_id)
        try:
            await self._wait_routed(container_id, UNDRAIN_WITHIN, "undrain")
        except StepFailed as error:
            log.warning(
                "undrain not applied everywhere in time",
                container=container_id[:12],
                error=str(error),
            )

    async def _undrain_quietly(self, container_id: str) -> None:
        deadline = time.monotonic() + UNDRAIN_WITHIN
        while True:
            try:
                await cancel_drain(self.etcd, self.prefix, container_id)
                return
            except EtcdError as error:
                self.etcd_error = describe(error)
                if time.monotonic() > deadline:
                    log.error(
                        "could not cancel a drain request: run pilotfish undrain",
                        container=container_id[:12],
                        error=describe(error),
                    )
                    return
            await asyncio.sleep(0.5)

    # --- recovery ---------------------------------------------------------------------------

    async def recover(self, plan: Recovery) -> Outcome:
        """Finish or undo one upgrade that was under way when the upgrader died."""
        new, old = plan.new, plan.old
        log.warning(
            "unfinished upgrade found", container=plan.base, action=plan.kind, reason=plan.reason
        )

        async def drop_new() -> None:
            if plan.brought_back:
                await self._put_back_previous(new.id, plan.base)
            else:
                await self._discard_new(new.id)

        if plan.kind == "finish":
            if not new.running:
                await self.engine.start(new.id)
            await self._finish(old.id if old else None, plan.base, new.id)
        elif plan.kind == "roll_back" and old is not None:
            await self._undrain(old.id)
            await drop_new()
        elif plan.kind == "remove_new" and old is not None:
            await self._undrain_quietly(old.id)
            await drop_new()
        elif plan.kind == "restore_old" and old is not None:
            await self.engine.start(old.id)
            await self._undrain_quietly(old.id)
            await drop_new()
        else:
            return Outcome(plan.base, "refused", plan.reason)
        return Outcome(plan.base, "recovered", f"{plan.kind}: {plan.reason}")
