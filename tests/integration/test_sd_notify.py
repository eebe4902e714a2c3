"""The agents speak systemd's notify protocol (``Type=notify`` + ``WatchdogSec``).

Each agent runs as a real process (``python -m agents register|discover|catalog``)
against the session's real etcd and dockerd (the discoverer with a real
HAProxy), with ``NOTIFY_SOCKET`` pointing at a datagram socket this test
reads, the way systemd runs the units in systemd/. It must send ``READY=1``
once it serves (after its first sync) and ``WATCHDOG=1`` at least every
``WATCHDOG_USEC / 2`` while healthy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WATCHDOG_USEC = 2_000_000  # the agents must ping every 1 s
READY_TIMEOUT = 30.0


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        # (arrival time, message) of every datagram received so far
        self.received: list[tuple[float, str]] = []

    def wait_for(
        self, message: str, timeout: float, proc: subprocess.Popen[bytes], *, new: bool = False
    ) -> float:
        """Arrival time of a datagram carrying ``message`` (``new``: not one already read)."""
        if not new:
            for at, text in self.received:
                if message in text.splitlines():
                    return at
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited with {proc.returncode} before {message}")
            self.sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            at = time.monotonic()
            text = data.decode(errors="replace")
            self.received.append((at, text))
            if message in text.splitlines():
                return at
        raise AssertionError(f"no {message} within {timeout} s; received {self.received!r}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="pf-sd-", dir="/tmp") as directory:
        yield Path(directory)


def _run_agent(args: list[str], notify: NotifySocket, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PILOTFISH_", "NOTIFY_", "WATCHDOG_"))
        and key not in ("ETCD_HOST", "HOST_IP", "DOCKER_HOST")
    }
    env |= {
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "agents", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _check_notify(args: list[str], directory: Path) -> None:
    notify = NotifySocket(directory)
    log_path = directory / "agent.log"
    proc = _run_agent(args, notify, log_path)
    try:
        try:
            ready_at = notify.wait_for("READY=1", READY_TIMEOUT, proc)
            # Then pings at WATCHDOG_USEC / 2, each within one WatchdogSec of the last.
            interval = WATCHDOG_USEC / 1e6
            pings = [notify.wait_for("WATCHDOG=1", interval, proc)]
            while len(pings) < 3:
                pings.append(notify.wait_for("WATCHDOG=1", interval, proc, new=True))
            assert ready_at <= pings[-1]
            assert proc.poll() is None, "agent exited"
        except AssertionError as error:
            log = log_path.read_text()[-4000:]
            raise AssertionError(f"{error}\n--- agent log ---\n{log}") from None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        notify.close()


def test_registrar_notifies_ready_and_watchdog(dockerd: Any, etcd: Any, notify_dir: Path) -> None:
    prefix = f"/sd-{uuid.uuid4().hex[:8]}"
    _check_notify(
        [
            "register",
            f"--etcd-host={etcd.endpoint}",
            f"--docker-host={dockerd.docker_host}",
            f"--host-ip={dockerd.host_ip}",
            f"--prefix={prefix}",
            f"--host-id=sd-{uuid.uuid4().hex[:6]}",
            "--admin-address=127.0.0.1:0",
            "--deregister-on-exit",
        ],
        notify_dir,
    )


def test_discoverer_notifies_ready_and_watchdog(etcd: Any, notify_dir: Path) -> None:
    prefix = f"/sd-{uuid.uuid4().hex[:8]}"
    _check_notify(
        [
            "discover",
            f"--etcd-host={etcd.endpoint}",
            f"--prefix={prefix}",
            f"--state-dir={notify_dir / 'state'}",
            "--admin-address=127.0.0.1:0",
            "--stats-address=off",
            "--stop-haproxy-on-exit",
        ],
        notify_dir,
    )


def test_catalog_notifies_ready_and_watchdog(etcd: Any, notify_dir: Path) -> None:
    prefix = f"/sd-{uuid.uuid4().hex[:8]}"
    _check_notify(
        [
            "catalog",
            f"--etcd-host={etcd.endpoint}",
            f"--prefix={prefix}",
            f"--prefix={prefix}-b",
            "--address=127.0.0.1:0",
        ],
        notify_dir,
    )
