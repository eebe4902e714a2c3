"""The images' stack: a private dockerd + etcd with the images built from this checkout.

``deploy/stack.sh up`` does the work (it is what CI runs too, through
deploy/ci-images.sh); this fixture reads the KEY=VALUE lines it prints.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.helpers import docker_env

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "deploy: builds and runs the container images (deploy/, Dockerfile.*)"
    )


@pytest.fixture(scope="session")
def deploy_stack() -> Iterator[dict[str, str]]:
    started_here = not os.environ.get("PF_STACK_KEEP")
    result = subprocess.run(
        [str(REPO / "deploy" / "stack.sh"), "up"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"deploy/stack.sh up failed:\n{result.stderr[-4000:]}")
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    try:
        yield env
    finally:
        if started_here:
            subprocess.run([str(REPO / "deploy" / "stack.sh"), "down"], timeout=120, check=False)


@pytest.fixture
def containers(deploy_stack: dict[str, str]) -> Iterator[list[str]]:
    """Names of the containers a test starts; removed after it."""
    names: list[str] = []
    yield names
    for name in reversed(names):
        subprocess.run(
            ["docker", "rm", "-f", name],
            env=docker_env(deploy_stack),
            capture_output=True,
            timeout=60,
            check=False,
        )
