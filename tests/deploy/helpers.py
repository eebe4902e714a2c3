"""What the deploy tests share: the docker CLI against the stack's engine, ports, polling."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any


def docker_env(stack: dict[str, str]) -> dict[str, str]:
    return {"DOCKER_HOST": stack["DOCKER_HOST"], "PATH": "/usr/local/bin:/usr/bin:/bin"}


def docker(stack: dict[str, str], *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        ["docker", *args],
        env=docker_env(stack),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def inspect(stack: dict[str, str], name: str) -> dict[str, Any]:
    return json.loads(docker(stack, "inspect", name))[0]  # type: ignore[no-any-return]


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()  # type: ignore[no-any-return]
    except (OSError, urllib.error.URLError):
        return None


def wait(what: str, check: Any, timeout: float, diagnose: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout} s\n{diagnose()}")
