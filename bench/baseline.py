"""The reload-based baseline the discoverer is measured against.

What docker-discover, confd and consul-template do: every ``--interval``
seconds read the whole prefix, re-render the full HAProxy configuration, and
if it changed, validate it (``haproxy -c``) and reload HAProxy. Runs as its
own process with its own HAProxy (master-worker, reloaded with SIGUSR2, so
listening sockets are kept: the kindest form of the baseline).

    .venv/bin/python bench/baseline.py --etcd-host 127.0.0.1:2379 --prefix /x \
        --state-dir /tmp/b --bind-address 127.0.0.1

It writes ``<state-dir>/status.json`` after each reload: reloads, revision.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

from agents.common.etcd import Etcd, EtcdError
from agents.common.schema import Instance, SchemaError, parse_entry, services_prefix
from agents.common.settings import CommonSettings
from agents.discoverer.model import Catalog, build_catalog


def render(
    catalog: Catalog, bind: str, state_dir: Path, check_all: bool = False, log: bool = False
) -> str:
    """The full configuration, every server static (as the template tools do).

    ``log``: a line per request on HAProxy's stdout (bench/e2e.py reads the
    timers to tell a slow server from a slow proxy).
    """
    lines = [
        "global",
        *(["    log stdout format raw local0"] if log else []),
        f"    stats socket {state_dir}/haproxy.sock mode 600 level admin",
        "    maxconn 4000",
        "defaults",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
    ]
    for name in sorted(catalog):
        service = catalog[name]
        lines += [
            f"frontend f_{name}",
            f"    mode {service.mode}",
            f"    bind {bind}:{service.bind_port}",
            *(["    log global", f"    option {service.mode}log"] if log else []),
            f"    default_backend b_{name}",
            *(["    option idle-close-on-response"] if service.mode == "http" else []),
            f"backend b_{name}",
            f"    mode {service.mode}",
            "    balance roundrobin",
        ]
        for server in sorted(service.servers.values(), key=lambda s: s.name):
            options = f" weight {server.weight}"
            if server.check or check_all:
                # --check-all: health-check every server, as the classic
                # docker-discover deployments did; dead containers left in the
                # config until their key expires are then taken out of rotation.
                options += " check inter 1s fall 2 rise 1"
            if server.state == "draining":
                options += " disabled"
            lines.append(f"    server {server.name} {server.address}:{server.port}{options}")
    return "\n".join(lines) + "\n"


class Baseline:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_dir = Path(args.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.state_dir / "haproxy.cfg"
        self.settings = CommonSettings(etcd_host=args.etcd_host, prefix=args.prefix)
        self.master: asyncio.subprocess.Process | None = None
        self.reloads = 0
        self.last_config = ""

    async def poll_once(self, etcd: Etcd) -> None:
        revision, items = await etcd.get_prefix(services_prefix(self.settings.prefix))
        instances: list[Instance] = []
        for kv in items:
            try:
                instances.append(parse_entry(self.settings.prefix, kv.key, kv.value))
            except SchemaError:
                continue
        catalog, _ = build_catalog(instances)
        config = render(
            catalog, self.args.bind_address, self.state_dir, self.args.check_all,
            self.args.log_requests,
        )  # fmt: skip
        if config == self.last_config:
            return
        candidate = self.state_dir / "haproxy.cfg.new"
        candidate.write_text(config)
        if not await self._check(candidate):
            return
        os.replace(candidate, self.config_path)
        self.last_config = config
        await self._reload()
        self._write_status(revision, len(instances))

    async def _check(self, path: Path) -> bool:
        proc = await asyncio.create_subprocess_exec(
            self.args.haproxy_binary, "-c", "-q", "-f", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            print(f"baseline: config rejected: {err.decode()[:500]}", flush=True)
        return proc.returncode == 0

    async def _reload(self) -> None:
        if self.master is None or self.master.returncode is not None:
            self.master = await asyncio.create_subprocess_exec(
                self.args.haproxy_binary, "-W", "-S", str(self.state_dir / "master.sock"),
                "-f", str(self.config_path),
            )  # fmt: skip
            return
        self.reloads += 1
        self.master.send_signal(signal.SIGUSR2)

    def _write_status(self, revision: int, instances: int) -> None:
        status = {
            "reloads": self.reloads,
            "revision": revision,
            "instances": instances,
            "applied_at": time.time(),
            "master_pid": self.master.pid if self.master else None,
        }
        tmp = self.state_dir / "status.json.new"
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.state_dir / "status.json")

    async def run(self, stop: asyncio.Event) -> None:
        async with Etcd(self.settings) as etcd:
            while not stop.is_set():
                try:
                    await self.poll_once(etcd)
                except EtcdError as error:
                    print(f"baseline: etcd: {error}", flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.args.interval)
        if self.master is not None and self.master.returncode is None:
            self.master.terminate()
            await self.master.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--etcd-host", default="127.0.0.1:2379")
    parser.add_argument("--prefix", default="/pilotfish")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--bind-address", default="127.0.0.1")
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--check-all", action="store_true", help="health-check every server")
    parser.add_argument("--log-requests", action="store_true", help="HAProxy logs each request")
    parser.add_argument("--haproxy-binary", default="haproxy")
    args = parser.parse_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await Baseline(args).run(stop)


if __name__ == "__main__":
    asyncio.run(main())
