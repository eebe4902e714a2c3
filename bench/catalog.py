"""The catalog at scale: 1,000 services, 10,000 instances in etcd.

    .venv/bin/python bench/catalog.py [--services 1000] [--per-service 10]
                                      [--requests 500] [--changes 200] [--clients 50]

Measures, against a real etcd and ``pilotfish catalog`` as its own process:
- ``first_catalog_s``: from the process's start until ``/api/v1/services``
  lists every service;
- ``services_ms``: ``GET /api/v1/services`` (whole list) round trips, one
  client with keep-alive; ``services_filtered_ms`` the same with ``?tag=``;
- ``sse_ms``: from just before an etcd put until the change's event reached
  every one of ``--clients`` Server-Sent Event clients;
- ``rss_mb``: the catalog's resident memory at the end (``rss_peak_mb``: its peak).

Progress goes to stderr; the last line on stdout is one JSON object.
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
from collections.abc import AsyncIterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

import aiohttp  # noqa: E402
from catalog_kit import put_instances  # noqa: E402
from common import peak_rss_kib, percentiles  # noqa: E402
from discoverer_support import make_instance, rss_kib  # noqa: E402

from agents.common.etcd import Etcd  # noqa: E402
from agents.common.schema import Instance, instance_key  # noqa: E402
from agents.common.settings import CommonSettings  # noqa: E402
from tests.stack import Etcd as EtcdServer  # noqa: E402
from tests.stack import free_port  # noqa: E402

PREFIX = "/bench-catalog"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def catalog_process(etcd_host: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    address = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents", "catalog", "--etcd-host", etcd_host,
        "--prefix", PREFIX, "--address", address, "--log-format", "json",
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield process, f"http://{address}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()


async def first_catalog(http: aiohttp.ClientSession, url: str, services: int) -> float:
    started = time.monotonic()
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/api/v1/services") as response:
                if response.status == 200 and (await response.json())["total"] == services:
                    return time.monotonic() - started
        if time.monotonic() - started > 120:
            raise RuntimeError("the catalog did not list every service within 120 s")
        await asyncio.sleep(0.01)


async def round_trips(http: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        async with http.get(url) as response:
            await response.read()
            assert response.status == 200
        times.append((time.perf_counter() - started) * 1000)
    return times


class SseClient:
    """Records when each event id arrived."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.seen: dict[int, float] = {}
        self.connected = asyncio.Event()
        self.task = asyncio.create_task(self._read(http, url))

    async def _read(self, http: aiohttp.ClientSession, url: str) -> None:
        async with http.get(f"{url}/api/v1/events", timeout=aiohttp.ClientTimeout()) as resp:
            async for line in resp.content:
                if line.startswith(b"id: "):
                    self.seen[int(line[4:])] = time.perf_counter()
                    self.connected.set()


async def sse_latency(
    etcd: Etcd,
    http: aiohttp.ClientSession,
    url: str,
    instances: list[Instance],
    args: argparse.Namespace,
) -> list[float]:
    clients = [SseClient(http, url) for _ in range(args.clients)]
    await asyncio.gather(*(c.connected.wait() for c in clients))  # each got its "hello"
    rng = random.Random(7)
    latencies = []
    for n in range(args.changes):
        chosen = rng.choice(instances)
        changed = chosen.model_copy(update={"weight": 1 + n % 200})
        started = time.perf_counter()
        revision = await etcd.put(instance_key(PREFIX, changed), changed.to_json())
        deadline = time.monotonic() + 5
        while not all(revision in c.seen for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"revision {revision} did not reach every SSE client in 5 s")
            await asyncio.sleep(0.0005)
        latencies.append((max(c.seen[revision] for c in clients) - started) * 1000)
    for client in clients:
        client.task.cancel()
    await asyncio.gather(*(c.task for c in clients), return_exceptions=True)
    return latencies


async def main(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="pfbc-", dir="/tmp") as workdir:
        server = EtcdServer(Path(workdir), "etcd")
        server.start()
        try:
            return await run(args, server.endpoint)
        finally:
            server.close()


async def run(args: argparse.Namespace, etcd_host: str) -> dict[str, object]:
    instances = [
        make_instance(
            f"svc-{s:04d}", 20000 + n, 1024 + s, host=f"host-{n:02d}", tags=(f"t{s % 7}",)
        )
        for s in range(args.services)
        for n in range(args.per_service)
    ]
    async with Etcd(CommonSettings(etcd_host=etcd_host, prefix=PREFIX)) as etcd:
        started = time.monotonic()
        await put_instances(etcd, PREFIX, instances, tasks=100)
        log(f"{len(instances)} instances put in {time.monotonic() - started:.1f}s")
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            catalog_process(etcd_host) as (process, url),
        ):
            first = await first_catalog(http, url, args.services)
            log(f"first full catalog after {first:.2f}s")
            await round_trips(http, f"{url}/api/v1/services", 20)  # warm up
            services = await round_trips(http, f"{url}/api/v1/services", args.requests)
            filtered = await round_trips(http, f"{url}/api/v1/services?tag=t3", args.requests)
            log(f"GET /api/v1/services: {percentiles(services)}")
            sse = await sse_latency(etcd, http, url, instances, args)
            log(f"put -> {args.clients} SSE clients: {percentiles(sse)}")
            rss = rss_kib(process.pid) / 1024
            peak = (peak_rss_kib(process.pid) or 0) / 1024
    return {
        "bench": "catalog",
        "services": args.services,
        "instances": len(instances),
        "first_catalog_s": round(first, 3),
        "services_ms": percentiles(services),
        "services_filtered_ms": percentiles(filtered),
        "sse_ms": percentiles(sse),
        "sse_clients": args.clients,
        "rss_mb": round(rss, 1),
        "rss_peak_mb": round(peak, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--per-service", type=int, default=10)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
