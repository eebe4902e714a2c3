"""Session fixtures for the real servers (see tests/stack.py).

Servers start lazily, the first time a test asks for them, so ``pytest tests/unit``
starts nothing. A missing server binary fails the run; nothing is skipped.

Environment:
  PILOTFISH_TEST_DOCKER_HOST  reuse this engine (``unix:///...``) instead of starting
                              a dockerd; it is never stopped, only the session's
                              test containers are removed from it.
  PILOTFISH_TEST_HOST_IP      the address the main engine publishes on (default: a
                              loopback address of its own, 127.0.N.1, see stack.py).
  PILOTFISH_TEST_LOGS         where server logs go (default /tmp/pilotfish-test-logs).
  CI=true / PILOTFISH_NO_SKIP=1  any skipped test is reported as a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack import (
    TEST_LABEL,
    Dockerd,
    Etcd,
    EtcdCluster,
    ExistingDockerd,
    Registry,
    copy_image,
    make_base_dir,
    make_test_images,
    require_binary,
    unique_prefix,
)

# Containers a test creates carry these labels; the session removes them at the end.
SESSION = uuid.uuid4().hex[:8]
TEST_LABELS = {TEST_LABEL: "1", f"{TEST_LABEL}.session": SESSION}
_started: list[Dockerd | Etcd | EtcdCluster | Registry] = []  # healed after every test


def label_args() -> list[str]:
    """``--label`` options for ``docker run`` so the session cleans the container up."""
    return [arg for key, value in TEST_LABELS.items() for arg in ("--label", f"{key}={value}")]


# --- no skips in CI ----------------------------------------------------------------------


def _no_skip() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("PILOTFISH_NO_SKIP") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """In CI a skip means a server or a dependency is missing: make it a failure."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and _no_skip() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, which counts as a failure in CI: {reason}"


# --- servers -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stack_dir() -> Iterator[Path]:
    """This session's server state (short path: unix sockets live there)."""
    base = make_base_dir("test")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def dockerd(stack_dir: Path) -> Iterator[Dockerd]:
    """The main engine, with the whoami images (``.whoami``, ``.whoami_health``) built."""
    external = os.environ.get("PILOTFISH_TEST_DOCKER_HOST")
    host_ip = os.environ.get("PILOTFISH_TEST_HOST_IP")
    if external:
        engine: Dockerd = ExistingDockerd(external, host_ip or "127.0.0.1")
    else:
        engine = Dockerd.isolated(stack_dir, "d1", host_ip=host_ip)
    try:
        engine.start()
        make_test_images(engine)
        _started.append(engine)
        yield engine
    finally:
        _remove_session_containers(engine)
        engine.close()


@pytest.fixture(scope="session")
def docker_hosts(dockerd: Dockerd, stack_dir: Path) -> Iterator[Callable[[int], Dockerd]]:
    """``docker_hosts(2)``: a second engine (own bridge, own publishing address, images).

    Index 1 is the main engine; 2, 3, ... are started on first use and shared
    for the rest of the session.
    """
    engines: dict[int, Dockerd] = {1: dockerd}

    def get(index: int) -> Dockerd:
        if index not in engines:
            engine = Dockerd.isolated(stack_dir, f"d{index}")
            engines[index] = engine
            engine.start()
            for image in (dockerd.whoami, dockerd.whoami_health):
                copy_image(dockerd, engine, image)
            _started.append(engine)
        return engines[index]

    yield get
    for index, engine in engines.items():
        if index != 1:
            engine.close()


@pytest.fixture(scope="session")
def etcd(stack_dir: Path) -> Iterator[Etcd]:
    """A single-node etcd (``.endpoint`` is ``127.0.0.1:PORT``)."""
    with Etcd(stack_dir, "e0") as server:
        _started.append(server)
        yield server


@pytest.fixture(scope="session")
def etcd_cluster(stack_dir: Path) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster (``.endpoints``, ``.etcd_host``, ``kill(i)``, ``leader()``)."""
    with EtcdCluster(stack_dir, size=3) as cluster:
        _started.append(cluster)
        yield cluster


@pytest.fixture(scope="session")
def registry(stack_dir: Path) -> Iterator[Registry]:
    """An image registry on 127.0.0.1 (``.address``), Debian's docker-registry."""
    with Registry(stack_dir) as server:
        _started.append(server)
        yield server


ETCD_USER, ETCD_PASSWORD = "root", "pilotfish-test"


@pytest.fixture
def auth_etcd(stack_dir: Path) -> Iterator[Etcd]:
    """A single-node etcd with authentication on (ETCD_USER), forgetting a token
    after 1 s unused (etcd's default is 300 s; a restart forgets them all)."""
    name = f"auth{uuid.uuid4().hex[:6]}"
    with Etcd(stack_dir, name, extra_args=["--auth-token-ttl=1"]) as server:
        for args in (["user", "add", f"{ETCD_USER}:{ETCD_PASSWORD}"], ["auth", "enable"]):
            subprocess.run(
                [require_binary("etcdctl"), f"--endpoints={server.endpoint}", *args],
                env={**os.environ, "ETCDCTL_API": "3"},
                check=True,
                capture_output=True,
                timeout=30,
            )
        yield server


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """An etcd key prefix of this test's own."""
    return unique_prefix(request.node.name)


@pytest.fixture(autouse=True)
def _heal_servers() -> Iterator[None]:
    """A test that killed, stopped or froze a shared server must not break the next one."""
    yield
    for server in _started:
        server.heal()


@pytest.fixture
def test_containers(dockerd: Dockerd) -> Iterator[list[str]]:
    """Label args for ``docker run``; this session's containers are removed afterwards."""
    yield label_args()
    _remove_session_containers(dockerd)


def _remove_session_containers(engine: Dockerd) -> None:
    try:
        alive = engine.ping()
    except OSError:
        alive = False  # the engine is gone: so are its containers' processes
    if alive:
        engine.remove_test_containers(f"{TEST_LABEL}.session={SESSION}")
