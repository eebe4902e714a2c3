"""The discoverer against the real etcd and the real HAProxy.

Each test runs ``serve()`` in-process (its own HAProxy, state dir, ports)
with a unique prefix; upstreams are asyncio HTTP servers answering their
name; requests go through the HAProxy consumer port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from discoverer_support import (
    EtcdProxy,
    Upstream,
    answered_by,
    comm,
    eventually,
    free_port,
    healthz,
    http_get,
    make_instance,
    metric,
    never_answered_by,
    proc_tree,
    request,
)
from structlog.testing import capture_logs

from agents.common.etcd import Etcd
from agents.common.schema import Instance, instance_key
from agents.common.settings import DiscovererSettings
from agents.discoverer.agent import serve
from tests.conftest import ETCD_PASSWORD, ETCD_USER

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def endpoint_of(etcd: Any) -> str:
    """The fixture's client endpoint as ``host:port``."""
    return str(etcd.endpoint)


@dataclass
class Running:
    settings: DiscovererSettings
    task: asyncio.Task[None]
    stop: asyncio.Event
    admin_port: int

    async def close(self) -> None:
        self.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 15)
        finally:
            if not self.task.done():
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)


@contextlib.asynccontextmanager
async def discoverer(
    tmp_path: Path, etcd_host: str, prefix: str, **extra: Any
) -> AsyncIterator[Running]:
    admin_port = free_port()
    settings = DiscovererSettings(
        etcd_host=etcd_host,
        prefix=prefix,
        state_dir=str(tmp_path / "state"),
        stats_address=f"127.0.0.1:{free_port()}",
        admin_address=f"127.0.0.1:{admin_port}",
        stop_haproxy_on_exit=True,
        reload_delay=0.01,
        reload_min_interval=0.1,
        etcd_timeout=2.0,
        drain_timeout=1.0,
        **extra,
    )
    stop = asyncio.Event()
    running = Running(settings, asyncio.create_task(serve(settings, stop)), stop, admin_port)
    try:
        yield running
    finally:
        await running.close()


@contextlib.asynccontextmanager
async def upstreams(*names: str) -> AsyncIterator[dict[str, Upstream]]:
    servers = {name: await Upstream(name).start() for name in names}
    try:
        yield servers
    finally:
        for server in servers.values():
            await server.stop()


class Writer:
    """Writes instances through the schema, like the registrar does."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix

    async def put(self, instance: Instance) -> int:
        return await self.etcd.put(instance_key(self.prefix, instance), instance.to_json())

    async def delete(self, instance: Instance) -> None:
        await self.etcd.delete(instance_key(self.prefix, instance))

    async def raw(self, key: str, value: bytes) -> None:
        await self.etcd.put(key, value)


@contextlib.asynccontextmanager
async def writer(endpoint: str, prefix: str, **credentials: str) -> AsyncIterator[Writer]:
    async with Etcd(DiscovererSettings(etcd_host=endpoint, prefix=prefix, **credentials)) as etcd:
        yield Writer(etcd, prefix)


async def routable(port: int, name: str, within: float = 10.0) -> float:
    return await eventually(lambda: answered_by(port, name), within=within)


async def gone(port: int, name: str, within: float = 10.0) -> float:
    return await eventually(lambda: never_answered_by(port, name), within=within)


# -- list, then watch ------------------------------------------------------------


async def test_list_then_watch(etcd: Any, prefix: str, tmp_path: Path) -> None:
    port = free_port()
    async with (
        upstreams("a", "b", "c") as up,
        writer(endpoint_of(etcd), prefix) as w,
    ):
        a = make_instance("web", up["a"].port, port)
        b = make_instance("web", up["b"].port, port, host="host-b")
        await w.put(a)
        await w.put(b)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(port, "a")
            await routable(port, "b")
            c = make_instance("web", up["c"].port, port)
            await w.put(c)
            took = await routable(port, "c")
            assert took < 2.0
            await w.delete(a)
            await gone(port, "a")
            assert await answered_by(port, "b") and await answered_by(port, "c")
            status, health = await healthz(d.admin_port)
            assert status == 200, health
            assert health["etcd"]["watching"] is True


async def test_with_etcd_auth_changes_flow_after_etcd_forgets_the_token(
    auth_etcd: Any, prefix: str, tmp_path: Path
) -> None:
    credentials = {"etcd_username": ETCD_USER, "etcd_password": ETCD_PASSWORD}
    port = free_port()
    async with (
        upstreams("a", "b") as up,
        writer(endpoint_of(auth_etcd), prefix, **credentials) as w,
    ):
        await w.put(make_instance("web", up["a"].port, port))
        async with discoverer(tmp_path, endpoint_of(auth_etcd), prefix, **credentials) as d:
            await routable(port, "a")
            auth_etcd.stop()
            auth_etcd.start()  # a restarted etcd knows no token: the watch must resume anyway
            await w.put(make_instance("web", up["b"].port, port))
            await routable(port, "b", within=15)
            status, health = await healthz(d.admin_port)
            assert status == 200, health


# -- etcd going away ----------------------------------------------------------------


async def test_rewatch_after_etcd_restart_misses_nothing(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    async with upstreams("a", "b", "c") as up:
        a = make_instance("web", up["a"].port, port)
        b = make_instance("web", up["b"].port, port)
        c = make_instance("web", up["c"].port, port)
        async with writer(endpoint_of(etcd), prefix) as w:
            await w.put(a)
            await w.put(b)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(port, "a")
            before = await metric(
                d.admin_port, 'pilotfish_discoverer_watch_restarts_total{reason="error"}'
            )
            etcd.stop()
            await eventually(lambda: _not_watching(d.admin_port), within=10)
            assert await answered_by(port, "a")  # HAProxy keeps serving meanwhile
            etcd.start()
            # Changes right after etcd returns, possibly before the discoverer
            # re-watches: the resumed watch must replay them.
            async with writer(endpoint_of(etcd), prefix) as w:
                await w.put(c)
                await w.delete(a)
            await routable(port, "c", within=15)
            await gone(port, "a")
            assert await answered_by(port, "b")
            after = await metric(
                d.admin_port, 'pilotfish_discoverer_watch_restarts_total{reason="error"}'
            )
            assert (after or 0) > (before or 0)
            await eventually(lambda: _healthy(d.admin_port), within=10)


async def _not_watching(admin_port: int) -> bool:
    _, health = await healthz(admin_port)
    return health["etcd"]["watching"] is False


async def _healthy(admin_port: int) -> bool:
    status, _ = await healthz(admin_port)
    return status == 200


async def test_compaction_while_cut_off_relists(etcd: Any, prefix: str, tmp_path: Path) -> None:
    port = free_port()
    host, _, etcd_port = endpoint_of(etcd).rpartition(":")
    proxy = EtcdProxy(host, int(etcd_port))
    await proxy.start()
    async with upstreams("a", "b", "c") as up, writer(endpoint_of(etcd), prefix) as w:
        a = make_instance("web", up["a"].port, port)
        b = make_instance("web", up["b"].port, port)
        c = make_instance("web", up["c"].port, port)
        await w.put(a)
        await w.put(b)
        async with discoverer(tmp_path, proxy.endpoint, prefix) as d:
            await routable(port, "b")
            relists = await metric(d.admin_port, "pilotfish_discoverer_relists_total") or 0
            await proxy.cut()
            await eventually(lambda: _not_watching(d.admin_port), within=10)
            # Behind its back: a goes, c comes, and the history is compacted.
            await w.delete(a)
            revision = await w.put(c)
            await w.etcd.client.compact(revision)
            await proxy.start()
            await routable(port, "c", within=15)
            await gone(port, "a")
            assert await answered_by(port, "b")
            assert (await metric(d.admin_port, "pilotfish_discoverer_relists_total") or 0) > relists
            compacted = await metric(
                d.admin_port, 'pilotfish_discoverer_watch_restarts_total{reason="compacted"}'
            )
            assert compacted and compacted >= 1
    await proxy.cut()


# -- a 3-member cluster -------------------------------------------------------------


async def _cluster_case(
    etcd_cluster: Any,
    prefix: str,
    tmp_path: Path,
    member: int,
    break_member: Callable[[int], None],
    heal_member: Callable[[int], None],
) -> None:
    port = free_port()
    # pick_first: the discoverer's channel is on the first endpoint listed, so
    # the member to break goes first (a different one per case: gRPC shares
    # subchannels in a process, and a member restarted earlier may still be
    # in reconnect backoff).
    order = [member] + [i for i in range(len(etcd_cluster.endpoints)) if i != member]
    endpoints = ",".join(etcd_cluster.endpoints[i] for i in order)
    others = ",".join(etcd_cluster.endpoints[i] for i in order[1:])
    async with upstreams("a", "b", "c") as up:
        a = make_instance("web", up["a"].port, port)
        async with writer(others, prefix) as w:
            await w.put(a)
        async with discoverer(tmp_path, endpoints, prefix) as d:
            await routable(port, "a")
            break_member(member)
            try:
                async with writer(others, prefix) as w:
                    b = make_instance("web", up["b"].port, port)
                    await _put_with_retry(w, b)
                    await routable(port, "b", within=30)
                    c = make_instance("web", up["c"].port, port)
                    await _put_with_retry(w, c)
                    await w.delete(a)
                    await routable(port, "c", within=30)
                    await gone(port, "a", within=30)
                await eventually(lambda: _watching(d.admin_port), within=30)
            finally:
                heal_member(member)


async def _watching(admin_port: int) -> bool:
    _, health = await healthz(admin_port)
    return bool(health["etcd"]["watching"])


async def _put_with_retry(w: Writer, instance: Instance) -> None:
    for _ in range(50):
        try:
            await w.put(instance)
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise AssertionError("could not write to the remaining members")


async def test_cluster_member_killed(etcd_cluster: Any, prefix: str, tmp_path: Path) -> None:
    await _cluster_case(etcd_cluster, prefix, tmp_path, 0, etcd_cluster.kill, etcd_cluster.start)


async def test_cluster_member_frozen(etcd_cluster: Any, prefix: str, tmp_path: Path) -> None:
    await _cluster_case(etcd_cluster, prefix, tmp_path, 1, etcd_cluster.pause, etcd_cluster.resume)


# -- bad data -----------------------------------------------------------------------


async def test_bad_entries_skipped_with_one_log_line(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    async with upstreams("a", "b") as up, writer(endpoint_of(etcd), prefix) as w:
        a = make_instance("web", up["a"].port, port)
        await w.put(a)
        base = f"{prefix}/services/web/host-a"
        good_b = make_instance("web", up["b"].port, port)
        crafted = good_b.model_dump(mode="json") | {"address": "127.0.0.1:1 check\n server x"}
        bad = {
            f"{base}/{'e' * 12}:{port}": b"not json",
            f"{base}/{'f' * 12}:{port}": b'{"version": 1}',
            instance_key(prefix, good_b): _json(crafted),
            f"{prefix}/services/we;b/host-a/{'d' * 12}:80": a.to_json(),
            f"{base}/{'c' * 12}:70000": a.to_json(),
        }
        with capture_logs() as logs:
            async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
                await routable(port, "a")
                for key, value in bad.items():  # again, through the watch
                    await w.raw(key, value)
                    await w.raw(key, value)
                await w.put(make_instance("web", up["b"].port, port, container_id="b" * 12))
                await routable(port, "b")
                assert await answered_by(port, "a")
                status, health = await healthz(d.admin_port)
                assert status == 200, health
        skipped = [e for e in logs if e["event"] == "skipping etcd entry that does not parse"]
        # Each bad key: once at its first write, once at its rewrite (a new
        # revision), never more.
        assert len(skipped) == 2 * len(bad), [e["key"] for e in skipped]
        assert {e["key"] for e in skipped} == set(bad)


def _json(data: dict[str, Any]) -> bytes:
    import json

    return json.dumps(data).encode()


# -- the empty-prefix guard ----------------------------------------------------------


async def test_prefix_wiped_keeps_serving_and_alarms(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    async with upstreams("a", "b") as up, writer(endpoint_of(etcd), prefix) as w:
        a = make_instance("web", up["a"].port, port, host="host-a")
        b = make_instance("web", up["b"].port, port, host="host-b")
        await w.put(a)
        await w.put(b)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix, loss_hold=3.0) as d:
            await routable(port, "a")
            await routable(port, "b")
            await w.etcd.client.delete_prefix(f"{prefix}/services/".encode())
            await eventually(lambda: _alarm(d.admin_port), within=5)
            assert await answered_by(port, "a") and await answered_by(port, "b")
            status, health = await healthz(d.admin_port)
            assert status == 503 and health["held_instances"] == 2
            assert await metric(d.admin_port, "pilotfish_discoverer_empty_prefix_alarm") == 1
            await w.put(a)  # host-a is back, host-b not: still held
            await asyncio.sleep(0.5)
            assert await _alarm(d.admin_port) and await answered_by(port, "b")
            # host-b never comes back: let go after the hold time (3 s here).
            await eventually(lambda: _healthy(d.admin_port), within=5)
            await gone(port, "b")
            assert await answered_by(port, "a")
            assert await metric(d.admin_port, "pilotfish_discoverer_empty_prefix_alarm") == 0


async def test_last_instance_of_one_host_is_removed(etcd: Any, prefix: str, tmp_path: Path) -> None:
    port = free_port()
    async with upstreams("a") as up, writer(endpoint_of(etcd), prefix) as w:
        a = make_instance("web", up["a"].port, port)
        await w.put(a)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(port, "a")
            await w.delete(a)
            await gone(port, "a")
            _, health = await healthz(d.admin_port)
            assert health["empty_prefix_alarm"] is False


async def _alarm(admin_port: int) -> bool:
    _, health = await healthz(admin_port)
    return bool(health["empty_prefix_alarm"])


# -- --services ------------------------------------------------------------------------


async def test_services_filter(etcd: Any, prefix: str, tmp_path: Path) -> None:
    web_port, db_port = free_port(), free_port()
    async with upstreams("web1", "db1") as up, writer(endpoint_of(etcd), prefix) as w:
        await w.put(make_instance("web", up["web1"].port, web_port))
        await w.put(make_instance("db", up["db1"].port, db_port))
        async with discoverer(tmp_path, endpoint_of(etcd), prefix, services="web"):
            await routable(web_port, "web1")
            assert await request(db_port) is None  # db is not exposed here


# -- admin endpoint and SIGTERM, as a real process ------------------------------------


async def test_process_healthz_metrics_and_sigterm_leaves_haproxy(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    async with upstreams("a") as up, writer(endpoint_of(etcd), prefix) as w:
        await w.put(make_instance("web", up["a"].port, port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agents", "discover",
            "--etcd-host", endpoint_of(etcd), "--prefix", prefix,
            "--state-dir", str(tmp_path / "state"),
            "--stats-address", f"127.0.0.1:{free_port()}",
            "--admin-address", f"127.0.0.1:{admin_port}",
            "--log-format", "json",
            cwd=REPO, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        haproxy: list[int] = []
        try:
            await eventually(lambda: _healthy_quietly(admin_port), within=20)
            await routable(port, "a")
            _, body = await http_get(admin_port, "/metrics")
            for name in (
                "pilotfish_discoverer_empty_prefix_alarm",
                "pilotfish_discoverer_apply_latency_seconds_bucket",
                "pilotfish_discoverer_watch_restarts_total",
            ):
                assert name in body
            haproxy = [p for p in proc_tree(proc.pid) if comm(p).startswith("haproxy")]
            assert haproxy
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            assert await answered_by(port, "a")  # HAProxy left serving
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for pid in haproxy:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)


async def _healthy_quietly(admin_port: int) -> bool:
    try:
        return await _healthy(admin_port)
    except OSError:
        return False


# -- scale to zero and back: the listener is kept -------------------------------------


async def _reloads(admin_port: int) -> float:
    return await metric(admin_port, "pilotfish_discoverer_reloads_total") or 0.0


async def _answers_503(port: int) -> bool:
    try:
        status, _ = await http_get(port, "/")
    except (OSError, IndexError, ValueError):  # refused, or closed without an answer
        return False
    return status == 503


async def test_scale_to_zero_and_back_needs_no_reload(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    async with upstreams("a", "b") as up, writer(endpoint_of(etcd), prefix) as w:
        a = make_instance("web", up["a"].port, port, mode="http")
        await w.put(a)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix) as d:
            await routable(port, "a")
            reloads = await _reloads(d.admin_port)
            await w.delete(a)
            # No instance left: the listener stays and HAProxy answers 503.
            await eventually(lambda: _answers_503(port), within=10)
            b = make_instance("web", up["b"].port, port, mode="http")
            await w.put(b)
            assert await routable(port, "b") < 2.0
            await w.delete(b)
            await eventually(lambda: _answers_503(port), within=10)
            await w.put(a)
            await routable(port, "a")
            assert await _reloads(d.admin_port) == reloads


async def test_retained_listener_goes_after_retention_or_to_a_new_owner(
    etcd: Any, prefix: str, tmp_path: Path
) -> None:
    port, other = free_port(), free_port()
    async with upstreams("a", "b") as up, writer(endpoint_of(etcd), prefix) as w:
        a = make_instance("web", up["a"].port, port, mode="http")
        keep = make_instance("api", up["b"].port, other, mode="http")
        await w.put(a)
        await w.put(keep)
        async with discoverer(tmp_path, endpoint_of(etcd), prefix, listener_retention=1.0) as d:
            await routable(port, "a")
            await w.delete(a)
            await eventually(lambda: _answers_503(port), within=10)
            # The retention passes with no change in etcd: the listener goes.
            await eventually(lambda: _refused(port), within=10)
            _, health = await healthz(d.admin_port)
            assert health["services"] == 1
            # Scaled to zero again, and another service claims the port at once.
            await w.put(a)
            await routable(port, "a")
            await w.delete(a)
            await eventually(lambda: _answers_503(port), within=10)
            b = make_instance("db", up["b"].port, port, mode="http")
            await w.put(b)
            await routable(port, "b")
            assert await answered_by(other, "b")


async def _refused(port: int) -> bool:
    try:
        await http_get(port, "/")
    except OSError:
        return True
    return False
