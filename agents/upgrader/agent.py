"""``pilotfish upgrade``: replace containers whose tag moved, start-first.

A pass reads every container from Docker, finishes or undoes upgrades a
killed upgrader left behind (:func:`plan.recover`), then compares each
opted-in container's image with the image its tag names now
(:func:`plan.decide`) and replaces the ones that differ (:mod:`replace`).
Copies of one image are replaced one at a time; different images in
parallel. Passes run on an image event (tag, pull, load, import), after every
(re)connection to Docker, and every ``--interval``; with ``--pull`` a pass
first asks each tag's registry for its digest and pulls what moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agents.common.access import checked, ensure_access
from agents.common.admin import AdminServer
from agents.common.backoff import Backoff
from agents.common.docker_events import DockerSource, DockerUnavailable, ImageEvent
from agents.common.etcd import Etcd, EtcdError
from agents.common.logging import OnceEvery, describe, get_logger
from agents.common.settings import UpgraderSettings
from agents.common.systemd import notify, watchdog_loop
from agents.registrar.agent import _until_stopped
from agents.upgrader import plan
from agents.upgrader.docker import DockerRefused, Engine, container_of
from agents.upgrader.replace import Outcome, Replacer, StepFailed

log = get_logger("pilotfish.upgrader")
MAX_LISTED = 100


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ns = "pilotfish_upgrader"
        self.upgrades = Counter(
            f"{ns}_upgrades", "Replacements by result", ["result"], registry=self.registry
        )
        self.passes = Counter(
            f"{ns}_passes",
            "Passes over the containers, by trigger",
            ["trigger"],
            registry=self.registry,
        )
        self.failed_images = Gauge(
            f"{ns}_failed_images",
            "Images that failed and wait for their tag to move",
            registry=self.registry,
        )
        self.refusals = Counter(f"{ns}_refusals", "Labels refused", registry=self.registry)
        self.seconds = Histogram(
            f"{ns}_upgrade_seconds",
            "From the start of a replacement to the new copy bearing the name",
            buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )
        for result in ("upgraded", "failed", "recovered", "rolled back"):
            self.upgrades.labels(result)


class Upgrader:
    def __init__(
        self,
        settings: UpgraderSettings,
        source: DockerSource,
        etcd: Etcd,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.source = source
        self.engine = Engine(source)
        self.replacer = Replacer(settings, self.engine, etcd)
        self.metrics = metrics
        # container name -> image id that failed for it (until the tag moves on)
        self.failed: dict[str, str] = {}
        self.failure_reasons: dict[str, str] = {}
        self.in_progress: set[str] = set()
        self.last_pass_error = ""
        self._refused: dict[str, str] = {}
        self._registry_quiet = OnceEvery(300.0)
        self._wake = asyncio.Event()
        self._triggers: set[str] = set()
        self._lanes: dict[str, asyncio.Task[list[Outcome]]] = {}
        self._recover_pending = True
        self.ready = asyncio.Event()

    # --- one pass ---------------------------------------------------------------------------

    async def run_pass(self, *, dry_run: bool = False, wait: bool = True) -> list[Outcome]:
        """Recover, decide, replace. Raises DockerUnavailable when Docker is away.

        Each lane (the copies of one image) is a task of its own: with
        ``wait=False`` (the daemon) the pass returns once they are started, a
        lane still busy is left alone, and a lane that ends asks for a pass.
        """
        containers = [container_of(doc) for doc in await self.engine.all_containers()]
        outcomes: list[Outcome] = []
        recoveries: list[plan.Recovery] = []
        if self._recover_pending or dry_run:
            # Only at the start and after an interruption: later, a
            # <name>.pilotfish-next may be another process's (a --rollback) at work.
            recoveries = [r for r in plan.recover(containers) if r.base not in self.in_progress]
            self._recover_pending = dry_run
        if dry_run:
            for recovery in recoveries:
                print(f"would {recovery.kind.replace('_', ' ')} {recovery.base}: {recovery.reason}")
        else:
            for recovery in recoveries:
                outcomes.append(await self._recover(recovery))
            if recoveries:
                containers = [container_of(doc) for doc in await self.engine.all_containers()]
        busy = [c for c in containers if plan.lane_of(c) in self._lanes]
        decisions = await self._decide([c for c in containers if c not in busy], dry_run=dry_run)
        if dry_run:
            for decision in decisions:
                verb = {"upgrade": "would upgrade", "current": "current"}.get(
                    decision.verdict, decision.verdict
                )
                print(f"{verb} {decision.container.name}: {decision.reason}")
            return outcomes
        lanes: dict[str, list[plan.Decision]] = {}
        for decision in decisions:
            if decision.verdict == "upgrade":
                lanes.setdefault(plan.lane_of(decision.container), []).append(decision)
        tasks = [self._start_lane(lane, queued) for lane, queued in lanes.items()]
        if wait:
            for lane_outcomes in await asyncio.gather(*tasks):
                outcomes.extend(lane_outcomes)
        return outcomes

    def _start_lane(self, lane: str, decisions: list[plan.Decision]) -> asyncio.Task[list[Outcome]]:
        task = asyncio.create_task(self._lane(decisions))
        self._lanes[lane] = task

        def done(_task: asyncio.Task[list[Outcome]]) -> None:
            self._lanes.pop(lane, None)
            self.trigger("lane done")  # what changed meanwhile in this lane

        task.add_done_callback(done)
        return task

    async def close(self) -> None:
        """Stop the lanes (an upgrade cut short is finished or undone at the next start)."""
        lanes = list(self._lanes.values())
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)

    async def _decide(
        self, containers: list[plan.Container], *, dry_run: bool
    ) -> list[plan.Decision]:
        by_name = {c.name: c for c in containers}
        tags: dict[str, str | None] = {}
        decisions = []
        for container in containers:
            ref = container.image_ref
            if ref not in tags and plan.follows_a_tag(ref) and self._candidate(container):
                tags[ref] = await self._tag_image(ref, dry_run=dry_run)
            previous = by_name.get(container.name + plan.PREVIOUS_SUFFIX)
            decision = plan.decide(
                container,
                tags.get(ref),
                all_containers=self.settings.all,
                failed=self.failed,
                previous_image=previous.image_id if previous else None,
            )
            if decision is None:
                continue
            if decision.verdict == "refused":
                self._refuse(container, decision.reason)
            elif decision.verdict == "skip":
                self._skip(container, decision.reason)
            decisions.append(decision)
        return decisions

    def _candidate(self, container: plan.Container) -> bool:
        opted = container.labels.get(plan.LABEL)
        return container.running and (opted == "auto" or (self.settings.all and opted != "off"))

    async def _tag_image(self, ref: str, *, dry_run: bool) -> str | None:
        """The image id the tag names; with --pull, after pulling it if its registry moved."""
        if self.settings.pull and not dry_run:
            await self._pull_if_moved(ref)
        image = await self.engine.image(ref)
        return str(image["Id"]) if image else None

    async def _pull_if_moved(self, ref: str) -> None:
        try:
            digest = await self.engine.registry_digest(ref)
            local = await self.engine.image(ref)
            known = [str(d) for d in (local or {}).get("RepoDigests") or []]
            if digest and not any(d.endswith("@" + digest) for d in known):
                log.info("registry digest moved, pulling", image=ref, digest=digest)
                await self.engine.pull(ref)
        except DockerRefused as error:
            if self._registry_quiet.should_log(ref):
                log.warning(
                    "registry not asked (comparing local images only)", image=ref, error=str(error)
                )

    def _refuse(self, container: plan.Container, reason: str) -> None:
        if self._refused.get(container.id) != reason:
            self._refused[container.id] = reason
            self.metrics.refusals.inc()
            log.warning(
                "label refused",
                container=container.name,
                container_id=container.id[:12],
                reason=reason,
            )

    def _skip(self, container: plan.Container, reason: str) -> None:
        if self._refused.get(container.id) != reason:
            self._refused[container.id] = reason
            log.info("not upgraded", container=container.name, reason=reason)

    async def _lane(self, decisions: list[plan.Decision]) -> list[Outcome]:
        outcomes = []
        for decision in decisions:
            try:
                outcomes.append(await self._replace(decision))
            except (DockerUnavailable, EtcdError) as error:
                # Not the image's fault: Docker's state tells the next pass what to finish.
                name = decision.container.name
                log.warning("upgrade interrupted", container=name, error=describe(error))
                self._recover_pending = True
                outcomes.append(Outcome(name, "interrupted", describe(error)))
                break
        return outcomes

    async def _replace(self, decision: plan.Decision) -> Outcome:
        container = decision.container
        self.in_progress.add(container.name)
        try:
            outcome = await self.replacer.upgrade(
                container, decision.reason, stop_first=decision.order == "stop-first"
            )
        except (StepFailed, DockerRefused) as error:
            self._recover_pending = True  # a step that failed late may have left a copy
            return self._failed(container, decision.target_image, describe(error))
        finally:
            self.in_progress.discard(container.name)
        self.failed.pop(container.name, None)
        self.failure_reasons.pop(container.name, None)
        self.metrics.failed_images.set(len(self.failed))
        self.metrics.upgrades.labels("upgraded").inc()
        self.metrics.seconds.observe(outcome.seconds)
        log.info(
            "upgraded",
            container=container.name,
            seconds=round(outcome.seconds, 3),
            reason=outcome.detail,
        )
        return outcome

    def _failed(self, container: plan.Container, image: str, why: str) -> Outcome:
        self.failed[container.name] = image
        self.failure_reasons[container.name] = why
        self.metrics.failed_images.set(len(self.failed))
        self.metrics.upgrades.labels("failed").inc()
        log.error(
            "upgrade failed, the old copy keeps serving",
            container=container.name,
            image=image,
            error=why,
        )
        return Outcome(container.name, "failed", why)

    async def _recover(self, recovery: plan.Recovery) -> Outcome:
        try:
            outcome = await self.replacer.recover(recovery)
        except (StepFailed, DockerRefused) as error:
            log.error(
                "could not recover an unfinished upgrade",
                container=recovery.base,
                error=describe(error),
            )
            return Outcome(recovery.base, "failed", describe(error))
        if outcome.result == "refused":
            log.warning(
                "unfinished upgrade left alone", container=recovery.base, reason=recovery.reason
            )
        else:
            self.metrics.upgrades.labels("recovered").inc()
        return outcome

    async def rollback(self, name: str) -> Outcome:
        containers = [container_of(doc) for doc in await self.engine.all_containers()]
        for recovery in plan.recover(containers):
            await self._recover(recovery)
        try:
            outcome = await self.replacer.rollback(name)
        except (StepFailed, DockerRefused) as error:
            log.error(
                "rollback failed, the current copy keeps serving",
                container=name,
                error=describe(error),
            )
            return Outcome(name, "failed", describe(error))
        self.metrics.upgrades.labels("rolled back").inc()
        log.info("rolled back", container=name, seconds=round(outcome.seconds, 3))
        return outcome

    # --- the daemon ---------------------------------------------------------------------------

    def trigger(self, why: str) -> None:
        self._triggers.add(why)
        self._wake.set()

    async def watch_docker(self) -> None:
        async with contextlib.aclosing(self.source.stream()) as stream:
            async for item in stream:
                if isinstance(item, ImageEvent):
                    log.debug("image event", action=item.action, name=item.name)
                    self.trigger("image event")
                else:
                    self.trigger("docker (re)connected")

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            self.trigger("interval")

    async def work(self) -> None:
        backoff = Backoff(initial=0.5, maximum=10.0)
        quiet = OnceEvery(60.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            triggers, self._triggers = self._triggers, set()
            for trigger in triggers:
                self.metrics.passes.labels(trigger).inc()
            try:
                await self.run_pass(wait=False)
                if not self.ready.is_set():
                    self.ready.set()
                    notify("READY=1")  # systemd: up once the first pass has looked
                self.last_pass_error = ""
                backoff.reset()
                if quiet.clear("pass"):
                    log.info("passes work again")
            except (DockerUnavailable, EtcdError) as error:
                self.last_pass_error = describe(error)
                self._recover_pending = True
                if quiet.should_log("pass"):
                    log.warning("pass interrupted, retrying", error=describe(error))
                await backoff.wait()
                self.trigger("retry")

    def health(self) -> tuple[bool, dict[str, object]]:
        etcd_error = self.replacer.etcd_error
        ok = self.source.connected and not etcd_error
        failed = [
            {"container": name, "image": image, "error": self.failure_reasons.get(name, "")}
            for name, image in sorted(self.failed.items())
        ]
        details: dict[str, object] = {
            "docker": {"connected": self.source.connected, "error": self.source.last_error},
            "etcd": {"ok": not etcd_error, "error": etcd_error},
            "in_progress": sorted(self.in_progress),
            "failed": failed[:MAX_LISTED],
            "refused": [
                {"container": cid[:12], "reason": reason}
                for cid, reason in sorted(self._refused.items())
            ][:MAX_LISTED],
            "last_pass_error": self.last_pass_error,
        }
        return ok, details


async def serve(settings: UpgraderSettings, stop: asyncio.Event) -> int:
    """Run until ``stop``; or one pass / one rollback. The exit code."""
    metrics = Metrics()
    async with (
        Etcd(settings) as etcd,
        DockerSource(settings.docker_host, event_types=("image",)) as source,
    ):
        upgrader = Upgrader(settings, source, etcd, metrics)
        if settings.dry_run:
            return await _one_pass(upgrader, dry_run=True)
        # The registrar's user (drain requests, registrations): refused rights
        # end the command with one line and exit 2. Proven beside the work, not
        # before it: etcd away is the work's own failure to report.
        access = ensure_access(etcd, "upgrader", [settings.prefix])
        if settings.rollback:
            return _code([await checked(access, upgrader.rollback(settings.rollback))])
        if settings.once:
            return await checked(access, _one_pass(upgrader, dry_run=False))
        admin = AdminServer(settings.admin_address, upgrader.health, metrics.registry)
        await admin.start()
        log.info(
            "upgrader started",
            all=settings.all,
            pull=settings.pull,
            interval=settings.interval,
            docker=settings.docker_host,
            etcd=etcd.target,
        )
        try:
            await _until_stopped(
                stop,
                upgrader.watch_docker(),
                upgrader.tick(),
                checked(access, upgrader.work()),
                watchdog_loop(lambda: upgrader.health()[0]),
            )
        finally:
            await upgrader.close()
            await admin.stop()
    log.info("upgrader stopped")
    return 0


async def _one_pass(upgrader: Upgrader, *, dry_run: bool) -> int:
    try:
        outcomes = await upgrader.run_pass(dry_run=dry_run)
    except (DockerUnavailable, EtcdError) as error:
        print(f"pilotfish upgrade: {describe(error)}", file=sys.stderr)
        return 1
    return _code(outcomes)


def _code(outcomes: Iterable[Outcome]) -> int:
    return 1 if any(o.result in ("failed", "interrupted") for o in outcomes) else 0


def run(settings: UpgraderSettings) -> int:
    """The command's entry point (agents/cli.py): the exit code."""
    from agents.common.runner import run_until_signal

    code = 0

    async def main(stop: asyncio.Event) -> None:
        nonlocal code
        code = await serve(settings, stop)

    started = time.monotonic()
    asyncio.run(run_until_signal(main))
    log.debug("upgrader exiting", seconds=round(time.monotonic() - started, 3), code=code)
    return code
