"""One registrar per host id: the claim in etcd, the default host id (issue 9, finding 5)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from registrar_kit import (
    DockerCli,
    EtcdView,
    eventually,
    registrar,
    registrar_process,
    settings_for,
)

pytestmark = pytest.mark.integration


async def claim_of(view: EtcdView, host_id: str) -> tuple[dict[str, Any], int] | None:
    """The claim of ``host_id`` (its JSON and lease), if there is one."""
    _rev, items = await view.etcd.get_prefix(f"{view.prefix}/hosts/{host_id}")
    return (json.loads(items[0].value), items[0].lease) if items else None


def error_lines(stderr: bytes) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("level") == "error"]


async def test_a_second_registrar_with_the_same_host_id_refuses_and_the_first_keeps_its_keys(
    docker_hosts: Callable[[int], Any],
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    second_engine = docker_hosts(2)
    docker_b = DockerCli(second_engine.url, publish_ip=second_engine.host_ip)
    first = settings_for(docker, etcd_endpoint, reg_prefix)
    second = settings_for(docker_b, etcd_endpoint, reg_prefix, host_id=first.host_id)
    try:
        on_a = await docker.run(whoami)
        await docker_b.run(whoami)  # the second would register it, and delete on_a's key
        async with registrar(first):
            (key,) = await eventually(lambda: view.of_container(on_a))
            await view.start_watch()
            process = await registrar_process(second, stderr=asyncio.subprocess.PIPE)
            async with asyncio.timeout(20):
                _out, stderr = await process.communicate()
            assert process.returncode == 2, stderr.decode()[-2000:]
            (refusal,) = error_lines(stderr)
            assert refusal["host_id"] == first.host_id
            assert f"pid {os.getpid()}" in refusal["holder"]  # the first, in this process
            assert list(await view.instances()) == [key]
            assert view.events == []  # nothing written, nothing deleted
            late = await docker.run(whoami)  # the first goes on
            await eventually(lambda: view.of_container(late))
    finally:
        await docker_b.cleanup()


async def test_kill_9_then_restart_takes_the_claim_over_and_keeps_every_key(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    # A TTL that outlasts the new process's start on a busy machine: the test
    # is about taking the claim over while the old lease still holds the keys.
    settings = settings_for(docker, etcd_endpoint, reg_prefix, ttl=8)
    cid = await docker.run(whoami)
    before = await registrar_process(settings)
    after = None
    try:
        (key,) = await eventually(lambda: view.of_container(cid), within=10)
        (_claim, old_lease) = await eventually(lambda: claim_of(view, settings.host_id))
        await view.start_watch()
        before.kill()
        await before.wait()
        after = await registrar_process(settings)  # the old lease still holds everything
        claim, lease = await eventually(
            lambda: _claimed_by(view, settings.host_id, after.pid), within=10
        )
        assert lease != old_lease
        await eventually(lambda: _on_lease(view, key, lease), within=5)
        await asyncio.sleep(settings.ttl + 1)  # the old lease has expired by now
        assert list(await view.of_container(cid)) == [key]
        assert "deleted" not in view.history(cid)
        assert await claim_of(view, settings.host_id) == (claim, lease)
    finally:
        for process in (before, after):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


async def _claimed_by(view: EtcdView, host_id: str, pid: int) -> tuple[Any, int] | None:
    found = await claim_of(view, host_id)
    return found if found and found[0]["pid"] == pid else None


async def _on_lease(view: EtcdView, key: str, lease: int) -> bool:
    return (await view.leases()).get(key) == lease


def expected_host_id(info: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{info['ID']}\n{info['DockerRootDir']}".encode()).hexdigest()
    return f"{info['Name'].split('.')[0][:19]}-{digest[:12]}"


async def test_the_default_host_id_comes_from_the_engine_and_differs_between_engines(
    docker_hosts: Callable[[int], Any],
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    """Two engines on one machine share their engine ID (/etc/docker/key.json) and
    hostname: the hash of the ID with the data root still tells them apart."""
    second_engine = docker_hosts(2)
    docker_b = DockerCli(second_engine.url, publish_ip=second_engine.host_ip)
    try:
        started = [(cli, await cli.run(whoami)) for cli in (docker, docker_b)]
        settings = [settings_for(cli, etcd_endpoint, reg_prefix, host_id="") for cli, _ in started]
        async with registrar(settings[0]), registrar(settings[1]):
            for cli, cid in started:
                info = json.loads(await cli("info", "--format", "{{json .}}"))
                (instance,) = (await eventually(lambda cid=cid: view.of_container(cid))).values()
                assert instance.host_id == expected_host_id(info)
                assert await claim_of(view, instance.host_id)
            hosts = {i.host_id for i in (await view.instances()).values()}
            assert len(hosts) == 2
    finally:
        await docker_b.cleanup()


async def test_put_if_creates_only_when_absent_and_replaces_only_the_revision_seen(
    view: EtcdView,
) -> None:
    key = f"{view.prefix}/hosts/put-if"
    assert await view.etcd.put_if(key, b"first", mod_revision=0) == (True, None)
    refused, current = await view.etcd.put_if(key, b"second", mod_revision=0)
    assert not refused and current is not None and current.value == b"first"
    lease = await view.etcd.grant(5)
    taken_over = await view.etcd.put_if(
        key, b"mine", mod_revision=current.mod_revision, lease=lease
    )
    assert taken_over == (True, None)
    stale, now = await view.etcd.put_if(key, b"late", mod_revision=current.mod_revision)
    assert not stale and now is not None and (now.value, now.lease) == (b"mine", lease)
    await view.etcd.delete(key)
    assert await view.etcd.put_if(key, b"late", mod_revision=now.mod_revision) == (False, None)


async def test_waiting_for_docker_to_name_the_host_still_stops_on_sigterm(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, tmp_path: Path
) -> None:
    """The default host id needs Docker's /info; SIGTERM must not wait for Docker."""
    nowhere = DockerCli(f"unix://{tmp_path}/no-docker.sock", publish_ip=docker.publish_ip)
    settings = settings_for(nowhere, etcd_endpoint, reg_prefix, host_id="")
    process = await registrar_process(settings, stderr=asyncio.subprocess.PIPE)
    try:
        # Started (imports take seconds on a busy machine) and retrying /info.
        assert process.stderr is not None
        seen = b""
        async with asyncio.timeout(30):
            while b"docker unavailable, waiting for it" not in seen:
                line = await process.stderr.readline()
                assert line, seen.decode()[-2000:]
                seen += line
        assert process.returncode is None
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(2):
            _out, stderr = await process.communicate()
        assert process.returncode == 0, (seen + stderr).decode()[-2000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
