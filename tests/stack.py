"""Real servers for integration tests, benchmarks and the demo: dockerd, etcd, HAProxy.

Plain synchronous, subprocess-based helpers. Each server class has ``start()`` /
``stop()`` and is a context manager; all of its state lives under a base
directory (short paths under /tmp: unix socket paths are limited to 107 bytes)
and its log under :data:`LOG_ROOT`, so a failed CI run can print them.

A missing server binary is an error naming the Debian package, never a skip.

CLI for benches and manual debugging::

    python -m tests.stack up --dir /tmp/pf-dev     # writes /tmp/pf-dev/env
    python -m tests.stack down --dir /tmp/pf-dev
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LOG_ROOT = Path(os.environ.get("PILOTFISH_TEST_LOGS", "/tmp/pilotfish-test-logs"))
CACHE_DIR = Path(os.environ.get("PILOTFISH_TEST_CACHE", "/tmp/pilotfish-test-cache"))
WHOAMI_IMAGE = "pilotfish-whoami"
WHOAMI_HEALTH_IMAGE = "pilotfish-whoami-health"
TEST_LABEL = "pilotfish.test"
# Subnets 10.252.N.0/24 are only ever used as local container bridges.
BRIDGE_NET = "10.252"
_NET_LOCK = Path("/tmp/pilotfish-net.lock")
_NET_OWNERS = Path("/tmp/pilotfish-net")  # one file per bridge: the allocating pid

# Which Debian package provides which binary, for the error message.
PACKAGES = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "haproxy": "haproxy",
    "busybox": "busybox-static",
    "ip": "iproute2",
    "docker-registry": "docker-registry",
}


class StackError(RuntimeError):
    """A server could not be started or driven; the message carries its log tail."""


# --- small helpers ---------------------------------------------------------------------


def require_binary(name: str) -> str:
    """The binary's path, or a StackError naming the package to install (never a skip)."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        raise StackError(
            f"required server binary {name!r} not found on PATH: "
            f"install the Debian package {package!r} (apt-get install {package})"
        )
    return path


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the kernel picks it).

    Never the same port twice in one process: the kernel may hand a just
    released port out again, and a member's client and peer ports collided so.
    """
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def unique_prefix(name: str = "t") -> str:
    """An etcd key prefix no other test uses, so tests share one etcd safely."""
    # Only characters the schema's PREFIX_PATTERN accepts.
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]
    return f"/pftest/{safe}-{uuid.uuid4().hex[:10]}"


def make_base_dir(tag: str = "stack") -> Path:
    """A fresh short directory under /tmp for one session's server state.

    Its name goes into containerd namespaces, which allow no "_" next to a
    "-" (mkdtemp's names hold "_": "pftest-_r9lfgbi-d1" failed every
    container start of a test session): letters and digits only.
    """
    path = Path("/tmp") / f"pf{tag[:6]}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)  # exists already: a clash of 32 random bits, fail loudly
    return path


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def haproxy_binary(minimum: tuple[int, int] = (2, 6)) -> str:
    """Path of an HAProxy at least ``minimum``; raises clearly otherwise."""
    path = require_binary("haproxy")
    out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    if match is None or (int(match[1]), int(match[2])) < minimum:
        raise StackError(f"{path} is not HAProxy {minimum[0]}.{minimum[1]}+: {out.strip()!r}")
    return path


def _wait_until(
    check: Callable[[], bool], timeout: float, what: str, proc: _Proc | None = None
) -> None:
    """Poll ``check``; fail fast (with the log tail) if the server process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise StackError(f"{what}: process exited ({proc.returncode()})\n{proc.tail()}")
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            tail = proc.tail() if proc is not None else ""
            raise StackError(f"{what}: not ready within {timeout}s\n{tail}")
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _kill_strays(markers: list[str]) -> list[int]:
    """SIGKILL every process whose command line names a marker, and its descendants.

    After dockerd is gone, its containerd, shims and the containers' processes
    may linger (dockerd SIGKILLed, or a shared system containerd); the shims'
    command lines carry our exec-root or containerd namespace.
    """
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(marker in cmdline for marker in markers):
                roots.append(int(entry.name))
    victims: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in victims:
            victims.append(pid)
            stack.extend(children.get(pid, []))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return victims


def _unmount_under(path: Path) -> None:
    """Lazily unmount whatever dockerd left mounted under ``path`` (netns, shm)."""
    prefix = str(path) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _remove_tree(path: Path) -> None:
    _unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


# --- process supervision ---------------------------------------------------------------

_LIVE: set[_Server] = set()


class _Proc:
    """One server process, its own session (so signals to pytest do not reach it)."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise StackError(f"{self.argv[0]} was never started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def terminate(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; a paused process is resumed first."""
        if self.popen is None:
            return
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
        self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        return f"--- last lines of {self.log_path} ---\n{log_tail(self.log_path, lines)}"


class _Server:
    """Context-manager plumbing shared by the servers; atexit stops what is left."""

    detached = False  # the CLI's servers outlive this Python process

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _track(self, live: bool) -> None:
        if live and not self.detached:
            _LIVE.add(self)
        else:
            _LIVE.discard(self)


@atexit.register
def _stop_everything() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()


# --- bridges ---------------------------------------------------------------------------


def _ip(*args: str) -> str:
    result = subprocess.run([require_binary("ip"), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise StackError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def create_bridge(name: str, cidr: str) -> None:
    _ip("link", "add", name, "type", "bridge")
    _ip("addr", "add", cidr, "dev", name)
    _ip("link", "set", name, "up")


def delete_bridge(name: str) -> None:
    if link_exists(name):
        _ip("link", "delete", name)
    (_NET_OWNERS / name).unlink(missing_ok=True)


def _stale(name: str) -> bool:
    """A pfbrN bridge whose allocating process is gone and no dockerd uses: a crash's."""
    with contextlib.suppress(OSError, ValueError):
        if _pid_alive(int((_NET_OWNERS / name).read_text())):
            return False
    return not any(
        f"--bridge={name}".encode() in cmdline for cmdline in _cmdlines() if b"dockerd" in cmdline
    )


def _cmdlines() -> Iterator[bytes]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield (entry / "cmdline").read_bytes().replace(b"\0", b" ") + b" "


def allocate_bridge() -> tuple[str, str, str]:
    """Create a bridge ``pfbrN`` with 10.252.N.1/24; return it with the host IP 127.0.N.1.

    N is picked under a file lock so several test sessions (developers, CI) on
    one machine never share a bridge, a subnet or a publishing address. The
    address matters: each engine allocates "random" host ports from the same
    start of the ephemeral range without knowing the other engines, so two
    engines publishing on one IP collide ("bind: address already in use").
    """
    with _NET_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = _ip("-o", "-4", "addr")
        for n in range(10, 250):
            name, cidr = f"pfbr{n}", f"{BRIDGE_NET}.{n}.1/24"
            if link_exists(name) and _stale(name):
                delete_bridge(name)
                used = _ip("-o", "-4", "addr")
            if not link_exists(name) and f" {BRIDGE_NET}.{n}." not in used:
                create_bridge(name, cidr)
                _NET_OWNERS.mkdir(exist_ok=True)
                (_NET_OWNERS / name).write_text(str(os.getpid()))
                return name, cidr, f"127.0.{n}.1"
    raise StackError("no free pfbrN bridge / 10.252.N.0/24 subnet left")


# --- dockerd ---------------------------------------------------------------------------


class Dockerd(_Server):
    """One Docker engine with its own socket, roots, containerd namespace and bridge.

    ``bridge=None`` uses dockerd's default ``docker0``. With a bridge name the
    bridge is created (and deleted on stop) if it does not exist; such engines
    run with ``--iptables=false`` so they never fight over the host firewall,
    and publish through docker-proxy on ``host_ip``.
    """

    whoami = WHOAMI_IMAGE
    whoami_health = WHOAMI_HEALTH_IMAGE

    def __init__(
        self,
        base_dir: Path | str,
        name: str = "d1",
        bridge: str | None = None,
        bridge_cidr: str | None = None,
        host_ip: str = "127.0.0.1",
        ready_timeout: float = 60.0,
    ) -> None:
        self.dir = Path(base_dir) / name
        self.name = name
        self.bridge = bridge
        self.bridge_cidr = bridge_cidr
        self.host_ip = host_ip
        self.ready_timeout = ready_timeout
        self.log_path = LOG_ROOT / Path(base_dir).name / f"dockerd-{name}.log"
        # Unique per engine: a system containerd (if one runs) is shared, and
        # engines must not see each other's containers in it.
        self.namespace = f"{Path(base_dir).name}-{name}"
        self._created_bridge = False
        self._proc = _Proc(self._argv(), self.log_path)

    @classmethod
    def isolated(cls, base_dir: Path | str, name: str, host_ip: str | None = None) -> Dockerd:
        """An engine with a bridge, subnet and publishing address of its own.

        The bridge is created now and deleted by stop(); start() re-creates it.
        """
        bridge, cidr, own_ip = allocate_bridge()
        engine = cls(base_dir, name, bridge=bridge, bridge_cidr=cidr, host_ip=host_ip or own_ip)
        engine._created_bridge = True
        return engine

    @property
    def socket_path(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    url = docker_host  # the name the registrar's tests use

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _argv(self) -> list[str]:
        argv = [
            require_binary("dockerd"),
            "--storage-driver=vfs",
            f"--data-root={self.dir / 'data'}",
            f"--exec-root={self.dir / 'exec'}",
            f"-H=unix://{self.dir / 'docker.sock'}",
            f"--pidfile={self.dir / 'docker.pid'}",
            f"--containerd-namespace={self.namespace}",
            f"--containerd-plugins-namespace={self.namespace}-plugins",
            f"--ip={self.host_ip}",
        ]
        if self.bridge is not None:
            argv += [f"--bridge={self.bridge}", "--iptables=false", "--ip-masq=false"]
        return argv

    def start(self) -> Self:
        if self._proc.alive():
            return self
        with _NET_LOCK.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._ensure_bridge()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._forget_dead_containerd()
        self._proc.spawn()
        self._track(True)
        _wait_until(self.ping, self.ready_timeout, f"dockerd {self.name}", self._proc)
        return self

    def _ensure_bridge(self) -> None:
        if self.bridge is None or link_exists(self.bridge):
            return
        if self.bridge_cidr is None:
            raise StackError(f"bridge {self.bridge} does not exist and no bridge_cidr given")
        create_bridge(self.bridge, self.bridge_cidr)
        self._created_bridge = True

    def _forget_dead_containerd(self) -> None:
        """Drop containerd's pidfile if that containerd is gone or a zombie.

        After dockerd is SIGKILLed its containerd dies too, but where PID 1
        does not reap orphans it stays a zombie; dockerd would take the pidfile
        for a live containerd and wait for its socket until it gives up.
        """
        pidfile = self.dir / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            if not _pid_alive(int(pidfile.read_text().strip())):
                pidfile.unlink()

    def ping(self) -> bool:
        """True when the engine's API answers ``GET /_ping``."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.socket_path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(4096).endswith(b"OK")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal dockerd itself (its containerd and containers are left as they are)."""
        self._proc.signal(sig)

    def stop(self) -> None:
        """SIGTERM (dockerd stops its containers), sweep leftovers, delete our bridge."""
        self._halt()
        if self._created_bridge and self.bridge is not None:
            delete_bridge(self.bridge)
            self._created_bridge = False
        self._track(False)

    def heal(self) -> None:
        """Start the engine again if a test killed or stopped it."""
        self.start()

    def _halt(self) -> None:
        self._proc.terminate(timeout=30)
        _kill_strays([str(self.dir) + "/", self.namespace])
        _unmount_under(self.dir)

    def restart(self) -> Self:
        """Stop and start on the same roots: containers stay defined (stopped).

        The bridge is kept meanwhile, so no other session can take its name.
        """
        self._halt()
        return self.start()

    def close(self) -> None:
        self.stop()
        _remove_tree(self.dir)

    def docker(self, *args: str, input: bytes | None = None, timeout: float = 120) -> str:
        """Run the docker CLI against this engine; stdout, or StackError with stderr."""
        out = self.docker_bytes(*args, input=input, timeout=timeout)
        return out.decode(errors="replace").strip()

    def docker_bytes(self, *args: str, input: bytes | None = None, timeout: float = 120) -> bytes:
        result = subprocess.run(
            [require_binary("docker"), "-H", self.docker_host, *args],
            input=input,
            capture_output=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            raise StackError(f"docker {' '.join(args)} ({self.name}): {err}")
        return result.stdout

    def remove_test_containers(self, label: str = f"{TEST_LABEL}=1") -> None:
        ids = self.docker("ps", "-aq", "--filter", f"label={label}").split()
        if ids:
            self.docker("rm", "-f", *ids)


class ExistingDockerd(Dockerd):
    """An engine this code did not start (PILOTFISH_TEST_DOCKER_HOST): never stopped."""

    def __init__(self, docker_host: str, host_ip: str = "127.0.0.1") -> None:
        if not docker_host.startswith("unix://"):
            raise StackError(f"only unix:// engines are supported, not {docker_host!r}")
        self._socket = Path(docker_host.removeprefix("unix://"))
        self.dir = self._socket.parent
        self.name = "external"
        self.bridge = None
        self.host_ip = host_ip
        self.log_path = Path("/dev/null")

    @property
    def socket_path(self) -> Path:
        return self._socket

    @property
    def docker_host(self) -> str:
        return f"unix://{self._socket}"

    url = docker_host

    def start(self) -> Self:
        _wait_until(self.ping, 10, f"existing engine {self.docker_host}")
        return self

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass

    def kill(self, sig: int = signal.SIGKILL) -> None:
        raise StackError("refusing to signal an engine this test session did not start")

    def restart(self) -> Self:
        raise StackError("refusing to restart an engine this test session did not start")


# --- test images -----------------------------------------------------------------------

# PID 1 is a shell so SIGTERM is handled (busybox httpd as PID 1 ignores it and
# `docker stop` would wait its full 10 s).
_INIT = """#!/bin/sh
trap 'kill $child 2>/dev/null; exit 0' TERM INT
httpd -f -p 8080 -h /www &
child=$!
wait $child
"""
# busybox httpd runs cgi-bin/index.cgi for "/" when there is no index.html.
_WHOAMI_CGI = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
hostname
"""
_FORMAT = 1  # bump when the rootfs layout changes


def whoami_rootfs_tarball() -> Path:
    """The busybox-static whoami root filesystem as a tarball, built once and cached."""
    busybox = Path(require_binary("busybox")).resolve()
    data = busybox.read_bytes()
    key = hashlib.sha256(data + _INIT.encode() + _WHOAMI_CGI.encode() + bytes([_FORMAT]))
    tarball = CACHE_DIR / f"whoami-{key.hexdigest()[:12]}.tar"
    if tarball.exists():
        return tarball
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_suffix(f".{os.getpid()}.tmp")
    with tarfile.open(tmp, "w") as tar:
        _fill_rootfs(tar, data, _applets(str(busybox)))
    tmp.replace(tarball)
    return tarball


def _applets(busybox: str) -> list[str]:
    out = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    return [name for name in out.stdout.split() if name != "busybox"]


def _fill_rootfs(tar: tarfile.TarFile, busybox: bytes, applets: list[str]) -> None:
    for directory in ("bin", "etc", "tmp", "www", "www/cgi-bin", "proc", "sys", "dev"):
        _add(tar, directory, tarfile.DIRTYPE, mode=0o1777 if directory == "tmp" else 0o755)
    _add(tar, "bin/busybox", tarfile.REGTYPE, busybox, 0o755)
    for applet in applets:
        _add(tar, f"bin/{applet}", tarfile.SYMTYPE, link="busybox")
    _add(tar, "init", tarfile.REGTYPE, _INIT.encode(), 0o755)
    _add(tar, "www/cgi-bin/index.cgi", tarfile.REGTYPE, _WHOAMI_CGI.encode(), 0o755)
    _add(tar, "etc/passwd", tarfile.REGTYPE, b"root:x:0:0:root:/:/bin/sh\n", 0o644)
    _add(tar, "etc/group", tarfile.REGTYPE, b"root:x:0:\n", 0o644)


def _add(
    tar: tarfile.TarFile,
    name: str,
    kind: bytes,
    data: bytes = b"",
    mode: int = 0o777,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, 0
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _import_image(dockerd: Dockerd, name: str, changes: list[str]) -> None:
    """Import the rootfs as ``name`` unless an image with the same build key is there."""
    tarball = whoami_rootfs_tarball()
    key = hashlib.sha256(json.dumps([tarball.name, changes]).encode()).hexdigest()[:12]
    with contextlib.suppress(StackError):
        labels = dockerd.docker("image", "inspect", "-f", "{{json .Config.Labels}}", name)
        if (json.loads(labels) or {}).get("pilotfish.image.key") == key:
            return
    args = ["import"]
    for change in [*changes, f"LABEL pilotfish.image.key={key}"]:
        args += ["--change", change]
    dockerd.docker(*args, str(tarball), name)


def make_whoami_image(dockerd: Dockerd, name: str = WHOAMI_IMAGE) -> str:
    """An HTTP server on 8080 answering ``/`` with the container's hostname (its short id)."""
    _import_image(dockerd, name, ['CMD ["/init"]', "EXPOSE 8080/tcp"])
    return name


def make_whoami_health_image(dockerd: Dockerd, name: str = WHOAMI_HEALTH_IMAGE) -> str:
    """whoami with a HEALTHCHECK: healthy iff /tmp/healthy exists (flip with docker exec)."""
    health = "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD test -e /tmp/healthy"
    _import_image(dockerd, name, ['CMD ["/init"]', "EXPOSE 8080/tcp", health])
    return name


def make_whoami_variant(dockerd: Dockerd, name: str, *changes: str) -> str:
    """whoami imported again with ``changes`` (``ENV``, ``LABEL``, ``HEALTHCHECK``, ...):
    a different image id from the same root filesystem, for upgrades."""
    _import_image(dockerd, name, ['CMD ["/init"]', "EXPOSE 8080/tcp", *changes])
    return name


def image_id(dockerd: Dockerd, name: str) -> str:
    return dockerd.docker("image", "inspect", "-f", "{{.Id}}", name)


def make_test_images(dockerd: Dockerd) -> None:
    make_whoami_image(dockerd)
    make_whoami_health_image(dockerd)


def copy_image(src: Dockerd, dst: Dockerd, name: str) -> None:
    """``docker save | docker load`` from one engine to another (there is no registry)."""
    dst.docker("load", input=src.docker_bytes("save", name))


# --- etcd ------------------------------------------------------------------------------


def _post_json(url: str, body: dict[str, Any], timeout: float = 2.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway CA, and a server and a client certificate it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path, server_names: Sequence[str] = ("etcd.test",)) -> TlsFiles:
    """With the openssl command; the server certificate is for 127.0.0.1 and ``server_names``."""
    openssl = require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)

    def run(command: str) -> None:  # no argument has a space
        argv = [openssl, *command.split()]
        subprocess.run(argv, cwd=directory, check=True, capture_output=True, timeout=60)

    run("req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=pilotfish-test-ca"
        " -keyout ca.key -out ca.crt")  # fmt: skip
    sans = ",".join(["IP:127.0.0.1", *(f"DNS:{name}" for name in server_names)])
    usages = {"server": f"subjectAltName={sans}", "client": "extendedKeyUsage=clientAuth"}
    for who, extension in usages.items():
        (directory / f"{who}.ext").write_text(extension + "\n")
        run(f"req -newkey rsa:2048 -nodes -subj /CN=pilotfish-{who} -keyout {who}.key"
            f" -out {who}.csr")  # fmt: skip
        run(f"x509 -req -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -in {who}.csr"
            f" -extfile {who}.ext -out {who}.crt")  # fmt: skip
    names = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
    return TlsFiles(*(directory / name for name in names))


class Etcd(_Server):
    """One etcd member on 127.0.0.1; ``initial_cluster`` makes it part of a cluster.

    With ``tls`` it serves clients over TLS only and requires a client
    certificate; /health is then on a plain-HTTP metrics port.
    """

    def __init__(
        self,
        base_dir: Path | str,
        name: str = "e0",
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        ready_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        self.name = name
        self.extra_args = list(extra_args)
        self.tls = tls
        self.metrics_port = free_port() if tls else None
        self.dir = Path(base_dir) / name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.ready_timeout = ready_timeout
        self.paused = False
        self.log_path = LOG_ROOT / Path(base_dir).name / f"etcd-{name}.log"
        self._proc = _Proc(self._argv(Path(base_dir).name), self.log_path)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def health_url(self) -> str:
        if self.metrics_port:
            return f"http://127.0.0.1:{self.metrics_port}/health"
        return f"{self.client_url}/health"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _argv(self, token: str) -> list[str]:
        return [
            require_binary("etcd"),
            f"--name={self.name}",
            f"--data-dir={self.dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            "--initial-cluster-state=new",  # ignored once the data dir exists
            f"--initial-cluster-token={token}",
            *self._tls_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--cert-file={self.tls.server_cert}",
            f"--key-file={self.tls.server_key}",
            f"--trusted-ca-file={self.tls.ca}",
            "--client-cert-auth",
            f"--listen-metrics-urls=http://127.0.0.1:{self.metrics_port}",
        ]

    def spawn(self) -> None:
        """Start the process without waiting (cluster members wait for each other)."""
        if not self._proc.alive():
            self._proc.spawn()
            self._track(True)

    def start(self) -> Self:
        self.spawn()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        _wait_until(self.healthy, self.ready_timeout, f"etcd {self.name}", self._proc)

    def healthy(self) -> bool:
        with urllib.request.urlopen(self.health_url, timeout=1) as response:
            return bool(json.loads(response.read()).get("health") == "true")

    def status(self) -> dict[str, Any]:
        """This member's maintenance status (gRPC gateway): member id, leader, revision."""
        status: dict[str, Any] = _post_json(f"{self.client_url}/v3/maintenance/status", {})
        return status

    def is_leader(self) -> bool:
        status = self.status()
        return bool(status.get("leader") == status["header"]["member_id"])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._proc.signal(sig)
        if sig == signal.SIGKILL:
            self._proc.terminate(timeout=5)  # reap, so alive() is right at once

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """``etcdctl`` (v3) against this member, over TLS with the client certificate if
        it has one; ``user`` is ``name:password``."""
        argv = [require_binary("etcdctl"), f"--endpoints={self.client_url}"]
        if self.tls is not None:
            argv += [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        if user is not None:
            argv.append(f"--user={user}")
        done = subprocess.run(
            [*argv, *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise StackError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def enable_auth(self, password: str) -> None:
        """Authentication on, with etcd's ``root`` user (``password``) holding the root role."""
        self.etcdctl("user", "add", f"root:{password}")
        self.etcdctl("auth", "enable")  # etcdctl grants root the root role first

    def pause(self) -> None:
        """SIGSTOP: the member is frozen, its connections stay open (a hung host)."""
        self._proc.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._proc.signal(signal.SIGCONT)
        self.paused = False

    def heal(self) -> None:
        """Undo whatever a test did to this member: resume it, start it again."""
        if self.paused:
            self.resume()
        self.start()

    def alive(self) -> bool:
        return self._proc.alive()

    def stop(self) -> None:
        self._proc.terminate(timeout=10)  # resumes a paused member first
        self.paused = False
        self._track(False)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class EtcdCluster(_Server):
    """``size`` etcd members on 127.0.0.1; member methods take the member's index."""

    def __init__(self, base_dir: Path | str, size: int = 3) -> None:
        names = [f"m{i}" for i in range(size)]
        peers = {name: free_port() for name in names}
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in peers.items())
        self.members = [
            Etcd(base_dir, n, peer_port=peers[n], initial_cluster=initial) for n in names
        ]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    @property
    def etcd_host(self) -> str:
        return ",".join(self.endpoints)

    def start(self, index: int | None = None) -> Self:
        """Start every member (index None) or one member again, and wait for health."""
        chosen = self.members if index is None else [self.members[index]]
        for member in chosen:
            member.spawn()
        for member in chosen:
            member.wait_ready()
        return self

    def stop(self, index: int | None = None) -> None:
        for member in self.members if index is None else [self.members[index]]:
            member.stop()

    def close(self) -> None:
        for member in self.members:
            member.close()

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.members[index].kill(sig)

    def pause(self, index: int) -> None:
        self.members[index].pause()

    def resume(self, index: int) -> None:
        self.members[index].resume()

    def heal(self) -> None:
        for member in self.members:
            if member.paused:
                member.resume()
        self.start()

    def leader(self, timeout: float = 15.0) -> Etcd:
        """The member that is leader now (waits through an election)."""
        found: list[Etcd] = []

        def check() -> bool:
            found[:] = [m for m in self.members if m.alive() and not m.paused and m.is_leader()]
            return bool(found)

        _wait_until(check, timeout, "etcd cluster leader")
        return found[0]


# --- image registry ----------------------------------------------------------------------


class Registry(_Server):
    """Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1, storage in a directory.

    Engines push to and pull from ``127.0.0.1:PORT/name:tag`` without
    ``--insecure-registry``: 127.0.0.0/8 is insecure by default.
    """

    def __init__(self, base_dir: Path | str, name: str = "r0", ready_timeout: float = 30.0) -> None:
        self.dir = Path(base_dir) / name
        self.port = free_port()
        self.ready_timeout = ready_timeout
        self.log_path = LOG_ROOT / Path(base_dir).name / f"registry-{name}.log"
        self._proc = _Proc([require_binary("docker-registry"), "serve", str(self.config)],
                           self.log_path)  # fmt: skip

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.dir / "config.yml"

    def start(self) -> Self:
        if self._proc.alive():
            return self
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n"
        )
        self._proc.spawn()
        self._track(True)
        _wait_until(self.ready, self.ready_timeout, f"registry {self.address}", self._proc)
        return self

    def ready(self) -> bool:
        with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as response:
            return bool(response.status == 200)

    def digest(self, name: str, tag: str) -> str:
        """The manifest digest ``name:tag`` has in this registry now."""
        request = urllib.request.Request(
            f"http://{self.address}/v2/{name}/manifests/{tag}",
            method="HEAD",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(response.headers["Docker-Content-Digest"])

    def heal(self) -> None:
        self.start()

    def stop(self) -> None:
        self._proc.terminate(timeout=10)
        self._track(False)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- CLI: up / down --------------------------------------------------------------------


def _cmd_up(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dockerd = Dockerd.isolated(directory, "d1")
    etcd = Etcd(directory, "e0")
    dockerd.detached = etcd.detached = True
    dockerd.start()
    etcd.start()
    make_test_images(dockerd)
    env = {
        "DOCKER_HOST": dockerd.docker_host,
        "ETCD_HOST": etcd.endpoint,
        "HOST_IP": dockerd.host_ip,
        "PF_DOCKERD_PID": str(dockerd.pid),
        "PF_ETCD_PID": str(etcd.pid),
        "PF_BRIDGE": str(dockerd.bridge),
        "PF_NAMESPACE": dockerd.namespace,
    }
    (directory / "env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    print((directory / "env").read_text(), end="")


def _read_env(directory: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in (directory / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def _terminate_pid(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _cmd_down(directory: Path) -> None:
    env = _read_env(directory)
    _terminate_pid(int(env["PF_ETCD_PID"]), 10)
    _terminate_pid(int(env["PF_DOCKERD_PID"]), 30)
    _kill_strays([str(directory / "d1") + "/", env["PF_NAMESPACE"]])
    delete_bridge(env["PF_BRIDGE"])
    _remove_tree(directory)
    print(f"stopped and removed {directory}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, required=True, help="state directory (short path)")
    args = parser.parse_args(argv)
    try:
        (_cmd_up if args.command == "up" else _cmd_down)(args.dir.resolve())
    except StackError as error:
        print(f"stack {args.command} failed: {error}", file=sys.stderr)
        return 1
    return 0


def iter_logs() -> Iterator[Path]:
    """Every server log of every session (CI prints their tails on failure)."""
    yield from sorted(LOG_ROOT.glob("*/*.log"))


if __name__ == "__main__":
    sys.exit(main())
