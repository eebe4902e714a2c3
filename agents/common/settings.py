"""Settings: every option is a flag and a ``PILOTFISH_*`` environment variable.

The seed deployment's variables (``HOST_IP``, ``ETCD_HOST``, ``DOCKER_HOST``)
keep working as aliases. Precedence: flag > ``PILOTFISH_*`` > seed variable >
default.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.common.schema import NAME_PATTERN, PREFIX_PATTERN


def _env(name: str, *seed: str) -> AliasChoices:
    return AliasChoices(f"PILOTFISH_{name.upper()}", *seed)


def parse_endpoints(value: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` (``http://`` accepted, as etcdctl users write it)."""
    endpoints = []
    for raw in value.split(","):
        item = raw.strip().removeprefix("http://").rstrip("/")
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "2379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{raw.strip()!r} is not host:port")
        endpoints.append((host, int(port)))
    if not endpoints:
        raise ValueError("no endpoint given")
    return endpoints


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
    etcd_username: str | None = Field(None, description="etcd user (with --etcd-password)")
    etcd_password: str | None = Field(None, description="etcd password")
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

    @property
    def etcd_tls(self) -> bool:
        return any((self.etcd_cacert, self.etcd_cert, self.etcd_key))

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


class DiscovererSettings(CommonSettings):
    state_dir: str = Field(
        "/run/pilotfish", description="directory for HAProxy's config, pidfile and sockets"
    )
    haproxy_binary: str = Field("haproxy", description="HAProxy executable")
    template: str | None = Field(None, description="Jinja2 template replacing the built-in one")
    attach: bool = Field(
        False, description="use an HAProxy already running with the sockets in --state-dir"
    )
    stats_address: str = Field(":1936", description="HAProxy stats page bind address, or off")
    bind_address: str = Field("127.0.0.1", description="address consumer frontends bind")
    services: str = Field("", description="comma-separated services to expose (default: all)")
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds a removed server may keep connections before cut"
    )
    reload_delay: float = Field(
        0.05, ge=0, description="seconds new services are gathered before one reload"
    )
    reload_min_interval: float = Field(1.0, ge=0, description="minimum seconds between two reloads")
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

    @field_validator("admin_address", "stats_address")
    @classmethod
    def _check_admin(cls, value: str) -> str:
        return _validate_admin(value)

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
