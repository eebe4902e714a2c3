"""Settings: flags, PILOTFISH_* and the seed deployment's variables."""

from __future__ import annotations

import pytest

from agents.cli import main
from agents.common.etcd import grpc_target
from agents.common.settings import DiscovererSettings, RegistrarSettings, parse_endpoints


def test_seed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_IP", "10.0.0.5")
    monkeypatch.setenv("ETCD_HOST", "etcd1:4001")
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    settings = RegistrarSettings()
    assert settings.host_ip == "10.0.0.5"
    assert settings.endpoints == [("etcd1", 4001)]
    assert settings.docker_host == "tcp://127.0.0.1:2375"


def test_pilotfish_variable_beats_seed_and_flag_beats_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ETCD_HOST", "a:1")
    monkeypatch.setenv("PILOTFISH_ETCD_HOST", "b:2")
    assert RegistrarSettings().etcd_host == "b:2"
    assert RegistrarSettings(etcd_host="c:3").etcd_host == "c:3"


def test_cluster_endpoints() -> None:
    assert parse_endpoints("127.0.0.1:2379, 127.0.0.1:22379,http://127.0.0.1:32379") == [
        ("127.0.0.1", 2379),
        ("127.0.0.1", 22379),
        ("127.0.0.1", 32379),
    ]
    host, port = grpc_target([("127.0.0.1", 2379), ("127.0.0.1", 22379), ("127.0.0.1", 32379)])
    assert f"{host}:{port}" == "ipv4:127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379"


def test_service_filter() -> None:
    settings = DiscovererSettings(services="a, b,,c")
    assert settings.service_filter == frozenset({"a", "b", "c"})


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        (["register", "--host-ip", "1.2.3"], {}, "host_ip"),
        (["register"], {"ETCD_HOST": "etcd:port"}, "etcd_host"),
        (["register", "--ttl", "1"], {}, "ttl"),
        (["register", "--prefix", "no-slash"], {}, "prefix"),
        (["discover", "--services", "ok,bad name"], {}, "services"),
        (["discover", "--bind-address", "localhost"], {}, "bind_address"),
        (["discover", "--etcd-cacert", "/nonexistent/ca.pem"], {}, "etcd_cacert"),
        (["register", "--etcd-cert", "/etc/hostname"], {}, "--etcd-cert and --etcd-key go"),
        (["register"], {"PILOTFISH_ETCD_KEY": "/etc/hostname"}, "etcd_key"),
    ],
)
def test_bad_setting_exits_2_with_one_line(
    argv: list[str],
    env: dict[str, str],
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert fragment in err
