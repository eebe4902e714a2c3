"""The HAProxy configuration for a catalog (Jinja2 template). Pure.

Every value is validated again here before it reaches the template — the
schema already did, but the renderer must not depend on its callers: no input
can produce a line outside :data:`CONFIG_GRAMMAR` (checked by the fuzz tests
on the built-in template).

Choices:
- Every current server is a static ``server`` line: dynamic servers added at
  runtime do not survive a reload, so the reloaded config must contain them.
- A draining server is rendered ``weight 0`` (no new connections from the
  first moment of the new worker; ``disabled`` would put it in maintenance
  and make its health/stat look dead) and the sink sends ``set server …
  state drain`` right after the reload, so the runtime state says "draining".
  Its connections in the old worker finish there.
- ``hard-stop-after`` bounds how long an old worker may keep connections
  after a reload: the drain timeout, but at least 5 s so a reload never cuts
  ordinary in-flight requests.
- ``option idle-close-on-response`` on HTTP frontends: measured, keep-alive
  clients lose no request across a reload only with it (TCP frontends warn on it).
- ``balance roundrobin`` and no cookie: servers added at runtime need a
  dynamic algorithm and refuse ``cookie``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from agents.common import validation
from agents.common.schema import NAME_PATTERN
from agents.discoverer.model import Catalog, Server

TEMPLATE_NAME = "haproxy.cfg.j2"
_TEMPLATES = Path(__file__).parent / "templates"
_NAME_RE = re.compile(NAME_PATTERN)
# Absolute path without whitespace, quotes or '#' (it goes on config lines).
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]*$")
# AF_UNIX paths are limited to 108 bytes; admin.sock is the longest we bind.
_MAX_STATE_DIR = 90


class ConfigError(ValueError):
    """A value that must not reach the HAProxy configuration."""


@dataclass(frozen=True, slots=True)
class RenderOptions:
    state_dir: str
    bind_address: str = "127.0.0.1"
    stats_address: str = "127.0.0.1:1936"  # host:port, ":port" (all addresses) or "off"
    drain_timeout: float = 30.0
    template: str | None = None  # path of a Jinja2 template replacing the built-in one
    stats_auth: tuple[str, str] | None = None  # (user, password) for the stats page
    # Account HAProxy's workers switch to (only set when HAProxy starts as root).
    user: str | None = None
    group: str | None = None


def render_config(catalog: Catalog, options: RenderOptions) -> str:
    context = {
        "state_dir": _state_dir(options.state_dir),
        "bind_address": _ip(options.bind_address),
        "stats_bind": _stats_bind(options.stats_address),
        "stats_auth": _stats_auth(options.stats_auth),
        "user": _account(options.user, "user"),
        "group": _account(options.group, "group"),
        "hard_stop_after_ms": int(max(options.drain_timeout, 5.0) * 1000),
        "services": [_service(catalog, name) for name in sorted(catalog)],
    }
    return _template(options.template).render(context)


def _template(path: str | None) -> jinja2.Template:
    if path is None:
        loader: jinja2.BaseLoader = jinja2.FileSystemLoader(_TEMPLATES)
        name = TEMPLATE_NAME
    else:
        loader = jinja2.FileSystemLoader(str(Path(path).parent))
        name = Path(path).name
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # not HTML; every value is validated instead
    )
    return env.get_template(name)


def _service(catalog: Catalog, key: str) -> dict[str, Any]:
    service = catalog[key]
    if key != service.name:
        raise ConfigError(f"catalog key {key!r} != service name {service.name!r}")
    if service.mode not in ("tcp", "http"):
        raise ConfigError(f"invalid mode {service.mode!r}")
    return {
        "name": _name(service.name),
        "port": _port(service.bind_port),
        "mode": service.mode,
        "servers": [_server(service.servers[n]) for n in sorted(service.servers)],
    }


def _server(server: Server) -> dict[str, Any]:
    weight = server.weight
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 256:
        raise ConfigError(f"invalid weight {weight!r}")
    return {
        "name": _name(server.name),
        "address": _ip(server.address),
        "port": _port(server.port),
        # See the module docstring: draining = no new connections from the start.
        "weight": weight if server.state == "up" else 0,
        "check": server.check is True,
    }


def _name(value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(f"invalid name {value!r}")
    return value


def _port(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"invalid port {value!r}")
    return value


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"invalid IP address {value!r}") from None


def _state_dir(value: str) -> str:
    value = value.rstrip("/") or "/"
    if not _PATH_RE.fullmatch(value) or len(value) > _MAX_STATE_DIR:
        raise ConfigError(
            f"state dir {value!r} must be an absolute path of at most {_MAX_STATE_DIR} "
            "characters [A-Za-z0-9_./-]"
        )
    return value


def _stats_bind(value: str) -> str | None:
    if value == "off":
        return None
    try:
        host, port = validation.bind_address(value, "stats address")
    except validation.Invalid as error:
        raise ConfigError(str(error)) from None
    return f"{host}:{port}"


def _stats_auth(value: tuple[str, str] | None) -> str | None:
    if value is None:
        return None
    try:
        user = validation.credential(value[0], "stats user")
        password = validation.credential(value[1], "stats password")
    except validation.Invalid as error:  # the message never shows the value
        raise ConfigError(str(error)) from None
    return f"{user}:{password}"


def _account(value: str | None, kind: str) -> str | None:
    if value is None:
        return None
    try:
        return validation.account(value, kind)
    except validation.Invalid as error:
        raise ConfigError(str(error)) from None


# The grammar of every line the built-in template may produce (fuzz-tested).
_N = NAME_PATTERN.removeprefix("^").removesuffix("$")
_ADDR = r"(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9a-f:.]{2,45})"
_P = r"[1-9][0-9]{0,4}"
_CRED = validation.CREDENTIAL_PATTERN.removeprefix("^").removesuffix("$")
_ACCOUNT = validation.ACCOUNT_PATTERN.removeprefix("^").removesuffix("$")
CONFIG_GRAMMAR = re.compile(
    "|".join(
        f"(?:{line})"
        for line in (
            r"",
            r"# Generated by pilotfish discover: do not edit, it is rewritten on every reload\.",
            r"(?:global|defaults)",
            r"    master-worker",
            r"    pidfile /[A-Za-z0-9_./-]*/haproxy\.pid",
            r"    stats socket /[A-Za-z0-9_./-]*/admin\.sock mode 600 level admin "
            r"expose-fd listeners",
            r"    stats timeout 2m",
            r"    hard-stop-after [0-9]+ms",
            rf"    (?:user|group) {_ACCOUNT}",
            r"    mode (?:tcp|http)",
            r"    timeout (?:connect|client|server|tunnel|queue|http-request|http-keep-alive) "
            r"[0-9]+[smh]",
            r"    retries 3",
            r"    option (?:redispatch|idle-close-on-response)",
            r"listen _stats",
            rf"    bind (?:{_ADDR}|[A-Za-z0-9.-]{{1,253}})?:{_P}",
            r"    stats (?:enable|uri /|refresh 5s|hide-version)",
            rf"    stats auth {_CRED}:{_CRED}",
            rf"frontend fe_{_P}_{_N}",
            rf"    default_backend {_N}",
            rf"backend {_N}",
            r"    balance roundrobin",
            r"    retry-on conn-failure empty-response response-timeout",
            r"    http-reuse safe",
            rf"    server {_N} {_ADDR}:{_P} weight [0-9]{{1,3}}(?: check)?",
        )
    )
)


def grammar_violations(text: str) -> list[str]:
    """Lines of ``text`` outside :data:`CONFIG_GRAMMAR` (empty list: all fine)."""
    return [line for line in text.split("\n") if not CONFIG_GRAMMAR.fullmatch(line)]
