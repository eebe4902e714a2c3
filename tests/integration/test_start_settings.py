"""Settings that used to pass validation and fail later (finding 11), as real commands.

Each runs ``python -m agents register|discover`` from this checkout and must
end at once with exit code 2 and one line on stderr, never a traceback. The
endpoint forms that are valid (https:// URLs, IPv6 literals) work against a
real etcd.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.common.etcd import Etcd
from agents.common.settings import CommonSettings
from agents.common.validation import MAX_STATE_DIR
from tests.stack import Etcd as EtcdServer
from tests.stack import make_tls_files

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run_agent(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Nothing here may reach etcd or Docker: a refusal happens before either is used.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PILOTFISH_")}
    environment.update(env or {}, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "agents", *argv],
        cwd=REPO,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_refused(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


LONG_STATE_DIR = "/tmp/" + "s" * MAX_STATE_DIR
ENDPOINTS = [
    ("https://", "host:port"),
    ("unix:///run/etcd.sock", "scheme 'unix'"),
    ("ftp://127.0.0.1:2379", "scheme 'ftp'"),
    ("::1:2379", "[address]:port"),
    ("[::1]:2379,127.0.0.1:2379", "IPv4 and IPv6"),
    ("http://127.0.0.1:2379,https://127.0.0.2:2379", "http:// and https://"),
]


@pytest.mark.parametrize(("endpoint", "fragment"), ENDPOINTS)
@pytest.mark.parametrize("command", ["register", "discover"])
def test_bad_etcd_endpoints_stop_the_agent_at_start(
    command: str, endpoint: str, fragment: str
) -> None:
    assert_refused(run_agent(command, "--etcd-host", endpoint), fragment)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--stats-address", ":0"], "stats address port 0"),
        (["--state-dir", LONG_STATE_DIR], "at most 90"),
        (["--template", "/nonexistent/haproxy.cfg.j2"], "cannot read"),
        (["--template", "/"], "cannot read"),
        (["--haproxy-user", "no-such-user-here"], "no user"),
        (["--etcd-password-file", "/nonexistent/password"], "cannot read"),
        (["--stats-credentials-file", "/nonexistent/stats"], "cannot read"),
    ],
)
def test_settings_that_failed_at_render_stop_the_discoverer(
    argv: list[str], fragment: str, tmp_path: Path
) -> None:
    assert_refused(run_agent("discover", "--state-dir", str(tmp_path), *argv), fragment)


def test_templates_that_cannot_render_stop_the_discoverer(tmp_path: Path) -> None:
    undefined = tmp_path / "undefined.j2"
    undefined.write_text("global\n    maxconn {{ no_such_value }}\n")
    assert_refused(run_agent("discover", "--template", str(undefined)), "no_such_value")
    refused = tmp_path / "refused.j2"
    refused.write_text("global\n    no-such-keyword {{ state_dir }}\n")
    assert_refused(run_agent("discover", "--template", str(refused)), "no-such-keyword")


def test_stats_credentials_are_checked_and_never_echoed(tmp_path: Path) -> None:
    env = {"PILOTFISH_STATS_USER": "ops", "PILOTFISH_STATS_PASSWORD": "new\nline"}
    result = run_agent("discover", "--state-dir", str(tmp_path), env=env)
    assert_refused(result, "stats password must match")
    assert "new" not in result.stderr


# --- the endpoint forms that are accepted work for real ----------------------------------


class Ipv6Etcd(EtcdServer):
    """The test stack's etcd, listening for clients on [::1] only."""

    @property
    def endpoint(self) -> str:
        return f"[::1]:{self.client_port}"


async def test_ipv6_endpoints_reach_a_real_etcd(stack_dir: Path, prefix: str) -> None:
    with Ipv6Etcd(stack_dir, "v6") as server:
        for etcd_host in (server.endpoint, f"http://{server.endpoint}/"):
            async with Etcd(CommonSettings(etcd_host=etcd_host, etcd_timeout=2.0)) as client:
                assert client.target == f"[::1]:{server.client_port}"
                revision = await client.put(f"{prefix}/one", b"1")
        # Several IPv6 endpoints: gRPC's ipv6: multi-address target (one member, twice).
        several = f"{server.endpoint},{server.endpoint}"
        async with Etcd(CommonSettings(etcd_host=several, etcd_timeout=2.0)) as client:
            assert client.target.startswith("ipv6:[::1]:")
            at, items = await client.get_prefix(f"{prefix}/")
        assert at >= revision and [item.value for item in items] == [b"1"]


async def test_https_endpoint_turns_tls_on(stack_dir: Path, prefix: str) -> None:
    tag = prefix.rsplit("-", 1)[-1][:8]
    files = make_tls_files(stack_dir / f"tls-url-{tag}")
    with EtcdServer(stack_dir, f"tlsurl{tag}", tls=files) as server:
        settings = CommonSettings(
            etcd_host=f"https://{server.endpoint}",
            etcd_timeout=2.0,
            etcd_cacert=str(files.ca),
            etcd_cert=str(files.client_cert),
            etcd_key=str(files.client_key),
        )
        assert settings.etcd_tls
        async with Etcd(settings) as client:
            await client.put(f"{prefix}/a", b"1")
            _revision, items = await client.get_prefix(f"{prefix}/")
        assert [item.value for item in items] == [b"1"]


def test_a_valid_https_endpoint_is_not_refused(tmp_path: Path) -> None:
    # Starts (TLS with the system's CAs), then is stopped by the timeout: no exit 2.
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agents", "register", "--etcd-host", "https://127.0.0.1:1"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PILOTFISH_ADMIN_ADDRESS": "off"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=3,
        )
    except subprocess.TimeoutExpired:
        return
    assert result.returncode != 2, result.stderr
