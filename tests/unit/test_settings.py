"""Settings: flags, PILOTFISH_* and the seed deployment's variables."""

from __future__ import annotations

import grp
import pwd
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from agents.cli import build_parser, main
from agents.common.etcd import grpc_target
from agents.common.settings import (
    DiscovererSettings,
    RegistrarSettings,
    endpoints_use_tls,
    parse_endpoints,
)
from agents.common.validation import MAX_STATE_DIR


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


# --- etcd endpoints: URLs and IPv6 (finding 11) --------------------------------------------


@pytest.mark.parametrize(
    ("value", "endpoints", "tls"),
    [
        ("http://etcd1:2379", [("etcd1", 2379)], False),
        ("https://etcd1:2379/", [("etcd1", 2379)], True),
        ("HTTPS://etcd1", [("etcd1", 2379)], True),
        ("[::1]:2379", [("::1", 2379)], False),
        ("[::1]", [("::1", 2379)], False),
        ("https://[0:0::1]:2379", [("::1", 2379)], True),
        ("[::1]:2379, [fd00::2]:22379", [("::1", 2379), ("fd00::2", 22379)], False),
    ],
)
def test_endpoint_urls_and_ipv6(value: str, endpoints: list[tuple[str, int]], tls: bool) -> None:
    assert parse_endpoints(value) == endpoints
    assert endpoints_use_tls(value) is tls
    assert RegistrarSettings(etcd_host=value).etcd_tls is tls


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("unix:///run/etcd.sock", "scheme 'unix'"),
        ("ftp://etcd1:2379", "scheme 'ftp'"),
        ("::1:2379", "[address]:port"),
        ("[::1]:2379,127.0.0.1:2379", "IPv4 and IPv6"),
        ("[::1]:2379,etcd1:2379", "IPv4 and IPv6"),
        ("http://a:2379,https://b:2379", "http:// and https://"),
        ("[fe80::1%eth0]:2379", "not an IPv6 address"),
        ("[127.0.0.1]:2379", "not an IPv6 address"),
        ("etcd1:0", "port 1-65535"),
        ("https://etcd1:2379/v3", "host:port"),
        ("etcd 1:2379", "host:port"),
        (" , ", "no endpoint"),
    ],
)
def test_bad_endpoints_are_refused(value: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_endpoints(value)


def test_grpc_targets_for_ipv6() -> None:
    assert grpc_target([("::1", 2379)]) == ("[::1]", 2379)
    host, port = grpc_target([("::1", 2379), ("fd00::2", 22379)])
    assert f"{host}:{port}" == "ipv6:[::1]:2379,[fd00::2]:22379"


# --- discoverer settings that used to fail at the first render (finding 11) ---------------


def test_stats_page_defaults_to_loopback() -> None:
    assert DiscovererSettings().stats_address == "127.0.0.1:1936"


@pytest.mark.parametrize("value", [":0", "127.0.0.1:0", "127.0.0.1:65536", "a b:1936", "1936"])
def test_bad_stats_addresses_are_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="stats"):
        DiscovererSettings(stats_address=value)


def test_state_dir_must_leave_room_for_socket_paths() -> None:
    longest = "/" + "d" * (MAX_STATE_DIR - 1)
    assert DiscovererSettings(state_dir=longest).state_dir == longest
    with pytest.raises(ValidationError, match="at most"):
        DiscovererSettings(state_dir=longest + "d")


def test_template_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read"):
        DiscovererSettings(template=str(tmp_path / "missing.j2"))
    with pytest.raises(ValidationError, match="cannot read"):
        DiscovererSettings(template=str(tmp_path))  # a directory


# --- secrets from files or the environment ------------------------------------------------


def test_etcd_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "etcd-password"
    secret.write_text("s3cret\n")
    assert RegistrarSettings(etcd_password_file=str(secret)).etcd_password == "s3cret"
    with pytest.raises(ValidationError, match="not both"):
        RegistrarSettings(etcd_password_file=str(secret), etcd_password="other")
    secret.write_text("\n")
    with pytest.raises(ValidationError, match="one non-empty line"):
        RegistrarSettings(etcd_password_file=str(secret))


def test_stats_credentials_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DiscovererSettings().stats_auth is None
    credentials = tmp_path / "stats"
    credentials.write_text("admin:pass=word\n")
    assert DiscovererSettings(stats_credentials_file=str(credentials)).stats_auth == (
        "admin",
        "pass=word",
    )
    monkeypatch.setenv("PILOTFISH_STATS_USER", "ops")
    monkeypatch.setenv("PILOTFISH_STATS_PASSWORD", "x.y")
    assert DiscovererSettings().stats_auth == ("ops", "x.y")
    assert "x.y" not in repr(DiscovererSettings())  # nor in a logged settings object
    with pytest.raises(ValidationError, match="not both"):
        DiscovererSettings(stats_credentials_file=str(credentials))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("admin", "user:password"),
        ("admin:", "stats password"),
        (":secret", "stats user"),
        ("admin:two words", "stats password"),
        ("admin:x\nglobal", "one non-empty line"),
        ("admin:#comment", "stats password"),
    ],
)
def test_bad_stats_credentials_are_refused(tmp_path: Path, content: str, fragment: str) -> None:
    credentials = tmp_path / "stats"
    credentials.write_text(content)
    with pytest.raises(ValidationError, match=fragment):
        DiscovererSettings(stats_credentials_file=str(credentials))


def test_secrets_are_never_flags_nor_echoed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    parser.parse_args(["discover", "--stats-credentials-file", "f", "--etcd-password-file", "f"])
    for flag in ("--stats-user", "--stats-password"):
        with pytest.raises(SystemExit):
            parser.parse_args(["discover", flag, "x"])
    capsys.readouterr()
    monkeypatch.setenv("PILOTFISH_STATS_USER", "admin")
    monkeypatch.setenv("PILOTFISH_STATS_PASSWORD", "hunter2 with space")
    assert main(["discover"]) == 2
    err = capsys.readouterr().err
    assert "stats password" in err and "hunter2" not in err


# --- HAProxy's account when started by root -----------------------------------------------


def test_haproxy_account_only_when_root() -> None:
    settings = DiscovererSettings(haproxy_user="nobody", haproxy_group="nogroup")
    assert settings.haproxy_account(euid=0) == ("nobody", "nogroup")
    assert settings.haproxy_account(euid=1000) == (None, None)
    off = DiscovererSettings(haproxy_user="none", haproxy_group="none")
    assert off.haproxy_account(euid=0) == (None, None)


def test_haproxy_account_defaults_to_an_existing_one() -> None:
    settings = DiscovererSettings()
    expected_user = "haproxy" if _exists(pwd.getpwnam, "haproxy") else "nobody"
    assert settings.haproxy_user == expected_user
    assert settings.haproxy_group in ("haproxy", "nogroup", "nobody")
    assert _exists(grp.getgrnam, settings.haproxy_group)


@pytest.mark.parametrize("name", ["no-such-user-here", "root\nglobal", "a b", ""])
def test_unknown_or_odd_accounts_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="haproxy_user"):
        DiscovererSettings(haproxy_user=name)


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True
