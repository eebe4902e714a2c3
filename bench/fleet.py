"""Benchmark: a fleet of registrars and discoverers on a real 3-member etcd cluster.

    .venv/bin/python bench/fleet.py [--hosts 1000 --containers 50 --services 1000]
        [--discoverers 100 --full-discoverers 4 --services-per-consumer 2]
        [--quick]

What runs (all on this machine, traffic on 127.0.0.1 only):
- etcd: a real 3-member cluster (tests/stack.py), started and removed here;
- registrars: ``--hosts`` simulated hosts, each the registrar's real etcd
  side (EtcdSink: LeaseKeeper, the host claim, reconcile/WritePlan, the key
  guard watches) fed by a synthetic Docker source of ``--containers``
  containers. Shared, unlike a real fleet: a few worker processes hold them
  all in one event loop each, and every ``--hosts-per-client`` hosts share
  one etcd client (one gRPC channel, one watch stream for their key guards);
- discoverers: one real ``pilotfish discover`` process driving a real
  HAProxy (every service), and counting discoverers: the real Discoverer
  loop (EtcdSource, guard, CatalogBuilder) with a sink that records what it
  would apply. ``--full-discoverers`` of them serve every service, the
  rest ``--services-per-consumer`` services each (``--services``: one etcd
  watch per service). Each has its own etcd client (gRPC may share the TCP
  connection of one worker process; each keeps its own watch stream).

Scenarios: (1) steady state: etcd requests/s of the whole fleet (sum of
every member's gRPC messages received), etcd CPU and memory, beside the
classic design's per-container refresh (a put per container every 10 s)
measured the same way; (2) cold start of the real discoverer: list and route
every instance through HAProxy, its RSS; (3) fan-out: ``--changes-per-s``
weight changes across the fleet for ``--fanout-s``; from the registrar's
write to each interested discoverer having applied it (wall clock, one
machine), p50/p99, none missed (each discoverer's final catalog is compared
with etcd's); (4) mass failure: ``--fail-hosts`` hosts stop keeping their
leases; until they are gone from every discoverer, and HAProxy's reloads;
(5) mass restart: every other registrar restarts within ``--restart-within``
s (new lease, full reconcile); keys of running instances deleted meanwhile
(a watch of the prefix until the old leases have expired), etcd's request
rate during the storm. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration"), str(REPO / "bench")]

from common import percentiles  # noqa: E402

from agents.common.etcd import Etcd  # noqa: E402
from agents.common.schema import Instance, instance_key, services_prefix  # noqa: E402
from agents.common.settings import CommonSettings  # noqa: E402

PYTHON = sys.executable
CLASSIC_PERIOD = 10.0  # docker-register rewrites every key every 10 s


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the synthetic fleet (same in every process) ---------------------------------------------


def service_name(index: int) -> str:
    return f"svc{index:05d}"


def host_id(host: int) -> str:
    return f"host{host:05d}"


def container_id(host: int, container: int) -> str:
    return hashlib.sha256(f"{host}/{container}".encode()).hexdigest()


def fleet_instance(
    args: argparse.Namespace, host: int, container: int, weight: int = 100
) -> Instance:
    """Container ``container`` of ``host``: services spread evenly over the hosts."""
    index = (host * args.containers + container) % args.services
    return Instance(
        service=service_name(index),
        host_id=host_id(host),
        address="127.0.0.2",  # never connected to: no health check, no traffic
        port=1024 + (host * args.containers + container) % 60000,
        private_port=args.port_base + index,
        container_id=container_id(host, container),
        container_name=f"c{container}",
        image="registry.local/app:1",
        weight=weight,
    )


def settings_for(args: argparse.Namespace, **extra: Any) -> CommonSettings:
    return CommonSettings(etcd_host=args.etcd_host, prefix=args.prefix, etcd_timeout=5.0, **extra)


# -- line protocol between the main process and its workers ----------------------------------


async def serve_commands(handle: Any) -> None:
    """Read one JSON command per line on stdin, answer one JSON line on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        reply = await handle(command)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if command["cmd"] == "stop":
            return
    # The main process went away without a word: stop too, at once.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await handle({"cmd": "stop"})
    os._exit(1)


class Worker:
    """A worker process of this script, driven by JSON lines."""

    def __init__(self, role: str, argv: list[str], logfile: Path) -> None:
        self.role, self.argv, self.logfile = role, argv, logfile
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            PYTHON, __file__, "--role", self.role, *self.argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=self.logfile.open("ab"), limit=2**26,
        )  # fmt: skip

    async def ask(self, command: dict[str, Any], within: float = 600.0) -> Any:
        assert self.proc and self.proc.stdin and self.proc.stdout
        async with self._lock, asyncio.timeout(within):
            self.proc.stdin.write((json.dumps(command) + "\n").encode())
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.role} worker died (see {self.logfile})")
        return json.loads(line)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.ask({"cmd": "stop"}, within=5)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


# -- registrars worker -------------------------------------------------------------------------


class SimulatedHost:
    """One host: the registrar's real EtcdSink with its host claim, fed synthetic containers."""

    def __init__(self, args: argparse.Namespace, host: int, etcd: Etcd) -> None:
        self.args, self.host, self.etcd = args, host, etcd
        self.containers = {
            container_id(host, c): [fleet_instance(args, host, c)] for c in range(args.containers)
        }
        self.sink: Any = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        from agents.registrar.etcd_sink import EtcdSink
        from agents.registrar.host_claim import HostClaim
        from agents.registrar.identity import Engine, Holder

        name = host_id(self.host)
        engine = Engine(id=f"ENGINE-{self.host}", name=name, root_dir="/var/lib/docker")
        holder = Holder.of(engine, host_id(self.host), os.getpid(), time_now())
        claim = HostClaim(self.etcd, self.args.prefix, host_id(self.host), holder)
        extra: dict[str, Any] = {}
        if "previous_lease" in inspect.signature(EtcdSink).parameters:  # older agents: without
            extra["previous_lease"] = lambda: claim.taken_over_lease
        self.sink = EtcdSink(
            self.etcd, prefix=self.args.prefix, host_id=host_id(self.host), ttl=self.args.ttl,
            claim=claim.make, **extra,
        )  # fmt: skip
        self.sink.replace_all(self.containers)
        self.task = asyncio.create_task(self.sink.run())

    async def stop(self) -> None:
        """Gone without a word (its lease is no longer kept): no revoke."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    @property
    def settled(self) -> bool:
        return bool(self.sink and self.sink.synced.is_set() and self.sink.backlog == 0)

    def change_weight(self, container: int, weight: int) -> Instance:
        instance = fleet_instance(self.args, self.host, container, weight)
        self.containers[container_id(self.host, container)] = [instance]
        self.sink.set_container(container_id(self.host, container), [instance])
        return instance


def time_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def registrars_worker(args: argparse.Namespace) -> None:
    hosts_range = range(args.first_host, args.first_host + args.host_count)
    clients_needed = -(-len(hosts_range) // args.hosts_per_client)
    clients = [Etcd(settings_for(args)) for _ in range(clients_needed)]
    for client in clients:
        await client.client.connect()
    hosts = {
        h: SimulatedHost(args, h, clients[i // args.hosts_per_client])
        for i, h in enumerate(hosts_range)
    }
    classic_tasks: list[asyncio.Task[None]] = []

    async def settled(within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(h.settled for h in hosts.values() if h.task is not None):
                return True
            await asyncio.sleep(0.1)
        return False

    # Hosts join in waves: a real fleet does not boot every registrar in the
    # same second, and one event loop would queue them all past etcd's deadline.
    for n, host in enumerate(hosts.values()):
        host.start()
        if (n + 1) % args.start_wave == 0:
            await settled(120)

    async def fanout(rate: float, seconds: float, seed: int) -> list[Any]:
        rng = random.Random(seed)
        live = [h for h in hosts.values() if h.task is not None]
        changes: list[Any] = []
        started, count = time.monotonic(), int(rate * seconds)
        for n in range(count):
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            host = rng.choice(live)
            weight = rng.choice([w for w in range(1, 257) if w != 100])
            instance = host.change_weight(rng.randrange(args.containers), weight)
            changes.append([instance.service, instance.server_name, weight, time.time()])
        return changes

    async def classic(seconds: float) -> dict[str, Any]:
        """docker-register's design: every container's key rewritten every 10 s (own prefix)."""
        writes = 0

        async def one_host(host: SimulatedHost, offset: float) -> None:
            nonlocal writes
            await asyncio.sleep(offset)
            while True:
                begun = time.monotonic()
                for instances in host.containers.values():
                    for instance in instances:
                        key = instance_key(args.prefix + "-classic", instance)
                        await host.etcd.put(key, instance.to_json())
                        writes += 1
                await asyncio.sleep(max(0.0, CLASSIC_PERIOD - (time.monotonic() - begun)))

        rng = random.Random(1)
        for host in hosts.values():
            offset = rng.uniform(0, CLASSIC_PERIOD)
            classic_tasks.append(asyncio.create_task(one_host(host, offset)))
        await asyncio.sleep(seconds)
        for task in classic_tasks:
            task.cancel()
        await asyncio.gather(*classic_tasks, return_exceptions=True)
        return {"writes": writes}

    async def restart(within: float, skip: set[int]) -> dict[str, Any]:
        rng = random.Random(2)

        async def one(host: SimulatedHost) -> None:
            await asyncio.sleep(rng.uniform(0, within))
            await host.stop()
            host.start()

        begun = time.monotonic()
        await asyncio.gather(*(one(h) for n, h in hosts.items() if n not in skip))
        restarted_in = time.monotonic() - begun
        ok = await settled(600)
        return {"restarted_in_s": round(restarted_in, 2), "settled": ok,
                "settled_s": round(time.monotonic() - begun, 2)}  # fmt: skip

    failed: set[int] = set()

    async def handle(command: dict[str, Any]) -> Any:
        cmd = command["cmd"]
        if cmd == "settled":
            return {"ok": await settled(command.get("within", 600))}
        if cmd == "requests":
            return {"requests": sum(c.request_count for c in clients)}
        if cmd == "fanout":
            return {"changes": await fanout(command["rate"], command["seconds"], command["seed"])}
        if cmd == "classic":
            return await classic(command["seconds"])
        if cmd == "fail":
            for n in command["hosts"]:
                if n in hosts:
                    failed.add(n)
                    await hosts[n].stop()
            return {"ok": True}
        if cmd == "restart":
            return await restart(command["within"], failed)
        if cmd == "stop":
            for host in hosts.values():
                await host.stop()
            for client in clients:
                await client.close()
            return {"ok": True}
        raise ValueError(cmd)

    await serve_commands(handle)


# -- discoverers worker ------------------------------------------------------------------------


class CountingSink:
    """The HAProxy side of a counting discoverer: records what it would apply."""

    def __init__(self) -> None:
        self.previous: dict[str, Any] = {}
        self.applies = 0
        self.changes: dict[tuple[str, str, int], float] = {}  # (service, server, weight) -> when

    async def start(self, catalog: Any) -> None:
        await self.apply(catalog)

    async def apply(self, catalog: Any) -> None:
        now = time.time()
        self.applies += 1
        for name, service in catalog.items():
            before = self.previous.get(name)
            if before is service:
                continue  # unchanged services are the same object
            old = before.servers if before is not None else {}
            for server in service.servers.values():
                was = old.get(server.name)
                if was is None or was.weight != server.weight:
                    self.changes.setdefault((name, server.name, server.weight), now)
        self.previous = catalog

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self, stop_haproxy: bool = False) -> None:
        return None

    def healthy(self) -> tuple[bool, dict[str, object]]:
        return True, {}

    def refused(self) -> dict[tuple[str, str | None], str]:
        return {}


def catalog_digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:16]


async def discoverers_worker(args: argparse.Namespace) -> None:
    from agents.common.prefix_source import EtcdSource
    from agents.common.settings import DiscovererSettings
    from agents.discoverer.agent import Discoverer
    from agents.discoverer.model import ListenRules

    specs: list[dict[str, Any]] = json.loads(args.specs)
    state_dir = tempfile.mkdtemp(prefix="pffleet-d")
    running: dict[str, tuple[Any, Any, CountingSink, Etcd, asyncio.Task[None]]] = {}
    for spec in specs:
        settings = DiscovererSettings(
            etcd_host=args.etcd_host, prefix=args.prefix, services=",".join(spec["services"]),
            state_dir=state_dir, admin_address="off", stats_address="off",
        )  # fmt: skip
        etcd = Etcd(settings)
        source = EtcdSource(etcd, args.prefix, services=spec["services"])
        sink = CountingSink()
        discoverer = Discoverer(settings, source, sink, rules=ListenRules())
        task = asyncio.create_task(discoverer.run())
        running[spec["id"]] = (discoverer, source, sink, etcd, task)
    gone_at: dict[str, float] = {}

    async def watch_gone(servers: list[list[str]], within: float) -> None:
        """When each discoverer's catalog no longer holds any of ``servers``."""
        pending = set(running)
        deadline = time.monotonic() + within
        while pending and time.monotonic() < deadline:
            for ident in list(pending):
                catalog = running[ident][0].catalog
                if not any(s in catalog and n in catalog[s].servers for s, n in servers):
                    gone_at[ident] = time.time()
                    pending.discard(ident)
            await asyncio.sleep(0.02)

    gone_task: asyncio.Task[None] | None = None

    async def handle(command: dict[str, Any]) -> Any:
        nonlocal gone_task
        cmd = command["cmd"]
        if cmd == "served":
            return {i: r[0].served for i, r in running.items()}
        if cmd == "digest":
            return {
                i: {
                    "digest": catalog_digest(
                        f"{s}/{n}/{v.weight}/{v.state}"
                        for s, service in r[0].catalog.items() for n, v in service.servers.items()
                    ),
                    "served": r[0].served,
                    "watch_events": r[1].metrics.watch_events._value.get(),
                    "applies": r[2].applies,
                }
                for i, r in running.items()
            }  # fmt: skip
        if cmd == "changes":
            return {i: [[*k, t] for k, t in r[2].changes.items()] for i, r in running.items()}
        if cmd == "reset_changes":
            for r in running.values():
                r[2].changes.clear()
            return {"ok": True}
        if cmd == "watch_gone":
            gone_at.clear()
            gone_task = asyncio.create_task(watch_gone(command["servers"], command["within"]))
            return {"ok": True}
        if cmd == "gone_at":
            if gone_task is not None:
                await gone_task
            return dict(gone_at)
        if cmd == "stop":
            for _, _, _, etcd, task in running.values():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await etcd.close()
            shutil.rmtree(state_dir, ignore_errors=True)
            return {"ok": True}
        raise ValueError(cmd)

    await serve_commands(handle)


# -- the cost of one change in a discoverer, in-process ---------------------------------------


async def apply_cost(args: argparse.Namespace) -> None:
    """ms per single-change batch through a full discoverer's real loop (source
    state, guard, catalog builder) holding ``--hosts`` x ``--containers``
    instances, with a counting sink: what caps the changes/s one core absorbs."""
    from agents.common.prefix_state import PrefixState
    from agents.common.settings import DiscovererSettings
    from agents.discoverer.agent import Discoverer
    from agents.discoverer.model import ListenRules

    state = PrefixState(args.prefix)
    fleet = [fleet_instance(args, h, c) for h in range(args.hosts) for c in range(args.containers)]
    state.replace(1, ((instance_key(args.prefix, i), i.to_json(), n + 2, n + 2)
                      for n, i in enumerate(fleet)))  # fmt: skip
    rng = random.Random(5)
    timing: list[float] = []
    done = asyncio.Event()

    class OneChangeAtATime:
        pending = False

        async def updates(self) -> Any:
            yield state.take_batch()
            # Resumed once the initial list is handled; the loop asks for each
            # next batch once it handled the previous one.
            timing.append(time.perf_counter())
            for n in range(args.changes):
                old = rng.choice(fleet)
                new = old.model_copy(update={"weight": n % 200 + 1})
                state.apply(instance_key(args.prefix, new), new.to_json(), len(fleet) + 2 + n)
                yield state.take_batch()
            timing.append(time.perf_counter())
            done.set()
            await asyncio.Event().wait()

        def status(self) -> dict[str, object]:
            return {}

        async def wait_for_changes(self, at_most: float) -> None:
            await asyncio.sleep(at_most)

    settings = DiscovererSettings(
        etcd_host="127.0.0.1:2379", prefix=args.prefix, state_dir=tempfile.gettempdir(),
        admin_address="off", stats_address="off",
    )  # fmt: skip
    sink = CountingSink()
    discoverer = Discoverer(settings, OneChangeAtATime(), sink, rules=ListenRules())
    task = asyncio.create_task(discoverer.run())
    await done.wait()
    per_change = (timing[1] - timing[0]) / args.changes * 1000
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    print(json.dumps({"instances": len(fleet), "services": args.services,
                      "changes": args.changes, "ms_per_change": round(per_change, 3)}))  # fmt: skip


# -- measuring etcd ----------------------------------------------------------------------------


def etcd_counters(cluster: Any) -> dict[str, float]:
    """Every member's gRPC messages received, by method, summed over the members."""
    totals: dict[str, float] = {}
    for member in cluster.members:
        with urllib.request.urlopen(f"{member.client_url}/metrics", timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("grpc_server_msg_received_total{"):
                labels, _, value = line.rpartition(" ")
                method = labels.split('grpc_method="')[1].split('"')[0]
                totals[method] = totals.get(method, 0.0) + float(value)
    return totals


def etcd_usage(cluster: Any) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) summed over the members."""
    from common import cpu_seconds

    cpu = rss = 0.0
    for member in cluster.members:
        cpu += cpu_seconds(member.pid) or 0.0
        for line in Path(f"/proc/{member.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
    return cpu, rss


async def measure_etcd(cluster: Any, seconds: float) -> dict[str, Any]:
    before, (cpu0, _) = etcd_counters(cluster), etcd_usage(cluster)
    begun = time.monotonic()
    await asyncio.sleep(seconds)
    after, (cpu1, rss) = etcd_counters(cluster), etcd_usage(cluster)
    took = time.monotonic() - begun
    by_method = {m: round((after[m] - before.get(m, 0.0)) / took, 1) for m in after}
    return {
        "rps": round(sum(by_method.values()), 1),
        "by_method": {m: r for m, r in by_method.items() if r > 0},
        "etcd_cpu_pct": round(100 * (cpu1 - cpu0) / took, 1),
        "etcd_rss_mb": round(rss, 1),
    }


# -- the real discoverer (HAProxy) -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthz(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/healthz"
    with contextlib.suppress(Exception), urllib.request.urlopen(url, timeout=5) as response:
        return dict(json.loads(response.read()))
    return {}


async def haproxy_server_rows(state_dir: Path) -> int:
    """Servers in HAProxy's ``show servers state`` (every backend)."""
    path = state_dir / "admin.sock"
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=2**26)
            writer.write(b"show servers state\n")
            data = await reader.read(-1)
            writer.close()
            lines = data.decode(errors="replace").splitlines()[2:]
            return sum(1 for line in lines if line.strip() and not line.startswith("#"))
    return -1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# -- the main process --------------------------------------------------------------------------


def consumer_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(3)
    specs = []
    for n in range(args.discoverers - 1):  # one more: the real one, with HAProxy
        if n < args.full_discoverers:
            services: list[str] = []
        else:
            picked = rng.sample(range(args.services), args.services_per_consumer)
            services = [service_name(i) for i in sorted(picked)]
        specs.append({"id": f"d{n:03d}", "services": services})
    return specs


async def etcd_state(args: argparse.Namespace) -> dict[str, list[tuple[str, str, int, str]]]:
    """service -> (service, server, weight, state) of every instance in etcd."""
    from agents.common.schema import parse_entry

    async with Etcd(settings_for(args)) as etcd:
        _, items = await etcd.get_prefix(services_prefix(args.prefix))
    state: dict[str, list[tuple[str, str, int, str]]] = {}
    for item in items:
        i = parse_entry(args.prefix, item.key.decode(), item.value)
        state.setdefault(i.service, []).append((i.service, i.server_name, i.weight, i.state))
    return state


async def count_deletes(args: argparse.Namespace, start: int, stop: asyncio.Event) -> list[str]:
    """Keys deleted under the services prefix from revision ``start`` until ``stop``."""
    deleted: list[str] = []
    async with Etcd(settings_for(args)) as etcd:
        events = etcd.watch_prefix(services_prefix(args.prefix), start)
        waiter = asyncio.create_task(stop.wait())
        while not stop.is_set():
            nxt = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({nxt, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                break
            event = nxt.result()
            if event.value is None:
                deleted.append(event.key.decode())
        await events.aclose()
    return deleted


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tests.stack import EtcdCluster

    result: dict[str, Any] = {
        "instances": args.hosts * args.containers,
        "hosts": args.hosts,
        "services": args.services,
        "discoverers": args.discoverers,
    }
    etcd_dir = Path(tempfile.mkdtemp(prefix="pffleet-etcd-", dir=args.etcd_dir))
    cluster = EtcdCluster(etcd_dir, 3)
    workers: list[Worker] = []
    real: asyncio.subprocess.Process | None = None
    try:
        log("starting a 3-member etcd cluster")
        cluster.start()
        args.etcd_host = cluster.etcd_host
        common = ["--etcd-host", args.etcd_host, "--prefix", args.prefix, *args.shape]
        per = -(-args.hosts // args.registrar_workers)
        registrars = [
            Worker("registrars", [*common, "--first-host", str(n), "--host-count",
                                  str(min(per, args.hosts - n))], workdir / f"reg{n}.log")
            for n in range(0, args.hosts, per)
        ]  # fmt: skip
        workers += registrars
        begun = time.monotonic()
        log(f"starting {args.hosts} registrars ({len(registrars)} processes)")
        await asyncio.gather(*(w.start() for w in registrars))
        oks = await asyncio.gather(*(w.ask({"cmd": "settled"}) for w in registrars))
        assert all(o["ok"] for o in oks), "registrars did not settle"
        result["fleet_registered_s"] = round(time.monotonic() - begun, 1)
        log(f"{result['instances']} instances registered in {result['fleet_registered_s']} s")

        specs = consumer_specs(args)
        per_d = -(-len(specs) // args.discoverer_workers)
        discoverers = [
            Worker("discoverers", [*common, "--specs", json.dumps(specs[n : n + per_d])],
                   workdir / f"disc{n}.log")
            for n in range(0, len(specs), per_d)
        ]  # fmt: skip
        workers += discoverers
        expected = await etcd_state(args)
        served_by = {s["id"]: s["services"] for s in specs}

        def expected_for(ident: str) -> list[tuple[str, str, int, str]]:
            services = served_by[ident] or list(expected)
            return [row for s in services for row in expected.get(s, [])]

        log(f"starting {len(specs)} counting discoverers")
        begun = time.monotonic()
        await asyncio.gather(*(w.start() for w in discoverers))
        await until_served(discoverers, {i: len(expected_for(i)) for i in served_by}, 600)
        result["counting_discoverers_listed_s"] = round(time.monotonic() - begun, 1)

        # (1) steady state, then the classic design's refresh, measured the same way.
        log(f"(1) steady state for {args.steady_s} s")
        await asyncio.sleep(args.ttl / 3)  # past the startup's writes
        requests0 = sum([(await w.ask({"cmd": "requests"}))["requests"] for w in registrars])
        steady = await measure_etcd(cluster, args.steady_s)
        requests1 = sum([(await w.ask({"cmd": "requests"}))["requests"] for w in registrars])
        steady["registrar_client_rps"] = round((requests1 - requests0) / args.steady_s, 1)
        steady["goal_rps"] = round(args.hosts / (args.ttl / 3), 1)
        result["steady"] = steady
        log(f"    {steady}")
        log(f"    baseline: per-container refresh every {CLASSIC_PERIOD:g} s")
        classic = [asyncio.create_task(w.ask({"cmd": "classic", "seconds": args.baseline_s + 11}))
                   for w in registrars]  # fmt: skip
        await asyncio.sleep(CLASSIC_PERIOD + 1)  # every host has started its round
        baseline = await measure_etcd(cluster, args.baseline_s)
        writes = sum(r["writes"] for r in await asyncio.gather(*classic))
        # The classic design keeps no lease: its load is the puts (our fleet's
        # keep-alives, still running meanwhile, are left out).
        baseline["rps"] = round(baseline["rps"] - baseline["by_method"].get("LeaseKeepAlive", 0), 1)
        baseline["wanted_rps"] = round(result["instances"] / CLASSIC_PERIOD, 1)
        baseline["writes"] = writes
        result["baseline_steady"] = baseline
        log(f"    {baseline}")

        # (2) cold start of the real discoverer with HAProxy.
        log("(2) cold start: the real discoverer with HAProxy, every service")
        state_dir = workdir / "real"
        state_dir.mkdir()
        admin = free_port()
        begun = time.monotonic()
        real = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "agents", "discover", "--etcd-host", args.etcd_host,
            "--prefix", args.prefix, "--state-dir", str(state_dir),
            "--admin-address", f"127.0.0.1:{admin}", "--stats-address", f"127.0.0.1:{free_port()}",
            "--stop-haproxy-on-exit", "--log-level", "warning",
            cwd=REPO, stderr=(workdir / "real.log").open("ab"),
        )  # fmt: skip
        total = result["instances"]
        while healthz(admin).get("instances") != total:
            assert real.returncode is None, "the real discoverer died"
            assert time.monotonic() - begun < 300, "cold start over 300 s"
            await asyncio.sleep(0.1)
        result["cold_start_s"] = round(time.monotonic() - begun, 2)
        result["haproxy_servers"] = await haproxy_server_rows(state_dir)
        result["discoverer_rss_mb"] = rss_mb(real.pid)
        log(f"    {result['cold_start_s']} s, RSS {result['discoverer_rss_mb']} MB, "
            f"HAProxy servers {result['haproxy_servers']}")  # fmt: skip

        # (3) fan-out.
        log(f"(3) fan-out: {args.changes_per_s}/s for {args.fanout_s} s")
        for w in discoverers:
            await w.ask({"cmd": "reset_changes"})
        rate = args.changes_per_s / len(registrars)
        replies = await asyncio.gather(*(w.ask({"cmd": "fanout", "rate": rate,
                                                "seconds": args.fanout_s, "seed": n})
                                         for n, w in enumerate(registrars)))  # fmt: skip
        changes = [c for r in replies for c in r["changes"]]
        await asyncio.gather(*(w.ask({"cmd": "settled"}) for w in registrars))
        await asyncio.sleep(2.0)
        applied: dict[str, dict[tuple[str, str, int], float]] = {}
        digests: dict[str, Any] = {}
        for w in discoverers:
            for ident, rows in (await w.ask({"cmd": "changes"})).items():
                applied[ident] = {(s, n, wt): t for s, n, wt, t in rows}
            digests.update(await w.ask({"cmd": "digest"}))
        latencies, missed = [], 0
        final: dict[tuple[str, str], int] = {}
        for service, server, weight, _ in changes:
            final[(service, server)] = weight  # the last change of a server wins
        for service, server, weight, put_at in changes:
            if final[(service, server)] != weight:
                continue  # overwritten by a later change: may be folded away
            for ident, services in served_by.items():
                if services and service not in services:
                    continue
                at = applied[ident].get((service, server, weight))
                if at is None:
                    missed += 1
                else:
                    latencies.append((at - put_at) * 1000)
        expected = await etcd_state(args)
        mismatched = [
            i for i, d in digests.items()
            if d["digest"] != catalog_digest(f"{s}/{n}/{w}/{st}" for s, n, w, st in expected_for(i))
        ]  # fmt: skip
        filtered = [i for i, s in served_by.items() if s]
        full = [i for i, s in served_by.items() if not s]
        result["fanout_ms"] = percentiles(latencies)
        result["fanout_samples"] = len(latencies)
        result["fanout_missed"] = missed + len(mismatched)
        result["fanout_final_state_mismatch"] = mismatched
        result["fanout_changes"] = len(changes)
        result["fanout_watch_events"] = {
            "full_discoverer": digests[full[0]]["watch_events"] if full else None,
            "filtered_discoverer_mean": round(
                sum(digests[i]["watch_events"] for i in filtered) / max(1, len(filtered)), 1
            ),
            "filtered_discoverer_services": args.services_per_consumer,
        }
        log(f"    {result['fanout_ms']} missed {result['fanout_missed']} "
            f"watch events {result['fanout_watch_events']}")  # fmt: skip

        # (4) mass failure.
        reloads0 = healthz(admin).get("haproxy", {}).get("reloads")
        failing = random.Random(4).sample(range(args.hosts), args.fail_hosts)
        dead = [fleet_instance(args, h, c) for h in failing for c in range(args.containers)]
        servers = [[i.service, i.server_name] for i in dead]
        log(f"(4) mass failure: {len(failing)} hosts, {len(servers)} instances")
        within = args.ttl + 60
        for w in discoverers:
            await w.ask({"cmd": "watch_gone", "servers": servers, "within": within})
        stopped_at = time.time()
        await asyncio.gather(*(w.ask({"cmd": "fail", "hosts": failing}) for w in registrars))
        left = total - len(servers)
        begun = time.monotonic()
        while time.monotonic() - begun < within:  # polled: another process
            if healthz(admin).get("instances") == left:
                break
            await asyncio.sleep(0.05)
        real_gone = time.time()
        gone: dict[str, float] = {}
        for w in discoverers:
            gone.update(await w.ask({"cmd": "gone_at"}, within=within + 30))
        not_gone = len(specs) - len(gone)
        result["mass_failure_s"] = round(max([*gone.values(), real_gone]) - stopped_at, 2)
        result["mass_failure_not_gone"] = not_gone + (healthz(admin).get("instances") != left)
        result["mass_failure_haproxy_reloads"] = healthz(admin).get("haproxy", {}).get(
            "reloads", 0
        ) - (reloads0 or 0)
        log(f"    gone everywhere after {result['mass_failure_s']} s (TTL {args.ttl}), "
            f"reloads {result['mass_failure_haproxy_reloads']}")  # fmt: skip

        # (5) mass restart.
        log(f"(5) mass restart: {args.hosts - len(failing)} registrars within "
            f"{args.restart_within} s")  # fmt: skip
        async with Etcd(settings_for(args)) as etcd:
            start_revision = await etcd.revision() + 1
        stop_watch = asyncio.Event()
        watcher = asyncio.create_task(count_deletes(args, start_revision, stop_watch))
        before, (cpu0, _) = etcd_counters(cluster), etcd_usage(cluster)
        begun = time.monotonic()
        restarts = await asyncio.gather(*(w.ask({"cmd": "restart", "within": args.restart_within},
                                                within=900) for w in registrars))  # fmt: skip
        storm_s = time.monotonic() - begun
        after, (cpu1, rss) = etcd_counters(cluster), etcd_usage(cluster)
        await asyncio.sleep(args.ttl + 2)  # the old leases expire meanwhile
        stop_watch.set()
        deleted = await watcher
        failed_hosts = {host_id(h) for h in failing}
        running_deleted = [k for k in deleted if k.split("/")[-2] not in failed_hosts]
        result["mass_restart_deleted"] = len(running_deleted)
        result["mass_restart"] = {
            "settled_s": max(r["settled_s"] for r in restarts),
            "settled": all(r["settled"] for r in restarts),
            "etcd_rps": round((sum(after.values()) - sum(before.values())) / storm_s, 1),
            "etcd_cpu_pct": round(100 * (cpu1 - cpu0) / storm_s, 1),
            "etcd_rss_mb": round(rss, 1),
        }
        log(f"    {result['mass_restart']}, deleted {result['mass_restart_deleted']}")
        return result
    finally:
        if real is not None and real.returncode is None:
            real.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await real.wait()
            if real.returncode is None:
                real.kill()
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        cluster.close()
        shutil.rmtree(etcd_dir, ignore_errors=True)


async def until_served(workers: list[Worker], expected: dict[str, int], within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        served: dict[str, int] = {}
        for w in workers:
            served.update(await w.ask({"cmd": "served"}))
        if all(served.get(i) == n for i, n in expected.items()):
            return
        if time.monotonic() > deadline:
            wrong = {i: (served.get(i), n) for i, n in expected.items() if served.get(i) != n}
            raise RuntimeError(f"discoverers did not converge: {list(wrong.items())[:5]}")
        await asyncio.sleep(0.2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--role", default="main", choices=["main", "registrars", "discoverers", "apply-cost"])
    add("--changes", type=int, default=500, help="apply-cost: single-change batches")
    add("--quick", action="store_true", help="a small fleet, in under 2 minutes")
    add("--hosts", type=int, default=1000)
    add("--containers", type=int, default=50, help="per host")
    add("--services", type=int, default=1000)
    add("--ttl", type=int, default=15, help="the registrars' lease TTL")
    add("--discoverers", type=int, default=100, help="including the real one")
    add("--full-discoverers", type=int, default=4, help="counting ones that serve every service")
    add("--services-per-consumer", type=int, default=2)
    add("--hosts-per-client", type=int, default=1, help="simulated hosts per etcd client")
    add("--registrar-workers", type=int, default=2)
    add("--start-wave", type=int, default=10, help="hosts started together, per worker")
    add("--etcd-dir", default="/dev/shm", help="where the etcd members keep their data")
    add("--discoverer-workers", type=int, default=2)
    add("--steady-s", type=float, default=30.0)
    add("--baseline-s", type=float, default=20.0)
    add("--changes-per-s", type=float, default=100.0)
    add("--fanout-s", type=float, default=60.0)
    add("--fail-hosts", type=int, default=100)
    add("--restart-within", type=float, default=10.0)
    add("--port-base", type=int, default=0, help="first consumer port (default: a free block)")
    add("--prefix", default="/fleet")
    add("--etcd-host", default="")
    add("--first-host", type=int, default=0)
    add("--host-count", type=int, default=0)
    add("--specs", default="[]")
    args = parser.parse_args(argv)
    if args.quick:
        args.hosts, args.containers, args.services, args.ttl = 40, 10, 40, 5
        args.discoverers, args.full_discoverers, args.hosts_per_client = 10, 2, 10
        args.steady_s, args.baseline_s, args.changes_per_s, args.fanout_s = 5.0, 10.0, 20.0, 8.0
        args.fail_hosts, args.restart_within = 4, 3.0
    return args


def shape_argv(args: argparse.Namespace) -> list[str]:
    """The fleet's shape, passed on to the workers (they rebuild the same instances)."""
    return [
        *("--hosts", str(args.hosts), "--containers", str(args.containers)),
        *("--services", str(args.services), "--ttl", str(args.ttl)),
        *("--hosts-per-client", str(args.hosts_per_client), "--port-base", str(args.port_base)),
        *("--start-wave", str(args.start_wave)),
    ]


async def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.role == "apply-cost":
        await apply_cost(args)
        return None
    if args.role != "main":
        from agents.common.logging import configure_logging

        configure_logging("warning", "json")
        worker = registrars_worker if args.role == "registrars" else discoverers_worker
        await worker(args)
        return None
    if not args.port_base:
        from discoverer import free_port_block  # bench/discoverer.py

        args.port_base = free_port_block(args.services)
    args.shape = shape_argv(args)
    workdir = Path(tempfile.mkdtemp(prefix="pffleet-"))
    began = time.monotonic()
    # SIGTERM (timeout, CI) unwinds like Ctrl-C: workers, HAProxy, etcd cleaned up.
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    try:
        result = await run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "instances": result["instances"],
        "steady_etcd_rps": result["steady"]["rps"],
        "baseline_steady_etcd_rps": result["baseline_steady"]["rps"],
        "steady_etcd_cpu_pct": result["steady"]["etcd_cpu_pct"],
        "steady_etcd_rss_mb": result["steady"]["etcd_rss_mb"],
        "baseline_steady_etcd_cpu_pct": result["baseline_steady"]["etcd_cpu_pct"],
        "cold_start_s": result["cold_start_s"],
        "discoverer_rss_mb": result["discoverer_rss_mb"],
        "fanout_ms": {k: result["fanout_ms"][k] for k in ("p50", "p99")},
        "fanout_missed": result["fanout_missed"],
        "mass_failure_s": result["mass_failure_s"],
        "mass_failure_haproxy_reloads": result["mass_failure_haproxy_reloads"],
        "mass_restart_deleted": result["mass_restart_deleted"],
        "mass_restart_etcd_rps": result["mass_restart"]["etcd_rps"],
        "took_s": round(time.monotonic() - began, 1),
        "details": result,
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    asyncio.run(main())
