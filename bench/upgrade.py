"""Upgrade benchmark: ``pilotfish upgrade`` (start-first) against watchtower's stop-then-start.

    .venv/bin/python bench/upgrade.py                 # ≈ 3 min on 2 cores
    .venv/bin/python bench/upgrade.py --rate 200 --load-seconds 30

Starts its own dockerd and etcd (tests/stack.py), a registrar and a
discoverer (with its HAProxy), and two services of three whoami instances
each, one in HTTP mode, one in TCP mode, on their own consumer ports. The
images carry a Docker HEALTHCHECK (an HTTP GET every second); the whoami
process drops its accepted connections on SIGTERM.

Runs, each under ``--rate`` requests/s per service from bench/load.py (a
new connection per request, a process of its own) for ``--load-seconds``:

- ``pilotfish``: a new image is tagged for both services, with
  ``pilotfish upgrade`` running: the time from the tag to all three
  instances of both services running it (``upgrade_s``), failed requests;
- ``baseline``: the same tag, then watchtower's method for each container in
  turn: stop it, remove it, run the new image under its name;
- ``rollback``: an image whose health check never passes is tagged:
  ``pilotfish upgrade`` starts it beside each instance, finds it unhealthy
  and removes it; ``rollback_failed`` counts what failed meanwhile.

A table, then the last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration"), str(REPO / "bench")]

from e2e import load_process  # noqa: E402
from e2e_kit import (  # noqa: E402
    Agent,
    discoverer_flags,
    fetch,
    free_port,
    registrar_flags,
    server_states,
    serving,
)
from upgrader_kit import HEALTHY, NEVER_HEALTHY, admin_get  # noqa: E402

from tests.stack import Dockerd, Etcd, image_id, make_base_dir, make_whoami_variant  # noqa: E402

RUN = uuid.uuid4().hex[:6]
LABEL = "pilotfish.bench"
HOST_ID = "bench"
INSTANCES = 3
MODES = ("http", "tcp")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Service:
    mode: str
    port: int
    tag: str  # pf-bench-<mode>:live
    names: list[str] = field(default_factory=list)

    def version(self, version: str) -> str:
        return self.tag.replace(":live", f":{version}")


class Bench:
    def __init__(self, engine: Dockerd, etcd: Etcd, root: Path, args: argparse.Namespace) -> None:
        self.engine = engine
        self.etcd = etcd
        self.root = root
        self.args = args
        self.prefix = f"/bench-{RUN}/upgrade"
        self.services = [Service(mode, free_port(), f"pf-bench-{mode}:live") for mode in MODES]
        self.agents: list[Agent] = []
        self.images: dict[str, str] = {}

    def docker(self, *args: str) -> str:
        return self.engine.docker(*args)

    async def adocker(self, *args: str) -> str:
        return await asyncio.to_thread(self.engine.docker, *args)

    # --- set-up -------------------------------------------------------------------------

    def make_images(self) -> None:
        for svc in self.services:
            for version, health in (("v1", HEALTHY), ("v2", HEALTHY), ("v3", HEALTHY),
                                    ("bad", NEVER_HEALTHY)):  # fmt: skip
                name = make_whoami_variant(self.engine, svc.version(version),
                                           f"ENV VERSION={version}", health)  # fmt: skip
                self.images[name] = image_id(self.engine, name)

    def start_agents(self) -> None:
        flags = registrar_flags(self.etcd.endpoint, self.prefix, HOST_ID,
                                self.engine.docker_host, self.engine.host_ip, 15)  # fmt: skip
        self.agents.append(Agent.start("registrar", "register", flags, self.root))
        state = self.root / "c"
        _, dflags = discoverer_flags(self.etcd.endpoint, self.prefix, state, "127.0.0.1",
                                     log_level="warning")  # fmt: skip
        self.agents.append(Agent.start("discoverer", "discover", dflags, self.root, str(state)))
        self.stats = str(dflags["stats_address"])

    def start_upgrader(self, name: str) -> tuple[Agent, str]:
        admin = f"127.0.0.1:{free_port()}"
        flags: dict[str, str | int | float | bool] = {
            "docker_host": self.engine.docker_host,
            "etcd_host": self.etcd.endpoint,
            "prefix": self.prefix,
            "admin_address": admin,
            "interval": 300,
            "health_timeout": 30,
            "drain_timeout": 10,
        }
        agent = Agent.start(name, "upgrade", flags, self.root)
        self.agents.append(agent)
        return agent, admin

    def point(self, svc: Service, version: str) -> None:
        self.docker("tag", svc.version(version), svc.tag)

    def run_container(self, svc: Service, name: str) -> None:
        labels = {
            "pilotfish.service": f"bench-{svc.mode}",
            "pilotfish.mode": svc.mode,
            "pilotfish.port": str(svc.port),
            "pilotfish.upgrade": "auto",
            LABEL: RUN,
        }
        args = [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]
        self.docker("run", "-d", "--name", name, *args, "-p", "8080", svc.tag)

    async def fresh_instances(self, version: str) -> None:
        """Three instances per service on ``version``; every other container removed."""
        with contextlib.suppress(Exception):
            ids = self.docker("ps", "-aq", "--filter", f"label={LABEL}={RUN}").split()
            if ids:
                self.docker("rm", "-f", *ids)
        for svc in self.services:
            self.point(svc, version)
            svc.names = [f"{svc.mode}-{i}-{RUN}" for i in range(INSTANCES)]
            for name in svc.names:
                self.run_container(svc, name)
        await self.until(self.all_routed, 90, "every instance routed")

    async def all_routed(self) -> bool:
        states = await server_states(self.stats) or {}
        up = [s for s, st in states.items() if serving(st)]
        if len(up) != INSTANCES * len(self.services):
            return False
        replies = [await fetch("127.0.0.1", svc.port) for svc in self.services]
        return all(r.ok for r in replies)

    async def until(self, check: Any, within: float, what: str) -> float:
        start = time.monotonic()
        while not await check():
            if time.monotonic() - start > within:
                raise RuntimeError(f"not true within {within}s: {what}")
            await asyncio.sleep(0.1)
        return time.monotonic() - start

    async def running_image(self, name: str) -> str | None:
        try:
            out = await self.adocker("inspect", "-f", "{{.Image}} {{.State.Running}}", name)
        except Exception:
            return None
        image, _, running = out.partition(" ")
        return image if running == "true" else None

    async def all_on(self, version: str) -> bool:
        for svc in self.services:
            wanted = self.images[svc.version(version)]
            for name in svc.names:
                if await self.running_image(name) != wanted:
                    return False
        return True

    # --- the runs -----------------------------------------------------------------------

    async def under_load(self, action: Any) -> tuple[dict[str, Any], Any]:
        """Run ``action()`` after 2 s of load on both services; the load's results too."""
        seconds = self.args.load_seconds
        loads = [
            asyncio.create_task(
                load_process(svc.port, self.args.rate, seconds, self.root / f"fail-{svc.mode}.json")
            )
            for svc in self.services
        ]
        await asyncio.sleep(2)
        outcome = await action()
        results = dict(zip(MODES, await asyncio.gather(*loads), strict=True))
        return results, outcome

    async def pilotfish_run(self, version: str) -> dict[str, Any]:
        agent, _admin = self.start_upgrader(f"upgrader-{version}")
        await asyncio.sleep(1.5)  # started: its first pass done (nothing to do)

        async def upgrade() -> float:
            tagged = time.monotonic()
            for svc in self.services:
                await self.adocker("tag", svc.version(version), svc.tag)
            await self.until(lambda: self.all_on(version), 120, f"all on {version}")
            return time.monotonic() - tagged

        loads, took = await self.under_load(upgrade)
        agent.stop()
        figures = _figures(loads, upgrade_s=round(took, 2))
        figures["steps_s"] = steps_of(agent.log_path)
        return figures

    async def baseline_run(self, version: str) -> dict[str, Any]:
        """Watchtower's method: stop, remove, run the new image under the same name."""

        async def stop_then_start() -> float:
            tagged = time.monotonic()
            for svc in self.services:
                await self.adocker("tag", svc.version(version), svc.tag)

            async def one_service(svc: Service) -> None:
                for name in svc.names:
                    await self.adocker("stop", name)
                    await self.adocker("rm", name)
                    await asyncio.to_thread(self.run_container, svc, name)

            await asyncio.gather(*(one_service(svc) for svc in self.services))
            return time.monotonic() - tagged

        loads, took = await self.under_load(stop_then_start)
        return _figures(loads, upgrade_s=round(took, 2))

    async def rollback_run(self) -> dict[str, Any]:
        agent, admin = self.start_upgrader("upgrader-bad")
        await asyncio.sleep(1.5)

        async def try_bad() -> float:
            tagged = time.monotonic()
            for svc in self.services:
                await self.adocker("tag", svc.version("bad"), svc.tag)

            async def all_failed() -> bool:
                _, body = await asyncio.to_thread(admin_get, admin, "/healthz")
                with contextlib.suppress(ValueError):
                    return len(json.loads(body).get("failed", [])) == INSTANCES * len(MODES)
                return False

            await self.until(all_failed, 120, "every instance's upgrade failed")
            return time.monotonic() - tagged

        loads, took = await self.under_load(try_bad)
        agent.stop()
        figures = _figures(loads, rolled_back_s=round(took, 2))
        return {
            "rollback_failed": figures["failed_http"] + figures["failed_tcp"],
            "rollback_total": figures["total_http"] + figures["total_tcp"],
            "rollback": figures,
        }


STEPS = ("started", "ready", "routed", "drained", "stopped", "renamed")


def steps_of(log_path: Path) -> dict[str, float]:
    """The median time each step of one replacement took (the upgrader's "replaced" lines)."""
    took: dict[str, list[float]] = {step: [] for step in STEPS}
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "replaced":
                before = 0.0
                for step in STEPS:
                    at = float(entry.get(f"{step}_s", before))
                    took[step].append(at - before)
                    before = at
    return {step: round(statistics.median(v), 3) for step, v in took.items() if v}


def _figures(loads: dict[str, dict[str, Any]], **extra: float) -> dict[str, Any]:
    figures: dict[str, Any] = dict(extra)
    for mode, result in loads.items():
        figures[f"failed_{mode}"] = result["failed"]
        figures[f"total_{mode}"] = result["total"]
        figures[f"why_{mode}"] = result["why"]
        figures[f"client_{mode}"] = result["client"]
    return figures


async def bench(engine: Dockerd, etcd: Etcd, root: Path, args: argparse.Namespace) -> Any:
    run = Bench(engine, etcd, root, args)
    try:
        log("building images, starting the registrar and the discoverer")
        await asyncio.to_thread(run.make_images)
        run.start_agents()
        await run.fresh_instances("v1")
        log(f"pilotfish upgrade v1 -> v2 under {args.rate} req/s per service")
        result = await run.pilotfish_run("v2")
        log(f"rollback: an image that never gets healthy ({result})")
        result.update(await run.rollback_run())
        log("baseline: stop then start, v1 -> v3")
        await run.fresh_instances("v1")
        result["baseline"] = await run.baseline_run("v3")
        return result
    finally:
        for agent in run.agents:
            agent.stop()


def table(result: dict[str, Any]) -> str:
    base = result["baseline"]
    rows = [
        ("", "pilotfish", "stop-then-start"),
        ("tag -> 3+3 replaced (s)", result["upgrade_s"], base["upgrade_s"]),
        ("failed HTTP", f"{result['failed_http']}/{result['total_http']}",
         f"{base['failed_http']}/{base['total_http']}"),
        ("failed TCP", f"{result['failed_tcp']}/{result['total_tcp']}",
         f"{base['failed_tcp']}/{base['total_tcp']}"),
        ("failed during rollback", f"{result['rollback_failed']}/{result['rollback_total']}", "-"),
    ]  # fmt: skip
    return "\n".join(f"{a:<26}{b!s:>16}{c!s:>18}" for a, b, c in rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s per service")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="load per run")
    parser.add_argument("--keep-logs", action="store_true")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = make_base_dir("bench")
    etcd_dir = Path(tempfile.mkdtemp(prefix="pfbench-etcd-", dir="/dev/shm"))
    engine, etcd = Dockerd.isolated(root, "d1"), Etcd(etcd_dir, "e0")
    ok = False
    try:
        log(f"starting dockerd ({engine.host_ip}) and etcd; logs in {root}")
        engine.start()
        etcd.start()
        began = time.monotonic()
        result = asyncio.run(bench(engine, etcd, root, args))
        result["rate"] = args.rate
        result["wall_s"] = round(time.monotonic() - began)
        print(table(result))
        print(json.dumps(result), flush=True)
        ok = True
    finally:
        teardown(engine, etcd, root, etcd_dir, keep=args.keep_logs or not ok)
    return 0


def teardown(engine: Dockerd, etcd: Etcd, root: Path, etcd_dir: Path, keep: bool) -> None:
    with contextlib.suppress(Exception):
        engine.remove_test_containers(f"{LABEL}={RUN}")
    for server in (engine, etcd):
        with contextlib.suppress(Exception):
            server.close()
    shutil.rmtree(etcd_dir, ignore_errors=True)
    if keep:
        logs = Path(f"/tmp/pfbench-logs-{RUN}")
        with contextlib.suppress(OSError):
            shutil.copytree(root, logs, ignore=shutil.ignore_patterns("*.sock", "d1"))
            log(f"agents' logs kept in {logs}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
