"""Drain requests and the discoverer's status key, on real dockerd, etcd and HAProxy.

A registrar and a discoverer run in-process on one prefix; ``pilotfish drain``
and ``undrain`` run as the operator runs them (subprocesses); HAProxy's state
is read from its runtime API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from catalog_kit import running_catalog
from discoverer_support import Upstream, comm, healthz, make_instance, proc_tree, request
from registrar_kit import REPO, DockerCli, EtcdView, eventually, registrar, settings_for, unique
from structlog.testing import capture_logs
from test_discoverer_agent import discoverer, routable, writer

from agents.common.consumers import read_statuses
from agents.common.drains import instance_keys_of
from agents.common.etcd import Etcd
from agents.common.schema import DiscovererStatus, drain_key, drains_prefix
from agents.common.settings import RegistrarSettings
from agents.discoverer.haproxy import RuntimeClient
from agents.discoverer.haproxy.runtime import ADMIN_PROMPT
from agents.discoverer.haproxy.state import parse_state
from agents.discoverer.model import ServerState
from tests.conftest import ETCD_PASSWORD, ETCD_USER
from tests.stack import free_port, require_binary

pytestmark = pytest.mark.integration


async def cli(*args: str) -> tuple[int, str, str]:
    """``pilotfish ARGS`` as a process: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents", *args, "--log-format", "json",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def target(docker: DockerCli, settings: RegistrarSettings) -> list[str]:
    return [
        f"--docker-host={docker.url}",
        f"--etcd-host={settings.etcd_host}",
        f"--prefix={settings.prefix}",
    ]


async def server_state(state_dir: str, service: str) -> dict[str, ServerState]:
    """HAProxy's own view: server name -> up / draining / maint."""
    client = RuntimeClient(Path(state_dir) / "admin.sock", ADMIN_PROMPT)
    try:
        stat, servers = await client.read(["show stat", f"show servers state {service}"])
    finally:
        await client.close()
    backend = parse_state(stat, servers).get(service)
    return {name: s.state for name, s in backend.servers.items()} if backend else {}


async def status_of(etcd: Etcd, prefix: str, discoverer_id: str) -> DiscovererStatus | None:
    return (await read_statuses(etcd, prefix)).get(discoverer_id)


async def test_drain_undrain_through_the_cli_and_a_registrar_restart(
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
    tmp_path: Path,
) -> None:
    service, port = unique("web"), free_port()
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    etcd = view.etcd
    async with (
        registrar(settings) as stop_registrar,
        discoverer(tmp_path, etcd_endpoint, reg_prefix, discoverer_id="consumer-a") as disc,
    ):
        cid = await docker.run(
            whoami, "-l", f"pilotfish.service={service}", "-l", f"pilotfish.port={port}"
        )
        name = (await docker("inspect", "-f", "{{.Name}}", cid)).lstrip("/")
        keys = await eventually(lambda: instance_keys_of(etcd, reg_prefix, cid))
        (key,) = keys

        # The status names the revision of the new instance once HAProxy has it.
        status = await eventually(
            lambda: _status_at_least(etcd, reg_prefix, "consumer-a", keys[key]), within=10
        )
        assert service in status.services and status.serves_all and status.draining == {}
        state_dir = disc.settings.state_dir
        (server,) = (await server_state(state_dir, service)).items()
        assert server[1] == "up"

        # One connection held open through HAProxy (TCP: a session on the server at once).
        _, held = await asyncio.open_connection("127.0.0.1", port)
        try:
            code, out, err = await cli("drain", name, "--reason", "maintenance", "--wait",
                                       "--timeout", "20", *target(docker, settings))  # fmt: skip
            assert code == 0, (out, err)
            assert "applied by 1 discoverer(s)" in out and "sessions left: 1" in out, out
            assert (await server_state(state_dir, service))[server[0]] == "draining"
            status = await status_of(etcd, reg_prefix, "consumer-a")
            assert status is not None and status.draining == {key: 1}
            # --idle waits for that connection too: not within a second.
            code, out, err = await cli("drain", name, "--wait", "--idle", "--timeout", "1",
                                       *target(docker, settings))  # fmt: skip
            assert code == 1 and "sessions still open" in err, (out, err)
        finally:
            held.close()
        await eventually(
            lambda: _draining_is(etcd, reg_prefix, "consumer-a", {key: 0}), within=5
        )  # re-read while sessions were left
        code, out, err = await cli("drain", name, "--wait", "--idle", "--timeout", "20",
                                   *target(docker, settings))  # fmt: skip
        assert code == 0 and "sessions left: 0" in out, (out, err)

        code, out, err = await cli("undrain", cid, "--wait", *target(docker, settings))
        assert code == 0, (out, err)
        assert (await server_state(state_dir, service))[server[0]] == "up"
        assert (await status_of(etcd, reg_prefix, "consumer-a")).draining == {}  # type: ignore[union-attr]

        # Drained, then the registrar restarts: the instance never turns up meanwhile.
        code, out, err = await cli("drain", cid, *target(docker, settings))
        assert code == 0, (out, err)
        await eventually(lambda: _instance_state(view, cid, "draining"))
        await view.start_watch()
        lease_before = (await view.leases())[key]
        stop_registrar.set()
    async with registrar(settings):
        await eventually(lambda: _lease_changed(view, key, lease_before), within=10)
        await asyncio.sleep(0.3)  # what a wrong registrar would write comes now
        assert set(view.history(cid)) == {"draining"}, view.history(cid)
        assert await _instance_state(view, cid, "draining")

        # The container destroyed: its registrar deletes the drain request.
        await docker("rm", "-f", cid)
        await eventually(lambda: _no_drain_keys(etcd, reg_prefix), within=10)


async def test_status_key_follows_the_discoverer_and_its_services_filter(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A ``--services`` discoverer reports only those; SIGKILL: its key expires with its lease."""
    web, other = unique("web"), unique("db")
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    etcd = view.etcd
    admin_port = free_port()
    async with registrar(settings):
        for svc in (web, other):
            await docker.run(whoami, "-l", f"pilotfish.service={svc}",
                             "-l", f"pilotfish.port={free_port()}")  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agents", "discover",
            "--etcd-host", etcd_endpoint, "--prefix", reg_prefix,
            "--state-dir", str(tmp_path / "state"),
            "--stats-address", f"127.0.0.1:{free_port()}",
            "--admin-address", f"127.0.0.1:{admin_port}",
            "--services", web, "--status-ttl", "2", "--discoverer-id", "filtered",
            "--stop-haproxy-on-exit", "--log-format", "json",
            cwd=REPO, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        haproxy: list[int] = []
        try:
            status = await eventually(lambda: _with_services(etcd, reg_prefix, "filtered"), 20)
            assert status.services == (web,) and not status.serves_all
            async with running_catalog(etcd_endpoint, reg_prefix) as catalog:
                (row,) = (await catalog.json("/api/v1/consumers"))["consumers"]
                assert row["id"] == "filtered" and row["services"] == [web]
                assert row["applied_revision"] == status.revision and not row["serves_all"]
            haproxy = _children(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            await eventually(lambda: _gone(etcd, reg_prefix, "filtered"), within=8)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for pid in haproxy:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def test_hostile_drain_keys_and_status_values_hurt_nobody(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    """Bad drain keys are ignored, a garbage drain value still drains its container;
    bad status values are left out by the catalog and by ``drain --wait``."""
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    etcd = view.etcd
    cid = await docker.run(whoami, "-l", f"pilotfish.port={free_port()}")
    prefix = drains_prefix(reg_prefix)
    hostile = {
        f"{prefix}{cid[:12]}": b"{}",  # not a full id
        f"{prefix}../services/x": b"{}",
        f"{prefix}{'f' * 64}": b"x" * 100_000,  # huge, names no container here
        drain_key(reg_prefix, cid): b"\x00garbage{",  # garbage, but its container drains
        f"{reg_prefix}/discoverers/evil": b"not json",
        f"{reg_prefix}/discoverers/liar": DiscovererStatus(
            id="other", agent_version="1", revision=1, serves_all=True
        ).to_json(),
        f"{reg_prefix}/discoverers/huge": b"[" + b"1," * 200_000 + b"1]",
        f"{reg_prefix}/discoverers/<script>": b"{}",
    }
    for key, value in hostile.items():
        await etcd.put(key, value)
    with capture_logs() as logs:
        async with registrar(settings), running_catalog(etcd_endpoint, reg_prefix) as catalog:
            await eventually(lambda: _instance_state(view, cid, "draining"), within=10)
            consumers = await catalog.json("/api/v1/consumers")
            assert consumers["consumers"] == []
            code, out, err = await cli("drain", cid, "--wait", "--timeout", "5",
                                       *target(docker, settings))  # fmt: skip
            assert code == 0, (out, err)  # no (valid) discoverer serves it: nothing to wait for
            assert "applied by 0 discoverer(s)" in out
            code, out, err = await cli("drain", "no-such-container", *target(docker, settings))
            assert code == 2 and "no such container" in err, (out, err)
    warned = {e.get("key", "") for e in logs if e["log_level"] == "warning"}
    assert drain_key(reg_prefix, cid) in warned and f"{prefix}{cid[:12]}" in warned
    assert f"{reg_prefix}/discoverers/evil" in warned


async def test_a_status_put_etcd_refuses_is_logged_once_and_routing_goes_on(
    auth_etcd: Any, prefix: str, tmp_path: Path
) -> None:
    """A discoverer whose role loses the right to write its status key while it runs.

    (At start, the missing right is refused outright: tests/integration/
    test_environments.py.)
    """
    endpoint = str(auth_etcd.endpoint)
    status_keys = f"{prefix}/discoverers/"
    for args in (
        ["role", "add", "pf-reader"],
        ["role", "grant-permission", "pf-reader", "read", "--prefix=true", f"{prefix}/"],
        ["role", "grant-permission", "pf-reader", "readwrite", "--prefix=true", status_keys],
        ["user", "add", "reader:reader-secret"],
        ["user", "grant-role", "reader", "pf-reader"],
    ):
        await _etcdctl(endpoint, *args)
    root = {"etcd_username": ETCD_USER, "etcd_password": ETCD_PASSWORD}
    reader = {"etcd_username": "reader", "etcd_password": "reader-secret"}
    port = free_port()
    a, b = await Upstream("a").start(), await Upstream("b").start()
    try:
        async with writer(endpoint, prefix, **root) as w:
            await w.put(make_instance("web", a.port, port))
            with capture_logs() as logs:
                async with discoverer(tmp_path, endpoint, prefix, **reader) as d:
                    await routable(port, "a")
                    revoke = ["role", "revoke-permission", "pf-reader", status_keys]
                    await _etcdctl(endpoint, *revoke, "--prefix=true")
                    await w.put(make_instance("web", b.port, port))  # a change: a status put
                    await eventually(lambda: _refused(logs), within=10)
                    await routable(port, "b")
                    await asyncio.sleep(0.5)  # retries meanwhile: still one line
                    assert await request(port) in ("a", "b")
                    status = await _health(d.admin_port)
                    assert "permission denied" in status["status"]["error"]
        assert len(_refused(logs)) == 1
    finally:
        await a.stop()
        await b.stop()


# -- helpers -----------------------------------------------------------------------------


async def _status_at_least(
    etcd: Etcd, prefix: str, discoverer_id: str, revision: int
) -> DiscovererStatus | None:
    status = await status_of(etcd, prefix, discoverer_id)
    return status if status is not None and status.revision >= revision else None


async def _draining_is(etcd: Etcd, prefix: str, discoverer_id: str, want: dict[str, int]) -> bool:
    status = await status_of(etcd, prefix, discoverer_id)
    return status is not None and dict(status.draining) == want


async def _with_services(etcd: Etcd, prefix: str, discoverer_id: str) -> DiscovererStatus | None:
    status = await status_of(etcd, prefix, discoverer_id)
    return status if status is not None and status.services else None


async def _gone(etcd: Etcd, prefix: str, discoverer_id: str) -> bool:
    return await status_of(etcd, prefix, discoverer_id) is None


async def _instance_state(view: EtcdView, cid: str, state: str) -> bool:
    instances = await view.of_container(cid)
    return bool(instances) and all(i.state == state for i in instances.values())


async def _lease_changed(view: EtcdView, key: str, before: int) -> bool:
    return (await view.leases()).get(key, before) != before


async def _no_drain_keys(etcd: Etcd, prefix: str) -> bool:
    return not (await etcd.get_prefix(drains_prefix(prefix)))[1]


def _children(pid: int) -> list[int]:
    return [p for p in proc_tree(pid) if comm(p).startswith("haproxy")]


async def _etcdctl(endpoint: str, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        require_binary("etcdctl"), f"--endpoints={endpoint}",
        f"--user={ETCD_USER}:{ETCD_PASSWORD}", *args,
        env={**os.environ, "ETCDCTL_API": "3"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


def _refused(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"].startswith("could not publish the discoverer status")]


async def _health(admin_port: int) -> dict[str, Any]:
    return (await healthz(admin_port))[1]
