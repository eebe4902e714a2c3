"""The registration half of the reload-based baseline: jwilder/docker-register's loop.

docker-register does not follow Docker events: every ``--interval`` (10 s) it
lists the running containers and writes every one's key with a TTL of
``--ttl`` (20 s). A new container appears at the next tick; a stopped one
disappears only when its key expires. Here each tick's keys share one lease
of ``--ttl`` seconds, which expires exactly like per-key TTLs written at that
tick (etcd v3 has no per-key TTL).

What is registered (service name, address, labels) is the same pure function
the registrar uses (agents.registrar.labels), so the two systems route the
same containers and only the mechanism differs.

    .venv/bin/python bench/classic_register.py --docker-host unix:///... \
        --etcd-host 127.0.0.1:2379 --prefix /classic --host-ip 127.0.10.1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodocker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.common.etcd import Etcd, EtcdError
from agents.common.schema import Instance, instance_key
from agents.common.settings import CommonSettings
from agents.registrar.container import container_from_inspect
from agents.registrar.labels import desired_instances


@dataclass(frozen=True)
class Options:
    """What agents.registrar.labels.desired_instances needs to know about this host."""

    host_ip: str
    host_id: str
    internal: bool = False
    explicit: bool = False


async def running_instances(docker: aiodocker.Docker, options: Options) -> list[Instance]:
    """Every running container's registrations, from a fresh list + inspect (as each tick)."""
    now = datetime.now(UTC)
    instances: list[Instance] = []
    for summary in await docker.containers.list():
        with contextlib.suppress(aiodocker.DockerError):  # gone since the list
            doc: dict[str, Any] = await docker._query_json(f"containers/{summary.id}/json")
            found, _refused = desired_instances(container_from_inspect(doc), options, now)
            instances += found
    return instances


async def tick(docker: aiodocker.Docker, etcd: Etcd, options: Options, args: Any) -> int:
    instances = await running_instances(docker, options)
    if not instances:
        return 0
    lease = await etcd.grant(args.ttl)
    await asyncio.gather(
        *(etcd.put(instance_key(args.prefix, i), i.to_json(), lease=lease) for i in instances)
    )
    return len(instances)


async def run(args: argparse.Namespace, stop: asyncio.Event) -> None:
    options = Options(host_ip=args.host_ip, host_id=args.host_id)
    settings = CommonSettings(etcd_host=args.etcd_host, prefix=args.prefix)
    docker = aiodocker.Docker(url=args.docker_host)
    try:
        async with Etcd(settings) as etcd:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    written = await tick(docker, etcd, options, args)
                    print(f"classic-register: wrote {written} keys", flush=True)
                except (EtcdError, aiodocker.DockerError, OSError) as error:
                    print(f"classic-register: {type(error).__name__}: {error}", flush=True)
                wait = max(0.0, args.interval - (time.monotonic() - started))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
    finally:
        await docker.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docker-host", default="unix:///var/run/docker.sock")
    parser.add_argument("--etcd-host", default="127.0.0.1:2379")
    parser.add_argument("--prefix", default="/pilotfish")
    parser.add_argument("--host-ip", default="127.0.0.1")
    parser.add_argument("--host-id", default="classic")
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--ttl", type=int, default=20)
    args = parser.parse_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run(args, stop)


if __name__ == "__main__":
    asyncio.run(main())
