"""A container as the registrar sees it, from Docker's inspect document. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Health = Literal["none", "starting", "healthy", "unhealthy"]


@dataclass(frozen=True, slots=True)
class PortBinding:
    private_port: int
    protocol: str
    host_ip: str  # "" when only exposed (not published)
    host_port: int | None  # None when only exposed


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    id: str
    name: str
    image: str
    image_id: str
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    state: str = "running"  # Docker's State.Status: running, paused, exited, ...
    health: Health = "none"
    ports: tuple[PortBinding, ...] = ()  # published bindings, then exposed-only ports
    ips: tuple[str, ...] = ()

    @property
    def has_healthcheck(self) -> bool:
        return self.health != "none"


def container_from_inspect(doc: Mapping[str, Any]) -> ContainerInfo:
    config = doc.get("Config") or {}
    state = doc.get("State") or {}
    network = doc.get("NetworkSettings") or {}
    return ContainerInfo(
        id=str(doc.get("Id", "")),
        name=str(doc.get("Name", "")).lstrip("/"),
        image=str(config.get("Image") or ""),
        image_id=str(doc.get("Image") or ""),
        labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
        env=_parse_env(config.get("Env") or []),
        state=_state_of(state),
        health=_health_of(state),
        ports=_ports_of(network.get("Ports") or {}, config.get("ExposedPorts") or {}),
        ips=_ips_of(network),
    )


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, _, value = str(item).partition("=")
        env[name] = value
    return env


def _state_of(state: Mapping[str, Any]) -> str:
    if state.get("Paused"):
        return "paused"
    return str(state.get("Status") or ("running" if state.get("Running") else "exited"))


def _health_of(state: Mapping[str, Any]) -> Health:
    status = (state.get("Health") or {}).get("Status")
    if status in ("starting", "healthy", "unhealthy"):
        return status  # type: ignore[no-any-return]
    return "none"


def _ports_of(published: Mapping[str, Any], exposed: Mapping[str, Any]) -> tuple[PortBinding, ...]:
    bindings: list[PortBinding] = []
    seen: set[tuple[int, str]] = set()
    for spec, hosts in published.items():
        port, protocol = _split_port_spec(spec)
        if port is None:
            continue
        for host in hosts or []:
            host_port = str(host.get("HostPort") or "")
            if host_port.isdigit():
                bindings.append(
                    PortBinding(port, protocol, host.get("HostIp") or "", int(host_port))
                )
                seen.add((port, protocol))
    for spec in [*published, *exposed]:
        port, protocol = _split_port_spec(spec)
        if port is not None and (port, protocol) not in seen:
            bindings.append(PortBinding(port, protocol, "", None))
            seen.add((port, protocol))
    return tuple(bindings)


def _split_port_spec(spec: str) -> tuple[int | None, str]:
    number, _, protocol = spec.partition("/")
    if not number.isdigit() or not 0 < int(number) < 65536:
        return None, ""
    return int(number), protocol or "tcp"


def _ips_of(network: Mapping[str, Any]) -> tuple[str, ...]:
    ips: list[str] = []
    if network.get("IPAddress"):
        ips.append(str(network["IPAddress"]))
    networks = network.get("Networks") or {}
    for name in sorted(networks):
        ip = (networks[name] or {}).get("IPAddress")
        if ip and ip not in ips:
            ips.append(str(ip))
    return tuple(ips)
