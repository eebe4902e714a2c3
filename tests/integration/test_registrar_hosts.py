"""Two registrars (two host ids) share a prefix and never touch each other's keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from registrar_kit import (
    DockerCli,
    EtcdView,
    eventually,
    registrar,
    settings_for,
)

from agents.common.schema import Instance, instance_key

pytestmark = pytest.mark.integration


async def test_registrars_of_two_hosts_leave_each_other_alone(
    docker_hosts: Callable[[int], Any],
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
) -> None:
    second = docker_hosts(2)  # another engine: own bridge, own publishing address
    docker_b = DockerCli(second.url, publish_ip=second.host_ip)
    host_a = settings_for(docker, etcd_endpoint, reg_prefix)
    host_b = settings_for(docker_b, etcd_endpoint, reg_prefix)
    # A key of a third host, whose registrar is not running here.
    foreign = Instance(
        service="elsewhere",
        host_id="hostc" + host_b.host_id,
        address="127.0.0.9",
        port=1234,
        private_port=80,
        container_id="f" * 64,
    )
    await view.etcd.put(instance_key(reg_prefix, foreign), foreign.to_json())
    try:
        on_a = await docker.run(whoami)
        on_b = await docker_b.run(whoami)
        async with registrar(host_b):
            (b_instance,) = (await eventually(lambda: view.of_container(on_b))).values()
            assert (b_instance.host_id, b_instance.address) == (host_b.host_id, second.host_ip)
            await view.start_watch()
            for _restart in range(2):  # each start reconciles this host's keys
                async with registrar(host_a):
                    await eventually(lambda: view.of_container(on_a))
            await docker("rm", "-f", on_a)
            assert await _hosts(view, on_b, {host_b.host_id})
        a_part, b_part = f"/{host_a.host_id}/", f"/{host_b.host_id}/"
        touched = {e.key.decode() for e in view.events}
        assert touched and all(a_part in key for key in touched), touched
        assert not [key for key in touched if b_part in key]
        assert instance_key(reg_prefix, foreign) in await view.instances(foreign.host_id)
    finally:
        await docker_b.cleanup()


async def _hosts(view: EtcdView, cid: str, hosts: set[str]) -> bool:
    return {i.host_id for i in (await view.of_container(cid)).values()} == hosts
