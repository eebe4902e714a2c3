"""The systemd units, run by a real systemd.

A container of the stack's engine boots systemd as PID 1 (a Debian host with
systemd and HAProxy; deploy/systemd-host.Dockerfile installed pilotfish there
with the README's commands). It shares the host's network, so the
discoverer's HAProxy binds the host's loopback, and the engine's socket is
mounted at /run/docker.sock, so the registrar registers that engine's
containers. The test edits the env files and runs the README's
``systemctl enable --now``, then checks what the units promise:

- ``Type=notify``: both units become active (READY=1) and keep sending
  WATCHDOG=1;
- a whoami container started on the engine is reachable through the
  discoverer's HAProxy;
- the agents and HAProxy run as the unit's dynamic user, with the sandbox's
  no-new-privileges, system-call filter and capabilities;
- the commented etcd TLS block, switched on, hands root's key files over as
  credentials, and both agents work against an etcd that requires TLS and
  client certificates;
- ``systemctl stop`` stops the discoverer with its HAProxy.

systemd in a container needs CAP_SYS_ADMIN, no seccomp filter of docker's
and the host's cgroup hierarchy (this machine has cgroup v1 with the
name=systemd hierarchy).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.helpers import docker, docker_env, free_port, get, wait
from tests.stack import Etcd, TlsFiles, make_base_dir, make_tls_files

pytestmark = [pytest.mark.integration, pytest.mark.deploy]

REPO = Path(__file__).resolve().parents[2]
UNITS = ("pilotfish-registrar", "pilotfish-discoverer")
DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser= range
CAP_NET_BIND_SERVICE = 1 << 10


@dataclass
class Host:
    """The systemd container, and what its env files point at."""

    stack: dict[str, str]
    name: str
    prefix: str

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> str:
        result = subprocess.run(
            ["docker", "exec", self.name, "sh", "-c", script],
            env=docker_env(self.stack),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            error = result.stderr.strip()
            raise AssertionError(
                f"{script!r} failed ({result.returncode}): {error}\n{self.journal()}"
            )
        return result.stdout.strip()

    def show(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value {unit}")

    def journal(self) -> str:
        command = ["docker", "exec", self.name, "journalctl", "--no-pager", "-n", "60", "-o", "cat"]
        result = subprocess.run(
            command + [f"--unit={unit}" for unit in UNITS],
            env=docker_env(self.stack),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return f"--- journal of {', '.join(UNITS)} ---\n{result.stdout}{result.stderr}"

    def processes(self, unit: str) -> dict[int, dict[str, str]]:
        """pid -> comm and /proc status fields of every process in the unit's cgroup."""
        script = (
            f"cg=$(systemctl show -p ControlGroup --value {unit}); "
            "for p in $(cat /sys/fs/cgroup/systemd$cg/cgroup.procs); do "
            'echo "$p comm $(cat /proc/$p/comm)"; '
            "grep -E '^(Uid|CapEff|NoNewPrivs|Seccomp):' /proc/$p/status | sed \"s/^/$p /\"; done"
        )
        found: dict[int, dict[str, str]] = {}
        for line in self.sh(script).splitlines():
            pid, key, value = line.split(None, 2)
            found.setdefault(int(pid), {})[key.rstrip(":")] = value.split()[0]
        return found

    def wait_active(self, timeout: float = 90) -> None:
        wait(
            f"{' and '.join(UNITS)} active",
            lambda: all(self.show(unit, "ActiveState") == "active" for unit in UNITS),
            timeout,
            self.journal,
        )


@pytest.fixture(scope="module")
def host(deploy_stack: dict[str, str]) -> Iterator[Host]:
    # The caller's environment (pip index settings, PF_*), this engine, this Python.
    env = {**os.environ, **docker_env(deploy_stack), "PYTHON": sys.executable}
    image = subprocess.run(
        [str(REPO / "deploy" / "build-systemd-host.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if image.returncode != 0:
        raise RuntimeError(f"deploy/build-systemd-host.sh failed:\n{image.stderr[-4000:]}")
    tag = uuid.uuid4().hex[:8]
    host = Host(deploy_stack, f"pf-systemd-{tag}", f"/systemd-{tag}")
    socket = deploy_stack["PF_DOCKER_SOCKET"]
    container = docker(
        deploy_stack,
        "run", "-d", "--name", host.name,
        "--net", "host",
        "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined",
        "--cgroupns", "host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--tmpfs", "/run", "--tmpfs", "/run/lock", "-e", "container=docker",
        "-v", f"{socket}:/run/docker.sock",
        image.stdout.strip().splitlines()[-1],
    )  # fmt: skip
    try:
        wait(
            "systemd booted",
            lambda: host.sh("systemctl is-system-running", check=False) in ("running", "degraded"),
            60,
            lambda: host.sh("systemctl --failed --no-pager", check=False),
        )
        # As on a host with Debian's docker.io: a docker group owning the socket.
        gid = Path(socket).stat().st_gid
        host.sh(f"groupadd --system --non-unique --gid {gid} docker")
        etcd = deploy_stack["PF_ETCD_LOCAL"]
        # Off the defaults (admin 9101/9102, stats :1936: the host's ports
        # under --net host), and this test's prefix only.
        common = f"PILOTFISH_PREFIX={host.prefix}\\n"
        registrar = f"{common}PILOTFISH_ADMIN_ADDRESS=127.0.0.1:{free_port()}\\n"
        discoverer = (
            f"{common}PILOTFISH_ADMIN_ADDRESS=127.0.0.1:{free_port()}\\n"
            f"PILOTFISH_STATS_ADDRESS=127.0.0.1:{free_port()}\\n"
        )
        # The README: edit HOST_IP and ETCD_HOST, then enable --now.
        host.sh(
            f"sed -i 's|^HOST_IP=.*|HOST_IP={deploy_stack['PF_HOST_IP']}|; "
            f"s|^ETCD_HOST=.*|ETCD_HOST={etcd}|' /etc/pilotfish/registrar.env && "
            f"sed -i 's|^ETCD_HOST=.*|ETCD_HOST={etcd}|' /etc/pilotfish/discoverer.env && "
            f"printf '{registrar}' >>/etc/pilotfish/registrar.env && "
            f"printf '{discoverer}' >>/etc/pilotfish/discoverer.env && "
            "systemctl daemon-reload && "
            "systemctl enable --now pilotfish-registrar pilotfish-discoverer"
        )
        host.wait_active()
        yield host
    finally:
        log = Path(os.environ.get("PF_DEPLOY_DIR", "/tmp/pilotfish-deploy")) / "systemd-host.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(host.journal())
        subprocess.run(
            ["docker", "rm", "-f", "-v", host.name],
            env=docker_env(deploy_stack),
            capture_output=True,
            timeout=60,
            check=False,
        )
        _remove_cgroups(container)


def _remove_cgroups(container: str) -> None:
    """The cgroups the container's systemd made in the host's hierarchy outlive it (empty)."""
    for top in Path("/sys/fs/cgroup").glob(f"*/docker/{container}"):
        for directory in sorted(top.glob("**/"), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()


def start_whoami(stack: dict[str, str], names: list[str], tag: str) -> tuple[int, str]:
    """A whoami on the engine, routed on a free port; (port, its hostname)."""
    port, name = free_port(), f"pf-sd-whoami-{tag}-{uuid.uuid4().hex[:6]}"
    names.append(name)
    container = docker(
        stack,
        "run", "-d", "--name", name,
        "-l", f"pilotfish.service=whoami-{tag}", "-l", f"pilotfish.port={port}",
        "-p", f"{stack['PF_HOST_IP']}::8080",
        stack["PF_WHOAMI_IMAGE"],
    )  # fmt: skip
    return port, container[:12]


def assert_routed(host: Host, port: int, hostname: str) -> None:
    body = wait(
        f"whoami {hostname} through 127.0.0.1:{port}",
        lambda: get(f"http://127.0.0.1:{port}/"),
        60,
        host.journal,
    )
    assert body.strip() == f"Hostname: {hostname}"


def test_units_start_notify_and_route_a_container(
    host: Host, deploy_stack: dict[str, str], containers: list[str]
) -> None:
    for unit in UNITS:
        assert host.show(unit, "Type") == "notify"
        assert host.show(unit, "NRestarts") == "0", host.journal()
    port, hostname = start_whoami(deploy_stack, containers, "plain")
    assert_routed(host, port, hostname)


def test_watchdog_pings_arrive(host: Host) -> None:
    # WatchdogSec=30: the agents ping every 15 s while healthy.
    first = {unit: host.show(unit, "WatchdogTimestampMonotonic") for unit in UNITS}
    wait(
        "a WATCHDOG=1 from both agents",
        lambda: all(host.show(unit, "WatchdogTimestampMonotonic") != first[unit] for unit in UNITS),
        25,
        host.journal,
    )


def test_agents_run_sandboxed_as_their_dynamic_users(host: Host) -> None:
    registrar = host.processes("pilotfish-registrar")
    discoverer = host.processes("pilotfish-discoverer")
    assert {p["comm"] for p in registrar.values()} == {"pilotfish"}
    assert {p["comm"] for p in discoverer.values()} == {"pilotfish", "haproxy"}
    for unit, processes in (("registrar", registrar), ("discoverer", discoverer)):
        for pid, status in processes.items():
            assert int(status["Uid"]) in DYNAMIC_UIDS, (unit, pid, status)
            assert status["NoNewPrivs"] == "1", (unit, pid, status)
            assert status["Seccomp"] == "2", (unit, pid, status)  # SystemCallFilter=
    assert {int(p["CapEff"], 16) for p in registrar.values()} == {0}
    assert {int(p["CapEff"], 16) for p in discoverer.values()} == {CAP_NET_BIND_SERVICE}
    # One dynamic user per unit.
    uids = {p["Uid"] for p in registrar.values()} | {p["Uid"] for p in discoverer.values()}
    assert len(uids) == 2, uids


@pytest.fixture
def tls_etcd() -> Iterator[tuple[Etcd, TlsFiles]]:
    base = make_base_dir("sdtls")
    try:
        files = make_tls_files(base / "tls")
        with Etcd(base, tls=files) as etcd:
            yield etcd, files
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_etcd_tls_through_load_credential(
    host: Host,
    deploy_stack: dict[str, str],
    containers: list[str],
    tls_etcd: tuple[Etcd, TlsFiles],
) -> None:
    """The unit's commented TLS block, switched on: root's 0600 key reaches the dynamic user."""
    etcd, files = tls_etcd
    host.sh("mkdir -p /etc/pilotfish/tls")
    for source, target in (
        (files.ca, "ca.pem"),
        (files.client_cert, "client.pem"),
        (files.client_key, "client-key.pem"),
    ):
        docker(deploy_stack, "cp", str(source), f"{host.name}:/etc/pilotfish/tls/{target}")
    host.sh(
        "chown -R root:root /etc/pilotfish/tls && chmod 0600 /etc/pilotfish/tls/client-key.pem && "
        "for unit in pilotfish-registrar pilotfish-discoverer; do "
        "  sed -i 's/^#LoadCredential=/LoadCredential=/; "
        "s/^#Environment=PILOTFISH_ETCD/Environment=PILOTFISH_ETCD/' "
        "/etc/systemd/system/$unit.service; done && "
        f"sed -i 's|^ETCD_HOST=.*|ETCD_HOST={etcd.endpoint}|' "
        "/etc/pilotfish/registrar.env /etc/pilotfish/discoverer.env && "
        "systemctl daemon-reload && systemctl restart pilotfish-registrar pilotfish-discoverer"
    )
    host.wait_active()
    # The key is root's, mode 0600; the agent read it through the credential.
    registrar_uid = next(iter(host.processes("pilotfish-registrar").values()))["Uid"]
    assert registrar_uid != "0"
    assert host.sh("stat -c %U:%a /etc/pilotfish/tls/client-key.pem") == "root:600"

    port, hostname = start_whoami(deploy_stack, containers, "tls")
    assert_routed(host, port, hostname)
    tls = [f"--cacert={files.ca}", f"--cert={files.client_cert}", f"--key={files.client_key}"]
    keys = subprocess.run(
        [
            "etcdctl",
            f"--endpoints={etcd.client_url}",
            *tls,
            "get",
            "--prefix",
            "--keys-only",
            host.prefix,
        ],
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "whoami-tls" in keys, keys


def test_stop_takes_haproxy_along(host: Host) -> None:
    """Runs last: the discoverer's HAProxy stops with it, nothing of the unit remains."""
    host.sh("systemctl stop pilotfish-discoverer pilotfish-registrar", timeout=90)
    for unit in UNITS:
        assert host.show(unit, "ActiveState") == "inactive", host.journal()
        assert host.show(unit, "Result") == "success", host.journal()
    assert host.sh("cat /proc/[0-9]*/comm 2>/dev/null | grep -c haproxy", check=False) == "0"
