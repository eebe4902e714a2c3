"""What one container should register, and which of its labels are refused:
the label policy. Pure.

Decisions (documented in the registrar's help and README section):

- Service name, per port: label ``pilotfish.<port>.service`` > label
  ``pilotfish.service`` > ``SERVICE_<port>_NAME`` > ``SERVICE_NAME`` > the
  image's repository name. A container-wide name gets ``-<private port>``
  appended when the container registers several ports.
- ``SERVICE_*`` variables are read from the environment and from labels of
  the same name (labels win), like registrator.
- ``--explicit``: only containers (or ports) whose service is *named* — by
  ``pilotfish.service``, ``pilotfish.<port>.service``, ``SERVICE_NAME`` or
  ``SERVICE_<port>_NAME`` — register.
- ``--environment NAME``: only containers labelled ``pilotfish.environment=NAME``
  register (a host that runs containers of several environments).
- Address: the published binding's IP when it is a specific address
  (``-p 127.0.0.2::8080``), otherwise (``0.0.0.0``, ``::``, empty) HOST_IP.
  ``--internal``: the container's own IP and private port; exposed but
  unpublished ports register too.
- Only TCP ports register: HAProxy cannot route UDP.
- A bad service name, routing label (mode, weight, check, port) or ignore
  flag skips the container (a per-port label skips that port); a bad tag or
  attribute is dropped alone. Every refusal is one log line naming the
  container and the label.
- Sizes are bounded here, where labels enter: tags beyond ``MAX_TAGS`` and
  attributes beyond ``MAX_ATTRIBUTES`` (by name) are dropped; a registration
  still larger than ``MAX_VALUE_BYTES`` refuses its container.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from agents.common.container import ContainerInfo
from agents.common.schema import (
    ATTRIBUTE_KEY_PATTERN,
    ATTRIBUTE_VALUE_PATTERN,
    NAME_PATTERN,
    TAG_PATTERN,
    Instance,
)
from agents.common.validation import MAX_ATTRIBUTES, MAX_TAGS, MAX_VALUE_BYTES, show

LABEL = "pilotfish."
ENVIRONMENT_LABEL = LABEL + "environment"  # with --environment: whose container it is
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class Options(Protocol):
    """The settings ``desired_instances`` needs (RegistrarSettings has them)."""

    @property
    def host_ip(self) -> str: ...
    @property
    def host_id(self) -> str: ...
    @property
    def internal(self) -> bool: ...
    @property
    def explicit(self) -> bool: ...
    @property
    def environment(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """A label or variable that could not be used, and what it made us skip."""

    container_id: str
    container_name: str
    label: str
    reason: str
    skipped: str  # "container", "port 8080", "tag", "attribute"


class _Refused(Exception):
    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Target:
    """One port to register: where consumers reach it."""

    private_port: int
    address: str
    port: int


def desired_instances(
    container: ContainerInfo, options: Options, now: datetime
) -> tuple[list[Instance], list[Refusal]]:
    """The instances ``container`` should have registered, and what was refused."""
    refusals: list[Refusal] = []

    def refuse(label: str, reason: str, skipped: str) -> None:
        refusals.append(Refusal(container.id, container.name, label, reason, skipped))

    if container.state != "running":
        return [], []
    if options.environment and container.labels.get(ENVIRONMENT_LABEL) != options.environment:
        return [], []  # another environment's container (or none's), on a shared host
    if container.has_healthcheck and container.health != "healthy":
        return [], []
    variables = _service_variables(container)
    try:
        if _is_ignored(container, variables):
            return [], []
    except _Refused as refused:
        refuse(refused.label, refused.reason, "container")
        return [], refusals
    targets = _targets(container, options)
    targets = [t for t in targets if not _port_ignored(variables, t.private_port)]
    if options.explicit:
        targets = [t for t in targets if _explicitly_named(container, variables, t.private_port)]
    if not targets:
        return [], refusals
    if len(targets) > 1 and LABEL + "port" in container.labels:
        refuse(LABEL + "port", "several ports register: use pilotfish.<port>.port", "container")
        return [], refusals
    instances = []
    for target in targets:
        try:
            instance = _instance(container, options, variables, target, len(targets), now, refuse)
        except _Refused as refused:
            container_wide = refused.label in _CONTAINER_WIDE or refused.label.startswith(
                "container"
            )
            skipped = "container" if container_wide else f"port {target.private_port}"
            refuse(refused.label, refused.reason, skipped)
            if skipped == "container":
                return [], _few(refusals)
            continue
        instances.append(instance)
    return instances, _few(refusals)


# Refusals named one by one per container; one container must not flood the log.
MAX_REFUSALS = 16
_MINOR = frozenset({"tag", "attribute"})


def _few(refusals: list[Refusal]) -> list[Refusal]:
    """At most MAX_REFUSALS dropped tags and attributes, and every skipped port or container."""
    unique = list(dict.fromkeys(refusals))
    minor = [r for r in unique if r.skipped in _MINOR]
    if len(unique) <= MAX_REFUSALS or not minor:
        return unique
    vital = [r for r in unique if r.skipped not in _MINOR]
    kept = minor[: max(MAX_REFUSALS - len(vital) - 1, 0)]
    first = minor[0]
    more = Refusal(
        first.container_id,
        first.container_name,
        "labels",
        f"{len(minor) - len(kept)} more tags or attributes refused",
        "tag or attribute",
    )
    return [*kept, more, *vital]


_CONTAINER_WIDE = frozenset(
    {
        *(LABEL + name for name in ("service", "mode", "weight", "check", "port")),
        "SERVICE_NAME",
        "image",
    }
)


def _service_variables(container: ContainerInfo) -> dict[str, str]:
    """``SERVICE_*`` from the environment, overridden by labels of the same name."""
    merged = {k: v for k, v in container.env.items() if k.startswith("SERVICE_")}
    merged.update({k: v for k, v in container.labels.items() if k.startswith("SERVICE_")})
    return merged


def _is_ignored(container: ContainerInfo, variables: Mapping[str, str]) -> bool:
    # registrator's rule: SERVICE_IGNORE set to anything non-false ignores.
    if "SERVICE_IGNORE" in variables and variables["SERVICE_IGNORE"].lower() not in FALSE_WORDS:
        return True
    label = container.labels.get(LABEL + "ignore")
    return label is not None and _parse_bool(LABEL + "ignore", label, empty=True)


def _port_ignored(variables: Mapping[str, str], port: int) -> bool:
    value = variables.get(f"SERVICE_{port}_IGNORE")
    return value is not None and value.lower() not in FALSE_WORDS


def _explicitly_named(container: ContainerInfo, variables: Mapping[str, str], port: int) -> bool:
    labels = container.labels
    return (
        f"{LABEL}{port}.service" in labels
        or LABEL + "service" in labels
        or f"SERVICE_{port}_NAME" in variables
        or "SERVICE_NAME" in variables
    )


def _targets(container: ContainerInfo, options: Options) -> list[_Target]:
    """One target per TCP private port (several bindings of a port collapse to one)."""
    targets: dict[int, _Target] = {}
    for binding in container.ports:
        if binding.protocol != "tcp" or binding.private_port in targets:
            continue
        if options.internal:
            if container.ips:
                targets[binding.private_port] = _Target(
                    binding.private_port, container.ips[0], binding.private_port
                )
        elif binding.host_port is not None:
            targets[binding.private_port] = _Target(
                binding.private_port, _address(binding.host_ip, options.host_ip), binding.host_port
            )
    return sorted(targets.values(), key=lambda t: t.private_port)


def _address(binding_ip: str, host_ip: str) -> str:
    """The binding's own IP when specific, else HOST_IP (docker-register's rule)."""
    if not binding_ip:
        return host_ip
    try:
        ip = ipaddress.ip_address(binding_ip)
    except ValueError:
        return host_ip
    return host_ip if ip.is_unspecified else str(ip)


def _instance(
    container: ContainerInfo,
    options: Options,
    variables: Mapping[str, str],
    target: _Target,
    port_count: int,
    now: datetime,
    refuse: Any,
) -> Instance:
    port = target.private_port
    labels = container.labels
    tags = _tags(labels, variables, port, refuse)
    attributes = _attributes(labels, variables, port, refuse)
    try:
        instance = Instance(
            service=_service_name(container, variables, port, port_count),
            host_id=options.host_id,
            address=target.address,
            port=target.port,
            private_port=port,
            container_id=container.id,
            container_name=container.name,
            image=container.image,
            image_id=container.image_id,
            tags=tags,
            attributes=attributes,
            health=container.health,
            mode=_routing(labels, port, "mode", _parse_mode, "tcp"),
            weight=_routing(labels, port, "weight", _parse_weight, 100),
            check=_routing(labels, port, "check", _parse_check, False),
            frontend_port=_routing(labels, port, "port", _parse_port, None),
            registered_at=now,
        )
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "value"
        raise _Refused(f"container {where}", first["msg"]) from None
    size = len(instance.to_json())
    if size > MAX_VALUE_BYTES:
        raise _Refused(
            "container labels",
            f"its registration would take {size} bytes, more than {MAX_VALUE_BYTES}",
        )
    return instance


def _service_name(
    container: ContainerInfo, variables: Mapping[str, str], port: int, port_count: int
) -> str:
    labels = container.labels
    per_port_label = f"{LABEL}{port}.service"
    if per_port_label in labels:
        return _check_name(per_port_label, labels[per_port_label])
    per_port_variable = f"SERVICE_{port}_NAME"
    if per_port_variable in variables and LABEL + "service" not in labels:
        return _check_name(per_port_variable, variables[per_port_variable])
    if LABEL + "service" in labels:
        base, origin = labels[LABEL + "service"], LABEL + "service"
    elif "SERVICE_NAME" in variables:
        base, origin = variables["SERVICE_NAME"], "SERVICE_NAME"
    else:
        base, origin = image_service_name(container.image), "image"
    _check_name(origin, base)
    return _check_name(origin, f"{base}-{port}" if port_count > 1 else base)


def _check_name(label: str, value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise _Refused(label, f"service name {show(value)} does not match {NAME_PATTERN}")
    return value


def image_service_name(image: str) -> str:
    """``registry:5000/team/app:1.2@sha256:…`` → ``app`` (registrator's default)."""
    if re.fullmatch(r"(sha256:)?[0-9a-f]{12,64}", image):
        return ""  # an image ID names nothing: refused by _check_name
    name = image.partition("@")[0]
    repository = name.rpartition("/")[2].partition(":")[0]
    return repository


def _tags(
    labels: Mapping[str, str], variables: Mapping[str, str], port: int, refuse: Any
) -> tuple[str, ...]:
    for name, source in (
        (f"{LABEL}{port}.tags", labels),
        (f"SERVICE_{port}_TAGS", variables),
        (LABEL + "tags", labels),
        ("SERVICE_TAGS", variables),
    ):
        if name in source:
            break
    else:
        return ()
    tags = []
    for tag in filter(None, (t.strip() for t in source[name].split(","))):
        if re.fullmatch(TAG_PATTERN, tag):
            tags.append(tag)
        else:
            refuse(name, f"tag {show(tag)} does not match {TAG_PATTERN}", "tag")
    unique = tuple(dict.fromkeys(tags))
    if len(unique) > MAX_TAGS:
        refuse(name, f"{len(unique)} tags, more than {MAX_TAGS}: the rest are dropped", "tag")
    return unique[:MAX_TAGS]


_NOT_ATTRIBUTES = frozenset({"NAME", "TAGS", "IGNORE"})


def _attributes(
    labels: Mapping[str, str], variables: Mapping[str, str], port: int, refuse: Any
) -> dict[str, str]:
    """``SERVICE_X`` and ``pilotfish.attr.x`` for every port; ``SERVICE_<port>_X`` wins."""
    found: dict[str, tuple[str, str]] = {}  # attribute -> (source name, value)
    port_specific: dict[str, tuple[str, str]] = {}
    for name, value in variables.items():
        rest = name.removeprefix("SERVICE_")
        head, _, tail = rest.partition("_")
        if head.isdigit() and tail:
            if int(head) == port and tail not in _NOT_ATTRIBUTES:
                port_specific[tail.lower()] = (name, value)
        elif rest not in _NOT_ATTRIBUTES and rest:
            found[rest.lower()] = (name, value)
    for name, value in labels.items():
        if name.startswith(LABEL + "attr."):
            found[name.removeprefix(LABEL + "attr.")] = (name, value)
    found.update(port_specific)
    attributes = {}
    for key, (name, value) in sorted(found.items()):
        if not re.fullmatch(ATTRIBUTE_KEY_PATTERN, key):
            refuse(
                name,
                f"attribute name {show(key)} does not match {ATTRIBUTE_KEY_PATTERN}",
                "attribute",
            )
        elif not re.fullmatch(ATTRIBUTE_VALUE_PATTERN, value):
            refuse(
                name, f"value {show(value)} does not match {ATTRIBUTE_VALUE_PATTERN}", "attribute"
            )
        else:
            attributes[key] = value
    if len(attributes) > MAX_ATTRIBUTES:
        refuse(
            "attributes",
            f"{len(attributes)} attributes, more than {MAX_ATTRIBUTES}: "
            "those after the first by name are dropped",
            "attribute",
        )
    return dict(list(attributes.items())[:MAX_ATTRIBUTES])


def _routing(labels: Mapping[str, str], port: int, name: str, parse: Any, default: Any) -> Any:
    for label in (f"{LABEL}{port}.{name}", f"{LABEL}{name}"):
        if label in labels:
            return parse(label, labels[label])
    return default


def _parse_mode(label: str, value: str) -> str:
    if value not in ("tcp", "http"):
        raise _Refused(label, f"{show(value)} is not tcp or http")
    return value


def _parse_int(label: str, value: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", value) or not low <= int(value) <= high:
        raise _Refused(label, f"{show(value)} is not a number from {low} to {high}")
    return int(value)


def _parse_weight(label: str, value: str) -> int:
    return _parse_int(label, value, 0, 256)


def _parse_port(label: str, value: str) -> int:
    return _parse_int(label, value, 1, 65535)


def _parse_check(label: str, value: str) -> bool:
    return _parse_bool(label, value)


def _parse_bool(label: str, value: str, *, empty: bool = False) -> bool:
    word = value.strip().lower()
    if word == "" and empty:
        return True
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise _Refused(label, f"{show(value)} is not true or false")


def draining(instances: list[Instance]) -> list[Instance]:
    """The same registrations, marked so consumers stop sending new connections."""
    return [i.model_copy(update={"state": "draining"}) for i in instances]
