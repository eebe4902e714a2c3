"""The demo: etcd, a registrar, a discoverer with its HAProxy, the catalog, three whoami
containers, and the upgrader (a second whoami image, v2, to move the tag to).

    python scripts/demo.py up     (make demo)
    python scripts/demo.py down   (make demo-down)

Uses the Docker engine at DOCKER_HOST or /var/run/docker.sock when one answers;
otherwise starts its own (vfs storage, own bridge). Everything it starts is
recorded in <dir>/state.json, and `down` removes it by PID and by label.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.stack import (  # noqa: E402  (the repository root is put on the path above)
    Dockerd,
    Etcd,
    ExistingDockerd,
    StackError,
    _kill_strays,
    _pid_alive,
    delete_bridge,
    free_port,
    make_whoami_image,
    make_whoami_variant,
)

DEMO_DIR = Path(os.environ.get("PILOTFISH_DEMO_DIR", "/tmp/pilotfish-demo"))
LABEL = "pilotfish.demo=1"
SERVICE_PORT = 8080  # whoami's private port: consumers reach it on 127.0.0.1:8080
STATS_PORT = 1936
CATALOG_PORT = 9103
UPGRADER_PORT = 9104
WHOAMI = "pilotfish-whoami"  # the demo's containers run its tag "latest"; v2 is the upgrade
PILOTFISH = [sys.executable, "-m", "agents"]


def running_engine() -> Dockerd | None:
    """The engine the user already runs, if one answers."""
    candidates = [os.environ.get("DOCKER_HOST", ""), "unix:///var/run/docker.sock"]
    for url in filter(None, candidates):
        engine = ExistingDockerd(url, host_ip="127.0.0.1")
        with contextlib.suppress(Exception):
            if engine.ping():
                return engine
    return None


def start_engine(state: dict[str, object]) -> Dockerd:
    engine = running_engine()
    if engine is not None:
        print(f"using the running Docker engine at {engine.docker_host}")
        return engine
    print("no Docker engine answers: starting one (vfs storage, own bridge)")
    engine = Dockerd.isolated(DEMO_DIR, "docker")
    engine.detached = True
    engine.start()
    state.update(dockerd_pid=engine.pid, bridge=engine.bridge, namespace=engine.namespace)
    return engine


def start_etcd(state: dict[str, object]) -> Etcd:
    port = 2379 if port_free(2379) else free_port()
    etcd = Etcd(DEMO_DIR, "etcd", client_port=port)
    etcd.detached = True
    etcd.start()
    state["etcd_pid"] = etcd.pid
    return etcd


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def spawn_agent(name: str, args: list[str], state: dict[str, object]) -> None:
    log = (DEMO_DIR / f"{name}.log").open("ab")
    process = subprocess.Popen(
        [*PILOTFISH, *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # survives this script and the terminal's Ctrl-C
        env={**os.environ, "PILOTFISH_LOG_FORMAT": "json"},
    )
    state[f"{name}_pid"] = process.pid


def start_whoami(engine: Dockerd, count: int) -> list[str]:
    return [
        engine.docker(
            "run",
            "-d",
            "--label",
            LABEL,
            "--label",
            "pilotfish.service=whoami",
            "--label",
            "pilotfish.mode=http",
            "--label",
            "pilotfish.upgrade=auto",
            "-p",
            f"{engine.host_ip}::{SERVICE_PORT}",
            f"{WHOAMI}:latest",
        ).strip()[:12]
        for _ in range(count)
    ]


def wait_for_answers(want: int, timeout: float = 60.0) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(seen) < want:
        with contextlib.suppress(OSError):
            url = f"http://127.0.0.1:{SERVICE_PORT}/"
            with urllib.request.urlopen(url, timeout=1) as response:
                seen.add(response.read().decode().strip())
        time.sleep(0.05)
    return seen


def up() -> int:
    if (DEMO_DIR / "state.json").exists():
        print(f"a demo is already up ({DEMO_DIR}); run `make demo-down` first")
        return 1
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    state: dict[str, object] = {}
    try:
        engine = start_engine(state)
        state["docker_host"] = engine.docker_host
        make_whoami_image(engine)
        make_whoami_variant(engine, f"{WHOAMI}:v2", "ENV VERSION=2")
        etcd = start_etcd(state)
        common = ["--etcd-host", etcd.endpoint, "--prefix", "/pilotfish-demo"]
        spawn_agent(
            "registrar",
            [
                "register",
                *common,
                "--docker-host",
                engine.docker_host,
                "--host-ip",
                engine.host_ip,
                "--host-id",
                "demo",
                "--ttl",
                "10",
            ],
            state,
        )
        spawn_agent(
            "discoverer",
            [
                "discover",
                *common,
                "--state-dir",
                str(DEMO_DIR / "haproxy"),
                "--stats-address",
                f"127.0.0.1:{STATS_PORT}",
            ],
            state,
        )
        catalog_port = CATALOG_PORT if port_free(CATALOG_PORT) else free_port()
        state["catalog_url"] = f"http://127.0.0.1:{catalog_port}/"
        spawn_agent(
            "catalog", ["catalog", *common, "--address", f"127.0.0.1:{catalog_port}"], state
        )
        upgrader_port = UPGRADER_PORT if port_free(UPGRADER_PORT) else free_port()
        upgrader = ["upgrade", *common, "--docker-host", engine.docker_host]
        state["upgrade_command"] = " ".join([*PILOTFISH[1:], *upgrader])
        spawn_agent("upgrader", [*upgrader, "--admin-address", f"127.0.0.1:{upgrader_port}"], state)
        containers = start_whoami(engine, 3)
    finally:
        (DEMO_DIR / "state.json").write_text(json.dumps(state, indent=1))
    answers = wait_for_answers(len(containers))
    print_usage(engine, containers, answers, state)
    return 0 if answers else 1


def print_usage(
    engine: Dockerd, containers: list[str], answers: set[str], state: dict[str, object]
) -> None:
    docker = f"docker -H {engine.docker_host}"
    catalog, upgrade = state["catalog_url"], f"{sys.executable} {state['upgrade_command']}"
    print(f"""
pilotfish demo is up: 3 whoami containers ({", ".join(containers)}), answered by {len(answers)}.

  catalog: {catalog}         # the service catalog: web UI, JSON API, live

  curl 127.0.0.1:{SERVICE_PORT}                       # a different container each time
  curl 127.0.0.1:{STATS_PORT}/                        # HAProxy's stats page
  {docker} run -d --label {LABEL} --label pilotfish.service=whoami \\
      --label pilotfish.mode=http -p {engine.host_ip}::{SERVICE_PORT} pilotfish-whoami
                                             # one more: it answers within milliseconds
  {docker} stop <id>                          # drained, then gone from HAProxy

  while :; do curl -s 127.0.0.1:{SERVICE_PORT}; sleep 0.1; done    # in another terminal: it keeps answering
  {docker} tag {WHOAMI}:v2 {WHOAMI}:latest
                                             # the upgrader replaces the 3 containers, start-first
  {docker} ps -a --filter label={LABEL}       # the new copies, and each previous one kept stopped
  {upgrade} --rollback <name>
                                             # one container back to its previous version
  tail -f {DEMO_DIR}/registrar.log {DEMO_DIR}/discoverer.log {DEMO_DIR}/upgrader.log

  make demo-down                             # removes everything the demo started
""")


def down() -> int:
    state_file = DEMO_DIR / "state.json"
    if not state_file.exists():
        print("no demo is up")
        return 0
    state = json.loads(state_file.read_text())
    for name in ("upgrader_pid", "registrar_pid", "discoverer_pid", "catalog_pid"):
        terminate(state.get(name), 5)
    terminate(haproxy_master_pid(), 5)
    with contextlib.suppress(StackError, KeyError):
        engine = ExistingDockerd(state["docker_host"])
        ids = engine.docker("ps", "-aq", "--filter", f"label={LABEL}").split()
        if ids:
            engine.docker("rm", "-f", *ids)
    terminate(state.get("etcd_pid"), 10)
    terminate(state.get("dockerd_pid"), 30)
    if state.get("namespace"):
        # containerd and its shims outlive a dockerd that was killed.
        _kill_strays([str(DEMO_DIR / "docker") + "/", str(state["namespace"])])
    if state.get("bridge"):
        with contextlib.suppress(StackError):
            delete_bridge(state["bridge"])
    subprocess.run(["rm", "-rf", str(DEMO_DIR)], check=False)
    print("demo removed")
    return 0


def haproxy_master_pid() -> int | None:
    for name in ("haproxy.pid", "master.pid"):
        path = DEMO_DIR / "haproxy" / name
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().split()[0])
    return None


def terminate(pid: object, timeout: float) -> None:
    if not isinstance(pid, int):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    return up() if parser.parse_args().command == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
