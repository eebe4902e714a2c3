"""End-to-end benchmark: pilotfish against the reload-based baseline, real Docker to HAProxy.

    .venv/bin/python bench/e2e.py            # full run (≈ 12 min on 2 cores)
    .venv/bin/python bench/e2e.py --quick    # reduced counts (≈ 4 min)
    .venv/bin/python bench/e2e.py --samples 0 --systems pilotfish   # churn only

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
  connection each; failed: error, no whole answer in 2 s, not 200) on an
  HTTP-mode and a TCP-mode service at once, each load generator its own
  process (bench/load.py), while each service is rolled every 5 s (start a
  new instance, wait 2 s, stop the oldest); then the same again beside
  ``stress-ng --cpu 0`` (a CPU hog per core, bounded by ``--timeout``):
  ``churn_http``, ``churn_tcp``, ``churn_http_loaded``, ``churn_tcp_loaded``.
  pilotfish stops the oldest the way its upgrader does: ``pilotfish drain
  --wait --idle`` (every discoverer applied it, no session left), then the
  stop signal; ``churn_*_signal`` is the same churn with the stop signal
  alone (``--churn-stop``). The baseline has no drain: the signal alone.
  Each failure is counted against the ``client`` (its own lag: the answer
  was there in time), the ``server`` (HAProxy had the request on a server in
  time, the server answered too late) or the ``proxy`` (the rest), see
  bench/load.py and ``split_by_haproxy``; beside it the client's lag,
  HAProxy's retry and error counters, and for every stop how long the server
  stayed in rotation and how many connections it got meanwhile.
- CPU seconds and peak memory (VmHWM) of each agent and of its HAProxy.

A table, then the last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiodocker

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration"), str(REPO / "bench")]

from common import ProcWatch, ServerList, _command, comm, in_rotation, percentiles  # noqa: E402
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

from agents.common.settings import DrainSettings  # noqa: E402
from agents.registrar import drain_command  # noqa: E402
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
class Rolling:
    """One system's pass over a churn set: who runs now, who is started next."""

    running: list[str]
    spare: list[str]

    @classmethod
    def of(cls, cset: ChurnSet) -> Rolling:
        return cls(list(cset.containers[:CHURN_INITIAL]), list(cset.containers[CHURN_INITIAL:]))


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
    # Enough fresh instances for every churn run.
    per_set = CHURN_INITIAL + churn_count(args) * (int(args.churn_seconds // CHURN_EVERY) + 1)
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
    # How this system takes a container out before its stop signal (None: it cannot).
    drain: Callable[[str], Awaitable[bool]] | None = None

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


def request_log(system: System, args: argparse.Namespace) -> Path | None:
    """Where this system's HAProxy logs each request (None: it does not)."""
    if not args.haproxy_log or (system.name == "pilotfish" and args.template):
        return None
    if system.name == "pilotfish":
        return system.state_dir / "haproxy.log"  # the discoverer sends HAProxy's output there
    return system.state_dir.parent / "baseline.log"  # its HAProxy inherits the agent's output


def logging_template(root: Path) -> Path:
    """The built-in template plus a log line per request (HAProxy's timers) on its stdout.

    Only these lines differ from the built-in template: the failures that
    HAProxy's timers pin on a slow server are counted as ``server``
    (``split_by_haproxy``). ``--no-haproxy-log`` runs the built-in one as is.
    """
    source = (REPO / "agents" / "discoverer" / "templates" / "haproxy.cfg.j2").read_text()
    source = source.replace("global\n", "global\n    log stdout format raw local0\n", 1)
    source = source.replace(
        "    default_backend {{ service.name }}\n",
        "    log global\n"
        "    option {{ 'httplog' if service.mode == 'http' else 'tcplog' }}\n"
        "    default_backend {{ service.name }}\n",
    )
    path = root / "haproxy-logging.cfg.j2"
    path.write_text(source)
    return path


def start_pilotfish(
    engine: Dockerd, etcd_host: str, root: Path, args: argparse.Namespace
) -> System:
    log, template = args.haproxy_log, args.template
    prefix, state = f"/bench-{RUN}/pilotfish", root / "pf"
    flags = registrar_flags(etcd_host, prefix, HOST_ID, engine.docker_host, engine.host_ip, 15)
    if args.internal:
        flags["internal"] = True  # the container's own address: no docker-proxy in the path
    registrar = Agent.start("registrar", "register", flags, root)
    extra = {"template": str(logging_template(root))} if log else {}
    if template:
        extra = {"template": template}
    _, dflags = discoverer_flags(
        etcd_host, prefix, state, "127.0.0.1", log_level="warning", **extra
    )
    discoverer = Agent.start("discoverer", "discover", dflags, root, marker=str(state))
    watch = _watch({"registrar": registrar, "discoverer": discoverer}, state)

    async def drain(cid: str) -> bool:
        """``pilotfish drain --wait --idle``, as an operator (or the upgrader) does it:
        in this process, so a starved machine does not time a CLI's start."""
        settings = DrainSettings(etcd_host=etcd_host, prefix=prefix, wait=True, idle=True,
                                 timeout=10, docker_host=engine.docker_host)  # fmt: skip
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = await drain_command.run("drain", cid, settings)
        if code != 0:
            log(f"drain of {cid[:12]} did not complete: {output.getvalue().strip()}")
        return code == 0

    return System("pilotfish", [registrar, discoverer], state, watch, drain)


def start_baseline(engine: Dockerd, etcd_host: str, root: Path, log: bool = False) -> System:
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
        "--check-all", *(["--log-requests"] if log else []),
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


async def load_process(
    port: int,
    rate: float,
    duration: float,
    out: Path,
    haproxy_log: Path | None = None,
    frontend: str = "",
) -> dict[str, Any]:
    """bench/load.py in its own process; every failure record is written to ``out``.

    With ``haproxy_log`` (HAProxy's own line for every request), a failure
    the client could not pin on itself is split further by HAProxy's timers
    (``split_by_haproxy``): ``server`` when HAProxy had the request on a
    server in time and the server's answer is what came too late.
    """
    argv = [PYTHON, str(REPO / "bench" / "load.py"), "--port", str(port), "--rate", str(rate),
            "--duration", str(duration), "--failures-out", str(out)]  # fmt: skip
    try:
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=duration + 90
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"load generator hung:\n{error.stderr!r}") from None
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    failures = json.loads(await asyncio.to_thread(out.read_text))
    result["server"] = 0
    if haproxy_log is not None:
        lines = await asyncio.to_thread(_haproxy_lines, haproxy_log, frontend)
        failures = [split_by_haproxy(f, result["start_wall"], lines) for f in failures]
        await asyncio.to_thread(out.write_text, json.dumps(failures))
        for cls in ("proxy", "client", "server"):
            result[cls] = sum(f["cls"] == cls for f in failures)
        why = collections.Counter(f["how"] for f in failures if f["cls"] == "proxy")
        result["why_proxy"] = dict(why)
        result["classified_with"] = "client kernel timestamps + HAProxy log"
    else:
        result["classified_with"] = "client kernel timestamps"
    # The first proxy-caused failures, with their evidence, in the JSON line.
    result["proxy_failures"] = [f for f in failures if f["cls"] == "proxy"][:5]
    return result


BUDGET_S = 2.0  # bench/load.py's default: what a request may take


def _haproxy_lines(log: Path, frontend: str) -> dict[int, list[tuple[float, list[str]]]]:
    """HAProxy's request log (httplog / tcplog) of the frontend whose name ends
    with ``frontend``, by client port: (accept time, fields)."""
    by_port: dict[int, list[tuple[float, list[str]]]] = {}
    for line in log.read_text(errors="replace").splitlines():
        fields = line.split()
        if len(fields) < 7 or not fields[0].startswith("127.") or not fields[1].startswith("["):
            continue
        if not fields[2].endswith(frontend):
            continue
        with contextlib.suppress(ValueError):
            accepted = datetime.strptime(fields[1], "[%d/%b/%Y:%H:%M:%S.%f]").timestamp()
            by_port.setdefault(int(fields[0].rsplit(":", 1)[1]), []).append((accepted, fields))
    return by_port


def split_by_haproxy(
    failure: dict[str, Any], start: float, lines: dict[int, list[tuple[float, list[str]]]]
) -> dict[str, Any]:
    """Who a request that timed out waiting for its answer is counted against, by HAProxy's log.

    HAProxy's line for the request (same client port, accepted between its
    sending and its failure) gives the accept delay, how long HAProxy took to
    have the request on a server (TR, Tw: queue and earlier attempts, Tc:
    connect) and when HAProxy was done (Ta; Tt in TCP mode, close included);
    the server's part is the time between the two:

    - ``client``: HAProxy sent the whole answer and closed within the budget
      of the request being sent (the client did not read it in time);
    - ``server``: HAProxy had it on the server within half the budget, and
      the server's part alone took it past the budget;
    - ``proxy``: the rest (HAProxy accepted, connected or retried too late).
    """
    if failure["how"] != "timeout-answer" or not failure.get("sent"):
        return failure
    sent, failed = start + failure["sent"], start + failure["failed"]
    port = failure.get("port", 0)
    candidates = [(at, f) for at, f in lines.get(port, []) if sent - 1 <= at <= failed]
    if not candidates:
        return {**failure, "haproxy": None}
    accepted, fields = candidates[0]
    timers = [int(t) for t in fields[4].split("/")]
    if len(timers) == 5:  # httplog: TR/Tw/Tc/Tr/Ta
        treq, tw, tc, _tr, done = timers
        on_server = treq + tw + tc
    else:  # tcplog: Tw/Tc/Tt
        tw, tc, done = timers
        on_server = tw + tc
    server_part = done - on_server  # request on the server → its whole answer (or the abort)
    delay = round(max(0.0, accepted - sent) * 1000)
    haproxy_ms = delay + max(on_server, 0)
    evidence = {"line": " ".join(fields[2:]), "accept_delay_ms": delay}
    budget_ms = BUDGET_S * 1000
    ended_normally = fields[9 if len(timers) == 5 else 6].startswith("-")
    if delay + done <= budget_ms and ended_normally:
        why = f"HAProxy answered and closed {delay + done} ms after it was sent"
        return {**failure, "cls": "client", "why": why, "haproxy": evidence}
    if tc >= 0 and haproxy_ms <= budget_ms / 2 and haproxy_ms + server_part >= budget_ms:
        why = f"HAProxy had it on the server in {haproxy_ms} ms; the server took {server_part} ms"
        return {**failure, "cls": "server", "why": why, "haproxy": evidence}
    why = f"HAProxy's part {haproxy_ms} ms (accept delay {delay}), the server's {server_part} ms"
    return {**failure, "cls": "proxy", "why": why, "haproxy": evidence}


async def roll(
    docker: Docker, servers: ServerList, rolling: Rolling, seconds: float,
    drain: Callable[[str], Awaitable[bool]] | None = None,
) -> list[dict[str, float]]:  # fmt: skip
    """Every 5 s: start the next instance, 2 s later stop the oldest one running.

    For each stop: how long after ``docker stop`` was issued the server left
    rotation, and how many connections HAProxy sent it in that time (with
    the stop signal alone, the drain lands after the signal: these met a
    dying process). With ``drain``, the oldest is drained first (every
    discoverer applied it, its sessions done), then stopped.
    """
    began, stops = time.monotonic(), []
    while time.monotonic() - began + CHURN_EVERY + CHURN_OVERLAP <= seconds:
        await asyncio.sleep(max(0.0, began + (len(stops) + 1) * CHURN_EVERY - time.monotonic()))
        fresh = rolling.spare.pop(0)
        await docker.start(fresh)
        rolling.running.append(fresh)
        await asyncio.sleep(CHURN_OVERLAP)
        old = rolling.running.pop(0)
        drained_ms = -1.0
        if drain is not None:
            asked = time.monotonic()
            if await drain(old):
                drained_ms = round((time.monotonic() - asked) * 1000, 1)
        stops.append({**await stop_and_count(docker, servers, old), "drain_ms": drained_ms})
    return stops


async def stop_and_count(docker: Docker, servers: ServerList, cid: str) -> dict[str, float]:
    name = server_name(HOST_ID, cid)
    before = await server_row(servers, name)
    issued = time.monotonic()
    stopping = asyncio.create_task(docker.stop(cid))
    last, left_ms = before, None
    while time.monotonic() - issued < 15.0:
        row = await server_row(servers, name)
        if row is None or not _in_rotation(row):
            left_ms = (time.monotonic() - issued) * 1000
            last = row or last  # a draining row still counts what it was sent before
            break
        last = row
        await asyncio.sleep(0.005)
    await stopping
    sessions = int(last["stot"]) - int(before["stot"]) if before and last else -1
    if sessions < -1:
        sessions = -1  # a reload (the baseline's) restarted HAProxy's counters: unknown
    return {"left_rotation_ms": round(left_ms, 1) if left_ms else -1.0, "sessions": sessions}


def _in_rotation(row: dict[str, str]) -> bool:
    return row.get("weight") not in ("0", "") and not row.get("status", "").startswith(
        ("DRAIN", "MAINT", "DOWN")
    )


async def server_row(servers: ServerList, name: str) -> dict[str, str] | None:
    """The ``show stat`` row of server ``name``; None if it is not there."""
    for row in await show_stat(servers):
        if row.get("svname") == name:
            return row
    return None


async def show_stat(servers: ServerList) -> list[dict[str, str]]:
    socket = servers.socket or next(iter(sorted(servers.state_dir.rglob("*.sock"))), None)
    text = await _command(socket, "show stat\n") if socket else None
    if not text or not text.startswith("# "):
        return []
    columns = text.splitlines()[0][2:].split(",")
    return [dict(zip(columns, line.split(","), strict=False)) for line in text.splitlines()[1:]]


# What HAProxy counted for a backend (``show stat``): retries, redispatches,
# connection and response errors, 5xx sent, aborts on either side.
COUNTERS = ("wretr", "wredis", "econ", "eresp", "hrsp_5xx", "cli_abrt", "srv_abrt")


async def backend_counters(servers: ServerList, backend_suffix: str) -> dict[str, int]:
    for row in await show_stat(servers):
        if row.get("svname") == "BACKEND" and row.get("pxname", "").endswith(backend_suffix):
            return {c: int(row[c] or 0) for c in COUNTERS if c in row}
    return {}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    # A reload restarts the counters: then "after" alone is the best we have.
    return {k: v - before.get(k, 0) if v >= before.get(k, 0) else v for k, v in after.items()}


@contextlib.contextmanager
def cpu_hog(seconds: float) -> Iterator[list[str]]:
    """``stress-ng --cpu 0`` (a worker per core) for at most ``seconds``."""
    argv = ["stress-ng", "--cpu", "0", "--timeout", f"{int(seconds)}s", "--quiet"]
    hog = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield argv
    finally:
        if hog.poll() is None:
            os.killpg(hog.pid, signal.SIGTERM)  # its own session: stress-ng and its workers
        try:
            hog.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(hog.pid, signal.SIGKILL)
            hog.wait()


async def churn_scenario(
    docker: Docker, system: System, layout: Layout, rolling: dict[str, Rolling],
    args: argparse.Namespace, loaded: bool, drain_first: bool,
) -> dict[str, Any]:  # fmt: skip
    servers = ServerList(system.state_dir)
    tag = ("_loaded" if loaded else "") + ("" if drain_first else "_signal")
    drain = system.drain if drain_first else None
    before = {m: await backend_counters(servers, f"churn{m}") for m in layout.churn}
    hog = cpu_hog(args.churn_seconds + 5) if loaded else contextlib.nullcontext([])
    with hog as hog_argv:
        load_avg = os.getloadavg()[0]
        runs = {}
        for mode, cset in layout.churn.items():
            out = system.state_dir.parent / f"failures-{system.name}-{mode}{tag}.json"
            hlog = request_log(system, args)
            load = load_process(
                cset.port, args.churn_rate, args.churn_seconds, out, hlog, f"_churn{mode}"
            )
            turns = roll(docker, servers, rolling[mode], args.churn_seconds, drain)
            runs[mode] = asyncio.gather(load, turns)
        results: dict[str, Any] = {}
        for mode, run in runs.items():
            load_result, stops = await run
            counters = _delta(await backend_counters(servers, f"churn{mode}"), before[mode])
            left = [s["left_rotation_ms"] for s in stops if s["left_rotation_ms"] >= 0]
            results[mode] = {**load_result, "replacements": len(stops), "haproxy": counters,
                             "stop_to_out_of_rotation_ms": percentiles(left),
                             "sessions_after_stop": [s["sessions"] for s in stops],
                             "stop": "drain, then signal" if drain else "signal",
                             "drain_ms": percentiles([s["drain_ms"] for s in stops
                                                      if s["drain_ms"] >= 0]),
                             "loadavg_1m_at_start": round(load_avg, 1),
                             "cpu_hog": " ".join(hog_argv)}  # fmt: skip
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
    samples = Samples()
    try:
        await until(lambda: ready(system, layout), 120, f"{name}: every initial server routed")
        if args.samples:
            log(f"{name}: ready; start/stop of {len(layout.probes)} containers")
            samples = await lanes_scenario(docker, system, layout, args)
        rolling = {mode: Rolling.of(cset) for mode, cset in layout.churn.items()}
        churn: dict[str, Any] = {}
        for loaded, drain_first in churn_runs(args, system):
            how = "drain, then stop" if drain_first else "stop signal only"
            with_hog = " beside stress-ng --cpu 0" if loaded else ""
            log(f"{name}: churn ({how}), {args.churn_seconds:.0f} s at {args.churn_rate:.0f}"
                f" req/s{with_hog}")  # fmt: skip
            result = await churn_scenario(
                docker, system, layout, rolling, args, loaded, drain_first
            )
            tag = ("_loaded" if loaded else "") + ("" if drain_first else "_signal")
            churn.update({f"churn_{m}{tag}": r for m, r in result.items()})
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
        **churn,
        "cpu_s": {agent: u["cpu_s"] for agent, u in usage.items()},
        "peak_rss_mb": {agent: u["peak_rss_mb"] for agent, u in usage.items()},
    }


def churn_runs(args: argparse.Namespace, system: System) -> list[tuple[bool, bool]]:
    """(loaded, drain first) of each churn run. A system that cannot drain
    (the baseline) stops with the signal only, under the plain names."""
    loads = (False, True)[: 2 if args.loaded else 1]
    if system.drain is None or args.churn_stop == "signal":
        return [(loaded, False) for loaded in loads]
    runs = [(loaded, True) for loaded in loads]
    if args.churn_stop == "both":
        runs += [(loaded, False) for loaded in loads]
    return runs


def churn_count(args: argparse.Namespace) -> int:
    """The most churn runs one system makes (each needs its own fresh instances)."""
    return (2 if args.loaded else 1) * (2 if args.churn_stop == "both" else 1)


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
    churns = ("churn_http", "churn_tcp", "churn_http_loaded", "churn_tcp_loaded")
    for key in churns + tuple(f"{c}_signal" for c in churns):
        # The baseline only stops with the signal: its plain rows are that.
        ours, theirs = result.get(key, {}), base.get(key.removesuffix("_signal"), {})
        if not ours and not theirs:
            continue
        goal = "0 proxy" if key.startswith("churn_http") and "_signal" not in key else ""
        rows.append(f"{key + ' failed/total':<30}{_frac(ours):>12}{_frac(theirs):>12}{'':>8}"
                    f"  {goal}")  # fmt: skip
        for part in ("proxy", "client", "server"):
            rows.append(f"{'  of which ' + part:<30}{ours.get(part, '-')!s:>12}"
                        f"{theirs.get(part, '-')!s:>12}")  # fmt: skip
        rows.append(f"{'  client send lag max ms':<30}{_lag(ours):>12}{_lag(theirs):>12}")
    for what in ("cpu_s", "peak_rss_mb"):
        for agent in {**result.get(what, {}), **base.get(what, {})}:
            ours = result.get(what, {}).get(agent, "")
            theirs = base.get(what, {}).get(agent, "")
            rows.append(f"{what + ' ' + agent:<30}{ours!s:>12}{theirs!s:>12}")
    return "\n".join(rows)


def _frac(churn: dict[str, Any]) -> str:
    return f"{churn['failed']}/{churn['total']}" if churn else "-"


def _lag(churn: dict[str, Any]) -> str:
    return str(churn.get("lag", {}).get("send_ms", {}).get("max", "-"))


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=50,
                        help="containers started and stopped (0: churn only)")  # fmt: skip
    parser.add_argument("--lanes", type=int, default=16, help="services the samples rotate over")
    parser.add_argument("--max-gap", type=float, default=5.0, help="seconds between starts, max")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds up, max (random)")
    parser.add_argument("--churn-seconds", type=float, default=60.0)
    parser.add_argument("--churn-rate", type=float, default=200.0, help="requests/s per service")
    parser.add_argument("--timeout", type=float, default=60.0, help="per start/stop sample")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--systems", default="pilotfish,baseline", help="which to run, in order")
    parser.add_argument("--keep-logs", action="store_true", help="keep agents' logs on success")
    parser.add_argument("--no-haproxy-log", dest="haproxy_log", action="store_false",
                        help="no request log (failures: proxy or client only)")  # fmt: skip
    parser.add_argument("--template", help="pilotfish's HAProxy template (to compare one)")
    parser.add_argument("--internal", action="store_true",
                        help="pilotfish registers container addresses")  # fmt: skip
    parser.add_argument("--churn-stop", choices=("drain", "signal", "both"), default="both",
                        help="how pilotfish's churn stops a container: `pilotfish drain --wait"
                             " --idle` then the stop signal (churn_*), the signal alone"
                             " (churn_*_signal), or both; the baseline: the signal")  # fmt: skip
    parser.add_argument("--no-loaded", dest="loaded", action="store_false",
                        help="skip the churn beside stress-ng --cpu 0 (all cores)")  # fmt: skip
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
        "pilotfish": lambda: start_pilotfish(engine, etcd_host, root, args),
        "baseline": lambda: start_baseline(engine, etcd_host, root, args.haproxy_log),
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
