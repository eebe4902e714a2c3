"""What the discoverer's HAProxy configuration does with one failing server, case by case.

    .venv/bin/python bench/retry_cases.py [--rate 40] [--seconds 3] [--template T.j2]

One service per case and mode, rendered by agents.discoverer.config (the
built-in template, or ``--template`` to compare another), each with three
healthy servers and one that fails in one way; HAProxy runs on that
configuration and bench/load.py sends ``rate`` requests/s through each
service for ``seconds`` (a new connection each, 2 s budget). The failing
server, as a dying container behind docker-proxy looks to HAProxy:

- ``refused``: nothing listens any more (docker-proxy gone);
- ``empty``: accepts, then closes without an answer (docker-proxy whose
  container is gone);
- ``syn-dropped``: a listener whose accept queue is full and never drains:
  SYNs go unanswered (a listener too starved to accept, an address whose
  interface was just removed);
- ``hung``: accepts, reads the request, never answers (docker-proxy still
  dialling a container address being torn down).

Seconds, no Docker, no etcd; every load bounded. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from agents.discoverer.config import RenderOptions, render_config  # noqa: E402
from agents.discoverer.model import Server, Service  # noqa: E402

CASES = ("refused", "empty", "syn-dropped", "hung")
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Upstreams:
    """Healthy servers and the failing ones, on an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.healthy = [free_port() for _ in range(3)]
        self.failing = {case: free_port() for case in CASES}
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> Upstreams:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        self._fill_syn_queue()
        return self

    async def _serve(self) -> None:
        async def healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(ANSWER)
                await writer.drain()
            writer.close()

        async def empty(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(60)
            writer.close()

        for port in self.healthy:
            await asyncio.start_server(healthy, "127.0.0.1", port, backlog=1024)
        await asyncio.start_server(empty, "127.0.0.1", self.failing["empty"])
        await asyncio.start_server(hung, "127.0.0.1", self.failing["hung"])

    def _fill_syn_queue(self) -> None:
        # listen(0), never accept, and hold connections until the queue is full.
        listener = socket.socket()
        listener.bind(("127.0.0.1", self.failing["syn-dropped"]))
        listener.listen(0)
        self._held.append(listener)
        for _ in range(4):
            client = socket.socket()
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", self.failing["syn-dropped"]))
            self._held.append(client)
        time.sleep(0.2)

    def close(self) -> None:
        for sock in self._held:
            sock.close()

        async def stop() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def catalog(upstreams: Upstreams) -> tuple[dict[str, Service], dict[tuple[str, str], int]]:
    services, ports = {}, {}
    for mode in ("http", "tcp"):
        for case in CASES:
            name = f"{mode}{case.replace('-', '')}"
            servers = {
                f"ok{i}": Server(f"ok{i}", "127.0.0.1", p) for i, p in enumerate(upstreams.healthy)
            }
            servers["failing"] = Server("failing", "127.0.0.1", upstreams.failing[case])
            port = free_port()
            services[name] = Service(name, port, mode, servers)  # type: ignore[arg-type]
            ports[(mode, case)] = port
    return services, ports


def run_load(port: int, rate: float, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, str(REPO / "bench" / "load.py"), "--port", str(port),
            "--rate", str(rate), "--duration", str(seconds)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--template", help="a template to compare with the built-in one")
    args = parser.parse_args()
    upstreams = Upstreams().start()
    state = Path(tempfile.mkdtemp(prefix="pf-retry-"))
    services, ports = catalog(upstreams)
    options = RenderOptions(state_dir=str(state), stats_address="off", template=args.template)
    config = state / "haproxy.cfg"
    config.write_text(render_config(services, options))
    haproxy = subprocess.Popen(["haproxy", "-W", "-f", str(config)], stdin=subprocess.DEVNULL)
    results: dict[str, Any] = {}
    try:
        time.sleep(0.5)
        for (mode, case), port in ports.items():
            load = run_load(port, args.rate, args.seconds)
            results[f"{mode} {case}"] = {
                k: load[k] for k in ("total", "failed", "proxy", "client", "why", "answer_ms")
            }
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        upstreams.close()
        shutil.rmtree(state, ignore_errors=True)
    print(f"{'case':<18}{'failed':>10}{'proxy':>7}{'answer p99 ms':>15}{'max':>9}  how")
    for key, r in results.items():
        print(f"{key:<18}{r['failed']:>6}/{r['total']:<3}{r['proxy']:>7}"
              f"{r['answer_ms']['p99']!s:>15}{r['answer_ms']['max']!s:>9}  {r['why']}")  # fmt: skip
    print(json.dumps({"template": args.template or "built-in", "cases": results}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
