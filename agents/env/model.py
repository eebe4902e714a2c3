"""What an environment is in etcd's access control, and what to change to get there.

Pure: plain data in, plain data out. The adapter (:mod:`agents.env.auth`)
reads etcd's users and roles into an :class:`AuthState`, asks :func:`plan_create`
or :func:`plan_delete` what to do, and does it.

An environment NAME with prefix P has two roles and one user for each:

- ``pilotfish-NAME-registrar``: read and write ``P/`` (services, hosts, drains);
- ``pilotfish-NAME-discoverer``: read ``P/``, write ``P/discoverers/`` only (its
  status key); the catalog uses it too.

Both may read the environment records (``/pilotfish-environments/``), so a
registrar can name its siblings and prove it may not write there. etcd grants
on key ranges and has no deny rule: a user of an environment must hold its
role and nothing else, which :func:`plan_create` enforces.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agents.common.schema import ENVIRONMENTS_PREFIX, NAME_PATTERN, PREFIX_PATTERN

Kind = Literal["registrar", "discoverer"]
KINDS: tuple[Kind, ...] = ("registrar", "discoverer")
Access = Literal["read", "write", "readwrite"]
ROOT = "root"  # etcd's root user and role: every right, and the only one to manage auth
ROLE_PREFIX = "pilotfish-"
_ROLE_RE = re.compile(r"^pilotfish-(?P<name>.+)-(?P<kind>registrar|discoverer)$")


def range_end(key: str) -> str:
    """The end of the range of every key starting with ``key`` (etcd's ``--prefix``)."""
    raw = key.encode()
    for index in range(len(raw) - 1, -1, -1):
        if raw[index] < 0xFF:
            return (raw[:index] + bytes([raw[index] + 1])).decode()
    return "\0"  # every key


@dataclass(frozen=True, order=True)
class Permission:
    """``access`` on the keys from ``key`` up to (not including) ``end``."""

    key: str
    end: str
    access: Access

    @classmethod
    def on_prefix(cls, key: str, access: Access) -> Permission:
        return cls(key, range_end(key), access)

    def covers(self, key: str) -> bool:
        if self.end == "":  # one key
            return key == self.key
        return self.key <= key and (self.end == "\0" or key < self.end)

    def allows_write(self) -> bool:
        return self.access in ("write", "readwrite")

    def describe(self) -> str:
        if self.end == "":
            return f"{self.access} {self.key}"
        if self.end == range_end(self.key):
            return f"{self.access} {self.key}*"
        return f"{self.access} [{self.key}, {self.end})"


@dataclass(frozen=True)
class Environment:
    name: str
    prefix: str

    def role(self, kind: Kind) -> str:
        return f"{ROLE_PREFIX}{self.name}-{kind}"

    def user(self, kind: Kind) -> str:
        return self.role(kind)

    def permissions(self, kind: Kind) -> frozenset[Permission]:
        records = Permission.on_prefix(ENVIRONMENTS_PREFIX, "read")
        if kind == "registrar":
            return frozenset({Permission.on_prefix(f"{self.prefix}/", "readwrite"), records})
        return frozenset(
            {
                Permission.on_prefix(f"{self.prefix}/", "read"),
                Permission.on_prefix(f"{self.prefix}/discoverers/", "readwrite"),
                records,
            }
        )


def default_prefix(name: str) -> str:
    return f"/pilotfish/{name}"


def check_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"environment name {name!r} does not match {NAME_PATTERN}")
    return name


def check_prefix(prefix: str) -> str:
    prefix = prefix.rstrip("/") or prefix
    if not re.fullmatch(PREFIX_PATTERN, prefix):
        raise ValueError(f"prefix must look like /name or /a/b, got {prefix!r}")
    return prefix


@dataclass
class AuthState:
    """etcd's users (with their roles) and roles (with their permissions)."""

    enabled: bool
    roles: dict[str, frozenset[Permission]] = field(default_factory=dict)
    users: dict[str, frozenset[str]] = field(default_factory=dict)


# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddRole:
    role: str

    def describe(self) -> str:
        return f"add role {self.role}"


@dataclass(frozen=True)
class GrantPermission:
    role: str
    permission: Permission

    def describe(self) -> str:
        return f"grant {self.permission.describe()} to role {self.role}"


@dataclass(frozen=True)
class RevokePermission:
    role: str
    permission: Permission

    def describe(self) -> str:
        return f"revoke {self.permission.describe()} from role {self.role}"


@dataclass(frozen=True)
class AddUser:
    user: str
    kind: Kind

    def describe(self) -> str:
        return f"add user {self.user} with a new password"


@dataclass(frozen=True)
class ChangePassword:
    user: str
    kind: Kind

    def describe(self) -> str:
        return f"give user {self.user} a new password"


@dataclass(frozen=True)
class GrantRole:
    user: str
    role: str

    def describe(self) -> str:
        return f"grant role {self.role} to user {self.user}"


@dataclass(frozen=True)
class RevokeRole:
    user: str
    role: str

    def describe(self) -> str:
        return f"revoke role {self.role} from user {self.user} (it may hold its own role only)"


@dataclass(frozen=True)
class DeleteUser:
    user: str

    def describe(self) -> str:
        return f"delete user {self.user}"


@dataclass(frozen=True)
class DeleteRole:
    role: str

    def describe(self) -> str:
        return f"delete role {self.role}"


Action = (
    AddRole
    | GrantPermission
    | RevokePermission
    | AddUser
    | ChangePassword
    | GrantRole
    | RevokeRole
    | DeleteUser
    | DeleteRole
)


def plan_create(
    env: Environment, state: AuthState, new_password_for: Iterable[Kind] = ()
) -> list[Action]:
    """What makes etcd hold ``env``'s roles and users exactly; [] when it does already.

    ``new_password_for``: the users of these kinds get a new password even if
    they exist (``--rotate``, or their password is known nowhere).
    """
    rotate = set(new_password_for)
    actions: list[Action] = []
    for kind in KINDS:
        role, wanted = env.role(kind), env.permissions(kind)
        have = state.roles.get(role)
        if have is None:
            actions.append(AddRole(role))
            have = frozenset()
        actions += [GrantPermission(role, p) for p in sorted(wanted - have)]
        actions += [RevokePermission(role, p) for p in sorted(have - wanted)]
    for kind in KINDS:
        user, role = env.user(kind), env.role(kind)
        roles = state.users.get(user)
        if roles is None:
            actions.append(AddUser(user, kind))
            roles = frozenset()
        elif kind in rotate:
            actions.append(ChangePassword(user, kind))
        if role not in roles:
            actions.append(GrantRole(user, role))
        actions += [RevokeRole(user, other) for other in sorted(roles - {role})]
    return actions


def plan_delete(env: Environment, state: AuthState) -> list[Action]:
    actions: list[Action] = []
    for kind in KINDS:
        if env.user(kind) in state.users:
            actions.append(DeleteUser(env.user(kind)))
    for kind in KINDS:
        if env.role(kind) in state.roles:
            actions.append(DeleteRole(env.role(kind)))
    return actions


# --- reading environments back -------------------------------------------------------------


@dataclass(frozen=True)
class RoleView:
    role: str
    kind: Kind
    users: tuple[str, ...]
    permissions: tuple[Permission, ...]


@dataclass(frozen=True)
class EnvironmentView:
    name: str
    prefix: str | None  # from the registrar role's permission (None: not recognisable)
    roles: tuple[RoleView, ...]


def environments(state: AuthState) -> list[EnvironmentView]:
    """The environments the roles describe (roles named ``pilotfish-NAME-KIND``)."""
    found: dict[str, list[RoleView]] = {}
    for role in sorted(state.roles):
        match = _ROLE_RE.match(role)
        if match is None:
            continue
        kind: Kind = "registrar" if match["kind"] == "registrar" else "discoverer"
        holders = tuple(sorted(u for u, roles in state.users.items() if role in roles))
        permissions = tuple(sorted(state.roles[role]))
        found.setdefault(match["name"], []).append(RoleView(role, kind, holders, permissions))
    return [EnvironmentView(name, _prefix_of(views), tuple(views)) for name, views in found.items()]


def _prefix_of(views: list[RoleView]) -> str | None:
    for view in views:
        if view.kind == "registrar":
            for permission in view.permissions:
                if permission.access == "readwrite" and permission.key != ENVIRONMENTS_PREFIX:
                    return permission.key.rstrip("/") or None
    return None


def roles_covering(prefix: str, roles: Mapping[str, frozenset[Permission]]) -> list[str]:
    """Roles (other than root) that grant anything in ``prefix``: the environment has roles."""
    key = f"{prefix}/"
    return sorted(
        role
        for role, permissions in roles.items()
        if role != ROOT and any(p.covers(key) for p in permissions)
    )


# --- environment files ----------------------------------------------------------------------


def env_file(
    env: Environment, kind: Kind, password: str, connection: Mapping[str, str | None]
) -> str:
    """The ``KEY=value`` file an agent of ``kind`` reads (systemd EnvironmentFile, compose
    env_file, or ``set -a; . FILE``). ``connection``: PILOTFISH_* settings to reach etcd."""
    lines = [
        f"# pilotfish environment {env.name}: the {kind}'s etcd user (pilotfish env create)",
        f"PILOTFISH_PREFIX={env.prefix}",
        f"PILOTFISH_ETCD_USERNAME={env.user(kind)}",
        f"PILOTFISH_ETCD_PASSWORD={password}",
    ]
    lines += [f"{name}={_quote(value)}" for name, value in connection.items() if value is not None]
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    # systemd and the shell both read an unquoted value of these characters as it is.
    if re.fullmatch(r"[A-Za-z0-9_./:,@+=-]*", value):
        return value
    return shlex.quote(value)


def read_env_file(text: str) -> dict[str, str]:
    """The variables of a file written by :func:`env_file` (comments and blanks skipped)."""
    found = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep:
            parts = shlex.split(value) if value else [""]
            found[name.strip()] = parts[0] if parts else ""
    return found
