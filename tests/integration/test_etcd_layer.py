"""The etcd layer on a real etcd: what aetcd alone does not do."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agents.common.etcd import Etcd, EtcdError
from agents.common.lease import LeaseKeeper
from agents.common.settings import CommonSettings
from tests.conftest import ETCD_PASSWORD, ETCD_USER
from tests.stack import Etcd as EtcdServer
from tests.stack import make_tls_files

pytestmark = pytest.mark.integration


def connect(server: EtcdServer) -> Etcd:
    return Etcd(CommonSettings(etcd_host=server.endpoint, etcd_timeout=2.0))


async def test_lists_a_prefix_larger_than_grpcs_default_message_cap(
    etcd: EtcdServer, prefix: str
) -> None:
    # 6 values of 1 MiB: 6 MiB in one range response (gRPC's default cap is 4 MiB).
    value = b"x" * (1 << 20)
    async with connect(etcd) as client:
        for n in range(6):
            await client.put(f"{prefix}/big/{n}", value)
        _revision, items = await client.get_prefix(f"{prefix}/big/")
    assert len(items) == 6


async def test_lease_keeper_replaces_an_expired_lease(etcd: EtcdServer, prefix: str) -> None:
    granted: list[int] = []
    first = asyncio.Event()

    async def on_new_lease(lease_id: int) -> None:
        granted.append(lease_id)
        await client.put(f"{prefix}/k", b"v", lease=lease_id)
        first.set()

    async with connect(etcd) as client:
        keeper = LeaseKeeper(client, ttl=2, on_new_lease=on_new_lease)
        task = asyncio.create_task(keeper.run())
        try:
            await asyncio.wait_for(first.wait(), 5)
            # Someone else revokes it (as expiry would): the keeper must notice
            # (a refresh of a dead lease answers TTL 0, it does not raise).
            await client.revoke(granted[0])
            for _ in range(100):
                if len(granted) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(granted) == 2, "the lost lease was not replaced"
            _revision, items = await client.get_prefix(f"{prefix}/k")
            assert [item.lease for item in items] == [granted[1]]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_forgotten_auth_token_is_renewed(auth_etcd: EtcdServer, prefix: str) -> None:
    """etcd drops a token after --auth-token-ttl unused and on restart; aetcd
    authenticates only when it connects. Calls and new watches must go on."""
    settings = CommonSettings(
        etcd_host=auth_etcd.endpoint,
        etcd_timeout=2.0,
        etcd_username=ETCD_USER,
        etcd_password=ETCD_PASSWORD,
    )
    async with Etcd(settings) as client:
        first = await client.put(f"{prefix}/a", b"1")
        before = client.watch_prefix(f"{prefix}/", first + 1)  # a stream open across it all
        await asyncio.sleep(2.5)  # the token expires (TTL 1 s)
        await client.put(f"{prefix}/b", b"2")
        event = await asyncio.wait_for(anext(before), 5)
        assert event.key == f"{prefix}/b".encode()
        auth_etcd.stop()
        auth_etcd.start()  # every token is gone
        await asyncio.sleep(2.5)  # and the renewed one expires too, unused
        revision, items = await client.get_prefix(f"{prefix}/")
        assert [i.key for i in items] == [f"{prefix}/a".encode(), f"{prefix}/b".encode()]
        with pytest.raises(EtcdError):  # the old stream broke with the restart
            await asyncio.wait_for(anext(before), 5)
        await asyncio.sleep(2.5)
        watch = client.watch_prefix(f"{prefix}/", revision + 1)  # as a resuming watcher does
        await client.put(f"{prefix}/c", b"3")
        event = await asyncio.wait_for(anext(watch), 5)
        assert (event.key, event.value) == (f"{prefix}/c".encode(), b"3")
        await watch.aclose()
        await before.aclose()
    lazy = Etcd(settings)  # never entered, as the discoverer uses it: aetcd connects on use
    try:
        await lazy.put(f"{prefix}/d", b"4")
    finally:
        await lazy.close()
    wrong = settings.model_copy(update={"etcd_password": "wrong"})
    with pytest.raises(EtcdError):
        async with Etcd(wrong) as client:
            await client.put(f"{prefix}/e", b"5")


async def test_tls_with_client_certificates(stack_dir: Path, prefix: str) -> None:
    """etcd serving TLS only and requiring a client certificate (aetcd has no TLS)."""
    tag = prefix.rsplit("-", 1)[-1][:8]
    files = make_tls_files(stack_dir / f"tls-{tag}")
    with EtcdServer(stack_dir, f"tls{tag}", tls=files) as server:
        settings = CommonSettings(
            etcd_host=server.endpoint,
            etcd_timeout=2.0,
            etcd_cacert=str(files.ca),
            etcd_cert=str(files.client_cert),
            etcd_key=str(files.client_key),
        )
        async with Etcd(settings) as client:
            revision = await client.put(f"{prefix}/a", b"1")
            watch = client.watch_prefix(f"{prefix}/", revision + 1)
            await client.put(f"{prefix}/b", b"2")
            event = await asyncio.wait_for(anext(watch), 5)
            assert event.key == f"{prefix}/b".encode()
            await watch.aclose()
        by_name = settings.model_copy(
            update={"etcd_host": f"localhost:{server.client_port}", "etcd_server_name": "etcd.test"}
        )
        async with Etcd(by_name) as client:  # the certificate checked against another name
            _revision, items = await client.get_prefix(f"{prefix}/")
            assert len(items) == 2
        plain = CommonSettings(etcd_host=server.endpoint, etcd_timeout=1.0)
        no_cert = settings.model_copy(update={"etcd_cert": None, "etcd_key": None})
        for refused in (plain, no_cert):
            with pytest.raises(EtcdError):
                async with Etcd(refused) as client:
                    await client.put(f"{prefix}/c", b"3")
