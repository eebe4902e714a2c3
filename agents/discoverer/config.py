"""The HAProxy configuration for a catalog (Jinja2 template). Pure.

Every value is validated again here, with the project's one allow-list
(:mod:`agents.common.validation`), before it reaches the template: the schema
already did, but the renderer must not depend on its callers. With the
built-in template, a rendered configuration with any line outside
:data:`CONFIG_GRAMMAR` is refused before it is written (fail closed).

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
- ``timeout connect 250ms``: a server on the local network answers a SYN in
  well under a millisecond; one that does not within 250 ms (a dying
  instance, a listener too starved to accept) is retried on another server
  (``retries`` + ``redispatch``) long before a client gives up. With 5 s,
  one unanswered SYN cost every request sent to that server (measured in
  bench/e2e.py and the README).
- ``balance roundrobin`` and no cookie: servers added at runtime need a
  dynamic algorithm and refuse ``cookie``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jinja2

from agents.common import validation
from agents.common.validation import NAME_PATTERN
from agents.discoverer.model import Catalog, Server

_T = TypeVar("_T")

TEMPLATE_NAME = "haproxy.cfg.j2"
_TEMPLATES = Path(__file__).parent / "templates"


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
    """The configuration for ``catalog``; :class:`ConfigError` if any value is
    refused or, with the built-in template, any line is outside its grammar
    (fail closed: nothing is written)."""
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
    text = _template(options.template).render(context)
    if options.template is None and (violations := grammar_violations(text)):
        raise ConfigError(f"refusing a configuration with unexpected lines: {violations[:3]!r}")
    return text


def refused_services(catalog: Catalog) -> dict[str, str]:
    """Services whose values the renderer would refuse, with why: the caller
    leaves them out (one bad service must not keep the others from a reload)."""
    refused: dict[str, str] = {}
    for name in catalog:
        try:
            _service(catalog, name)
        except ConfigError as error:
            refused[name] = str(error)
    return refused


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
    return {
        "name": _name(service.name),
        "port": _port(service.bind_port),
        "mode": _checked(validation.mode, service.mode),
        "servers": [_server(service.servers[n]) for n in sorted(service.servers)],
    }


def _server(server: Server) -> dict[str, Any]:
    weight = _checked(validation.weight, server.weight)
    return {
        "name": _name(server.name),
        "address": _checked(validation.server_address, server.address),
        "port": _port(server.port),
        # See the module docstring: draining = no new connections from the start.
        "weight": weight if server.state == "up" else 0,
        "check": server.check is True,
    }


def _checked(check: Callable[[Any], _T], value: Any) -> _T:
    try:
        return check(value)
    except validation.Invalid as error:
        raise ConfigError(str(error)) from None


def _name(value: str) -> str:
    return _checked(validation.name, value)


def _port(value: int) -> int:
    return _checked(validation.port, value)


def _ip(value: str) -> str:
    return _checked(validation.ip_literal, value)


def _state_dir(value: str) -> str:
    value = value.rstrip("/") or "/"
    return _checked(lambda v: validation.path(v, "state dir", validation.MAX_STATE_DIR), value)


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
            r"[0-9]+(?:ms|[smh])",
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
