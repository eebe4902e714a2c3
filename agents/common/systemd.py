"""sd_notify without libsystemd: READY=1 after the first sync, WATCHDOG=1 while healthy.

Does nothing unless systemd (or a test) set ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from agents.common.logging import get_logger

log = get_logger("pilotfish.systemd")


def notify(message: str) -> bool:
    """Send one sd_notify datagram; False when not under a notifying supervisor."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
        return True
    except OSError as error:
        log.warning("sd_notify failed", error=str(error))
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (``WATCHDOG_USEC``), the interval it recommends."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def watchdog_loop(healthy: Callable[[], bool], interval: float | None = None) -> None:
    """Ping the watchdog while ``healthy()``; silence lets systemd restart us."""
    interval = interval or watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
