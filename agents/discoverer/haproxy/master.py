"""HAProxy's master process: launched by us or adopted from its sockets;
configuration check and atomic write, start, reload through the master CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agents.common.logging import get_logger
from agents.common.settings import DiscovererSettings
from agents.discoverer.haproxy.runtime import CLI_ERRORS, MASTER_PROMPT, HaproxyError, RuntimeClient

log = get_logger("pilotfish.discoverer.haproxy")

# -- the master process -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcInfo:
    master_pid: int
    reloads: int
    failed: int
    worker_pid: int | None  # the current worker (0 reloads survived)


def parse_show_proc(text: str) -> ProcInfo:
    master = re.search(r"^(\d+)\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", text, re.M)
    if master is None:
        raise HaproxyError(f"unexpected `show proc` answer: {text[:200]!r}")
    worker = re.search(r"^(\d+)\s+worker\s+0\s", text, re.M)
    return ProcInfo(
        int(master[1]), int(master[2]), int(master[3]), int(worker[1]) if worker else None
    )


class Master:
    """HAProxy's master process: launched by us, or adopted from the pidfile."""

    def __init__(self, settings: DiscovererSettings, state_dir: Path) -> None:
        self.binary = settings.haproxy_binary
        self.dir = state_dir
        self.config = state_dir / "haproxy.cfg"
        self.socket = state_dir / "master.sock"
        self.pidfile = state_dir / "haproxy.pid"
        self.logfile = state_dir / "haproxy.log"
        self.cli = RuntimeClient(self.socket, MASTER_PROMPT)
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None

    async def show_proc(self) -> ProcInfo:
        (answer,) = await self.cli.read(["show proc"])
        return parse_show_proc(answer)

    async def answers(self) -> bool:
        try:
            await self.show_proc()
        except (*CLI_ERRORS, HaproxyError):
            return False
        return True

    async def adopt(self) -> None:
        """Use an HAProxy we did not start (a previous discoverer's, or --attach)."""
        self.proc = None
        self.pid = (await self.show_proc()).master_pid

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self.pid is not None and _pid_alive(self.pid)

    async def write_config(self, text: str) -> None:
        """``haproxy -c`` on a temporary file, then an atomic replace."""
        tmp = self.config.with_suffix(".cfg.new")
        _write_private(tmp, text)
        check = await asyncio.create_subprocess_exec(
            self.binary, "-c", "-q", "-f", str(tmp),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await check.communicate()
        if check.returncode != 0:
            raise HaproxyError(f"haproxy -c refused the config: {output.decode()[-2000:]}")
        os.replace(tmp, self.config)

    async def launch(self) -> ProcInfo:
        """Start a new master (config already written); return once its worker is up."""
        with _open_log(self.logfile) as logfile:
            self.proc = await asyncio.create_subprocess_exec(
                self.binary, "-W", "-S", f"{self.socket},mode,600", "-f", str(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                # Not in our process group: a Ctrl-C or a signal to the agent's group
                # must not take routing down (HAProxy is left serving on exit).
                start_new_session=True,
            )  # fmt: skip
        self.pid = self.proc.pid
        self.cli.reset()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise HaproxyError(f"HAProxy exited at start: {self._log_tail()}")
            with contextlib.suppress(*CLI_ERRORS, HaproxyError):
                proc = await self.show_proc()
                if proc.worker_pid is not None:
                    return proc
            await asyncio.sleep(0.01)
        raise HaproxyError(f"HAProxy did not start within 10 s: {self._log_tail()}")

    async def reload(self) -> ProcInfo:
        """Reload through the master CLI; return once the new worker is there."""
        before = await self.show_proc()
        # The master re-executes itself: this connection dies, a new one is refused
        # for a few ms (measured ~40 ms until it answers again).
        self.cli.reset()
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        writer.write(b"reload\n")
        await writer.drain()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await reader.read()
        writer.close()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            try:
                now = await self.show_proc()
            except CLI_ERRORS:
                continue
            if now.failed > before.failed:
                raise HaproxyError(f"HAProxy reload failed: {self._log_tail()}")
            if now.reloads > before.reloads and now.worker_pid not in (None, before.worker_pid):
                return now
        raise HaproxyError("HAProxy reload did not finish within 10 s")

    async def stop(self) -> None:
        pid = self.pid
        if pid is None or not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while self.alive() and time.monotonic() < deadline:  # noqa: ASYNC110 - a pid, no event
            await asyncio.sleep(0.02)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()

    def _log_tail(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"


def _write_private(path: Path, text: str) -> None:
    """Owner-only (0600) from the first byte: the config may hold the stats password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)  # an older file kept its mode through O_CREAT
        file.write(text)


def _pid_alive(pid: int) -> bool:
    # Not our child: a zombie (parent not reaping) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _open_log(path: Path) -> IO[bytes]:
    # HAProxy's alerts go to stderr: keep them in a file it can outlive us with
    # (a pipe to us would SIGPIPE it once we exit). Rotated once at 10 MiB.
    with contextlib.suppress(OSError):
        if path.stat().st_size > 10 * 1024 * 1024:
            os.replace(path, path.with_suffix(".log.1"))
    return open(path, "ab")  # the child gets its own descriptor; ours closes
