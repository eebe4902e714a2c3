"""The stats page (finding 6) and HAProxy's privilege drop, on the real HAProxy.

The stats page binds the loopback by default, hides HAProxy's version and,
given credentials, answers 401 without them. Started by root (as these tests
are), HAProxy's workers run as the configured account while the master keeps
root: reloads still hand the listening sockets over and both CLI sockets
still answer the agent.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import stat
import subprocess

import pytest

from agents.common.settings import DiscovererSettings
from tests.integration.upstreams import (
    HttpUpstream,
    Load,
    catalog,
    eventually,
    free_port,
    http_once,
    running_sink,
    server,
    service,
)

pytestmark = pytest.mark.integration


async def _get(host: str, port: int, authorization: str | None = None) -> tuple[int, str] | None:
    """GET / on ``host:port`` (None: connection refused)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return None
    header = f"Authorization: Basic {authorization}\r\n" if authorization else ""
    writer.write(f"GET / HTTP/1.0\r\nHost: stats\r\n{header}\r\n".encode())
    page = (await reader.read()).decode(errors="replace")
    writer.close()
    return int(page.split()[1]), page


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _haproxy_version() -> str:
    first = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=True).stdout
    return first.split()[2]  # "HAProxy version 2.6.12-1+deb12u4 ..."


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Uid:"))
    return int(line.split()[1])  # real uid


def _default_stats_host() -> str:
    default = DiscovererSettings.model_fields["stats_address"].default
    return str(default).rpartition(":")[0]


async def test_stats_page_is_loopback_only_and_hides_the_version() -> None:
    assert os.geteuid() == 0, "runs as root, like CI"
    port = free_port()
    # The default's host, on a port of this test's own (1936 may be taken here).
    async with running_sink(catalog(), stats_address=f"{_default_stats_host()}:{port}") as h:
        answer = await _get("127.0.0.1", port)
        assert answer is not None and answer[0] == 200, answer
        assert _haproxy_version() not in answer[1]
        assert "version" not in answer[1].lower()
        # Bound to 127.0.0.1 only: another address of this host is refused.
        assert await _get("127.0.0.2", port) is None
        config = h.sink.dir / "haproxy.cfg"
        assert "    stats hide-version" in config.read_text().splitlines()


async def test_stats_page_with_credentials_answers_401_without_them() -> None:
    port = free_port()
    extra = {"stats_address": f"127.0.0.1:{port}", "stats_user": "ops", "stats_password": "s3c.r3t"}
    async with running_sink(catalog(), **extra) as h:
        without = await _get("127.0.0.1", port)
        assert without is not None and without[0] == 401
        wrong = await _get("127.0.0.1", port, _basic("ops", "guess"))
        assert wrong is not None and wrong[0] == 401
        right = await _get("127.0.0.1", port, _basic("ops", "s3c.r3t"))
        assert right is not None and right[0] == 200 and "_stats" in right[1]
        # The configuration holds the password: owner-only, like its temporary file.
        config = h.sink.dir / "haproxy.cfg"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert "stats auth ops:s3c.r3t" in config.read_text()


async def test_workers_drop_root_and_reloads_still_work() -> None:
    assert os.geteuid() == 0, "runs as root, like CI"
    account = DiscovererSettings().haproxy_user
    expected_uid = pwd.getpwnam(account).pw_uid
    assert expected_uid != 0
    a, b = await HttpUpstream("a").start(), await HttpUpstream("b").start()
    first_port, second_port = free_port(), free_port()
    first = service("first", first_port, server("a", a.port))
    async with running_sink(catalog(first)) as h:
        config = (h.sink.dir / "haproxy.cfg").read_text().splitlines()
        assert f"    user {account}" in config
        old_worker = h.sink.worker_pid
        assert old_worker is not None and _uid(old_worker) == expected_uid
        assert h.sink.master.pid is not None and _uid(h.sink.master.pid) == 0
        assert await http_once(first_port) == (200, "a")
        # A new service: a reload. The re-executed master (root) takes the
        # listening sockets over from the unprivileged worker: no request lost.
        load = Load(first_port, rate=100)
        async with load.running(clients=4):
            await asyncio.sleep(0.3)
            await h.sink.apply(catalog(first, service("second", second_port, server("b", b.port))))
            await eventually(lambda: h.reloads == 1, within=10)
            await asyncio.sleep(0.3)
        assert load.failed == [] and load.ok > 20, (load.ok, load.failed[:5])
        new_worker = h.sink.worker_pid
        assert new_worker not in (None, old_worker)
        assert new_worker is not None and _uid(new_worker) == expected_uid
        assert await http_once(first_port) == (200, "a")
        assert await http_once(second_port) == (200, "b")
        # The master CLI and the worker's admin socket still answer the root agent.
        proc = await h.sink.master.show_proc()
        assert proc.worker_pid == new_worker and proc.failed == 0
        more = service("first", first_port, server("a", a.port), server("b", b.port))
        await h.sink.apply(catalog(more, service("second", second_port, server("b", b.port))))
        bodies = {(await http_once(first_port) or (0, ""))[1] for _ in range(6)}
        assert bodies == {"a", "b"}
        assert h.reloads == 1  # the server was added through the admin socket
    await a.stop()
    await b.stop()


async def test_no_privilege_drop_when_disabled() -> None:
    async with running_sink(catalog(), haproxy_user="none", haproxy_group="none") as h:
        lines = (h.sink.dir / "haproxy.cfg").read_text().splitlines()
        assert not [line for line in lines if line.startswith(("    user ", "    group "))]
        assert h.sink.worker_pid is not None and _uid(h.sink.worker_pid) == 0
