"""Shared by the benchmarks: percentiles, process CPU/memory, HAProxy's server list.

The load generator is bench/load.py, a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max by nearest rank (no interpolation: every number was measured)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        index = max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))
        return round(ordered[int(index)], 1)

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(ordered[-1], 1)}


# --- process CPU and memory -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (/proc/<pid>/stat fields 14 and 15)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return None


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the process's peak resident set."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


@dataclass
class ProcGroup:
    """One agent (or an HAProxy's master + workers); pids found again at every sample."""

    find: Any  # Callable[[], list[int]]
    cpu: dict[int, float] = field(default_factory=dict)  # last reading per pid ever seen
    peak_kib: int = 0  # largest sum of VmHWM over the pids alive at one sample

    def sample(self) -> None:
        total = 0
        for pid in self.find():
            cpu, hwm = cpu_seconds(pid), peak_rss_kib(pid)
            if cpu is not None and hwm is not None:
                self.cpu[pid] = cpu
                total += hwm
        self.peak_kib = max(self.peak_kib, total)

    def summary(self) -> dict[str, float]:
        # Workers replaced by a reload keep the CPU they had at their last sample.
        return {
            "cpu_s": round(sum(self.cpu.values()), 2),
            "peak_rss_mb": round(self.peak_kib / 1024, 1),
        }


class ProcWatch:
    """Samples process groups every ``interval`` s in a thread, until stopped."""

    def __init__(self, interval: float = 0.5) -> None:
        self.groups: dict[str, ProcGroup] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, name: str, find: Any) -> None:
        self.groups[name] = ProcGroup(find)

    def start(self) -> ProcWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for group in list(self.groups.values()):
            group.sample()

    def stop(self) -> dict[str, dict[str, float]]:
        """One last sample (call before the processes exit), then the summaries."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        return {name: group.summary() for name, group in self.groups.items()}


def comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


# --- HAProxy's server list through its stats socket ----------------------------------------


class ServerList:
    """``show servers state`` on the worker's stats socket in a state dir.

    The socket's name is HAProxy-config specific, so every ``*.sock`` in the
    state dir is tried and the one that answers (not the master CLI) is kept.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.socket: Path | None = None

    async def states(self) -> dict[str, tuple[int, int]] | None:
        """Server name → (operational, administrative) state; None while no socket answers.

        Operational 2 is running; administrative 0 is ready (drain and
        maintenance set bits). None happens during a reload.
        """
        candidates = [self.socket] if self.socket else sorted(self.state_dir.rglob("*.sock"))
        for path in candidates:
            if path is None:
                continue
            text = await _command(path, "show servers state\n")
            if text is not None and text.startswith("1\n"):
                self.socket = path
                rows = [line.split() for line in text.splitlines()[2:] if line.strip()]
                return {row[3]: (int(row[5]), int(row[6])) for row in rows}
        self.socket = None
        return None


def in_rotation(state: tuple[int, int] | None) -> bool:
    """The server takes new connections: running and neither draining nor in maintenance."""
    return state is not None and state[0] == 2 and state[1] == 0


async def _command(path: Path, command: str) -> str | None:
    try:
        async with asyncio.timeout(1.0):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(command.encode())
                return (await reader.read(-1)).decode(errors="replace")
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
