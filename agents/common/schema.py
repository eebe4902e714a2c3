"""The contract between the registrar and the discoverer.

Key layout:   <prefix>/services/<service>/<host-id>/<container-id>:<private-port>
Value:        the JSON of :class:`Instance`, with a ``version`` field.
Also:         <prefix>/discoverers/<id> (:class:`DiscovererStatus`, on the
              discoverer's lease) and <prefix>/drains/<container-id>
              (:class:`DrainRequest`, no lease).

The registrar writes only through :func:`instance_key` and
:meth:`Instance.to_json`; the discoverer reads only through :func:`parse_entry`.
Every field that may later reach an HAProxy configuration line or a runtime
command is held to the allow-list of :mod:`agents.common.validation`, which
the renderer and the runtime commands check again; sizes are bounded before
a value is parsed.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from agents.common import validation
from agents.common.validation import (
    ATTRIBUTE_KEY_PATTERN,
    ATTRIBUTE_VALUE_PATTERN,
    CONTAINER_ID_PATTERN,
    CONTAINER_NAME_PATTERN,
    FULL_CONTAINER_ID_PATTERN,
    IMAGE_PATTERN,
    MAX_ATTRIBUTES,
    MAX_KEY_BYTES,
    MAX_TAGS,
    MAX_VALUE_BYTES,
    NAME_PATTERN,
    PREFIX_PATTERN,
    REASON_PATTERN,
    TAG_PATTERN,
    VERSION_PATTERN,
)

__all__ = [
    "ATTRIBUTE_KEY_PATTERN",
    "ATTRIBUTE_VALUE_PATTERN",
    "NAME_PATTERN",
    "PREFIX_PATTERN",
    "TAG_PATTERN",
    "DiscovererStatus",
    "DrainRequest",
    "Instance",
    "SchemaError",
    "discoverer_key",
    "discoverers_prefix",
    "drain_key",
    "drains_prefix",
    "instance_key",
    "parse_discoverer_status",
    "parse_drain_key",
    "parse_drain_request",
    "parse_entry",
    "parse_key",
    "services_prefix",
    "validate_prefix",
]

SCHEMA_VERSION: Literal[1] = 1

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Tag = Annotated[str, StringConstraints(pattern=TAG_PATTERN)]
AttributeKey = Annotated[str, StringConstraints(pattern=ATTRIBUTE_KEY_PATTERN)]
AttributeValue = Annotated[str, StringConstraints(pattern=ATTRIBUTE_VALUE_PATTERN)]
ContainerId = Annotated[str, StringConstraints(pattern=CONTAINER_ID_PATTERN)]
ContainerName = Annotated[str, StringConstraints(pattern=CONTAINER_NAME_PATTERN)]
Image = Annotated[str, StringConstraints(pattern=IMAGE_PATTERN)]
Port = Annotated[int, Field(ge=1, le=65535)]
Weight = Annotated[int, Field(ge=0, le=256)]
# One spelling per address, no IPv6 scope text, one host (validation.server_address).
IpAddress = Annotated[str, AfterValidator(validation.server_address)]


def _in_utc(value: datetime) -> datetime:
    # 9999-12-31T23:59-01:00 is valid but overflows when compared with a
    # time in another zone: keep every time comparable, in UTC.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time is outside the range of UTC") from None


Timestamp = Annotated[AwareDatetime, AfterValidator(_in_utc)]

Health = Literal["none", "starting", "healthy", "unhealthy"]
State = Literal["up", "draining"]
Mode = Literal["tcp", "http"]


class Instance(BaseModel):
    """One published port of one container on one host: a backend server."""

    # strict: no coercion of hostile JSON ("80" or 80.0 for a port, 1 for true).
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    version: Literal[1] = SCHEMA_VERSION
    service: Name
    host_id: Name
    address: IpAddress
    port: Port
    private_port: Port
    protocol: Literal["tcp", "udp"] = "tcp"
    container_id: ContainerId
    container_name: ContainerName = ""
    image: Image = ""
    image_id: Image = ""
    tags: tuple[Tag, ...] = Field((), max_length=MAX_TAGS)
    attributes: dict[AttributeKey, AttributeValue] = Field(
        default_factory=dict, max_length=MAX_ATTRIBUTES
    )
    health: Health = "none"
    state: State = "up"
    # How consumers should route to it (labels pilotfish.mode / .weight /
    # .check / .port): typed, because they reach HAProxy.
    mode: Mode = "tcp"
    weight: Weight = 100
    check: bool = False
    frontend_port: Port | None = None
    # Informational (shown, and the registration-latency metric): decisions
    # between instances use etcd's create_revision, which no registrar sets.
    registered_at: Timestamp = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def key_suffix(self) -> str:
        return f"{self.container_id}:{self.private_port}"

    @property
    def server_name(self) -> str:
        """HAProxy server name: unique per backend and stable across restarts."""
        return validation.server_name(self.host_id, self.container_id, self.private_port)

    @property
    def bind_port(self) -> int:
        """The consumer-side port (docker-discover's convention: the private port)."""
        return self.frontend_port or self.private_port

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def same_registration(self, other: Instance) -> bool:
        """Equal in everything but the registration time (no rewrite needed)."""
        return self.model_dump(exclude={"registered_at"}) == other.model_dump(
            exclude={"registered_at"}
        )


class SchemaError(ValueError):
    """A key or value in etcd that does not follow the contract."""


_KEY_RE = re.compile(
    r"^(?P<prefix>.+)/services/(?P<service>[^/]+)/(?P<host>[^/]+)/"
    r"(?P<container>[0-9a-f]{12,64}):(?P<port>[0-9]{1,5})$"
)


def services_prefix(prefix: str) -> str:
    return f"{validate_prefix(prefix)}/services/"


def instance_key(prefix: str, instance: Instance) -> str:
    return f"{services_prefix(prefix)}{instance.service}/{instance.host_id}/{instance.key_suffix}"


def validate_prefix(prefix: str) -> str:
    if not re.fullmatch(PREFIX_PATTERN, prefix):
        raise SchemaError(f"prefix {prefix!r} must look like /name or /a/b ({PREFIX_PATTERN})")
    return prefix


def parse_key(prefix: str, key: str) -> tuple[str, str, str, int]:
    """Split a key into (service, host id, container id, private port)."""
    match = _KEY_RE.match(key)
    if not match or match["prefix"] != prefix:
        raise SchemaError(f"key {key!r} is not <prefix>/services/<service>/<host>/<id>:<port>")
    service, host = match["service"], match["host"]
    for what, value in (("service", service), ("host id", host)):
        if not re.fullmatch(NAME_PATTERN, value):
            raise SchemaError(f"key {key!r}: {what} {value!r} does not match {NAME_PATTERN}")
    return service, host, match["container"], int(match["port"])


def parse_entry(prefix: str, key: bytes | str, value: bytes | str) -> Instance:
    """Parse one etcd entry; the key and the value must agree.

    Raises :class:`SchemaError` with a one-line reason for anything else.
    """
    key_text = key.decode(errors="replace") if isinstance(key, bytes) else key
    if len(key_text) > MAX_KEY_BYTES:
        raise SchemaError(f"key {key_text[:80]!r}... is longer than {MAX_KEY_BYTES} bytes")
    service, host, container, port = parse_key(prefix, key_text)
    if len(value) > MAX_VALUE_BYTES:
        size = len(value)
        raise SchemaError(f"key {key_text!r}: value of {size} bytes exceeds {MAX_VALUE_BYTES}")
    try:
        instance = Instance.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "value"
        raise SchemaError(f"key {key_text!r}: {where}: {first['msg']}") from None
    if (instance.service, instance.host_id, instance.container_id, instance.private_port) != (
        service,
        host,
        container,
        port,
    ):
        raise SchemaError(f"key {key_text!r} does not match its value")
    return instance


# -- discoverer status: <prefix>/discoverers/<discoverer-id> ------------------------
#
# Each discoverer publishes, on its own lease, the etcd revision it has
# applied to HAProxy, the services it routes and the sessions left on its
# draining servers. Readers (the upgrader, ``pilotfish drain --wait``, the
# catalog) parse it only through :func:`parse_discoverer_status`.

# The status of a discoverer routing every service of a big fleet: thousands
# of names and the draining instances' keys fit; a flood does not.
MAX_STATUS_BYTES = 256 * 1024
MAX_STATUS_SERVICES = 4096
MAX_STATUS_DRAINING = 1024
MAX_SESSIONS = 10**9

Reason = Annotated[str, StringConstraints(pattern=REASON_PATTERN)]
FullContainerId = Annotated[str, StringConstraints(pattern=FULL_CONTAINER_ID_PATTERN)]
AgentVersion = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
Sessions = Annotated[int, Field(ge=0, le=MAX_SESSIONS)]


class DiscovererStatus(BaseModel):
    """What one discoverer has applied to HAProxy (the value of its status key)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    version: Literal[1] = SCHEMA_VERSION
    id: Name
    agent_version: AgentVersion
    # Every change under <prefix>/services/ at or before this revision that
    # concerns a served service is applied to HAProxy.
    revision: int = Field(ge=0)
    services: tuple[Name, ...] = Field((), max_length=MAX_STATUS_SERVICES)
    serves_all: bool
    # Instance key -> sessions HAProxy still has on its server (0: none left).
    draining: dict[str, Sessions] = Field(default_factory=dict, max_length=MAX_STATUS_DRAINING)
    updated_at: Timestamp = Field(default_factory=lambda: datetime.now(UTC))

    def serves(self, service: str) -> bool:
        return self.serves_all or service in self.services

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def discoverers_prefix(prefix: str) -> str:
    return f"{validate_prefix(prefix)}/discoverers/"


def discoverer_key(prefix: str, discoverer_id: str) -> str:
    return f"{discoverers_prefix(prefix)}{validation.name(discoverer_id, 'discoverer id')}"


def parse_discoverer_status(prefix: str, key: bytes | str, value: bytes | str) -> DiscovererStatus:
    """Parse one status entry; its key must name the id its value carries.

    Raises :class:`SchemaError` with a one-line reason for anything else.
    """
    key_text = _key_text(key)
    discoverer_id = key_text.removeprefix(discoverers_prefix(prefix))
    if discoverer_id == key_text or not re.fullmatch(NAME_PATTERN, discoverer_id):
        raise SchemaError(f"key {key_text!r} is not <prefix>/discoverers/<id> ({NAME_PATTERN})")
    status = _validate(DiscovererStatus, key_text, value, MAX_STATUS_BYTES)
    if status.id != discoverer_id:
        raise SchemaError(f"key {key_text!r} does not match its value's id {status.id!r}")
    for instance in status.draining:
        try:
            parse_key(prefix, instance)
        except SchemaError:
            raise SchemaError(
                f"key {key_text!r}: draining: {validation.show(instance)} is not an instance key"
            ) from None
    return status


# -- drain requests: <prefix>/drains/<container-id> ---------------------------------
#
# An operator's (or the upgrader's) request that a container's instances be
# marked draining. No lease: it stays until undrained, or until the
# container's registrar finds the container destroyed. Only the key's
# existence counts; the value says who asked and why.

MAX_DRAIN_BYTES = 1024
_M = TypeVar("_M", bound=BaseModel)


class DrainRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    version: Literal[1] = SCHEMA_VERSION
    reason: Reason = ""
    requested_at: Timestamp = Field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def drains_prefix(prefix: str) -> str:
    return f"{validate_prefix(prefix)}/drains/"


def drain_key(prefix: str, container_id: str) -> str:
    if not re.fullmatch(FULL_CONTAINER_ID_PATTERN, container_id):
        raise SchemaError(f"container id {validation.show(container_id)} is not 64 hex digits")
    return f"{drains_prefix(prefix)}{container_id}"


def parse_drain_key(prefix: str, key: bytes | str) -> str:
    """The container id a drain key names; :class:`SchemaError` if it names none."""
    key_text = _key_text(key)
    container_id = key_text.removeprefix(drains_prefix(prefix))
    if container_id == key_text or not re.fullmatch(FULL_CONTAINER_ID_PATTERN, container_id):
        raise SchemaError(f"key {key_text!r} is not <prefix>/drains/<64 hex container id>")
    return container_id


def parse_drain_request(prefix: str, key: bytes | str, value: bytes | str) -> DrainRequest:
    parse_drain_key(prefix, key)
    return _validate(DrainRequest, _key_text(key), value, MAX_DRAIN_BYTES)


def _key_text(key: bytes | str) -> str:
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    if len(text) > MAX_KEY_BYTES:
        raise SchemaError(f"key {text[:80]!r}... is longer than {MAX_KEY_BYTES} bytes")
    return text


def _validate(model: type[_M], key: str, value: bytes | str, limit: int) -> _M:
    if len(value) > limit:
        raise SchemaError(f"key {key!r}: value of {len(value)} bytes exceeds {limit}")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "value"
        raise SchemaError(f"key {key!r}: {where}: {first['msg']}") from None


# --- environments (written by ``pilotfish env create``, read by every agent) -------------

# One key per environment: ``ENVIRONMENTS_PREFIX<name>``. Every environment's
# roles may read them, so a registrar can name its siblings and prove that it
# may not write there.
ENVIRONMENTS_PREFIX = "/pilotfish-environments/"
MAX_ENVIRONMENT_BYTES = 1024

Prefix = Annotated[str, StringConstraints(pattern=PREFIX_PATTERN, max_length=256)]


class EnvironmentRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    version: Literal[1] = SCHEMA_VERSION
    name: Name
    prefix: Prefix

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def environment_key(name: str) -> str:
    return ENVIRONMENTS_PREFIX + name


def parse_environment(key: bytes | str, value: bytes | str) -> EnvironmentRecord:
    """One environment record; :class:`SchemaError` with a one-line reason otherwise."""
    key_text = _key_text(key)
    record = _validate(EnvironmentRecord, key_text, value, MAX_ENVIRONMENT_BYTES)
    if key_text != environment_key(record.name):
        raise SchemaError(f"key {key_text!r} does not match its value")
    return record
