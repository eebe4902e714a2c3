"""A registrar rewriting its own keys keeps their registration time (issue 9, finding 4)."""

from __future__ import annotations

import pytest
from registrar_kit import DockerCli, EtcdView, eventually, registrar, settings_for

from agents.common.schema import Instance

pytestmark = pytest.mark.integration


async def test_registered_at_is_kept_across_a_registrar_restart_and_a_drain(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    settings = settings_for(docker, etcd_endpoint, reg_prefix, ttl=10)
    cid = await docker.run(whoami)
    async with registrar(settings):
        ((key, first),) = (await eventually(lambda: view.of_container(cid))).items()
    old_lease = (await view.leases())[key]
    async with registrar(settings):  # a new lease: every key is put again
        await eventually(lambda: _on_another_lease(view, key, old_lease))
        assert (await view.instances())[key].registered_at == first.registered_at
        await view.start_watch()
        await docker("stop", "-t", "1", cid)
        await eventually(lambda: view.history(cid)[:1] == ["draining"], within=10)
        (drained, *_) = [
            Instance.model_validate_json(e.value)
            for e in view.events
            if e.value is not None and e.key.decode() == key
        ]
        assert drained.state == "draining" and drained.registered_at == first.registered_at


async def _on_another_lease(view: EtcdView, key: str, old: int) -> bool:
    lease = (await view.leases()).get(key)
    return lease is not None and lease != old
