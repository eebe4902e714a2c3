"""The container images, built with a real ``docker build`` and run for real.

The registrar runs exactly as the seed deployment ran docker-register (bridge
network, ``-e HOST_IP -e ETCD_HOST -v /var/run/docker.sock:...``), the
discoverer as docker-discover ran (``--net host -e ETCD_HOST``). A whoami
container started on the engine must become reachable through the
discoverer container's HAProxy on the host's loopback.

etcd is reached by the registrar through the engine's bridge address
(etcd listens there too) and by the discoverer through 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests.deploy.helpers import docker, docker_env, free_port, get, inspect, wait

pytestmark = [pytest.mark.integration, pytest.mark.deploy]

SIZE_LIMIT_MB = 250  # on the local Debian base; the goal on python:3.12-slim is 150


@pytest.mark.parametrize("image, command", [("REGISTRAR", "register"), ("DISCOVERER", "discover")])
def test_image_metadata(deploy_stack: dict[str, str], image: str, command: str) -> None:
    name = deploy_stack[f"PF_{image}_IMAGE"]
    info = json.loads(docker(deploy_stack, "image", "inspect", name))[0]
    size_mb = info["Size"] / 1e6
    print(f"{name}: {size_mb:.0f} MB")
    assert size_mb < SIZE_LIMIT_MB
    config = info["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == name.rsplit(":", 1)[1]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Entrypoint"] == ["pilotfish-entrypoint"]
    assert config["Cmd"] == [command]
    if command == "discover":
        assert config["User"] == "10001:10001"
    # No compiler or binutils made it into the final image.
    out = docker(
        deploy_stack,
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        name,
        "-c",
        "for t in gcc cc strip ld; do command -v $t; done; true",
    )
    assert out == ""


def test_the_two_images_share_all_but_haproxy(deploy_stack: dict[str, str]) -> None:
    """Built in one engine, the registrar's layers are the start of the discoverer's.

    A host running both agents then stores (and pulls) Python and the venv once.
    """
    registrar = json.loads(
        docker(deploy_stack, "image", "inspect", deploy_stack["PF_REGISTRAR_IMAGE"])
    )[0]
    discoverer = json.loads(
        docker(deploy_stack, "image", "inspect", deploy_stack["PF_DISCOVERER_IMAGE"])
    )[0]
    shared = registrar["RootFS"]["Layers"]
    assert discoverer["RootFS"]["Layers"][: len(shared)] == shared
    extra_mb = (discoverer["Size"] - registrar["Size"]) / 1e6
    print(
        f"both images on one host: {discoverer['Size'] / 1e6:.0f} MB "
        f"(the discoverer adds {extra_mb:.1f} MB to the registrar's layers)"
    )
    assert extra_mb < 15  # HAProxy and its libraries, nothing else


@pytest.mark.parametrize("image, command", [("REGISTRAR", "register"), ("DISCOVERER", "discover")])
def test_cli_help(deploy_stack: dict[str, str], image: str, command: str) -> None:
    name = deploy_stack[f"PF_{image}_IMAGE"]
    assert f"usage: pilotfish {command}" in docker(deploy_stack, "run", "--rm", name, "--help")
    version = docker(deploy_stack, "run", "--rm", name, "pilotfish", "--version")
    assert version == f"pilotfish {name.rsplit(':', 1)[1]}"


def test_registrar_drops_root_and_reaches_the_socket(
    deploy_stack: dict[str, str],
) -> None:
    out = docker(
        deploy_stack,
        "run",
        "--rm",
        "-v",
        f"{deploy_stack['PF_DOCKER_SOCKET']}:/var/run/docker.sock",
        deploy_stack["PF_REGISTRAR_IMAGE"],
        "sh",
        "-c",
        "id -u; grep CapEff /proc/self/status; test -w /var/run/docker.sock && echo rw",
    )
    uid, caps, rw = out.splitlines()
    assert uid == "10001"
    assert caps.split()[1] == "0000000000000000"
    assert rw == "rw"


def test_seed_deployment_routes_a_whoami(
    deploy_stack: dict[str, str], containers: list[str]
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"/deploy-{tag}"
    port, admin, stats = free_port(), free_port(), free_port()
    reg, disc, app = f"pf-reg-{tag}", f"pf-disc-{tag}", f"pf-whoami-{tag}"
    fast_health = ["--health-interval=2s", "--health-start-period=30s"]

    # docker-discover's form: --net host -e ETCD_HOST. Ports moved off the
    # defaults (9102, :1936) so the test never collides with anything else.
    containers.append(disc)
    docker(
        deploy_stack,
        "run",
        "-d",
        "--name",
        disc,
        "--net",
        "host",
        *fast_health,
        "-e",
        f"ETCD_HOST={deploy_stack['PF_ETCD_LOCAL']}",
        "-e",
        f"PILOTFISH_PREFIX={prefix}",
        "-e",
        f"PILOTFISH_ADMIN_ADDRESS=127.0.0.1:{admin}",
        "-e",
        f"PILOTFISH_STATS_ADDRESS=127.0.0.1:{stats}",
        deploy_stack["PF_DISCOVERER_IMAGE"],
    )
    # docker-register's form: bridge network, HOST_IP, ETCD_HOST, the socket.
    containers.append(reg)
    docker(
        deploy_stack,
        "run",
        "-d",
        "--name",
        reg,
        *fast_health,
        "-e",
        f"HOST_IP={deploy_stack['PF_HOST_IP']}",
        "-e",
        f"ETCD_HOST={deploy_stack['PF_ETCD_BRIDGE']}",
        "-e",
        f"PILOTFISH_PREFIX={prefix}",
        "-v",
        f"{deploy_stack['PF_DOCKER_SOCKET']}:/var/run/docker.sock",
        deploy_stack["PF_REGISTRAR_IMAGE"],
    )
    containers.append(app)
    app_id = docker(
        deploy_stack,
        "run",
        "-d",
        "--name",
        app,
        "-l",
        f"pilotfish.service=whoami-{tag}",
        "-l",
        f"pilotfish.port={port}",
        "-p",
        f"{deploy_stack['PF_HOST_IP']}::8080",
        deploy_stack["PF_WHOAMI_IMAGE"],
    )

    def logs() -> str:
        parts = []
        for name in (reg, disc):
            result = subprocess.run(
                ["docker", "logs", "--tail", "40", name],
                env=docker_env(deploy_stack),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            parts.append(f"--- {name} ---\n{result.stdout}{result.stderr}")
        return "\n".join(parts)

    body = wait(
        f"whoami through 127.0.0.1:{port}",
        lambda: get(f"http://127.0.0.1:{port}/"),
        90,
        logs,
    )
    assert body.strip() == f"Hostname: {app_id[:12]}"

    # Both agents' HEALTHCHECK (python urllib on /healthz) reports healthy.
    for name in (reg, disc):
        wait(
            f"{name} healthy",
            lambda name=name: inspect(deploy_stack, name)["State"]["Health"]["Status"] == "healthy",
            60,
            logs,
        )
    # The discoverer's HAProxy runs as the image's user, not root.
    ps = docker(deploy_stack, "top", disc, "-o", "pid,uid,comm")
    haproxy_uids = {line.split()[1] for line in ps.splitlines()[1:] if "haproxy" in line}
    assert haproxy_uids == {"10001"}, ps
