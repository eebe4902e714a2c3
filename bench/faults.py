"""Exit on SIGTERM under load, health while etcd is away, keys put back after a wipe.

    .venv/bin/python bench/faults.py [--runs 20] [--health-runs 3]

Starts its own etcd and dockerd (bench/registrar.py's ``Servers``) and runs
the agents as processes (tests/integration/e2e_kit.py), as deployed:

- SIGTERM → exit of ``pilotfish register --deregister-on-exit`` (``--runs``
  times), with 20 containers registered while containers are started and
  removed in a loop and another client writes to etcd (~200 puts/s);
- the same for ``pilotfish discover`` (HAProxy stopped with it), while its
  service's instances are put and deleted in etcd (~100/s), so it is applying
  changes to HAProxy when the signal comes;
- the registrar's ``/healthz`` (TTL 15): seconds from etcd SIGSTOP / SIGKILL
  to 503, and from SIGCONT / restart to 200 (``--health-runs`` each);
- ``etcdctl del --prefix <prefix>/services/`` → every key back (same runs).

The last line printed is one JSON object; times in ms unless named ``_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests" / "integration")]

from common import percentiles  # noqa: E402
from e2e_kit import Agent, discoverer_flags, fetch, registrar_flags  # noqa: E402
from registrar import Servers  # noqa: E402

from agents.common.etcd import Etcd  # noqa: E402
from agents.common.schema import instance_key, services_prefix  # noqa: E402
from agents.common.settings import RegistrarSettings  # noqa: E402
from tests import stack  # noqa: E402
from tests.integration.discoverer_support import make_instance  # noqa: E402

LABEL = f"{stack.TEST_LABEL}=1"


async def _health(address: str) -> int | None:
    host, _, port = address.rpartition(":")
    return (await fetch(host, int(port), "/healthz", within=1.0)).status


async def _until(check: Any, within: float, step: float = 0.02) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise RuntimeError(f"not done within {within}s: {check}")
        await asyncio.sleep(step)
    return time.monotonic() - start


def _stop_timed(agent: Agent) -> float:
    """SIGTERM → exit, in ms (SIGKILL and an error after 10 s)."""
    assert agent.popen is not None
    sent = time.monotonic()
    agent.popen.send_signal(signal.SIGTERM)
    agent.popen.wait(10)
    took = (time.monotonic() - sent) * 1000
    agent.stop()  # sweeps anything it left
    if agent.popen.returncode != 0:
        raise RuntimeError(f"exit code {agent.popen.returncode}\n{agent.tail()}")
    return took


class Load:
    """Container churn on the engine and puts to etcd, until stopped."""

    def __init__(self, servers: Servers, etcd: Etcd, prefix: str) -> None:
        self.servers, self.etcd, self.prefix = servers, etcd, prefix
        self.churned = self.puts = 0
        self._tasks: list[asyncio.Task[None]] = []

    def __enter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._churn()), asyncio.create_task(self._writes())]
        return self

    def __exit__(self, *_: object) -> None:
        for task in self._tasks:
            task.cancel()

    async def _churn(self) -> None:
        while True:
            cid = await asyncio.to_thread(
                self.servers.docker,
                *("run", "-d", "-l", LABEL, "-p", f"{self.servers.dockerd.host_ip}::8080"),
                self.servers.dockerd.whoami,
            )
            await asyncio.to_thread(self.servers.docker, "rm", "-f", cid)
            self.churned += 1

    async def _writes(self) -> None:
        while True:
            await self.etcd.put(f"{self.prefix}/noise/{self.puts % 500}", b"x" * 200)
            self.puts += 1
            await asyncio.sleep(0.005)


async def registrar_exits(servers: Servers, etcd: Etcd, logs: Path, runs: int) -> dict[str, Any]:
    for _ in range(20):
        servers.docker(
            *("run", "-d", "-l", LABEL, "-p", f"{servers.dockerd.host_ip}::8080"),
            servers.dockerd.whoami,
        )
    times = []
    with Load(servers, etcd, "/bench-noise") as load:
        for run in range(runs):
            flags = registrar_flags(
                f"127.0.0.1:{servers.etcd_port}",
                f"/bench-exit-{uuid.uuid4().hex[:6]}",
                f"exit{run}",
                servers.docker_url,
                servers.dockerd.host_ip,
                15,
            )
            flags["deregister_on_exit"] = True
            agent = Agent.start(f"reg-exit{run}", "register", flags, logs)
            address = str(flags["admin_address"])
            await _until(lambda a=address: _ok(a), 30)
            await asyncio.sleep(0.5)
            times.append(await asyncio.to_thread(_stop_timed, agent))
        churned, puts = load.churned, load.puts
    return {"runs": runs, "exit_ms": percentiles(times), "churned": churned, "etcd_puts": puts}


async def _ok(address: str) -> bool:
    return await _health(address) == 200


async def discoverer_exits(servers: Servers, etcd: Etcd, logs: Path, runs: int) -> dict[str, Any]:
    times = []
    for run in range(runs):
        prefix = f"/bench-dexit-{uuid.uuid4().hex[:6]}"
        consumer, flags = discoverer_flags(
            f"127.0.0.1:{servers.etcd_port}", prefix, logs / f"d{run}"
        )
        instance = make_instance("benchexit", 1, 18080, container_id=f"{run:012x}")
        await etcd.put(instance_key(prefix, instance), instance.to_json())
        agent = Agent.start(f"disc-exit{run}", "discover", flags, logs, str(logs / f"d{run}"))
        await _until(lambda a=consumer.admin: _ok(a), 30)
        churn = asyncio.create_task(_instance_churn(etcd, prefix))
        await asyncio.sleep(0.5)
        times.append(await asyncio.to_thread(_stop_timed, agent))
        churn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await churn
    return {"runs": runs, "exit_ms": percentiles(times)}


async def _instance_churn(etcd: Etcd, prefix: str) -> None:
    """Instances of the discoverer's service put and deleted, ~100/s."""
    n = 0
    while True:
        instance = make_instance("benchexit", 2 + n % 50, 18080, container_id=f"c{n % 50:011x}")
        key = instance_key(prefix, instance)
        await (etcd.put(key, instance.to_json()) if n % 100 < 50 else etcd.delete(key))
        n += 1
        await asyncio.sleep(0.01)


async def health_and_wipes(servers: Servers, etcd: Etcd, logs: Path, runs: int) -> dict[str, Any]:
    prefix = f"/bench-health-{uuid.uuid4().hex[:6]}"
    flags = registrar_flags(
        f"127.0.0.1:{servers.etcd_port}",
        prefix,
        "health",
        servers.docker_url,
        servers.dockerd.host_ip,
        15,
    )
    agent = Agent.start("reg-health", "register", flags, logs)
    address = str(flags["admin_address"])
    results: dict[str, Any] = {}
    try:
        await _until(lambda: _ok(address), 30)
        running = len(servers.docker("ps", "-q", "--filter", f"label={LABEL}").split())
        await _until(lambda: _has(etcd, prefix, running), 30)
        keys = len((await etcd.get_prefix(services_prefix(prefix)))[1])
        wipes = []
        for _ in range(runs):
            start = time.monotonic()
            await asyncio.to_thread(
                subprocess.run,
                [
                    stack.require_binary("etcdctl"),
                    f"--endpoints=127.0.0.1:{servers.etcd_port}",
                    "del",
                    "--prefix",
                    services_prefix(prefix),
                ],
                env={**os.environ, "ETCDCTL_API": "3"},
                check=True,
                capture_output=True,
            )
            await _until(lambda: _has(etcd, prefix, keys), 10, 0.005)
            wipes.append((time.monotonic() - start) * 1000)
            await asyncio.sleep(1)
        results["wipe"] = {"keys": keys, "back_ms": percentiles(wipes)}
        for how in ("freeze", "kill"):
            lost, back = [], []
            for _ in range(runs):
                start = time.monotonic()
                if how == "freeze":
                    servers.etcd.pause()
                else:
                    servers.etcd.kill()
                try:
                    lost.append(await _until(lambda: _is(address, 503), 30, 0.05))
                finally:
                    start = time.monotonic()
                    if how == "freeze":
                        servers.etcd.resume()
                    else:
                        await asyncio.to_thread(servers.etcd.start)
                back.append(await _until(lambda: _ok(address), 30, 0.05))
                await asyncio.sleep(6)  # a quiet lease period before the next run
            results[how] = {
                "to_503_s": [round(x, 2) for x in lost],
                "to_200_s": [round(x, 2) for x in back],
            }
    finally:
        await asyncio.to_thread(agent.stop)
    return results


async def _has(etcd: Etcd, prefix: str, keys: int) -> bool:
    return len((await etcd.get_prefix(services_prefix(prefix)))[1]) >= keys


async def _is(address: str, status: int) -> bool:
    return await _health(address) == status


async def bench(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    logs = stack.make_base_dir("bench-faults")
    settings = RegistrarSettings(etcd_host=f"127.0.0.1:{servers.etcd_port}", etcd_timeout=3.0)
    async with Etcd(settings) as etcd:
        return {
            "registrar_sigterm": await registrar_exits(servers, etcd, logs, args.runs),
            "discoverer_sigterm": await discoverer_exits(servers, etcd, logs, args.runs),
            "registrar_health": await health_and_wipes(servers, etcd, logs, args.health_runs),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--health-runs", type=int, default=3)
    args = parser.parse_args()
    servers = Servers(stack.make_base_dir("bench"), etcd_on_disk=False)
    try:
        servers.start()
        result = asyncio.run(bench(servers, args))
    finally:
        servers.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
