"""Registrar benchmark: event → etcd latency, resync time, etcd load, memory.

    .venv/bin/python bench/registrar.py [--containers 200] [--starts 100] [--steady 60]

Starts its own etcd and dockerd (vfs, own bridge) in a temporary directory,
runs ``pilotfish register`` as a subprocess and measures:

- event → etcd: from the Docker ``start`` event's ``timeNano`` to the etcd
  watch event of the container's key, over ``--starts`` container starts;
- resync: the registrar started with N running containers, none registered
  (``--deregister-on-exit`` emptied etcd) → until all N keys are in etcd;
- steady state: etcd RPCs per minute started by the registrar over
  ``--steady`` seconds (etcd's own ``grpc_server_started_total``), beside
  docker-register's refresher (2 writes per container every 10 s);
- the registrar's RSS with N containers.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker

from agents.common.etcd import Etcd
from agents.common.settings import RegistrarSettings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.stack when run as bench/registrar.py

from tests import stack  # noqa: E402


class Servers:
    """etcd + dockerd from tests/stack.py, and the whoami image.

    etcd's data directory is on tmpfs by default: on one shared disk, vfs
    copying each container's root filesystem makes etcd's WAL fsync the
    largest part of the latency (p99 ~36 ms measured), which says more about
    the test machine than about the registrar. ``--etcd-on-disk`` measures that.
    """

    def __init__(self, root: Path, etcd_on_disk: bool) -> None:
        self.root = root
        self.etcd_root = root if etcd_on_disk else Path(tempfile.mkdtemp(dir="/dev/shm"))
        self.dockerd = stack.Dockerd.isolated(root, "d1")
        self.etcd = stack.Etcd(self.etcd_root, "e0")

    @property
    def docker_url(self) -> str:
        return self.dockerd.docker_host

    @property
    def etcd_port(self) -> int:
        return self.etcd.client_port

    def start(self) -> None:
        self.etcd.start()
        self.dockerd.start()
        stack.make_whoami_image(self.dockerd)

    def docker(self, *args: str) -> str:
        return self.dockerd.docker(*args)

    def stop(self) -> None:
        with contextlib.suppress(stack.StackError):
            self.dockerd.remove_test_containers()
        self.dockerd.close()
        self.etcd.close()
        shutil.rmtree(self.etcd_root, ignore_errors=True)

    def etcd_rpcs_started(self) -> float:
        text = urllib.request.urlopen(f"{self.etcd.client_url}/metrics").read()
        total = 0.0
        for line in text.decode().splitlines():
            if line.startswith("grpc_server_started_total"):
                total += float(line.rsplit(" ", 1)[1])
        return total


class Registrar:
    def __init__(self, servers: Servers, prefix: str) -> None:
        self.servers = servers
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "agents", "register",
            f"--docker-host={self.servers.docker_url}",
            f"--etcd-host=127.0.0.1:{self.servers.etcd_port}",
            f"--prefix={self.prefix}", "--host-id=bench",
            f"--host-ip={self.servers.dockerd.host_ip}",
            "--ttl=15", "--deregister-on-exit", "--admin-address=off", "--log-level=warning",
        ]  # fmt: skip
        log = open(stack.LOG_ROOT / "bench-registrar.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, cwd=REPO, stderr=log)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
            self.proc = None

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


class KeyWatch:
    """When each container's first key appeared in etcd (wall clock, ns)."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix + "/services/"
        self.first_put: dict[str, int] = {}
        self.present: set[str] = set()

    async def run(self) -> None:
        revision, items = await self.etcd.get_prefix(self.prefix)
        self.present = {item.key.decode() for item in items}
        async for event in self.etcd.watch_prefix(self.prefix, revision + 1):
            now = time.time_ns()
            key = event.key.decode()
            if event.value is None:
                self.present.discard(key)
                continue
            self.present.add(key)
            container = key.rpartition("/")[2].partition(":")[0]
            self.first_put.setdefault(container, now)


async def docker_start_times(url: str, into: dict[str, int]) -> None:
    async with aiodocker.Docker(url=url) as docker:
        params = {"filters": json.dumps({"type": ["container"], "event": ["start"]})}
        async with docker._query("events", params=params, timeout=None) as response:
            while line := await response.content.readline():
                data = json.loads(line)
                into.setdefault(data["id"], int(data["timeNano"]))


async def start_containers(servers: Servers, count: int, concurrency: int) -> list[str]:
    limit = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with limit:
            return await asyncio.to_thread(
                servers.docker, "run", "-d", "-l", f"{stack.TEST_LABEL}=1",
                "-p", f"{servers.dockerd.host_ip}::8080", stack.WHOAMI_IMAGE,
            )  # fmt: skip

    return list(await asyncio.gather(*(one() for _ in range(count))))


@contextlib.asynccontextmanager
async def background(coro: Any) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    prefix = "/bench"
    settings = RegistrarSettings(etcd_host=f"127.0.0.1:{servers.etcd_port}", prefix=prefix)
    registrar = Registrar(servers, prefix)
    async with Etcd(settings) as etcd:
        watch = KeyWatch(etcd, prefix)
        started_ns: dict[str, int] = {}
        async with (
            background(watch.run()),
            background(docker_start_times(servers.docker_url, started_ns)),
        ):
            await asyncio.sleep(0.5)
            # 1. event → etcd latency
            registrar.start()
            # Warm-up: the first container proves the registrar is synced.
            (warm,) = await start_containers(servers, 1, concurrency=1)
            await wait_for(lambda: warm in watch.first_put, 30)
            t0 = time.monotonic()
            ids = await start_containers(servers, args.starts, concurrency=1)
            await wait_for(lambda: all(i in watch.first_put for i in ids), 30)
            latencies = [(watch.first_put[i] - started_ns[i]) / 1e6 for i in ids]
            print(
                f"event→etcd over {len(ids)} starts: p50 {percentile(latencies, 0.5):.1f} ms, "
                f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms "
                f"(starting took {time.monotonic() - t0:.1f} s)",
                flush=True,
            )
            # 2. resync with N running containers, none registered
            t0 = time.monotonic()
            ids += [warm]
            ids += await start_containers(servers, args.containers - len(ids), concurrency=8)
            print(f"{len(ids)} containers running ({time.monotonic() - t0:.1f} s)", flush=True)
            registrar.stop()  # --deregister-on-exit: etcd is empty for this host
            await wait_for(lambda: not watch.present, 10)
            spawned = time.monotonic()
            registrar.start()
            await wait_for(lambda: len(watch.present) >= args.containers, 30)
            resync = time.monotonic() - spawned
            print(f"resync: {args.containers} keys in {resync:.2f} s after spawn", flush=True)
            # 3. steady state
            await asyncio.sleep(2)
            before = await asyncio.to_thread(servers.etcd_rpcs_started)
            await asyncio.sleep(args.steady)
            after = await asyncio.to_thread(servers.etcd_rpcs_started)
            per_min = (after - before) * 60 / args.steady
            baseline = 2 * args.containers * 60 / 10
            rss = registrar.rss_mb()
            print(
                f"steady state: {per_min:.0f} etcd requests/min vs {baseline:.0f} for "
                f"docker-register's refresher (ratio {per_min / baseline:.4f}); RSS {rss:.1f} MB",
                flush=True,
            )
            registrar.stop()
    return {
        "event_to_etcd_ms": {
            "p50": round(percentile(latencies, 0.5), 2),
            "p99": round(percentile(latencies, 0.99), 2),
        },
        "resync_200_s": round(resync, 3),
        "etcd_requests_per_min": round(per_min, 1),
        "baseline_requests_per_min": round(baseline, 1),
        "ratio": round(per_min / baseline, 5),
        "rss_mb": round(rss, 1),
        "containers": args.containers,
        "starts": args.starts,
    }


async def wait_for(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not done within {within}s")
        await asyncio.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--steady", type=float, default=60.0)
    parser.add_argument("--etcd-on-disk", action="store_true", help="etcd data on /tmp, not tmpfs")
    args = parser.parse_args()
    servers = Servers(stack.make_base_dir("bench"), args.etcd_on_disk)
    try:
        servers.start()
        result = asyncio.run(bench(servers, args))
    finally:
        servers.stop()
    result["etcd_on"] = "disk" if args.etcd_on_disk else "tmpfs"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
