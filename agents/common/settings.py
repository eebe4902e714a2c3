"""Settings: every option is a flag and a ``PILOTFISH_*`` environment variable.

The seed deployment's variables (``HOST_IP``, ``ETCD_HOST``, ``DOCKER_HOST``)
keep working as aliases. Precedence: flag > ``PILOTFISH_*`` > seed variable >
default.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.common import validation
from agents.common.schema import NAME_PATTERN, PREFIX_PATTERN


def _env(name: str, *seed: str) -> AliasChoices:
    return AliasChoices(f"PILOTFISH_{name.upper()}", *seed)


Scheme = Literal["http", "https"]
_SCHEMES: tuple[Scheme, ...] = ("http", "https")


def split_endpoint(raw: str) -> tuple[Scheme | None, str, int]:
    """``[scheme://]host[:port]`` -> (scheme or None, host, port); IPv6 as ``[addr]:port``.

    The host is an IP literal (IPv6 without brackets) or a DNS name; the port
    defaults to etcd's 2379.
    """
    item = raw.strip()
    scheme: Scheme | None = None
    if "://" in item:
        given, _, item = item.partition("://")
        if given.lower() not in _SCHEMES:
            raise ValueError(f"{raw.strip()!r}: scheme {given!r} is not http:// or https://")
        scheme = "https" if given.lower() == "https" else "http"
        item = item.removesuffix("/")
    if item.startswith("["):
        address, _, rest = item[1:].partition("]")
        host, port = _ipv6(address, raw), rest.removeprefix(":") if rest else "2379"
        if rest and not rest.startswith(":"):
            raise ValueError(f"{raw.strip()!r} is not [IPv6]:port")
    elif item.count(":") > 1:
        raise ValueError(f"{raw.strip()!r}: write an IPv6 endpoint as [address]:port")
    else:
        host, sep, port = item.partition(":")
        port = port if sep else "2379"
        try:
            host = validation.hostname(host)
        except validation.Invalid:
            raise ValueError(f"{raw.strip()!r} is not host:port") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{raw.strip()!r} is not host:port (port 1-65535)")
    return scheme, host, int(port)


def _ipv6(address: str, raw: str) -> str:
    try:
        return str(ipaddress.IPv6Address(validation.ip_literal(address)))
    except (validation.Invalid, ValueError):
        raise ValueError(f"{raw.strip()!r}: {address!r} is not an IPv6 address") from None


def is_ipv6(host: str) -> bool:
    return ":" in host


def _split_all(value: str) -> list[tuple[Scheme | None, str, int]]:
    endpoints = [split_endpoint(raw) for raw in value.split(",") if raw.strip()]
    if not endpoints:
        raise ValueError("no endpoint given")
    if len({scheme for scheme, _, _ in endpoints if scheme is not None}) > 1:
        raise ValueError("mixes http:// and https:// endpoints; TLS is on for all or none")
    if len(endpoints) > 1 and len({is_ipv6(host) for _, host, _ in endpoints}) > 1:
        # gRPC's multi-address target names one family (ipv4:... or ipv6:...).
        raise ValueError("mixes IPv4 and IPv6 endpoints: one gRPC target takes one family")
    return endpoints


def parse_endpoints(value: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]``: (host, port) pairs, IPv6 hosts without brackets.

    ``http://`` and ``https://`` are accepted as etcdctl users write them
    (https turns TLS on: :func:`endpoints_use_tls`); any other scheme, a mix of
    schemes or a mix of IPv4 and IPv6 literals is refused.
    """
    return [(host, port) for _, host, port in _split_all(value)]


def endpoints_use_tls(value: str) -> bool:
    return any(scheme == "https" for scheme, _, _ in _split_all(value))


def read_secret(path: str, what: str) -> str:
    """A secret kept in a file (not on a command line, where ``ps`` shows it)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ValueError(f"cannot read {what} {path}: {reason}") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret or "\n" in secret:
        raise ValueError(f"{what} {path} must hold one non-empty line")
    return secret


def _validate_docker_host(value: str) -> str:
    if not value.startswith(("unix://", "tcp://", "http://", "https://")):
        raise ValueError(f"{value!r} must start with unix:// or tcp://")
    return value


def _validate_admin(value: str) -> str:
    if value in ("", "off"):
        return "off"
    _host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port (or 'off')")
    return value


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PILOTFISH_",
        populate_by_name=True,
        extra="ignore",
        validate_default=True,
    )

    etcd_host: str = Field(
        "127.0.0.1:2379",
        validation_alias=_env("etcd_host", "ETCD_HOST"),
        description="etcd endpoint host:port, or a comma-separated list for a cluster",
    )
    prefix: str = Field("/pilotfish", description="etcd key prefix (isolates environments)")
    etcd_timeout: float = Field(5.0, gt=0, description="seconds before an etcd call is retried")
    etcd_username: str | None = Field(
        None, description="etcd user (with --etcd-password-file or PILOTFISH_ETCD_PASSWORD)"
    )
    etcd_password: str | None = Field(
        None,
        description="etcd password (a flag shows in ps: prefer the file or the variable)",
        repr=False,
    )
    etcd_password_file: str | None = Field(
        None, description="file holding the etcd password (read once at start)"
    )
    etcd_cacert: str | None = Field(
        None, description="CA bundle (PEM) to verify etcd's certificate; turns TLS on"
    )
    etcd_cert: str | None = Field(None, description="client certificate (PEM) for etcd")
    etcd_key: str | None = Field(None, description="client key (PEM) for etcd, with --etcd-cert")
    etcd_server_name: str | None = Field(
        None, description="name etcd's certificate must carry (default: the endpoint's host)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: readable on a terminal, JSON lines otherwise"
    )

    @field_validator("etcd_host")
    @classmethod
    def _check_endpoints(cls, value: str) -> str:
        parse_endpoints(value)
        return value

    @field_validator("etcd_cacert", "etcd_cert", "etcd_key")
    @classmethod
    def _check_readable(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Path(value).read_bytes()
            except OSError as error:
                raise ValueError(f"cannot read {value}: {error.strerror}") from None
        return value

    @field_validator("etcd_key")
    @classmethod
    def _check_key_pair(cls, value: str | None, info: ValidationInfo) -> str | None:
        if (value is None) != (info.data.get("etcd_cert") is None):
            raise ValueError("--etcd-cert and --etcd-key go together")
        return value

    @model_validator(mode="after")
    def _read_etcd_password(self) -> Self:
        if self.etcd_password_file is not None:
            if self.etcd_password is not None:
                raise ValueError("give --etcd-password-file or the etcd password, not both")
            self.etcd_password = read_secret(self.etcd_password_file, "--etcd-password-file")
        return self

    @property
    def etcd_tls(self) -> bool:
        """TLS to etcd: https:// endpoints, or any certificate given (then https is implied)."""
        files = any((self.etcd_cacert, self.etcd_cert, self.etcd_key))
        return files or endpoints_use_tls(self.etcd_host)

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        value = value.rstrip("/") or value
        if not re.fullmatch(PREFIX_PATTERN, value):
            raise ValueError(f"must look like /name or /a/b, got {value!r}")
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return parse_endpoints(self.etcd_host)


class RegistrarSettings(CommonSettings):
    host_ip: str = Field(
        "127.0.0.1",
        validation_alias=_env("host_ip", "HOST_IP"),
        description="address registered for published ports (this host's address)",
    )
    host_id: str = Field(
        "",
        description="identity of this host in keys, claimed in etcd (default: from "
        "the Docker engine: <first label of its name>-<12 hex of a hash of its ID>)",
    )
    docker_host: str = Field(
        "unix:///var/run/docker.sock",
        validation_alias=_env("docker_host", "DOCKER_HOST"),
        description="Docker engine socket",
    )
    ttl: int = Field(15, ge=2, le=3600, description="lease TTL in seconds")
    internal: bool = Field(
        False, description="register the container's own address and private port"
    )
    explicit: bool = Field(False, description="register only containers with pilotfish labels")
    environment: str = Field(
        "",
        description="register only containers labelled pilotfish.environment=<this> "
        "(a host that runs containers of several environments; default: every container)",
    )
    deregister_on_exit: bool = Field(False, description="revoke the lease on SIGTERM")
    admin_address: str = Field(
        "127.0.0.1:9101", description="host:port for /healthz and /metrics, or off"
    )

    @field_validator("host_ip")
    @classmethod
    def _check_ip(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))

    @field_validator("host_id")
    @classmethod
    def _check_host_id(cls, value: str) -> str:
        if value and not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"{value!r} does not match {NAME_PATTERN}")
        return value

    @field_validator("environment")
    @classmethod
    def _check_environment(cls, value: str) -> str:
        if value and not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"{value!r} does not match {NAME_PATTERN}")
        return value

    @field_validator("docker_host")
    @classmethod
    def _check_docker(cls, value: str) -> str:
        return _validate_docker_host(value)

    @field_validator("admin_address")
    @classmethod
    def _check_admin(cls, value: str) -> str:
        return _validate_admin(value)


class DrainSettings(CommonSettings):
    """``pilotfish drain`` / ``undrain``: run on the container's host, with the
    registrar's etcd settings and credentials."""

    docker_host: str = Field(
        "unix:///var/run/docker.sock",
        validation_alias=_env("docker_host", "DOCKER_HOST"),
        description="Docker engine socket (resolves the container's name)",
    )
    reason: str = Field("", description="why (shown with the drain request)")
    wait: bool = Field(
        False, description="wait until every discoverer serving the container applied it"
    )
    idle: bool = Field(
        False,
        description="with --wait: a drain also waits until the container's sessions are done",
    )
    timeout: float = Field(30.0, gt=0, le=3600, description="seconds --wait waits at most")

    @field_validator("docker_host")
    @classmethod
    def _check_docker(cls, value: str) -> str:
        return _validate_docker_host(value)

    @field_validator("reason")
    @classmethod
    def _check_reason(cls, value: str) -> str:
        if not re.fullmatch(validation.REASON_PATTERN, value):
            raise ValueError(f"must match {validation.REASON_PATTERN}")
        return value


class DiscovererSettings(CommonSettings):
    state_dir: str = Field(
        "/run/pilotfish", description="directory for HAProxy's config, pidfile and sockets"
    )
    haproxy_binary: str = Field("haproxy", description="HAProxy executable")
    template: str | None = Field(None, description="Jinja2 template replacing the built-in one")
    attach: bool = Field(
        False, description="use an HAProxy already running with the sockets in --state-dir"
    )
    stats_address: str = Field(
        "127.0.0.1:1936", description="HAProxy stats page bind address host:port, or off"
    )
    stats_credentials_file: str | None = Field(
        None, description="file holding user:password for the stats page (read once at start)"
    )
    # Secrets: environment only, never a flag (ps shows a command line).
    stats_user: str | None = Field(
        None, description="stats page user", json_schema_extra={"env_only": True}
    )
    stats_password: str | None = Field(
        None, description="stats page password", json_schema_extra={"env_only": True}, repr=False
    )
    haproxy_user: str = Field(
        default_factory=lambda: _first_existing(_user_exists, "haproxy", "nobody"),
        description="user HAProxy's workers run as when started by root, or none",
    )
    haproxy_group: str = Field(
        default_factory=lambda: _first_existing(_group_exists, "haproxy", "nogroup", "nobody"),
        description="group HAProxy's workers run as when started by root, or none",
    )
    bind_address: str = Field("127.0.0.1", description="address consumer frontends bind")
    services: str = Field("", description="comma-separated services to expose (default: all)")
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds a removed server may keep connections before cut"
    )
    reload_delay: float = Field(
        0.05, ge=0, description="seconds new services are gathered before one reload"
    )
    reload_min_interval: float = Field(1.0, ge=0, description="minimum seconds between two reloads")
    listener_retention: float = Field(
        300.0,
        ge=0,
        description="seconds a service with no instance left keeps its listener (503 / closed) "
        "unless another service claims its port; 0: drop it at once (a reload)",
    )
    loss_hold: float = Field(
        22.5,
        gt=0,
        description="seconds the last known servers are kept after most vanished at once "
        "(etcd wiped or restarted); default: a TTL and a half of the registrars' default",
    )
    stop_haproxy_on_exit: bool = Field(
        False, description="stop HAProxy on SIGTERM (default: leave it serving)"
    )
    admin_address: str = Field(
        "127.0.0.1:9102", description="host:port for /healthz and /metrics, or off"
    )
    publish_status: bool = Field(
        True, description="publish what is applied to HAProxy at <prefix>/discoverers/<id>"
    )
    discoverer_id: str = Field(
        "", description="this discoverer's id in its status key (default: <hostname>-<admin port>)"
    )
    status_interval: float = Field(
        0.2, gt=0, le=60, description="minimum seconds between two status key writes"
    )
    status_ttl: int = Field(
        10, ge=2, le=300, description="TTL of the status key's lease (kept alive every TTL/3)"
    )

    @field_validator("admin_address")
    @classmethod
    def _check_admin(cls, value: str) -> str:
        return _validate_admin(value)

    @field_validator("discoverer_id")
    @classmethod
    def _check_discoverer_id(cls, value: str) -> str:
        if value and not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"must match {NAME_PATTERN}")
        return value

    @field_validator("stats_address")
    @classmethod
    def _check_stats(cls, value: str) -> str:
        if value in ("", "off"):
            return "off"
        validation.bind_address(value, "stats address")
        return value

    @field_validator("state_dir")
    @classmethod
    def _check_state_dir(cls, value: str) -> str:
        # Sockets live there: a longer path cannot be bound (AF_UNIX limit).
        absolute = str(Path(value).absolute()).rstrip("/") or "/"
        validation.path(absolute, "state dir", validation.MAX_STATE_DIR)
        return value

    @field_validator("template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Path(value).read_text()
            except (OSError, UnicodeDecodeError) as error:
                reason = getattr(error, "strerror", None) or "not UTF-8 text"
                raise ValueError(f"cannot read {value}: {reason}") from None
        return value

    @field_validator("haproxy_user")
    @classmethod
    def _check_user(cls, value: str) -> str:
        return _check_account(value, "user", _user_exists)

    @field_validator("haproxy_group")
    @classmethod
    def _check_group(cls, value: str) -> str:
        return _check_account(value, "group", _group_exists)

    @model_validator(mode="after")
    def _read_stats_credentials(self) -> Self:
        if self.stats_credentials_file is not None:
            if self.stats_user is not None or self.stats_password is not None:
                raise ValueError(
                    "give --stats-credentials-file or PILOTFISH_STATS_USER/_PASSWORD, not both"
                )
            path = self.stats_credentials_file
            line = read_secret(path, "--stats-credentials-file")
            user, sep, password = line.partition(":")
            if not sep:
                raise ValueError(f"--stats-credentials-file {path} must hold user:password")
            self.stats_user, self.stats_password = user, password
        if (self.stats_user is None) != (self.stats_password is None):
            raise ValueError("PILOTFISH_STATS_USER and PILOTFISH_STATS_PASSWORD go together")
        if self.stats_user is not None:
            validation.credential(self.stats_user, "stats user")
            validation.credential(self.stats_password, "stats password")
        return self

    @property
    def stats_auth(self) -> tuple[str, str] | None:
        if self.stats_user is None or self.stats_password is None:
            return None
        return self.stats_user, self.stats_password

    def haproxy_account(self, euid: int) -> tuple[str | None, str | None]:
        """(user, group) for HAProxy's global section: only when started by root."""
        if euid != 0:
            return None, None
        user, group = self.haproxy_user, self.haproxy_group
        return (None if user == "none" else user), (None if group == "none" else group)

    @field_validator("bind_address")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))

    @field_validator("services")
    @classmethod
    def _check_services(cls, value: str) -> str:
        for name in filter(None, (s.strip() for s in value.split(","))):
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"service {name!r} does not match {NAME_PATTERN}")
        return value

    @property
    def service_filter(self) -> frozenset[str]:
        return frozenset(filter(None, (s.strip() for s in self.services.split(","))))


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _first_existing(exists: Callable[[str], bool], *names: str) -> str:
    return next((name for name in names if exists(name)), "none")


def _check_account(value: str, kind: str, exists: Callable[[str], bool]) -> str:
    if value == "none":
        return value
    validation.account(value, kind)
    if not exists(value):
        raise ValueError(f"no {kind} {value!r} on this host (or 'none')")
    return value


class CatalogSettings(CommonSettings):
    # Several environments: ``--prefix`` given more than once, or commas.
    prefix: str = Field(
        "/pilotfish",
        description="etcd key prefix; several environments: repeat --prefix or separate by commas",
        json_schema_extra={"repeatable": True},
    )
    address: str = Field(
        "127.0.0.1:9103",
        description="host:port of the web UI, the JSON API, /healthz and /metrics",
    )

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        prefixes = []
        for raw in value.split(","):
            item = raw.strip().rstrip("/") or raw.strip()
            if not re.fullmatch(PREFIX_PATTERN, item):
                raise ValueError(f"must look like /name or /a/b, got {item!r}")
            if item not in prefixes:
                prefixes.append(item)
        return ",".join(prefixes)

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port")
        if host:
            ipaddress.ip_address(host.strip("[]"))
        return value

    @property
    def prefixes(self) -> list[str]:
        return self.prefix.split(",")


class UpgraderSettings(CommonSettings):
    docker_host: str = Field(
        "unix:///var/run/docker.sock",
        validation_alias=_env("docker_host", "DOCKER_HOST"),
        description="Docker engine socket",
    )
    interval: float = Field(
        300.0, gt=0, description="seconds between two checks of every tag (besides image events)"
    )
    pull: bool = Field(
        False, description="ask each tag's registry for its digest; pull only when it moved"
    )
    all: bool = Field(
        False, description="upgrade every container, not only those labelled pilotfish.upgrade=auto"
    )
    once: bool = Field(
        False, description="one pass, then exit: 0 nothing to do or all upgraded, 1 a failure"
    )
    dry_run: bool = Field(False, description="print what would be upgraded and why, change nothing")
    rollback: str = Field(
        "", description="bring CONTAINER's kept previous version back (start-first), then exit"
    )
    health_timeout: float = Field(
        60.0, gt=0, description="seconds the new container has to become healthy and registered"
    )
    route_timeout: float = Field(
        30.0, gt=0, description="seconds every live discoverer has to route to the new container"
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds the old container's connections may take to finish"
    )
    admin_address: str = Field(
        "127.0.0.1:9104", description="host:port for /healthz and /metrics, or off"
    )

    @field_validator("docker_host")
    @classmethod
    def _check_docker(cls, value: str) -> str:
        if not value.startswith(("unix://", "tcp://", "http://", "https://")):
            raise ValueError(f"{value!r} must start with unix:// or tcp://")
        return value

    @field_validator("admin_address")
    @classmethod
    def _check_admin(cls, value: str) -> str:
        return _validate_admin(value)

    @field_validator("rollback")
    @classmethod
    def _check_rollback(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", value):
            raise ValueError(f"{value!r} is not a container name or id")
        return value


class EnvSettings(CommonSettings):
    """``pilotfish env``: the operator's connection (etcd's root user) and what to write."""

    env_dir: str = Field(
        "/etc/pilotfish/environments",
        description="directory of the environment files (<dir>/<name>/registrar.env, mode 0600)",
    )
    env_prefix: str = Field(
        "", description="the environment's key prefix (default /pilotfish/<name>)"
    )
    enable_auth: bool = Field(
        False, description="turn etcd's authentication on, creating the root user it needs"
    )
    rotate: bool = Field(False, description="give the environment's users new passwords")
    rotate_users: str = Field(
        "registrar,discoverer",
        description="whose passwords --rotate renews: registrar, discoverer, or both",
    )
    purge: bool = Field(False, description="env delete: delete the environment's keys too")
    agent_etcd_host: str = Field(
        "", description="etcd endpoints as the agents reach them (default: --etcd-host)"
    )
    agent_cert: str | None = Field(
        None, description="client certificate the agents use (default: --etcd-cert)"
    )
    agent_key: str | None = Field(
        None, description="client key the agents use, with --agent-cert (default: --etcd-key)"
    )
    agent_tls_paths: bool = Field(
        True,
        description="write the certificate paths into the environment files (--no-agent-tls-paths: "
        "the agents get them elsewhere, e.g. systemd's LoadCredential)",
    )
    output: Literal["text", "json"] = Field("text", description="env list: text or json")

    @field_validator("env_prefix")
    @classmethod
    def _check_env_prefix(cls, value: str) -> str:
        if value:
            value = value.rstrip("/") or value
            if not re.fullmatch(PREFIX_PATTERN, value):
                raise ValueError(f"must look like /name or /a/b, got {value!r}")
        return value

    @field_validator("rotate_users")
    @classmethod
    def _check_rotate_users(cls, value: str) -> str:
        kinds = [kind.strip() for kind in value.split(",") if kind.strip()]
        if not kinds or not set(kinds) <= {"registrar", "discoverer"}:
            raise ValueError("must be registrar, discoverer or registrar,discoverer")
        return ",".join(kinds)

    @field_validator("agent_etcd_host")
    @classmethod
    def _check_agent_endpoints(cls, value: str) -> str:
        if value:
            parse_endpoints(value)
        return value

    @field_validator("agent_key")
    @classmethod
    def _check_agent_key_pair(cls, value: str | None, info: ValidationInfo) -> str | None:
        if (value is None) != (info.data.get("agent_cert") is None):
            raise ValueError("--agent-cert and --agent-key go together")
        return value
