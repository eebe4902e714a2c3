"""End-to-end benchmark: pilotfish against the reload-based baseline, real Docker to HAProxy.

    .venv/bin/python bench/e2e.py            # full run (≈ 10 min on 2 cores)
    .venv/bin/python bench/e2e.py --quick    # reduced counts (≈ 3 min)

Starts its own dockerd and etcd (tests/stack.py) and, one system after the
other, against the same whoami containers:

- pilotfish: ``pilotfish register`` + ``pilotfish discover`` (its own HAProxy);
- baseline: bench/classic_register.py (docker-register: every container's
  key rewritten every 10 s with a 20 s TTL) + bench/baseline.py
  (docker-discover: poll every 5 s, re-render, reload).

Scenarios, per system:

- start → routable: ``docker start`` returned → first request through the
  consumer's HAProxy port answered by that container (fresh connection every
  ~1.5 ms for the first second, then every 10 ms, then 100 ms: the error is
  under 2 % of the latency measured). Each container is started into a service
  ("lane") of its own whose only other server has weight 0, so nothing but it
  can answer; 16 lanes let the slow baseline's samples overlap. Starts are
  0 to ``--max-gap`` s apart at random; each container then lives 0 to
  ``--hold`` s more before it is stopped.
- stop → gone: ``docker stop`` issued → its server no longer in
  ``show servers state`` of the consumer's HAProxy (stats socket in the state
  dir, polled every 2 ms while a stop is younger than 1 s, else every 20 ms).
- churn: ``--churn-seconds`` of load at ``--churn-rate`` req/s (a new
  connection each; failed: error, no answer in 2 s, not 200) on an HTTP-mode
  and a TCP-mode service at once, each load generator its own process, while
  each service is rolled every 5 s (start a new instance, wait 2 s, stop the
  oldest).
- CPU seconds and peak memory (VmHWM) of each agent and of its HAProxy.

A table, then the last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiodocker

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration"), str(REPO / "bench")]

from common import ProcWatch, ServerList, comm, in_rotation, percentiles  # noqa: E402
from e2e_kit import (  # noqa: E402
    PYTHON,
    Agent,
    discoverer_flags,
    fetch,
    free_port,
    pids_mentioning,
    registrar_flags,
    server_name,
)

from tests.stack import Dockerd, Etcd, make_base_dir, make_whoami_image  # noqa: E402

HOST_ID = "bench"  # both registrars use it, so both systems name servers alike
RUN = uuid.uuid4().hex[:8]
LABEL = "pilotfish.bench"
CHURN_INITIAL = 3
CHURN_EVERY = 5.0
CHURN_OVERLAP = 2.0
T = TypeVar("T")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the containers, shared by both systems --------------------------------------------------


@dataclass
class Lane:
    """A service of its own: an anchor (weight 0, never answers) plus one probe at a time."""

    port: int
    anchor: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class ChurnSet:
    mode: str
    port: int
    containers: list[str] = field(default_factory=list)  # started in this order


@dataclass
class Layout:
    lanes: list[Lane]
    probes: list[tuple[int, str]]  # (lane index, container id)
    churn: dict[str, ChurnSet]

    def always_on(self) -> list[str]:
        anchors = [lane.anchor for lane in self.lanes]
        return anchors + [c for s in self.churn.values() for c in s.containers[:CHURN_INITIAL]]


class Docker:
    """The engine's API (what ``docker create|start|stop`` send), without the CLI.

    The CLI's own start-up (~30 ms) would sit inside every stop measurement,
    and asyncio subprocesses were seen to hang on this machine.
    """

    def __init__(self, engine: Dockerd) -> None:
        self.engine = engine
        self.api = aiodocker.Docker(url=engine.docker_host)

    async def close(self) -> None:
        await self.api.close()

    async def create(self, service: str, port: int, mode: str, weight: int | None = None) -> str:
        labels = {
            LABEL: RUN,
            "pilotfish.service": service,
            "pilotfish.mode": mode,
            "pilotfish.port": str(port),
        }
        if weight is not None:
            labels["pilotfish.weight"] = str(weight)
        config = {
            "Image": self.engine.whoami,
            "Labels": labels,
            "ExposedPorts": {"8080/tcp": {}},
            # No HostIp: the engine's --ip (its HOST_IP), a random host port: "-p 8080".
            "HostConfig": {"PortBindings": {"8080/tcp": [{"HostPort": ""}]}},
        }
        async with asyncio.timeout(120):  # a wedged engine fails the run, never hangs it
            return str((await self.api.containers.create(config)).id)

    async def start(self, cid: str) -> None:
        async with asyncio.timeout(120):
            await self.api.containers.container(cid).start()

    async def stop(self, cid: str) -> None:
        async with asyncio.timeout(120):
            await self.api.containers.container(cid).stop(t=10)

    async def stop_all(self) -> None:
        mine = await self.api.containers.list(filters=json.dumps({"label": [f"{LABEL}={RUN}"]}))
        await bounded([self.stop(c.id) for c in mine])


async def bounded(calls: list[Awaitable[T]], limit: int = 4) -> list[T]:
    sem = asyncio.Semaphore(limit)

    async def one(call: Awaitable[T]) -> T:
        async with sem:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def make_layout(docker: Docker, args: argparse.Namespace) -> Layout:
    lanes = [Lane(free_port()) for _ in range(args.lanes)]
    anchors = await bounded(
        [docker.create(f"lane{i}", lane.port, "http", weight=0) for i, lane in enumerate(lanes)]
    )
    for lane, anchor in zip(lanes, anchors, strict=True):
        lane.anchor = anchor
    which = [i % args.lanes for i in range(args.samples)]
    probes = await bounded([docker.create(f"lane{i}", lanes[i].port, "http") for i in which])
    churn = {mode: ChurnSet(mode, free_port()) for mode in ("http", "tcp")}
    per_set = CHURN_INITIAL + int(args.churn_seconds // CHURN_EVERY) + 1
    for mode, cset in churn.items():
        creates = [docker.create(f"churn{mode}", cset.port, mode) for _ in range(per_set)]
        cset.containers = await bounded(creates)
    return Layout(lanes, list(zip(which, probes, strict=True)), churn)


# --- the two systems -------------------------------------------------------------------------


@dataclass
class System:
    name: str
    agents: list[Agent]
    state_dir: Path
    watch: ProcWatch

    def stop(self) -> dict[str, dict[str, float]]:
        usage = self.watch.stop()
        for agent in self.agents:
            agent.stop()
        return usage

    def check_alive(self) -> None:
        for agent in self.agents:
            if not agent.alive():
                raise RuntimeError(f"{agent.name} exited\n{agent.tail()}")


def _haproxy_of(state_dir: Path) -> Callable[[], list[int]]:
    return lambda: [p for p in pids_mentioning(str(state_dir)) if comm(p).startswith("haproxy")]


def _watch(groups: dict[str, Agent], state_dir: Path) -> ProcWatch:
    watch = ProcWatch()
    for name, agent in groups.items():
        watch.add(name, lambda a=agent: [a.pid] if a.alive() else [])
    watch.add("haproxy", _haproxy_of(state_dir))
    return watch.start()


def start_pilotfish(engine: Dockerd, etcd_host: str, root: Path) -> System:
    prefix, state = f"/bench-{RUN}/pilotfish", root / "pf"
    flags = registrar_flags(etcd_host, prefix, HOST_ID, engine.docker_host, engine.host_ip, 15)
    registrar = Agent.start("registrar", "register", flags, root)
    _, dflags = discoverer_flags(etcd_host, prefix, state, "127.0.0.1", log_level="warning")
    discoverer = Agent.start("discoverer", "discover", dflags, root, marker=str(state))
    watch = _watch({"registrar": registrar, "discoverer": discoverer}, state)
    return System("pilotfish", [registrar, discoverer], state, watch)


def start_baseline(engine: Dockerd, etcd_host: str, root: Path) -> System:
    prefix, state = f"/bench-{RUN}/classic", root / "bl"
    state.mkdir(parents=True, exist_ok=True)
    register = Agent("classic_register", [
        PYTHON, str(REPO / "bench" / "classic_register.py"), "--docker-host", engine.docker_host,
        "--etcd-host", etcd_host, "--prefix", prefix, "--host-ip", engine.host_ip,
        "--host-id", HOST_ID,
    ], root / "classic_register.log")  # fmt: skip
    poller = Agent("baseline", [
        PYTHON, str(REPO / "bench" / "baseline.py"), "--etcd-host", etcd_host,
        "--prefix", prefix, "--state-dir", str(state), "--bind-address", "127.0.0.1",
        "--check-all",
    ], root / "baseline.log", marker=str(state))  # fmt: skip
    for agent in (register, poller):
        agent.spawn()
    watch = _watch({"classic_register": register, "baseline": poller}, state)
    return System("baseline", [register, poller], state, watch)


# --- HAProxy's server list, polled once for every waiter -------------------------------------


@dataclass
class Waiter:
    since: float
    drained: asyncio.Future[float]  # out of rotation: no new connections
    gone: asyncio.Future[float]  # no longer in the server list


class GoneWatch:
    """Resolves ``wait(name)`` as ``name`` leaves rotation, then ``show servers state``.

    One poller for all waiters: every 2 ms while some wait is younger than
    1 s, else every 20 ms (the baseline's waits last seconds).
    """

    def __init__(self, servers: ServerList) -> None:
        self.servers = servers
        self.waiters: dict[str, Waiter] = {}
        self.task = asyncio.create_task(self._run())

    async def wait(self, name: str, since: float, within: float) -> tuple[float, float] | None:
        """Milliseconds from ``since`` until drained and until gone; None on timeout."""
        loop = asyncio.get_running_loop()
        waiter = self.waiters[name] = Waiter(since, loop.create_future(), loop.create_future())
        try:
            async with asyncio.timeout(within):
                return await waiter.drained, await waiter.gone
        except TimeoutError:
            return None
        finally:
            self.waiters.pop(name, None)

    async def _run(self) -> None:
        while True:
            states = await self.servers.states() if self.waiters else None
            now = time.monotonic()
            for name, waiter in list(self.waiters.items()):
                if states is not None:
                    took = (now - waiter.since) * 1000
                    _resolve(waiter.drained, took, not in_rotation(states.get(name)))
                    _resolve(waiter.gone, took, name not in states)
            young = any(now - w.since < 1.0 for w in self.waiters.values())
            await asyncio.sleep(0.002 if young else 0.02)

    def close(self) -> None:
        self.task.cancel()


def _resolve(future: asyncio.Future[float], value: float, condition: bool) -> None:
    if condition and not future.done():
        future.set_result(value)


# --- scenario: start → routable, stop → gone -------------------------------------------------


def _poll_interval(elapsed: float) -> float:
    return 0.0015 if elapsed < 1.0 else 0.01 if elapsed < 5.0 else 0.1


async def start_to_routable(docker: Docker, port: int, cid: str, within: float) -> float | None:
    await docker.start(cid)
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < within:
        if (await fetch("127.0.0.1", port, within=1.0)).body == cid[:12]:
            return (time.monotonic() - started) * 1000
        await asyncio.sleep(_poll_interval(elapsed))
    return None


async def stop_to_gone(
    docker: Docker, gone: GoneWatch, cid: str, within: float
) -> tuple[float, float, float] | None:
    """(drained, gone, ``docker stop`` returned) in ms after the stop was issued."""
    issued = time.monotonic()
    returned: list[float] = []
    stopping = asyncio.create_task(docker.stop(cid))
    stopping.add_done_callback(lambda _: returned.append(time.monotonic()))
    took = await gone.wait(server_name(HOST_ID, cid), issued, within)
    await stopping
    return None if took is None else (*took, (returned[0] - issued) * 1000)


@dataclass
class Samples:
    start_ms: list[float] = field(default_factory=list)
    drained_ms: list[float] = field(default_factory=list)
    stop_ms: list[float] = field(default_factory=list)
    docker_stop_ms: list[float] = field(default_factory=list)
    timeouts: int = 0

    def add(self, started: float | None, stopped: tuple[float, float, float] | None) -> None:
        if started is not None:
            self.start_ms.append(started)
        if stopped is not None:
            drained, gone, docker_stop = stopped
            self.drained_ms.append(drained)
            self.stop_ms.append(gone)
            self.docker_stop_ms.append(docker_stop)
        self.timeouts += (started is None) + (stopped is None)


async def lanes_scenario(
    docker: Docker, system: System, layout: Layout, args: argparse.Namespace
) -> Samples:
    rng = random.Random(args.seed)
    samples = Samples()
    gone = GoneWatch(ServerList(system.state_dir))
    within = args.timeout

    async def one(lane: Lane, cid: str, at: float, hold: float) -> None:
        await asyncio.sleep(at)
        async with lane.lock:  # the lane's previous probe is gone from HAProxy
            started = await start_to_routable(docker, lane.port, cid, within)
            # A random life: stopping right after routable would put every stop at
            # the same phase of the baseline's 10 s refresh (its result: always 20 s).
            await asyncio.sleep(hold)
            stopped = await stop_to_gone(docker, gone, cid, within)
        samples.add(started, stopped)

    at, tasks = 0.0, []
    for index, cid in layout.probes:
        tasks.append(one(layout.lanes[index], cid, at, rng.uniform(0, args.hold)))
        at += rng.uniform(0, args.max_gap)
    try:
        await asyncio.gather(*tasks)
    finally:
        gone.close()
    return samples


# --- scenario: churn under load --------------------------------------------------------------


async def load_process(port: int, rate: float, duration: float) -> dict[str, Any]:
    argv = [PYTHON, str(REPO / "bench" / "common.py"), "load", "--port", str(port),
            "--rate", str(rate), "--duration", str(duration)]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=duration + 60
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def roll(docker: Docker, cset: ChurnSet, seconds: float) -> int:
    """Every 5 s: start the next instance, 2 s later stop the oldest one running."""
    running = list(cset.containers[:CHURN_INITIAL])
    spare = iter(cset.containers[CHURN_INITIAL:])
    began, rolled = time.monotonic(), 0
    while time.monotonic() - began + CHURN_EVERY + CHURN_OVERLAP <= seconds:
        await asyncio.sleep(max(0.0, began + (rolled + 1) * CHURN_EVERY - time.monotonic()))
        fresh = next(spare)
        await docker.start(fresh)
        running.append(fresh)
        await asyncio.sleep(CHURN_OVERLAP)
        await docker.stop(running.pop(0))
        rolled += 1
    return rolled


async def churn_scenario(
    docker: Docker, layout: Layout, args: argparse.Namespace
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode, cset in layout.churn.items():
        load = load_process(cset.port, args.churn_rate, args.churn_seconds)
        results[mode] = asyncio.gather(load, roll(docker, cset, args.churn_seconds))
    for mode in list(results):
        load_result, rolled = await results[mode]
        results[mode] = {**load_result, "replacements": rolled}
    return results


# --- one system, start to finish -------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready within {within}s: {what}")
        await asyncio.sleep(0.1)


async def ready(system: System, layout: Layout) -> bool:
    system.check_alive()
    names = (await ServerList(system.state_dir).states() or {}).keys()
    if not {server_name(HOST_ID, c) for c in layout.always_on()} <= names:
        return False
    lanes = [await fetch("127.0.0.1", lane.port) for lane in layout.lanes]
    churn = [await fetch("127.0.0.1", s.port) for s in layout.churn.values()]
    return all(r.status == 503 for r in lanes) and all(r.ok for r in churn)


async def run_system(
    start: Callable[[], System], docker: Docker, layout: Layout, args: argparse.Namespace
) -> dict[str, Any]:
    await bounded([docker.start(c) for c in layout.always_on()])
    system = start()
    name = system.name
    try:
        await until(lambda: ready(system, layout), 120, f"{name}: every initial server routed")
        log(f"{name}: ready; start/stop of {len(layout.probes)} containers")
        samples = await lanes_scenario(docker, system, layout, args)
        log(f"{name}: churn, {args.churn_seconds:.0f} s at {args.churn_rate:.0f} req/s")
        churn = await churn_scenario(docker, layout, args)
        system.check_alive()
    finally:
        usage = system.stop()
        await docker.stop_all()
    return {
        "start_to_routable_ms": percentiles(samples.start_ms),
        "stop_to_gone_ms": percentiles(samples.stop_ms),
        "stop_to_drained_ms": percentiles(samples.drained_ms),
        "docker_stop_ms": percentiles(samples.docker_stop_ms),
        "samples": len(samples.start_ms),
        "timeouts": samples.timeouts,
        "churn_http": churn["http"],
        "churn_tcp": churn["tcp"],
        "cpu_s": {agent: u["cpu_s"] for agent, u in usage.items()},
        "peak_rss_mb": {agent: u["peak_rss_mb"] for agent, u in usage.items()},
    }


# --- report ----------------------------------------------------------------------------------


def _ratio(base: float | None, ours: float | None) -> str:
    if not base or not ours:
        return "-"
    return f"{base / ours:.0f}x" if base / ours >= 10 else f"{base / ours:.1f}x"


def table(result: dict[str, Any]) -> str:
    base = result.get("baseline", {})
    rows = [f"{'metric':<30}{'pilotfish':>12}{'baseline':>12}{'ratio':>8}  goal"]
    goals = {("start_to_routable_ms", "p50"): "≤ 25", ("start_to_routable_ms", "p99"): "≤ 100",
             ("stop_to_gone_ms", "p99"): "≤ 100"}  # fmt: skip
    for key in ("start_to_routable_ms", "stop_to_gone_ms", "stop_to_drained_ms", "docker_stop_ms"):
        for stat in ("p50", "p90", "p99", "max"):
            ours, theirs = result.get(key, {}).get(stat), base.get(key, {}).get(stat)
            rows.append(f"{key + ' ' + stat:<30}{ours!s:>12}{theirs!s:>12}"
                        f"{_ratio(theirs, ours):>8}  {goals.get((key, stat), '')}")  # fmt: skip
    for key in ("churn_http", "churn_tcp"):
        ours, theirs = result.get(key, {}), base.get(key, {})
        rows.append(f"{key + ' failed/total':<30}{_frac(ours):>12}{_frac(theirs):>12}{'':>8}"
                    f"  {'0' if key == 'churn_http' else ''}")  # fmt: skip
    for what in ("cpu_s", "peak_rss_mb"):
        for agent in {**result.get(what, {}), **base.get(what, {})}:
            ours = result.get(what, {}).get(agent, "")
            theirs = base.get(what, {}).get(agent, "")
            rows.append(f"{what + ' ' + agent:<30}{ours!s:>12}{theirs!s:>12}")
    return "\n".join(rows)


def _frac(churn: dict[str, Any]) -> str:
    return f"{churn['failed']}/{churn['total']}" if churn else "-"


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=50, help="containers started and stopped")
    parser.add_argument("--lanes", type=int, default=16, help="services the samples rotate over")
    parser.add_argument("--max-gap", type=float, default=5.0, help="seconds between starts, max")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds up, max (random)")
    parser.add_argument("--churn-seconds", type=float, default=60.0)
    parser.add_argument("--churn-rate", type=float, default=200.0, help="requests/s per service")
    parser.add_argument("--timeout", type=float, default=60.0, help="per start/stop sample")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--systems", default="pilotfish,baseline", help="which to run, in order")
    parser.add_argument("--keep-logs", action="store_true", help="keep agents' logs on success")
    parser.add_argument("--quick", action="store_true",
                        help="8 samples over 4 lanes, 2 s gaps and holds, 20 s churn")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.samples, args.lanes, args.max_gap, args.churn_seconds = 8, 4, 2.0, 20.0
        args.hold = 2.0
    return args


async def bench(engine: Dockerd, etcd_host: str, root: Path, args: argparse.Namespace) -> Any:
    docker = Docker(engine)
    systems = {
        "pilotfish": lambda: start_pilotfish(engine, etcd_host, root),
        "baseline": lambda: start_baseline(engine, etcd_host, root),
    }
    result: dict[str, Any] = {}
    try:
        log("creating containers")
        layout = await make_layout(docker, args)
        for name in args.systems.split(","):
            measured = await run_system(systems[name], docker, layout, args)
            if name == "pilotfish":
                result.update(measured)
            else:
                result[name] = measured
    finally:
        await docker.close()
    return result


def main() -> int:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so the finally below tears everything down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = make_base_dir("bench")
    etcd_dir = Path(tempfile.mkdtemp(prefix="pfbench-etcd-", dir="/dev/shm"))
    engine, etcd = Dockerd.isolated(root, "d1"), Etcd(etcd_dir, "e0")
    ok = False
    try:
        log(f"starting dockerd ({engine.host_ip}) and etcd; logs in {root}")
        engine.start()
        etcd.start()
        make_whoami_image(engine)
        began = time.monotonic()
        result = asyncio.run(bench(engine, etcd.endpoint, root, args))
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
