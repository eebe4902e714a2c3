"""Benchmark: the discoverer against the reload-based baseline (bench/baseline.py).

    .venv/bin/python bench/discoverer.py [--instances 200] [--baseline-samples 15]
        [--sync-instances 10000 --sync-services 1000] [--burst 1000]
        [--scale-samples 200 --baseline-scale-samples 5]

Both systems run as their own processes with their own HAProxy, one after the
other, against one etcd started here (tests/stack.py). Upstreams are asyncio
HTTP servers in this process answering their name; requests go through the
HAProxy consumer ports on new connections.

(a) add:    put of a new instance → first request answered by it
            (the service's other server, "base", has weight 1 and each new
            instance 256, so almost every request goes to the new one).
(b) remove: delete → the first of 20 consecutive requests answered by
            "base" instead. A live base server matters: with no usable server
            left, HAProxy queues a request until a timeout, which would
            measure the timeout.
(c) sync:   N instances over M services already in etcd → start → all
            servers UP in ``show servers state`` + a few requests; RSS.
(d) burst:  1,000 new instances put at once into existing services → time
            until HAProxy has them all; reloads during the burst.
(e) at scale: (a) and (b) again with the (c) instances in the same prefix
            (10,000 servers in HAProxy), so every change is processed
            against the whole catalog.
(f) scale to zero: one service's only instance deleted and a new one put,
            20 times (``--zero-cycles``): HAProxy reloads and the time from
            the put to the first request answered, with the listener kept
            (``--listener-retention`` default) and dropped at once (0).
            ``--zero-only`` runs (f) alone.

The baseline polls every 5 s, so each of its add/remove samples costs up to
5 s: it gets ``--baseline-samples`` of them (the discoverer gets all).
The last line is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

from discoverer_support import (  # noqa: E402
    Upstream,
    comm,
    free_port,
    http_get,
    proc_tree,
    request,
    rss_kib,
)

from agents.common.etcd import Etcd  # noqa: E402
from agents.common.schema import Instance, instance_key  # noqa: E402
from agents.common.settings import CommonSettings  # noqa: E402

PYTHON = sys.executable


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- etcd --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def etcd_server(workdir: Path) -> AsyncIterator[str]:
    """A single etcd member from tests/stack.py; yields its host:port."""
    from tests.stack import Etcd as EtcdServer

    server = EtcdServer(workdir, "bench-etcd")
    server.start()
    try:
        yield server.endpoint
    finally:
        server.close()


class Writer:
    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self.etcd, self.prefix = etcd, prefix

    async def put(self, instance: Instance) -> None:
        await self.etcd.put(instance_key(self.prefix, instance), instance.to_json())

    async def delete(self, instance: Instance) -> None:
        await self.etcd.delete(instance_key(self.prefix, instance))

    async def put_many(self, instances: list[Instance], concurrency: int = 200) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(instance: Instance) -> None:
            async with sem:
                await self.put(instance)

        await asyncio.gather(*(one(i) for i in instances))


def instance(service: str, n: int, upstream_port: int, private_port: int, **kw: Any) -> Instance:
    return Instance(
        service=service,
        host_id=kw.pop("host_id", f"host{n % 16}"),
        address="127.0.0.1",
        port=upstream_port,
        private_port=private_port,
        container_id=f"{abs(hash((service, n))) % (1 << 48):012x}",
        **kw,
    )


# -- the systems under test -------------------------------------------------------------


@dataclass
class System:
    name: str
    etcd_host: str
    workdir: Path
    proc: asyncio.subprocess.Process | None = None
    last_up: tuple[int, int] = (0, 0)
    admin_port: int = 0
    prefix: str = ""
    state_dir: Path = field(default_factory=Path)
    extra: list[str] = field(default_factory=list)  # more flags for `pilotfish discover`

    async def start(self, prefix: str) -> None:
        self.prefix = prefix
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.workdir))
        self.admin_port = free_port()
        if self.name == "pilotfish":
            args = [
                "-m", "agents", "discover", "--etcd-host", self.etcd_host, "--prefix", prefix,
                "--state-dir", str(self.state_dir), "--stats-address", f"127.0.0.1:{free_port()}",
                "--admin-address", f"127.0.0.1:{self.admin_port}", "--stop-haproxy-on-exit",
                "--log-level", "warning", "--log-format", "json", *self.extra,
            ]  # fmt: skip
        else:
            args = [
                str(REPO / "bench" / "baseline.py"), "--etcd-host", self.etcd_host,
                "--prefix", prefix, "--state-dir", str(self.state_dir),
            ]  # fmt: skip
        log_file = (self.state_dir / "agent.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            PYTHON, *args, cwd=REPO, stdout=log_file, stderr=log_file
        )

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        haproxy = self.haproxy_pids()
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.sleep(0.2)
        for pid in haproxy:  # whatever was left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            log_tail = (self.state_dir / "agent.log").read_text()[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{log_tail}")

    def haproxy_pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [p for p in proc_tree(self.proc.pid) if comm(p).startswith("haproxy")]

    def rss_mib(self) -> tuple[float, float]:
        """(agent, HAProxy master + workers) resident memory in MiB."""
        assert self.proc is not None
        agent = rss_kib(self.proc.pid) / 1024
        haproxy = sum(rss_kib(p) for p in self.haproxy_pids()) / 1024
        return round(agent, 1), round(haproxy, 1)

    async def servers_state(self) -> list[dict[str, str]] | None:
        """``show servers state`` from the HAProxy worker's stats socket."""
        for sock in sorted(self.state_dir.rglob("*.sock")):
            text = await _socket_command(sock, "show servers state\n")
            if text is None or not text.startswith("1\n"):
                continue
            lines = text.splitlines()
            header = lines[1].lstrip("# ").split()
            return [dict(zip(header, line.split(), strict=False)) for line in lines[2:] if line]
        return None

    async def reloads(self) -> int:
        if self.name == "baseline":
            with contextlib.suppress(OSError, ValueError):
                return int(json.loads((self.state_dir / "status.json").read_text())["reloads"])
            return 0
        _, body = await http_get(self.admin_port, "/metrics")
        total = 0.0
        for line in body.splitlines():
            if line.startswith("pilotfish_discoverer_reloads_total"):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)


async def _socket_command(path: Path, command: str) -> str | None:
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return None
    try:
        writer.write(command.encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 10)
        return data.decode(errors="replace")
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


async def wait_for(check: Callable[[], Awaitable[bool]], within: float, step: float = 0.1) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise TimeoutError(f"not reached within {within}s")
        await asyncio.sleep(step)
    return time.monotonic() - start


# -- measurements --------------------------------------------------------------------------


async def poll_until(port: int, done: Callable[[str | None], bool], within: float) -> float:
    """Requests until ``done(answer)``; the monotonic time of that answer.

    Polls every 0.5 ms for the first 50 ms, then every 5 ms (the baseline
    takes seconds; hammering it would only exhaust ephemeral ports).
    """
    start = time.monotonic()
    while True:
        answer = await request(port, within=1.0)
        now = time.monotonic()
        if done(answer):
            return now
        if now - start > within:
            raise TimeoutError("no convergence")
        await asyncio.sleep(0.0005 if now - start < 0.05 else 0.005)


async def poll_until_gone(port: int, name: str, within: float, streak: int = 20) -> float:
    """Time of the first of ``streak`` consecutive answers not from ``name``.

    One answer from "base" proves nothing (it gets 1 request in 257 while the
    instance is still in); 20 in a row cannot happen while it is.
    """
    start = time.monotonic()
    run_start, run = 0.0, 0
    while run < streak:
        answer = await request(port, within=1.0)
        now = time.monotonic()
        if answer is not None and answer != name:
            run_start, run = (run_start, run + 1) if run else (now, 1)
        else:
            run = 0
        if now - start > within:
            raise TimeoutError("no convergence")
        await asyncio.sleep(0.0005 if now - start < 0.05 else 0.005)
    return run_start


async def add_remove(
    system: System, w: Writer, samples: int, port: int
) -> tuple[list[float], list[float]]:
    """(a) and (b): one service, a weight-1 base server, instances added and removed."""
    base = await Upstream("base").start()
    placeholder = instance("latency", 0, base.port, port, weight=1)
    await w.put(placeholder)
    await wait_for(lambda: _has_server(system, placeholder), within=30)
    adds, removes = [], []
    # A random phase against the baseline's 5 s poll, or every sample would
    # wait a whole period; the discoverer gets a little jitter too.
    jitter = 5.0 if system.name == "baseline" else 0.05
    upstreams = [await Upstream(f"u{i}").start() for i in range(samples)]
    try:
        for i, upstream in enumerate(upstreams):
            new = instance("latency", i + 1, upstream.port, port, weight=256)
            await asyncio.sleep(random.uniform(0, jitter))
            t0 = time.monotonic()
            await w.put(new)
            adds.append((await poll_until(port, lambda a, u=upstream: a == u.name, 30) - t0) * 1e3)
            await asyncio.sleep(random.uniform(0, jitter))
            t0 = time.monotonic()
            await w.delete(new)
            removes.append((await poll_until_gone(port, upstream.name, 30) - t0) * 1e3)
            if system.name == "baseline" or (i + 1) % 50 == 0:
                log(f"  {system.name}: {i + 1}/{samples} add {adds[-1]:.1f} ms "
                    f"remove {removes[-1]:.1f} ms")  # fmt: skip
    finally:
        for upstream in [*upstreams, base]:
            await upstream.stop()
    return adds, removes


async def _has_server(system: System, inst: Instance) -> bool:
    state = await system.servers_state()
    return bool(state) and any(s.get("srv_name") == inst.server_name for s in state or [])


async def _all_up(system: System, expected: int) -> bool:
    system.check_alive()
    state = await system.servers_state()
    if not state:
        return False
    up = sum(1 for s in state if s.get("srv_op_state") == "2" and s.get("srv_admin_state") == "0")
    system.last_up = (up, len(state))
    return up >= expected


def sync_instances(
    count: int, services: int, upstream_ports: list[int], base_port: int
) -> list[Instance]:
    return [
        instance(
            f"svc{n % services}",
            n,
            upstream_ports[n % len(upstream_ports)],
            base_port + n % services,
        )
        for n in range(count)
    ]


async def sync(
    system: System, prefix: str, count: int, services: int, base_port: int
) -> dict[str, float]:
    """(c): start with ``count`` instances already in etcd; time to all routable."""
    t0 = time.monotonic()
    await system.start(prefix)
    try:
        await wait_for(lambda: _all_up(system, count), within=60, step=0.05)
    except TimeoutError:
        up, listed = system.last_up
        raise TimeoutError(f"{system.name}: {up} of {listed} servers up, want {count}") from None
    for n in random.sample(range(services), 5):
        assert await request(base_port + n) is not None, f"svc{n} not answering"
    took = time.monotonic() - t0
    agent, haproxy = system.rss_mib()
    await system.stop()
    return {"sync_s": round(took, 2), "agent_rss_mib": agent, "haproxy_rss_mib": haproxy}


async def burst(
    system: System, w: Writer, count: int, upstream_ports: list[int], already: int
) -> tuple[float, int]:
    """(d): ``count`` new instances into 10 existing services at once.

    ``already``: servers UP before (the latency service's placeholder).
    """
    base = free_port_block(10)
    seeds = [instance(f"burst{s}", 10_000 + s, upstream_ports[0], base + s) for s in range(10)]
    await w.put_many(seeds)
    expected = already + len(seeds)
    await wait_for(lambda: _all_up(system, expected), within=60)
    reloads = await system.reloads()
    new = [
        instance(
            f"burst{n % 10}", 20_000 + n, upstream_ports[n % len(upstream_ports)], base + n % 10
        )
        for n in range(count)
    ]
    t0 = time.monotonic()
    await w.put_many(new, concurrency=100)
    await wait_for(lambda: _all_up(system, expected + count), within=120, step=0.01)
    took = time.monotonic() - t0
    return took, await system.reloads() - reloads


def free_port_block(size: int) -> int:
    """A run of ``size`` free ports (consumer frontends bind them)."""
    for _ in range(100):
        start = random.randrange(20000, 30000)
        if all(_port_free(start + i) for i in range(size)):
            return start
    raise RuntimeError("no free port block")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


# -- the run -------------------------------------------------------------------------------


async def run_system(
    name: str, etcd_host: str, workdir: Path, args: argparse.Namespace, upstream_ports: list[int],
    sync_prefix: str, sync_base: int,
) -> dict[str, Any]:  # fmt: skip
    system = System(name, etcd_host, workdir)
    result: dict[str, Any] = {}
    log(f"{name}: (c) sync of {args.sync_instances} instances / {args.sync_services} services")
    result.update(
        await sync(system, sync_prefix, args.sync_instances, args.sync_services, sync_base)
    )
    log(f"{name}: (c) {result}")

    prefix = f"/bench-{name}-{os.getpid()}"
    settings = CommonSettings(etcd_host=etcd_host, prefix=prefix)
    async with Etcd(settings) as etcd:
        w = Writer(etcd, prefix)
        await system.start(prefix)
        try:
            samples = args.instances if name == "pilotfish" else args.baseline_samples
            port = free_port_block(1)
            # The service exists before the first sample (a new listener is a
            # reload for both systems; that is not what (a) measures).
            log(f"{name}: (a)/(b) {samples} add/remove samples")
            adds, removes = await add_remove(system, w, samples, port)
            result["add_ms"] = {"p50": pct(adds, 0.5), "p99": pct(adds, 0.99), "n": len(adds)}
            result["remove_ms"] = {"p50": pct(removes, 0.5), "p99": pct(removes, 0.99),
                                   "n": len(removes)}  # fmt: skip
            log(f"{name}: add {result['add_ms']} remove {result['remove_ms']}")
            log(f"{name}: (d) burst of {args.burst}")
            took, reloads = await burst(system, w, args.burst, upstream_ports, already=1)
            result["burst_s"] = round(took, 3)
            result["burst_reloads"] = reloads
            log(f"{name}: burst {took:.3f} s, {reloads} reloads")
        finally:
            await system.stop()
    result.update(await at_scale(system, etcd_host, args, upstream_ports, sync_base))
    return result


async def scale_to_zero(
    etcd_host: str, workdir: Path, cycles: int, retention: str, gap: float
) -> dict[str, Any]:
    """(f) one service, first created, then scaled to zero for ``gap`` seconds
    and back ``cycles`` times: HAProxy reloads during the cycles, and from the
    put of each new instance to the first request it answers (the consumer
    port polled from the put on)."""
    system = System("pilotfish", etcd_host, workdir, extra=["--listener-retention", retention])
    prefix = f"/bench-zero-{retention}-{os.getpid()}"
    upstream = await Upstream("zero").start()
    firsts: list[float] = []
    async with Etcd(CommonSettings(etcd_host=etcd_host, prefix=prefix)) as etcd:
        w = Writer(etcd, prefix)
        await system.start(prefix)
        try:
            await wait_for(lambda: _healthy(system), within=30)
            port = free_port_block(1)
            reloads = 0
            for n in range(cycles + 1):
                if n == 1:  # the service exists: count from here
                    reloads = await system.reloads()
                new = instance("zero", n, upstream.port, port)
                t0 = time.monotonic()
                await w.put(new)
                took = (await poll_until(port, lambda a: a == upstream.name, 30) - t0) * 1e3
                if n:
                    firsts.append(took)
                await w.delete(new)
                await poll_until(port, lambda a: a is None, 30)  # 503, closed or refused
                await asyncio.sleep(gap)  # scaled to zero for a while
            reloads = await system.reloads() - reloads
        finally:
            await system.stop()
            await upstream.stop()
    result = {"reloads": reloads, "cycles": cycles, "gap_s": gap,
              "first_request_ms": {"p50": pct(firsts, 0.5), "p99": pct(firsts, 0.99),
                                   "max": round(max(firsts), 1)}}  # fmt: skip
    log(f"scale to zero, --listener-retention {retention}: {result}")
    return result


async def _healthy(system: System) -> bool:
    system.check_alive()
    try:
        status, _ = await http_get(system.admin_port, "/healthz")
    except OSError:
        return False  # not listening yet
    return status == 200


async def at_scale(
    system: System, etcd_host: str, args: argparse.Namespace, upstream_ports: list[int],
    sync_base: int,
) -> dict[str, Any]:  # fmt: skip
    """(e): (a)/(b) with the (c) instances in the same prefix."""
    samples = args.scale_samples if system.name == "pilotfish" else args.baseline_scale_samples
    if not samples:
        return {}
    prefix = f"/bench-scale-{system.name}-{os.getpid()}"
    async with Etcd(CommonSettings(etcd_host=etcd_host, prefix=prefix)) as etcd:
        w = Writer(etcd, prefix)
        preload = sync_instances(args.sync_instances, args.sync_services, upstream_ports, sync_base)
        await w.put_many(preload)
        await system.start(prefix)
        try:
            await wait_for(lambda: _all_up(system, len(preload)), within=60, step=0.05)
            log(f"{system.name}: (e) {samples} add/remove samples over {len(preload)} servers")
            adds, removes = await add_remove(system, w, samples, free_port_block(1))
        finally:
            await system.stop()
    result = {
        "scale_add_ms": {"p50": pct(adds, 0.5), "p99": pct(adds, 0.99), "n": len(adds)},
        "scale_remove_ms": {"p50": pct(removes, 0.5), "p99": pct(removes, 0.99), "n": len(removes)},
    }
    log(f"{system.name}: at scale: add {result['scale_add_ms']} remove {result['scale_remove_ms']}")
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=200, help="(a)/(b) samples, pilotfish")
    parser.add_argument(
        "--baseline-samples", type=int, default=15, help="(a)/(b) samples, baseline"
    )
    parser.add_argument("--sync-instances", type=int, default=10_000)
    parser.add_argument("--sync-services", type=int, default=1_000)
    parser.add_argument("--burst", type=int, default=1_000)
    parser.add_argument("--upstreams", type=int, default=50, help="real ports behind (c) and (d)")
    parser.add_argument("--scale-samples", type=int, default=200, help="(e) samples, pilotfish")
    parser.add_argument(
        "--baseline-scale-samples", type=int, default=5, help="(e) samples, baseline"
    )
    parser.add_argument("--etcd", help="use this etcd host:port instead of starting one")
    parser.add_argument("--systems", default="pilotfish,baseline", help="which to run, in order")
    parser.add_argument("--zero-cycles", type=int, default=20, help="(f) scale-to-zero cycles")
    parser.add_argument("--zero-gap", type=float, default=2.0, help="(f) seconds at zero")
    parser.add_argument("--zero-only", action="store_true", help="run (f) only")
    args = parser.parse_args()
    if args.zero_only:
        await zero_only(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="pilotfish-bench-"))
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        if args.etcd:
            etcd_host = args.etcd
        else:
            etcd_host = await stack.enter_async_context(etcd_server(workdir))
        upstreams = [await Upstream(f"s{i}").start() for i in range(args.upstreams)]
        upstream_ports = [u.port for u in upstreams]
        sync_prefix = f"/bench-sync-{os.getpid()}"
        sync_base = free_port_block(args.sync_services)
        async with Etcd(CommonSettings(etcd_host=etcd_host, prefix=sync_prefix)) as etcd:
            t0 = time.monotonic()
            await Writer(etcd, sync_prefix).put_many(
                sync_instances(args.sync_instances, args.sync_services, upstream_ports, sync_base)
            )
            log(f"wrote {args.sync_instances} instances in {time.monotonic() - t0:.1f} s")
        results = {}
        for name in args.systems.split(","):
            results[name] = await run_system(
                name, etcd_host, workdir, args, upstream_ports, sync_prefix, sync_base
            )
        for upstream in upstreams:
            await upstream.stop()
        if args.zero_cycles:
            before = await scale_to_zero(etcd_host, workdir, args.zero_cycles, "0", args.zero_gap)
            results["pilotfish"]["scale_to_zero"] = await scale_to_zero(
                etcd_host, workdir, args.zero_cycles, "300", args.zero_gap
            )
            results.setdefault("baseline", {})["scale_to_zero"] = before
    report(results, args, time.monotonic() - started)


async def zero_only(args: argparse.Namespace) -> None:
    """(f) alone: listeners dropped at once (retention 0, before) and kept (default)."""
    workdir = Path(tempfile.mkdtemp(prefix="pilotfish-bench-"))
    async with contextlib.AsyncExitStack() as stack:
        etcd_host = args.etcd or await stack.enter_async_context(etcd_server(workdir))
        before = await scale_to_zero(etcd_host, workdir, args.zero_cycles, "0", args.zero_gap)
        after = await scale_to_zero(etcd_host, workdir, args.zero_cycles, "300", args.zero_gap)
    print(json.dumps({"scale_to_zero": after, "baseline": {"scale_to_zero": before}}))


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, took: float) -> None:
    ours, base = results.get("pilotfish", {}), results.get("baseline", {})

    def get(r: dict[str, Any], key: str, sub: str | None = None) -> Any:
        value = r.get(key)
        return value.get(sub) if sub and isinstance(value, dict) else value

    rows = [
        ("add p50 (ms)", "add_ms", "p50"),
        ("add p99 (ms)", "add_ms", "p99"),
        ("remove p50 (ms)", "remove_ms", "p50"),
        ("remove p99 (ms)", "remove_ms", "p99"),
        (f"sync {args.sync_instances} (s)", "sync_s", None),
        ("agent RSS (MiB)", "agent_rss_mib", None),
        ("HAProxy RSS (MiB)", "haproxy_rss_mib", None),
        (f"burst {args.burst} (s)", "burst_s", None),
        ("burst reloads", "burst_reloads", None),
        (f"add p50 @{args.sync_instances} (ms)", "scale_add_ms", "p50"),
        (f"add p99 @{args.sync_instances} (ms)", "scale_add_ms", "p99"),
        (f"remove p50 @{args.sync_instances} (ms)", "scale_remove_ms", "p50"),
        (f"remove p99 @{args.sync_instances} (ms)", "scale_remove_ms", "p99"),
    ]
    print(f"\n{'':22} {'pilotfish':>12} {'baseline':>12} {'baseline/pilotfish':>20}")
    for label, key, sub in rows:
        a, b = get(ours, key, sub), get(base, key, sub)
        ratio = (
            f"{b / a:.1f}x"
            if isinstance(a, int | float) and isinstance(b, int | float) and a
            else "-"
        )
        print(f"{label:22} {a!s:>12} {b!s:>12} {ratio:>20}")
    print(
        f"(add/remove samples: pilotfish {get(ours, 'add_ms', 'n')}, baseline "
        f"{get(base, 'add_ms', 'n')}; at scale {get(ours, 'scale_add_ms', 'n')} and "
        f"{get(base, 'scale_add_ms', 'n')}; whole run {took:.0f} s)"
    )

    def keys(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "add_ms": {k: get(r, "add_ms", k) for k in ("p50", "p99")},
            "remove_ms": {k: get(r, "remove_ms", k) for k in ("p50", "p99")},
            "sync_10k_s": r.get("sync_s"),
            "burst_1000_s": r.get("burst_s"),
            "burst_reloads": r.get("burst_reloads"),
            "agent_rss_mib": r.get("agent_rss_mib"),
            "haproxy_rss_mib": r.get("haproxy_rss_mib"),
            "scale_add_ms": {k: get(r, "scale_add_ms", k) for k in ("p50", "p99")},
            "scale_remove_ms": {k: get(r, "scale_remove_ms", k) for k in ("p50", "p99")},
            # pilotfish: listeners kept (default); baseline: pilotfish with
            # --listener-retention 0 (the listener dropped at once).
            "scale_to_zero": r.get("scale_to_zero"),
        }

    print(json.dumps({**keys(ours), "baseline": keys(base)}))


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
