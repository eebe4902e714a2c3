"""The catalog's UI in a real headless chromium, on the real stack.

dockerd, etcd and a registrar make the registrations; the catalog serves
them; the page is driven by Playwright. Each page is saved as a screenshot
under test-artifacts/catalog/ (see catalog_kit.ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from catalog_kit import put_instances, running_catalog, screenshot
from discoverer_support import make_instance
from registrar_kit import DockerCli, eventually, registrar, settings_for, unique

from agents.common.etcd import Etcd
from agents.common.schema import instance_key
from agents.common.settings import CommonSettings
from tests.conftest import label_args

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(etcd: Any, prefix: str) -> AsyncIterator[Etcd]:
    async with Etcd(CommonSettings(etcd_host=etcd.endpoint, prefix=prefix)) as etcd_client:
        yield etcd_client


def row(service: str) -> str:
    return f'tr[data-service="{service}"]'


async def mark_document(page: Any) -> None:
    """A flag that only survives as long as the page is not reloaded."""
    await page.evaluate("window.__sameDocument = true")


async def same_document(page: Any) -> bool:
    return bool(await page.evaluate("window.__sameDocument === true"))


async def _at_least(rows: Any, count: int) -> bool:
    return bool(await rows.count() >= count)


async def test_the_page_follows_containers_started_and_stopped_without_a_reload(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, whoami: str, page: Any
) -> None:
    web, api, late = unique("web"), unique("api"), unique("late")
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    async with running_catalog(etcd_endpoint, reg_prefix) as catalog, registrar(settings):
        for service, tags in ((web, "v1,blue"), (web, "v1,blue"), (api, "v2")):
            await docker.run(
                whoami, "-l", f"pilotfish.service={service}", "-l", f"pilotfish.tags={tags}"
            )
        await page.goto(catalog.url)
        await page.wait_for_selector(f'{row(web)} td.serving:text-is("2")', timeout=10_000)
        await page.wait_for_selector(row(api))
        assert await page.locator("#live").get_attribute("data-state") == "live"
        await screenshot(page, "services")
        await mark_document(page)

        # A container started on the host appears within a second, without a reload.
        await docker.run(whoami, "-l", f"pilotfish.service={late}")
        started = time.monotonic()
        await page.wait_for_selector(row(late), timeout=5_000)
        appeared = time.monotonic() - started
        print(f"container appeared in the page {appeared * 1000:.0f} ms after docker run returned")
        assert appeared < 1.0, f"took {appeared:.2f}s"

        # A container that ignores SIGTERM (sleep as PID 1): `docker stop -t 3`
        # leaves it draining for 3 s before it is killed and its key deleted.
        slow = await docker(
            "run",
            "-d",
            *label_args(),
            "-l",
            f"pilotfish.service={late}",
            "-p",
            f"{docker.publish_ip}::8080",
            whoami,
            "sleep",
            "1000",
        )
        docker.started.append(slow)
        await page.wait_for_selector(f'{row(late)} td.serving:text-is("2")', timeout=5_000)
        await page.click(f"{row(late)} a")
        await page.wait_for_selector(f'tr[data-container="{slow}"][data-state="up"]')
        assert await page.locator("#instances tbody tr").count() == 2
        await screenshot(page, "service")

        stopping = asyncio.create_task(docker("stop", "-t", "3", slow))
        await page.wait_for_selector(
            f'tr[data-container="{slow}"][data-state="draining"]', timeout=3_000
        )
        await screenshot(page, "service-draining")
        await page.wait_for_selector(
            f'tr[data-container="{slow}"]', state="detached", timeout=10_000
        )
        await stopping
        assert await page.locator("#instances tbody tr").count() == 1

        await page.click('a[data-nav="hosts"]')
        host = f'tr[data-host="{settings.host_id}"]'
        await page.wait_for_selector(f"{host} >> text=alive")
        assert await page.inner_text(f"{host} td:nth-child(2)") == "4"  # containers
        await screenshot(page, "hosts")

        await page.click('a[data-nav="consumers"]')
        await page.wait_for_selector("#no-consumers")
        await screenshot(page, "consumers")
        assert await same_document(page)
        assert not [p for p in page.problems if "Content Security Policy" in p], page.problems


async def test_search_filters_pick_services_and_environments(
    etcd: Any, prefix: str, client: Etcd, page: Any
) -> None:
    prod = prefix + "-prod"
    instances = [
        make_instance("alpha", 9001, 8001, host="h1", tags=("blue",)),
        make_instance("beta", 9002, 8002, host="h2", tags=("green",), mode="http"),
        make_instance("gamma", 9003, 8003, host="h1", tags=("green",)),
    ]
    await put_instances(client, prefix, instances)
    await put_instances(client, prod, [make_instance("prod-db", 9004, 5432, host="p1")])
    async with running_catalog(etcd.endpoint, prefix, prod) as catalog:
        await page.goto(catalog.url)
        await page.wait_for_selector(row("gamma"))

        async def shown() -> list[str]:
            rows = page.locator("#service-rows tr")
            return [await r.get_attribute("data-service") for r in await rows.all()]

        assert await shown() == ["alpha", "beta", "gamma"]
        await page.fill("#search-name", "alp")
        assert await shown() == ["alpha"]
        await page.fill("#search-name", "")
        await page.fill("#search-tag", "green")
        assert await shown() == ["beta", "gamma"]
        await page.fill("#search-host", "h2")
        assert await shown() == ["beta"]
        assert await page.inner_text("#counts") == "1 of 3 services · 3 instances"
        await page.fill("#search-tag", "")
        await page.fill("#search-host", "")

        await page.check(f"{row('alpha')} input.pick")
        await page.check(f"{row('beta')} input.pick")
        command = await page.inner_text("#pick-command")
        assert command == (
            f"pilotfish discover --etcd-host {etcd.endpoint} --prefix {prefix} "
            "--services alpha,beta"
        )
        ports = await page.inner_text("#pick-ports")
        assert "curl 127.0.0.1:8001" in ports and "curl 127.0.0.1:8002" in ports
        assert "PILOTFISH_SERVICES: alpha,beta" in await page.inner_text("#pick-compose")
        await screenshot(page, "pick")

        await page.select_option("#env", prod)
        await page.wait_for_selector(row("prod-db"))
        assert await shown() == ["prod-db"]
        assert await page.is_hidden("#pick")


async def test_hostile_values_from_etcd_render_as_text(
    etcd: Any, prefix: str, client: Etcd, page: Any
) -> None:
    good = make_instance("good", 9001, 8001)
    tagged, attributed = make_instance("tagged", 9002, 8002), make_instance("attr", 9003, 8003)
    hostile = {
        instance_key(prefix, tagged): tagged.model_dump(mode="json")
        | {"tags": ["<script>window.__pwned=1</script>"]},
        instance_key(prefix, attributed): attributed.model_dump(mode="json")
        | {"attributes": {"note": "<img src=x onerror=window.__pwned=2>"}},
    }
    evil_key = f"{prefix}/services/<img src=x onerror=window.__pwned=3>/h1/abcdef012345:80"
    await put_instances(client, prefix, [good])
    for key, value in hostile.items():
        await client.put(key, json.dumps(value).encode())
    await client.put(evil_key, b'{"tags": ["<b>bold</b>"]}')
    await client.put(f"{prefix}/hosts/h1", b"<script>window.__pwned=4</script>")
    async with running_catalog(etcd.endpoint, prefix) as catalog:
        await page.goto(catalog.url)
        await page.wait_for_selector(row("good"))
        assert await page.inner_text("#quarantined-count") == "3"
        await page.click('a[data-nav="quarantined"]')
        await page.wait_for_selector("#quarantined tbody tr")
        text = await page.inner_text("#quarantined")
        assert "<img src=x onerror=window.__pwned=3>" in text  # the key, as text
        assert "null" not in await page.inner_text("#view")
        assert (
            await page.locator("#quarantined img, #quarantined script, #quarantined b").count() == 0
        )
        await screenshot(page, "quarantined")
        await page.click('a[data-nav="hosts"]')
        await page.wait_for_selector('tr[data-host="h1"]')
        assert await page.locator("#hosts script").count() == 0
        assert await page.evaluate("window.__pwned") is None
        assert [s["name"] for s in (await catalog.json("/api/v1/services"))["services"]] == ["good"]


async def test_ten_thousand_instances_render_their_first_screen_within_two_seconds(
    etcd: Any, prefix: str, client: Etcd, page: Any
) -> None:
    instances = [
        make_instance(
            f"svc-{s:04d}", 20000 + n, 8000 + s % 1000, host=f"host-{n}", tags=(f"t{s % 7}",)
        )
        for s in range(1000)
        for n in range(10)
    ]
    await put_instances(client, prefix, instances, tasks=100)
    async with running_catalog(etcd.endpoint, prefix) as catalog:
        assert (await catalog.json("/api/v1/services"))["total"] == 1000
        started = time.monotonic()
        await page.goto(catalog.url)
        await page.wait_for_selector(row("svc-0000"))
        first_screen = time.monotonic() - started
        print(f"first screen of 10,000 instances after {first_screen * 1000:.0f} ms")
        assert await page.inner_text("#counts") == "1000 of 1000 services · 10000 instances"
        await screenshot(page, "services-10k", full_page=False)
        assert first_screen < 2.0, f"first screen after {first_screen:.2f}s"

        # Rows are built as the table scrolls; search finds every service.
        rows = page.locator("#service-rows tr")
        assert await rows.count() == 100
        await page.locator("#rows-end").scroll_into_view_if_needed()
        # (not wait_for_function: the page's CSP refuses the eval it needs)
        await eventually(lambda: _at_least(rows, 200))
        await page.fill("#search-name", "svc-0999")
        await page.wait_for_selector(row("svc-0999"))
        assert await rows.count() == 1 and await page.is_hidden("#rows-end")
