"""What the upgrader decides, as plain functions over plain data. Pure.

- :func:`read_labels`: a container's opt-in and order labels, checked.
- :func:`decide`: does this container need an upgrade, and why (or why not).
- :func:`clone_config`: the ``POST /containers/create`` body of the new
  container, from the old one's inspect document and its image's config.
- :func:`recover`: what to do about upgrades that were under way when the
  upgrader died, from Docker's state alone.

Labels (agreed with the registrar and the operator commands):
``pilotfish.upgrade=auto`` opts in (``off`` opts out under ``--all``);
``pilotfish.upgrade.order=stop-first`` accepts a gap; the new container
carries ``pilotfish.upgrade.replaces=<old container id>`` and
``pilotfish.upgrade.from-image=<old image id>`` while it runs under the
temporary name ``<name>.pilotfish-next``; the previous version is kept
stopped as ``<name>.pilotfish-previous``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

LABEL = "pilotfish.upgrade"
ORDER_LABEL = "pilotfish.upgrade.order"
REPLACES_LABEL = "pilotfish.upgrade.replaces"
FROM_IMAGE_LABEL = "pilotfish.upgrade.from-image"
BOOKKEEPING_LABELS = frozenset({REPLACES_LABEL, FROM_IMAGE_LABEL})
NEXT_SUFFIX = ".pilotfish-next"
PREVIOUS_SUFFIX = ".pilotfish-previous"

Order = Literal["start-first", "stop-first"]
_OPT_VALUES = frozenset({"auto", "off"})
_ORDERS: tuple[Order, ...] = ("start-first", "stop-first")
CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{64}$")
IMAGE_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# A reference that follows a tag: not an image id, not pinned by digest.
_ID_LIKE = re.compile(r"^(sha256:)?[0-9a-f]{12,64}$")
MAX_LABEL_SHOWN = 80


@dataclass(frozen=True, slots=True)
class Container:
    """What the plan needs of a container (from its inspect document)."""

    id: str
    name: str  # without Docker's leading "/"
    image_ref: str  # Config.Image: the tag it was created from
    image_id: str  # .Image: what it runs
    labels: Mapping[str, str] = field(default_factory=dict)
    state: str = "running"  # running, created, exited, paused, ...
    health: str = "none"  # none, starting, healthy, unhealthy
    fixed_ports: tuple[str, ...] = ()  # "8080/tcp->80": published on a fixed host port

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True, slots=True)
class UpgradeLabels:
    opted: Literal["auto", "off", "unset"]
    order: Order


class BadLabel(ValueError):
    """A label the upgrader refuses; the message names the label and the value."""


def _show(value: str) -> str:
    return repr(value if len(value) <= MAX_LABEL_SHOWN else value[:MAX_LABEL_SHOWN] + "...")


def read_labels(labels: Mapping[str, str]) -> UpgradeLabels:
    """The opt-in and order labels; :class:`BadLabel` if one of them is not understood."""
    opted = labels.get(LABEL)
    if opted is not None and opted not in _OPT_VALUES:
        raise BadLabel(f"{LABEL}={_show(opted)}: expected auto or off")
    order = labels.get(ORDER_LABEL, "start-first")
    if order not in _ORDERS:
        raise BadLabel(f"{ORDER_LABEL}={_show(order)}: expected start-first or stop-first")
    replaces = labels.get(REPLACES_LABEL)
    if replaces is not None and not CONTAINER_ID_RE.match(replaces):
        raise BadLabel(f"{REPLACES_LABEL}={_show(replaces)}: expected a 64-hex container id")
    from_image = labels.get(FROM_IMAGE_LABEL)
    if from_image is not None and not IMAGE_ID_RE.match(from_image):
        raise BadLabel(f"{FROM_IMAGE_LABEL}={_show(from_image)}: expected sha256:<64 hex>")
    return UpgradeLabels(
        opted="unset" if opted is None else ("auto" if opted == "auto" else "off"),
        order="stop-first" if order == "stop-first" else "start-first",
    )


def follows_a_tag(image_ref: str) -> bool:
    """False for a container created from an image id or a digest: nothing can move."""
    return bool(image_ref) and "@" not in image_ref and not _ID_LIKE.match(image_ref)


def is_temporary(name: str) -> bool:
    return name.endswith((NEXT_SUFFIX, PREVIOUS_SUFFIX))


def base_name(name: str) -> str:
    return name.removesuffix(NEXT_SUFFIX).removesuffix(PREVIOUS_SUFFIX)


# --- which containers need an upgrade, and why ------------------------------------------

Verdict = Literal["upgrade", "current", "skip", "refused"]


@dataclass(frozen=True, slots=True)
class Decision:
    container: Container
    verdict: Verdict
    reason: str
    target_image: str = ""  # the tag's image id (for "upgrade")
    order: Order = "start-first"


def decide(
    container: Container,
    tag_image: str | None,
    *,
    all_containers: bool,
    failed: Mapping[str, str],
    previous_image: str | None = None,
) -> Decision | None:
    """Whether ``container`` should be replaced by the image its tag names now.

    ``tag_image``: the image id the tag names on this engine (None: the tag is
    gone). ``failed``: container name -> image id that failed for it (not
    retried until the tag moves). ``previous_image``: the image of the kept
    ``<name>.pilotfish-previous`` container, when there is one: after a
    rollback it runs the tag's image, which must not come back by itself.
    None: not a candidate at all (not opted in, not running, temporary).
    """
    if not container.running or is_temporary(container.name):
        return None
    try:
        labels = read_labels(container.labels)
    except BadLabel as error:
        return Decision(container, "refused", str(error))
    if labels.opted == "off" or (labels.opted == "unset" and not all_containers):
        return None
    if not follows_a_tag(container.image_ref):
        return Decision(container, "skip", f"created from {container.image_ref!r}, not a tag")
    if tag_image is None:
        return Decision(container, "skip", f"tag {container.image_ref} not found on this engine")
    if tag_image == container.image_id:
        return Decision(container, "current", "runs the image its tag names")
    if failed.get(container.name) == tag_image:
        why = f"{_short(tag_image)} failed before; waiting for the tag to move"
        return Decision(container, "skip", why)
    if previous_image == tag_image:
        return Decision(
            container, "skip", f"rolled back from {_short(tag_image)}; waiting for the tag to move"
        )
    if container.fixed_ports and labels.order != "stop-first":
        return Decision(
            container,
            "skip",
            f"publishes fixed host port(s) {', '.join(container.fixed_ports)}: cannot start "
            f"a second copy first (label {ORDER_LABEL}=stop-first accepts a gap)",
        )
    reason = f"tag {container.image_ref} moved: {_short(container.image_id)} -> {_short(tag_image)}"
    return Decision(container, "upgrade", reason, tag_image, labels.order)


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def lane_of(container: Container) -> str:
    """Upgrades in one lane run one at a time: copies of one service share their tag."""
    return container.image_ref


# --- the new container's configuration ----------------------------------------------------

# Config fields copied only where the container differs from its image:
# what the image set must come from the new image.
_FROM_IMAGE_UNLESS_CHANGED = (
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "Healthcheck",
    "StopSignal",
    "Shell",
    "OnBuild",
)
# Config fields that belong to the container itself.
_CONTAINER_FIELDS = (
    "Domainname",
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "Tty",
    "OpenStdin",
    "StdinOnce",
    "StopTimeout",
    "NetworkDisabled",
    "MacAddress",
)


def fixed_ports(host_config: Mapping[str, Any]) -> tuple[str, ...]:
    """Published ports bound to a fixed host port (``--publish 80:8080``): "8080/tcp->80"."""
    found = []
    for spec, bindings in sorted((host_config.get("PortBindings") or {}).items()):
        for binding in bindings or []:
            host_port = str((binding or {}).get("HostPort") or "")
            if host_port not in ("", "0"):
                found.append(f"{spec}->{host_port}")
    return tuple(found)


def clone_config(
    inspect: Mapping[str, Any],
    image_config: Mapping[str, Any],
    image: str,
    extra_labels: Mapping[str, str],
) -> dict[str, Any]:
    """The create body for a copy of the container ``inspect`` running ``image``.

    ``image_config`` is the Config of the image the old container runs: what
    the container merely inherited from it (environment, labels, exposed
    ports, command, health check, ...) is left out, so the new image's own
    values apply; what the container set itself is kept. Host config is copied
    whole: binds, volumes, restart policy, published ports (an ephemeral host
    port is requested as ephemeral again: Docker keeps the request there, not
    the port it picked). The primary network goes into the body with its
    aliases; :func:`extra_networks` lists the ones to connect afterwards.
    """
    config: Mapping[str, Any] = inspect.get("Config") or {}
    body: dict[str, Any] = {"Image": image}
    for name in _FROM_IMAGE_UNLESS_CHANGED:
        value = config.get(name)
        if value is not None and value != image_config.get(name):
            body[name] = copy.deepcopy(value)
    for name in _CONTAINER_FIELDS:
        if config.get(name) is not None:
            body[name] = copy.deepcopy(config[name])
    hostname = config.get("Hostname")
    if hostname and hostname != str(inspect.get("Id", ""))[:12]:
        body["Hostname"] = hostname  # set by the user, not Docker's default (the short id)
    image_env = set(image_config.get("Env") or [])
    body["Env"] = [item for item in config.get("Env") or [] if item not in image_env]
    image_labels = image_config.get("Labels") or {}
    labels = {
        key: value
        for key, value in (config.get("Labels") or {}).items()
        if key not in BOOKKEEPING_LABELS and image_labels.get(key) != value
    }
    body["Labels"] = {**labels, **extra_labels}
    image_ports = image_config.get("ExposedPorts") or {}
    exposed: dict[str, dict[str, Any]] = {
        port: {} for port in config.get("ExposedPorts") or {} if port not in image_ports
    }
    if exposed:
        body["ExposedPorts"] = exposed
    image_volumes = image_config.get("Volumes") or {}
    volumes: dict[str, dict[str, Any]] = {
        path: {} for path in config.get("Volumes") or {} if path not in image_volumes
    }
    if volumes:
        body["Volumes"] = volumes
    body["HostConfig"] = copy.deepcopy(dict(inspect.get("HostConfig") or {}))
    primary = _primary_network(inspect)
    if primary is not None:
        name, endpoint = primary
        body["NetworkingConfig"] = {"EndpointsConfig": {name: endpoint}}
    return body


def _endpoint(inspect: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a network endpoint was asked for: aliases (not Docker's own), fixed IPs, links."""
    short_id = str(inspect.get("Id", ""))[:12]
    endpoint: dict[str, Any] = {}
    aliases = [a for a in settings.get("Aliases") or [] if a != short_id]
    if aliases:
        endpoint["Aliases"] = aliases
    for name in ("IPAMConfig", "Links", "DriverOpts"):
        if settings.get(name):
            endpoint[name] = copy.deepcopy(settings[name])
    return endpoint


def _networks(inspect: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return dict(((inspect.get("NetworkSettings") or {}).get("Networks") or {}).items())


def _primary_name(inspect: Mapping[str, Any]) -> str:
    mode = str((inspect.get("HostConfig") or {}).get("NetworkMode") or "")
    return "bridge" if mode == "default" else mode


def _primary_network(inspect: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    networks = _networks(inspect)
    primary = _primary_name(inspect)
    if primary in networks:
        return primary, _endpoint(inspect, networks[primary])
    return None


def extra_networks(inspect: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Networks besides the primary one, to connect before the start (one per call)."""
    primary = _primary_name(inspect)
    return [
        (name, _endpoint(inspect, settings))
        for name, settings in sorted(_networks(inspect).items())
        if name != primary
    ]


def upgrade_labels(old: Container) -> dict[str, str]:
    """The bookkeeping labels of the new container: what it replaces."""
    return {REPLACES_LABEL: old.id, FROM_IMAGE_LABEL: old.image_id}


# --- recovery after the upgrader died --------------------------------------------------------

RecoveryKind = Literal["finish", "roll_back", "remove_new", "restore_old", "refused"]


@dataclass(frozen=True, slots=True)
class Recovery:
    """One unfinished upgrade and what finishes it.

    - ``finish``: the new copy runs and the old one is stopped (or gone):
      keep the old one as previous, give the new one the name.
    - ``roll_back``: both run: route to the old one again, then remove the new.
    - ``remove_new``: the new copy does not run, the old one does: remove it.
    - ``restore_old``: neither runs (stop-first, or the new one died): start
      the old one again, remove the new one.
    """

    kind: RecoveryKind
    new: Container
    old: Container | None
    base: str
    reason: str

    @property
    def brought_back(self) -> bool:
        """The new copy is a kept previous version (a rollback's): put it back, never remove it.

        A copy the upgrader created names the old one in its label.
        """
        replaces = self.new.labels.get(REPLACES_LABEL)
        return self.old is None or replaces != self.old.id


def recover(containers: Iterable[Container]) -> list[Recovery]:
    """Every ``<name>.pilotfish-next`` container and what to do with it.

    The old container is the one the new one's ``replaces`` label names; a
    rollback's new copy (the kept previous one, renamed) has no such label,
    and its old one is the container that bears the name.
    """
    everything = list(containers)
    by_id = {c.id: c for c in everything}
    by_name = {c.name: c for c in everything}
    plans = []
    for new in everything:
        if not new.name.endswith(NEXT_SUFFIX):
            continue
        base = base_name(new.name)
        try:
            read_labels(new.labels)
        except BadLabel as error:
            plans.append(Recovery("refused", new, None, base, str(error)))
            continue
        replaces = new.labels.get(REPLACES_LABEL)
        # A kept previous version brought back by a rollback may carry the
        # label of its own upgrade, naming a container long gone: then the
        # old one is the container bearing the name.
        old = by_id.get(replaces or "") or by_name.get(base)
        if old is not None and old.name not in (base, base + PREVIOUS_SUFFIX):
            # Only a copy of the same name is ever replaced: anything else is
            # not ours to stop or rename.
            why = f"it names {old.name} ({old.id[:12]}) as the one it replaces, not {base}"
            plans.append(Recovery("refused", new, old, base, why))
            continue
        plans.append(_recovery(new, old, base, by_name))
    return plans


def _recovery(
    new: Container, old: Container | None, base: str, by_name: Mapping[str, Container]
) -> Recovery:
    new_ok = new.running and new.health in ("none", "healthy")
    if old is not None and old.running:
        if new.running:
            return Recovery("roll_back", new, old, base, "both copies run: the old one stays")
        return Recovery("remove_new", new, old, base, "the new copy does not run")
    if new_ok:
        holder = by_name.get(base)
        if holder is not None and (old is None or holder.id != old.id):
            return Recovery("refused", new, old, base, f"name {base} is taken by {holder.id[:12]}")
        return Recovery("finish", new, old, base, "the new copy runs, the old one is stopped")
    if old is not None:
        return Recovery("restore_old", new, old, base, "the new copy is not running or healthy")
    return Recovery("finish", new, None, base, "the old copy is gone; the new one is all there is")
