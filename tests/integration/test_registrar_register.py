"""What gets registered, and how: ports, names, metadata, filters, the admin endpoint."""

from __future__ import annotations

import json

import pytest
import structlog
from registrar_kit import (
    DockerCli,
    EtcdView,
    eventually,
    http_get,
    registrar,
    settings_for,
)

pytestmark = pytest.mark.integration


async def test_published_ports_register_one_key_each_on_the_registrar_lease(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    async with registrar(settings):
        cid = await docker.run(
            whoami,
            "-e", "SERVICE_TAGS=blue,v2",
            "-e", "SERVICE_REGION=eu",
            "-l", "pilotfish.attr.team=core",
            "-l", "pilotfish.weight=50",
            "--expose", "9090",
            ports=(8080, 9090),
        )  # fmt: skip
        found = await eventually(lambda: _two(view.of_container(cid)))
        by_port = {i.private_port: i for i in found.values()}
        assert set(by_port) == {8080, 9090}
        for port, instance in by_port.items():
            assert instance.service == f"{whoami}-{port}"
            assert instance.host_id == settings.host_id
            assert instance.address == settings.host_ip
            assert instance.port == await docker.host_port(cid, port)
            assert instance.tags == ("blue", "v2")
            assert instance.attributes == {"region": "eu", "team": "core"}
            assert instance.weight == 50 and instance.state == "up"
        # Every key hangs on the registrar's one lease.
        _ok, health = await _health(settings.admin_address)
        leases = {lease for key, lease in (await view.leases()).items() if cid in key}
        assert leases == {health["etcd"]["lease"]}
        # The published port really answers with the container's hostname.
        status, body = await http_get(f"{settings.host_ip}:{by_port[8080].port}")
        assert status == 200 and body.strip() == cid[:12]


async def _two(pending: object) -> object:
    found = await pending  # type: ignore[misc]
    return found if len(found) == 2 else None


async def test_ignore_variable_and_label_skip_a_container(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    async with registrar(settings_for(docker, etcd_endpoint, reg_prefix)):
        ignored_env = await docker.run(whoami, "-e", "SERVICE_IGNORE=1")
        ignored_label = await docker.run(whoami, "-l", "pilotfish.ignore=true")
        witness = await docker.run(whoami)
        await eventually(lambda: view.of_container(witness))
        assert await view.of_container(ignored_env) == {}
        assert await view.of_container(ignored_label) == {}


async def test_explicit_registers_only_named_containers(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    async with registrar(settings_for(docker, etcd_endpoint, reg_prefix, explicit=True)):
        anonymous = await docker.run(whoami)
        by_label = await docker.run(whoami, "-l", "pilotfish.service=named")
        by_env = await docker.run(whoami, "-e", "SERVICE_NAME=alsonamed")
        await eventually(lambda: view.of_container(by_label))
        await eventually(lambda: view.of_container(by_env))
        assert [i.service for i in (await view.of_container(by_label)).values()] == ["named"]
        assert [i.service for i in (await view.of_container(by_env)).values()] == ["alsonamed"]
        assert await view.of_container(anonymous) == {}


async def test_internal_registers_container_ip_and_private_port(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    async with registrar(settings_for(docker, etcd_endpoint, reg_prefix, internal=True)):
        cid = await docker.run(whoami, ports=())  # exposed (EXPOSE 8080), not published
        (instance,) = (await eventually(lambda: view.of_container(cid))).values()
        ip = await docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid)
        assert (instance.address, instance.port, instance.private_port) == (ip, 8080, 8080)
        status, body = await http_get(f"{ip}:8080")
        assert status == 200 and body.strip() == cid[:12]


async def test_bad_labels_are_refused_with_one_line_and_others_still_register(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    bad = {
        "pilotfish.service": "web\nbackend evil",
        "pilotfish.weight": "heavy",
        "pilotfish.mode": 'tcp"',
        "pilotfish.port": "80#",
    }
    with structlog.testing.capture_logs() as logs:
        async with registrar(settings_for(docker, etcd_endpoint, reg_prefix)):
            bad_ids = {
                label: await docker.run(whoami, "-l", f"{label}={value}")
                for label, value in bad.items()
            }
            long_name = await docker.run(whoami, "-l", "pilotfish.service=" + "a" * 300)
            good = await docker.run(whoami, "-l", "pilotfish.service=good")
            await eventually(lambda: view.of_container(good))
            for cid in [*bad_ids.values(), long_name]:
                assert await view.of_container(cid) == {}
    refusals = [entry for entry in logs if entry["event"] == "label refused"]
    for label, cid in [*bad_ids.items(), ("pilotfish.service", long_name)]:
        lines = [r for r in refusals if r["container_id"] == cid[:12]]
        assert len(lines) == 1, lines
        assert lines[0]["label"] == label and lines[0]["skipped"] == "container"
        assert lines[0]["container"].startswith("t")  # the container's name
        assert "\n" not in json.dumps(lines[0]).replace("\\n", "")


async def test_healthz_and_metrics(
    docker: DockerCli, etcd_endpoint: str, reg_prefix: str, view: EtcdView, whoami: str
) -> None:
    settings = settings_for(docker, etcd_endpoint, reg_prefix)
    async with registrar(settings):
        cid = await docker.run(whoami)
        await eventually(lambda: view.of_container(cid))
        _status, health = await eventually(lambda: _healthy(settings.admin_address))
        assert health["docker"]["connected"] and health["etcd"]["ok"]
        assert health["registrations"] >= 1
        status, metrics = await http_get(settings.admin_address, "/metrics")
        assert status == 200
        for name in (
            'pilotfish_registrar_events_total{action="start"}',
            "pilotfish_registrar_registrations ",
            "pilotfish_registrar_etcd_errors_total",
            'pilotfish_registrar_reconnects_total{peer="docker"}',
            'pilotfish_registrar_reconnects_total{peer="etcd"}',
            "pilotfish_registrar_event_to_etcd_seconds_bucket",
            "pilotfish_registrar_event_to_etcd_seconds_count",
        ):
            assert name in metrics, name
        count = next(
            line for line in metrics.splitlines()
            if line.startswith("pilotfish_registrar_event_to_etcd_seconds_count")
        )  # fmt: skip
        assert float(count.split()[1]) >= 1


async def _health(address: str) -> tuple[int, dict[str, object]]:
    status, body = await http_get(address, "/healthz")
    return status, json.loads(body)


async def _healthy(address: str) -> tuple[int, dict[str, object]] | None:
    status, body = await _health(address)
    return (status, body) if status == 200 else None
