"""The one allow-list for every value that may reach HAProxy or an etcd key.

The schema (what a registration may hold), the configuration renderer and
the runtime commands all check their values here, so a value that passes
one of them passes all three and nothing else does. Everything is an
allow-list: a pattern of the characters and lengths that are known to be
inert on an HAProxy configuration line and on the admin socket. Pure.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any

# Names become etcd path segments and HAProxy proxy and server names.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,62}$"
ATTRIBUTE_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# Attribute values never reach HAProxy; they are shown in logs and admin pages.
ATTRIBUTE_VALUE_PATTERN = r"^[A-Za-z0-9_.:/@+=,%-]{0,255}$"
CONTAINER_ID_PATTERN = r"^[0-9a-f]{12,64}$"
# A drain request names one container by its full id (no prefix ambiguity).
FULL_CONTAINER_ID_PATTERN = r"^[0-9a-f]{64}$"
# Free text an operator gives (a drain's reason): shown, never sent to HAProxy.
REASON_PATTERN = r"^[A-Za-z0-9 _.:/@+=,%()-]{0,128}$"
# pilotfish's own version string (PEP 440 / semver-like).
VERSION_PATTERN = r"^[A-Za-z0-9_.+-]{1,64}$"
CONTAINER_NAME_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,127})?$"
IMAGE_PATTERN = r"^[A-Za-z0-9_.:/@+-]{0,255}$"
PREFIX_PATTERN = r"^(/[A-Za-z0-9_.-]+)+$"
# An absolute path on a configuration line: no whitespace, quotes or '#'.
PATH_PATTERN = r"^/[A-Za-z0-9_./-]*$"
# `stats auth USER:PASSWORD`: HAProxy splits on the first ':' and the line on
# whitespace; '#', quotes and backslashes would start a comment or an escape.
CREDENTIAL_PATTERN = r"^[A-Za-z0-9_.@%+=,~!^*-]{1,64}$"
# A DNS name (a bind address or an etcd endpoint): letters, digits, dots, dashes.
HOSTNAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$"
# `user` / `group` in HAProxy's global section: a POSIX account name.
ACCOUNT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,31}$"

MAX_NAME = 63
# Sizes are bounded where values enter: one registration is a few hundred
# bytes; these leave room for generous metadata and none for a flood.
MAX_TAGS = 32
MAX_ATTRIBUTES = 64
MAX_VALUE_BYTES = 16 * 1024
MAX_KEY_BYTES = 512
# Server names must fit MAX_NAME: a long host id is shortened to this length,
# keeping a hash of the whole id so two long ids never share a name.
MAX_HOST_IN_SERVER_NAME = 32

_NAME_RE = re.compile(NAME_PATTERN)
_TAG_RE = re.compile(TAG_PATTERN)
_PATH_RE = re.compile(PATH_PATTERN)
_CREDENTIAL_RE = re.compile(CREDENTIAL_PATTERN)
_HOSTNAME_RE = re.compile(HOSTNAME_PATTERN)
_ACCOUNT_RE = re.compile(ACCOUNT_PATTERN)
# A UNIX socket path is at most 107 bytes; the longest one under the state
# directory is "/admin.sock.new"-sized, so the directory gets 90.
MAX_STATE_DIR = 90


class Invalid(ValueError):
    """A value outside the allow-list; the message says which and why."""


def show(value: object) -> str:
    """A value quoted for one log line or error: escapes newlines, cuts long ones."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def name(value: Any, what: str = "name") -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise Invalid(f"{what} {show(value)} does not match {NAME_PATTERN}")
    return value


def tag(value: Any) -> str:
    if not isinstance(value, str) or not _TAG_RE.fullmatch(value):
        raise Invalid(f"tag {show(value)} does not match {TAG_PATTERN}")
    return value


def ip_literal(value: Any) -> str:
    """An IPv4 or IPv6 literal in its one normal spelling.

    HAProxy never resolves a dynamic server's hostname, so only literals work.
    Python's ``ipaddress`` accepts an IPv6 scope (``fe80::1%eth0``) whose text
    is kept verbatim, newlines included: refused here, with anything else that
    is not a plain address.
    """
    if not isinstance(value, str) or not 2 <= len(value) <= 45 or "%" in value:
        raise Invalid(f"address {show(value)} is not an IPv4 or IPv6 literal")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise Invalid(f"address {show(value)} is not an IPv4 or IPv6 literal") from None
    text = str(address)
    if not re.fullmatch(r"[0-9a-f:.]{2,45}", text):  # belt and braces
        raise Invalid(f"address {show(value)} is not an IPv4 or IPv6 literal")
    return text


def server_address(value: Any) -> str:
    """A backend server's address: an IP literal naming one host.

    An IPv4-mapped IPv6 address is spelled as the IPv4 one (one spelling per
    address). Unspecified (``0.0.0.0``, ``::``) and multicast addresses are
    refused: HAProxy connects a server at 0.0.0.0 to the address the client
    connected to, its own listener.
    """
    text = ip_literal(value)
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast:
        raise Invalid(f"address {show(value)} does not name one host")
    return str(address)


def port(value: Any, what: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise Invalid(f"{what} {show(value)} is not a number from 1 to 65535")
    return value


def weight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise Invalid(f"weight {show(value)} is not a number from 0 to 256")
    return value


def mode(value: Any) -> str:
    if value not in ("tcp", "http"):
        raise Invalid(f"mode {show(value)} is not tcp or http")
    return str(value)


def path(value: Any, what: str = "path", max_length: int = 255) -> str:
    if not isinstance(value, str) or not _PATH_RE.fullmatch(value) or len(value) > max_length:
        raise Invalid(
            f"{what} {show(value)} must be an absolute path of at most {max_length} "
            "characters [A-Za-z0-9_./-]"
        )
    return value


def credential(value: Any, what: str = "credential") -> str:
    if not isinstance(value, str) or not _CREDENTIAL_RE.fullmatch(value):
        raise Invalid(f"{what} must match {CREDENTIAL_PATTERN}")
    return value


def hostname(value: Any, what: str = "host name") -> str:
    if not isinstance(value, str) or not _HOSTNAME_RE.fullmatch(value):
        raise Invalid(f"{what} {show(value)} does not match {HOSTNAME_PATTERN}")
    return value


def account(value: Any, what: str = "account") -> str:
    """A user or group name for HAProxy's ``user`` / ``group`` lines."""
    if not isinstance(value, str) or not _ACCOUNT_RE.fullmatch(value):
        raise Invalid(f"{what} {show(value)} does not match {ACCOUNT_PATTERN}")
    return value


def bind_address(value: Any, what: str = "bind address") -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (every address) -> (host, port).

    The host is an IP literal in its normal spelling, a DNS name, or "" for
    every address; the port is 1-65535 (0 would make HAProxy pick one nobody knows).
    """
    text = value if isinstance(value, str) else ""
    host, sep, digits = text.rpartition(":")
    if not sep or not digits.isdigit() or len(digits) > 5:
        raise Invalid(f"{what} {show(value)} is not host:port")
    number = port(int(digits), f"{what} port")
    if host.startswith("[") and host.endswith("]"):
        return ip_literal(host[1:-1]), number
    if host == "":
        return "", number
    try:
        return ip_literal(host), number
    except Invalid:
        return hostname(host, f"{what} host"), number


def server_name(host_id: str, container_id: str, private_port: int) -> str:
    """HAProxy server name: unique per backend, stable, at most :data:`MAX_NAME` long."""
    host = name(host_id, "host id")
    if len(host) > MAX_HOST_IN_SERVER_NAME:
        digest = hashlib.sha256(host.encode()).hexdigest()[:8]
        host = f"{host[: MAX_HOST_IN_SERVER_NAME - 9]}-{digest}"
    return name(f"{host}_{container_id[:12]}_{port(private_port)}", "server name")
