"""The catalog's JSON API and event stream against the real etcd (and a real registrar)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from catalog_kit import Catalog, EventStream, running_catalog
from discoverer_support import EtcdProxy, make_instance
from registrar_kit import REPO, DockerCli, eventually, registrar, settings_for

from agents.common.etcd import Etcd
from agents.common.schema import instance_key
from agents.common.settings import CommonSettings
from tests.stack import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(etcd: Any, prefix: str) -> AsyncIterator[Etcd]:
    async with Etcd(CommonSettings(etcd_host=etcd.endpoint, prefix=prefix)) as etcd_client:
        yield etcd_client


async def test_services_counts_filters_detail_and_revision(
    etcd: Any, prefix: str, client: Etcd
) -> None:
    web = [make_instance("web", 9000 + n, 8080, host=f"h{n % 2}", tags=("v2",)) for n in range(3)]
    draining = make_instance("web", 9100, 8080, host="h1", state="draining")
    db = make_instance("db", 9200, 5432, host="h2", tags=("primary",), mode="tcp")
    for instance in [*web, draining, db]:
        await client.put(instance_key(prefix, instance), instance.to_json())
    async with running_catalog(etcd.endpoint, prefix) as catalog:
        status, body, headers = await catalog.get("/api/v1/services")
        assert status == 200 and body["ready"] and body["total"] == 2
        assert headers["X-Etcd-Revision"] == str(body["revision"]) and body["revision"] > 0
        by_name = {s["name"]: s for s in body["services"]}
        assert by_name["web"] == {
            "name": "web",
            "mode": "tcp",
            "port": 8080,
            "instances": 4,
            "serving": 3,
            "draining": 1,
            "hosts": ["h0", "h1"],
            "tags": ["v2"],
        }
        assert by_name["db"]["port"] == 5432 and by_name["db"]["hosts"] == ["h2"]

        names = lambda body: [s["name"] for s in body["services"]]  # noqa: E731
        assert names(await catalog.json("/api/v1/services", name="WE")) == ["web"]
        assert names(await catalog.json("/api/v1/services", tag="primary")) == ["db"]
        assert names(await catalog.json("/api/v1/services", host="h1")) == ["web"]
        assert names(await catalog.json("/api/v1/services", host="nowhere")) == []

        detail = await catalog.json("/api/v1/services/web")
        assert detail["revision"] == body["revision"]
        rows = detail["instances"]
        assert len(rows) == 4 and {r["state"] for r in rows} == {"up", "draining"}
        row = next(r for r in rows if r["container_id"] == web[0].container_id)
        assert row["host_id"] == "h0" and row["address"] == "127.0.0.1" and row["port"] == 9000
        assert row["tags"] == ["v2"] and row["weight"] == 100 and row["registered_at"]
        assert row["key"] == instance_key(prefix, web[0]) and row["create_revision"] > 0

        assert (await catalog.get("/api/v1/services/nope"))[0] == 404
        assert (await catalog.get("/api/v1/services", prefix="/other"))[0] == 404
        consumers = await catalog.json("/api/v1/consumers")
        assert consumers == {"prefix": prefix, "revision": body["revision"], "consumers": []}

        for path in ("/", "/api/v1/services", "/static/app.js", "/api/v1/services/nope"):
            _, _, headers = await catalog.get(path)
            csp = headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp, path
            assert headers["X-Content-Type-Options"] == "nosniff"


async def test_openapi_documents_every_route(etcd: Any, prefix: str) -> None:
    async with running_catalog(etcd.endpoint, prefix) as catalog:
        document = await catalog.json("/api/v1/openapi.json")
        assert document["openapi"].startswith("3.")
        assert set(document["paths"]) >= {
            "/api/v1/services",
            "/api/v1/services/{name}",
            "/api/v1/hosts",
            "/api/v1/consumers",
            "/api/v1/events",
        }
        schemas = document["components"]["schemas"]
        refs = _refs(document)
        assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)


def _refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


async def test_events_carry_revisions_and_resume_with_last_event_id(
    etcd: Any, prefix: str, client: Etcd
) -> None:
    a, b = make_instance("alpha", 9000, 8001), make_instance("beta", 9001, 8002)
    async with running_catalog(etcd.endpoint, prefix) as catalog:
        start = (await catalog.json("/api/v1/services"))["revision"]
        async with EventStream(catalog, params={"since": str(start)}) as stream:
            revision_a = await client.put(instance_key(prefix, a), a.to_json())
            (first,) = await eventually(lambda: stream.of_kind("change"))
        assert first.id == str(revision_a) and first.data["revision"] == revision_a
        assert first.data["services"]["alpha"]["instances"] == 1

        # Missed while disconnected: replayed in order, each exactly once.
        revision_b = await client.put(instance_key(prefix, b), b.to_json())
        await client.delete(instance_key(prefix, a))
        now = await eventually(lambda: _without(catalog, "alpha"))
        revision_gone = now["revision"]
        async with EventStream(catalog, headers={"Last-Event-ID": first.id}) as stream:
            await eventually(lambda: len(stream.of_kind("change")) >= 2)
            await asyncio.sleep(0.2)  # nothing more comes
        changes = stream.of_kind("change")
        assert [e.id for e in changes] == [str(revision_b), str(revision_gone)]
        assert changes[0].data["services"] == {"beta": changes[0].data["services"]["beta"]}
        assert changes[1].data["services"] == {"alpha": None}

        # A revision the catalog cannot replay (before it started): told to start over.
        async with EventStream(catalog, headers={"Last-Event-ID": "1"}) as stream:
            (reset,) = await eventually(lambda: stream.of_kind("reset"))
        assert reset.data["reset"] is True and reset.id == str(revision_gone)

        # A new client without a revision: told where "now" is.
        async with EventStream(catalog) as stream:
            (hello,) = await eventually(lambda: stream.of_kind("hello"))
        assert hello.id == str(revision_gone)


async def _without(catalog: Catalog, name: str) -> dict[str, Any] | None:
    body = await catalog.json("/api/v1/services")
    return None if any(s["name"] == name for s in body["services"]) else body


async def test_environments_are_served_side_by_side(etcd: Any, prefix: str, client: Etcd) -> None:
    other = prefix + "-prod"
    await client.put(instance_key(prefix, (i := make_instance("dev-only", 1, 81))), i.to_json())
    await client.put(instance_key(other, (j := make_instance("prod-only", 2, 82))), j.to_json())
    async with running_catalog(etcd.endpoint, prefix, other) as catalog:
        envs = await catalog.json("/api/v1/environments")
        assert [e["prefix"] for e in envs["environments"]] == [prefix, other]
        assert envs["etcd_host"] == etcd.endpoint
        dev = await catalog.json("/api/v1/services")
        prod = await catalog.json("/api/v1/services", prefix=other)
        assert [s["name"] for s in dev["services"]] == ["dev-only"]
        assert [s["name"] for s in prod["services"]] == ["prod-only"]


async def test_hosts_show_the_registrars_claim_and_its_lease(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, whoami: str
) -> None:
    settings = settings_for(docker, etcd_endpoint, reg_prefix, ttl=5)
    async with running_catalog(etcd_endpoint, reg_prefix) as catalog:
        async with registrar(settings):
            cid = await docker.run(whoami)

            async def host_row() -> dict[str, object] | None:
                hosts = (await catalog.json("/api/v1/hosts"))["hosts"]
                row = next((h for h in hosts if h["host_id"] == settings.host_id), None)
                return row if row and row["containers"] == 1 else None

            row = await eventually(host_row, within=10)
            assert row["claimed"] and row["lease_alive"], row
            assert 0 < row["ttl_left"] <= 5 and "pid" in row["holder"]
            assert row["services"] == [await _service_of(catalog)]
            assert row["container_ids"] == [cid]
        # The registrar stopped without revoking: the lease runs out, keys and claim go.
        await eventually(lambda: _host_gone(catalog, settings.host_id), within=15)


async def _service_of(catalog: Catalog) -> str:
    body = await catalog.json("/api/v1/services")
    return str(body["services"][0]["name"])


async def _host_gone(catalog: Catalog, host_id: str) -> bool:
    hosts = (await catalog.json("/api/v1/hosts"))["hosts"]
    return all(h["host_id"] != host_id for h in hosts)


async def test_cli_takes_prefix_more_than_once_and_stops_on_sigterm(etcd: Any, prefix: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agents",
        "catalog",
        "--etcd-host",
        etcd.endpoint,
        "--prefix",
        prefix,
        "--prefix",
        prefix + "-b",
        "--address",
        address,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:

            async def environments() -> list[str] | None:
                try:
                    async with http.get(f"http://{address}/api/v1/environments") as response:
                        body = await response.json()
                except aiohttp.ClientError:
                    return None
                return [e["prefix"] for e in body["environments"]]

            assert await eventually(environments, within=15) == [prefix, prefix + "-b"]
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    bad = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agents",
        "catalog",
        "--prefix",
        "no-slash",
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await bad.communicate()
    assert bad.returncode == 2 and b"invalid setting prefix" in err


async def test_cut_off_from_etcd_through_a_compaction_the_catalog_relists_and_tells_browsers(
    etcd: Any, prefix: str, client: Etcd
) -> None:
    host, _, port = str(etcd.endpoint).rpartition(":")
    proxy = EtcdProxy(host, int(port))
    await proxy.start()
    alpha, beta = make_instance("alpha", 9000, 8001), make_instance("beta", 9001, 8002)
    await client.put(instance_key(prefix, alpha), alpha.to_json())
    try:
        async with running_catalog(proxy.endpoint, prefix) as catalog:
            start = (await catalog.json("/api/v1/services"))["revision"]
            async with EventStream(catalog, params={"since": str(start)}) as stream:
                await proxy.cut()
                await eventually(lambda: _unhealthy(catalog), within=10)
                await client.delete(instance_key(prefix, alpha))
                revision = await client.put(instance_key(prefix, beta), beta.to_json())
                await client.client.compact(revision)  # the watch cannot resume: re-list
                await proxy.start()
                (change,) = await eventually(lambda: stream.of_kind("change"), within=15)
            assert int(change.id) >= revision
            assert change.data["services"]["alpha"] is None
            assert change.data["services"]["beta"]["instances"] == 1
            names = [s["name"] for s in (await catalog.json("/api/v1/services"))["services"]]
            assert names == ["beta"]
            assert (await catalog.get("/healthz"))[0] == 200
    finally:
        await proxy.cut()


async def _unhealthy(catalog: Catalog) -> bool:
    return (await catalog.get("/healthz"))[0] == 503
