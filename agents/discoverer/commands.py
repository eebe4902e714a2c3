"""HAProxy runtime API command lines, built only from validated fields.

Every builder re-validates what it puts into the line with the project's one
allow-list (:mod:`agents.common.validation`), and :func:`validate_command`
checks the finished line against the whole grammar the sink may send: even a
bug in a builder cannot put a newline or an unexpected keyword on the admin
socket. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from agents.common import validation
from agents.common.validation import NAME_PATTERN

_T = TypeVar("_T")

_NAME = NAME_PATTERN.removeprefix("^").removesuffix("$")
_IP = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f:.]{2,45}"
_PORT = r"[1-9][0-9]{0,4}"
_SRV = rf"{_NAME}/{_NAME}"
_WEIGHT = r"[0-9]{1,3}"

# The complete grammar of what the sink sends. Anything else is refused.
_GRAMMAR = [
    rf"add server {_SRV} (?:{_IP}):{_PORT} weight {_WEIGHT}(?: check)?",
    rf"(?:enable|disable) (?:server|health) {_SRV}",
    rf"set server {_SRV} state (?:ready|drain|maint)",
    rf"set server {_SRV} weight {_WEIGHT}",
    rf"set server {_SRV} addr (?:{_IP}) port {_PORT}",
    rf"del server {_SRV}",
    rf"shutdown sessions server {_SRV}",
    r"show servers state",
    rf"show servers state {_NAME}",
    r"show stat",
    rf"show stat {_NAME} 4 -1",
    r"show info",
    r"show proc",
    r"reload",
    r"prompt",
]
_GRAMMAR_RE = re.compile("|".join(f"(?:{g})" for g in _GRAMMAR))


class CommandError(ValueError):
    """A command line outside the allowed grammar, or a value outside the
    allow-list: never sent."""


def validate_command(line: str) -> str:
    """Return ``line`` if it is in the allowed grammar, else raise :class:`CommandError`."""
    if not _GRAMMAR_RE.fullmatch(line):
        raise CommandError(f"refusing runtime command {line!r}")
    return line


def _checked(check: Callable[[Any], _T], value: Any) -> _T:
    try:
        return check(value)
    except validation.Invalid as error:
        raise CommandError(str(error)) from None


def _name(value: str) -> str:
    return _checked(validation.name, value)


def _srv(backend: str, server: str) -> str:
    return f"{_name(backend)}/{_name(server)}"


def _ip(value: str) -> str:
    return _checked(validation.server_address, value)


def _port(value: int) -> int:
    return _checked(validation.port, value)


def _weight(value: int) -> int:
    return _checked(validation.weight, value)


def add_server(backend: str, server: str, address: str, port: int, weight: int, check: bool) -> str:
    # HAProxy reads the port after the last colon, so IPv6 needs no brackets.
    line = (
        f"add server {_srv(backend, server)} {_ip(address)}:{_port(port)} weight {_weight(weight)}"
    )
    return validate_command(line + (" check" if check else ""))


def enable_server(backend: str, server: str) -> str:
    return validate_command(f"enable server {_srv(backend, server)}")


def enable_health(backend: str, server: str) -> str:
    return validate_command(f"enable health {_srv(backend, server)}")


def set_state(backend: str, server: str, state: str) -> str:
    if state not in ("ready", "drain", "maint"):
        raise CommandError(f"invalid state {state!r}")
    return validate_command(f"set server {_srv(backend, server)} state {state}")


def set_weight(backend: str, server: str, weight: int) -> str:
    return validate_command(f"set server {_srv(backend, server)} weight {_weight(weight)}")


def set_addr(backend: str, server: str, address: str, port: int) -> str:
    line = f"set server {_srv(backend, server)} addr {_ip(address)} port {_port(port)}"
    return validate_command(line)


def del_server(backend: str, server: str) -> str:
    return validate_command(f"del server {_srv(backend, server)}")


def shutdown_sessions(backend: str, server: str) -> str:
    return validate_command(f"shutdown sessions server {_srv(backend, server)}")


def show_stat_servers(backend: str) -> str:
    # type mask 4 = servers only; -1 = all of them.
    return validate_command(f"show stat {_name(backend)} 4 -1")


def verb(line: str) -> str:
    """The metrics label of a command: its first two words ("add server", "set server")."""
    return " ".join(line.split(" ", 2)[:2])


# Answers of the runtime API that mean success; anything else is an error.
_OK_ANSWERS = ("New server registered.", "Server deleted.", "IP changed", "port changed",
               "no need to change")  # fmt: skip
STILL_CONNECTED = "still has connections attached"
NOT_FOUND = ("No such server", "No such backend", "Can't find backend", "No such proxy")


def is_error(answer: str) -> bool:
    text = answer.strip()
    return bool(text) and not text.startswith(_OK_ANSWERS)


def is_not_found(answer: str) -> bool:
    return any(marker in answer for marker in NOT_FOUND)
