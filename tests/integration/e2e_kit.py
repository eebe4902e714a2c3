"""The agents as black boxes: subprocesses, HTTP through HAProxy, its stats page.

Shared by the end-to-end test (test_multihost.py) and bench/e2e.py. Nothing
here imports the agents' internals: the agents run as
``python -m agents register|discover`` with flags, exactly as deployed, so
these helpers keep working while the agents' code moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# A server HAProxy sends traffic to: checked and UP, or not checked at all.
_SERVING = ("UP", "no check")


# --- ports and addresses ------------------------------------------------------------------


def free_port(*hosts: str) -> int:
    """A TCP port free right now on every one of ``hosts`` (default 127.0.0.1)."""
    hosts = hosts or ("127.0.0.1",)
    for _attempt in range(100):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
        if all(_bindable(host, port) for host in hosts[1:]):
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# --- the agents as subprocesses -------------------------------------------------------------


def _argv(command: str, flags: Mapping[str, str | int | float | bool]) -> list[str]:
    argv = [PYTHON, "-m", "agents", command]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


def pid_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (HAProxy master and workers under a discoverer)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (an HAProxy started in a state dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@dataclass
class Agent:
    """One ``pilotfish register|discover`` subprocess and its log file."""

    name: str
    argv: list[str]
    log_path: Path
    marker: str = ""  # a string in the command line of processes it starts (state dir)
    env: Mapping[str, str] = field(default_factory=dict)  # variables (an environment file's)
    popen: subprocess.Popen[bytes] | None = None
    started_pids: set[int] = field(default_factory=set)

    @classmethod
    def start(
        cls,
        name: str,
        command: str,
        flags: Mapping[str, str | int | float | bool],
        log_dir: Path,
        marker: str = "",
        env: Mapping[str, str] | None = None,
    ) -> Agent:
        agent = cls(name, _argv(command, flags), log_dir / f"{name}.log", marker, dict(env or {}))
        agent.spawn()
        return agent

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "PILOTFISH_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on the test run must not hit it first
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def descendants(self) -> list[int]:
        """Its process tree plus processes naming its marker (a daemonised HAProxy)."""
        pids = set(pid_tree(self.pid)) if self.alive() else set()
        if self.marker:
            pids |= set(pids_mentioning(self.marker))
        self.started_pids |= pids - {self.pid}
        return sorted(pids)

    def kill(self) -> None:
        """SIGKILL the agent alone (a host dying): what it started keeps running."""
        self.descendants()
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            assert self.popen is not None
            self.popen.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout``; then anything it started that outlived it."""
        if self.popen is None:
            return None
        if self.alive():
            self.descendants()
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._sweep()
        return self.popen.returncode

    def _sweep(self) -> None:
        # Only pids this agent started (seen in its tree or carrying its state dir).
        leftovers = self.started_pids | set(pids_mentioning(self.marker) if self.marker else [])
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            return f"--- {self.log_path} ---\n" + "\n".join(text)
        return f"--- {self.log_path}: no log ---"


def registrar_flags(
    etcd_host: str, prefix: str, host_id: str, docker_host: str, host_ip: str, ttl: int
) -> dict[str, str | int | float | bool]:
    return {
        "etcd_host": etcd_host,
        "prefix": prefix,
        "host_id": host_id,
        "docker_host": docker_host,
        "host_ip": host_ip,
        "ttl": ttl,
        "admin_address": f"127.0.0.1:{free_port()}",
    }


@dataclass(frozen=True)
class Consumer:
    """Where a discoverer's HAProxy serves: frontends on ``bind``, stats on ``stats``."""

    bind: str
    stats: str
    admin: str
    state_dir: Path


def discoverer_flags(
    etcd_host: str, prefix: str, state_dir: Path, bind: str = "127.0.0.1", **extra: str | float
) -> tuple[Consumer, dict[str, str | int | float | bool]]:
    consumer = Consumer(
        bind=bind,
        stats=f"127.0.0.1:{free_port()}",
        admin=f"127.0.0.1:{free_port()}",
        state_dir=state_dir,
    )
    flags: dict[str, str | int | float | bool] = {
        "etcd_host": etcd_host,
        "prefix": prefix,
        "state_dir": str(state_dir),
        "stats_address": consumer.stats,
        "admin_address": consumer.admin,
        "bind_address": bind,
        "stop_haproxy_on_exit": True,
        **extra,
    }
    return consumer, flags


# --- HTTP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int | None  # None: refused, reset, empty or timed out
    body: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


async def fetch(host: str, port: int, path: str = "/", within: float = 2.0) -> Reply:
    """One GET on a fresh connection (what a consumer without keep-alive does)."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                )
                data = await reader.read(-1)
            finally:
                writer.close()
    except TimeoutError:
        return Reply(None, "", "timeout")
    except OSError as error:
        return Reply(None, "", type(error).__name__)
    return _parse_reply(data)


def _parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return Reply(None, "", "empty" if not data else "garbled")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return Reply(int(parts[1]), body.decode(errors="replace").strip())


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


# --- HAProxy's view -------------------------------------------------------------------------


async def server_states(stats: str, within: float = 1.0) -> dict[str, str] | None:
    """Every backend server on the stats page (``;csv``): name → status; None if unreachable."""
    host, _, port = stats.rpartition(":")
    reply = await fetch(host, int(port), "/;csv", within)
    if reply.status != 200:
        return None
    states: dict[str, str] = {}
    lines = reply.body.splitlines()
    columns = lines[0].lstrip("# ").split(",") if lines else []
    for line in lines[1:]:
        row = dict(zip(columns, line.split(","), strict=False))
        if row.get("svname") not in (None, "FRONTEND", "BACKEND"):
            states[row["svname"]] = row.get("status", "")
    return states


def serving(status: str | None) -> bool:
    return status is not None and status.startswith(_SERVING)


def server_name(host_id: str, container_id: str, private_port: int = 8080) -> str:
    """The HAProxy server name of a registration (agents.common.schema's convention)."""
    return f"{host_id}_{container_id[:12]}_{private_port}"


async def wait_for(
    check: Callable[[], Awaitable[object]],
    within: float,
    interval: float = 0.05,
    what: str = "condition",
) -> float:
    """Await ``check()`` until truthy; the seconds it took."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not true within {within}s")
        await asyncio.sleep(interval)
