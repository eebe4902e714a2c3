"""etcd's Auth service, read into :class:`AuthState` and changed by :data:`Action`.

aetcd wraps no Auth call; :meth:`Etcd.auth` calls the gRPC stub aetcd
generates (``aetcd.rpc.AuthStub``) with the client's token, deadline and
token renewal, over the same channel (TLS and client certificates included).
Thin: every decision is in :mod:`agents.env.model`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd.rpc as rpc

from agents.common.etcd import Etcd
from agents.env.model import (
    ROOT,
    Access,
    Action,
    AddRole,
    AddUser,
    AuthState,
    ChangePassword,
    DeleteRole,
    DeleteUser,
    GrantPermission,
    GrantRole,
    Permission,
    RevokePermission,
    RevokeRole,
)

_ACCESS: dict[int, Access] = {0: "read", 1: "write", 2: "readwrite"}
_TYPE = {access: number for number, access in _ACCESS.items()}


def _permission(perm: Any) -> Permission:
    return Permission(
        perm.key.decode(errors="replace"),
        perm.range_end.decode(errors="replace"),
        _ACCESS.get(int(perm.permType), "read"),
    )


async def read_state(etcd: Etcd) -> AuthState:
    """Every role with its permissions and every user with its roles."""
    enabled = await etcd.auth_enabled()
    role_names = list((await etcd.auth("RoleList", rpc.AuthRoleListRequest())).roles)
    user_names = list((await etcd.auth("UserList", rpc.AuthUserListRequest())).users)
    role_replies = await asyncio.gather(
        *(etcd.auth("RoleGet", rpc.AuthRoleGetRequest(role=name)) for name in role_names)
    )
    user_replies = await asyncio.gather(
        *(etcd.auth("UserGet", rpc.AuthUserGetRequest(name=name)) for name in user_names)
    )
    return AuthState(
        enabled=enabled,
        roles={
            name: frozenset(_permission(p) for p in reply.perm)
            for name, reply in zip(role_names, role_replies, strict=True)
        },
        users={
            name: frozenset(reply.roles)
            for name, reply in zip(user_names, user_replies, strict=True)
        },
    )


async def apply(etcd: Etcd, action: Action, password: str | None = None) -> None:
    """Do one action; ``password`` for :class:`AddUser` and :class:`ChangePassword`."""
    match action:
        case AddRole(role=role):
            await etcd.auth("RoleAdd", rpc.AuthRoleAddRequest(name=role))
        case GrantPermission(role=role, permission=p):
            perm = rpc.Permission(
                permType=_TYPE[p.access], key=p.key.encode(), range_end=p.end.encode()
            )
            await etcd.auth(
                "RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(name=role, perm=perm)
            )
        case RevokePermission(role=role, permission=p):
            request = rpc.AuthRoleRevokePermissionRequest(
                role=role, key=p.key.encode(), range_end=p.end.encode()
            )
            await etcd.auth("RoleRevokePermission", request)
        case AddUser(user=user):
            await etcd.auth("UserAdd", rpc.AuthUserAddRequest(name=user, password=password))
        case ChangePassword(user=user):
            request = rpc.AuthUserChangePasswordRequest(name=user, password=password)
            await etcd.auth("UserChangePassword", request)
        case GrantRole(user=user, role=role):
            await etcd.auth("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=user, role=role))
        case RevokeRole(user=user, role=role):
            await etcd.auth("UserRevokeRole", rpc.AuthUserRevokeRoleRequest(name=user, role=role))
        case DeleteUser(user=user):
            await etcd.auth("UserDelete", rpc.AuthUserDeleteRequest(name=user))
        case DeleteRole(role=role):
            await etcd.auth("RoleDelete", rpc.AuthRoleDeleteRequest(role=role))


async def password_works(etcd: Etcd, user: str, password: str) -> bool:
    """Whether etcd accepts ``password`` for ``user`` (authentication must be on)."""
    try:
        await etcd.auth("Authenticate", rpc.AuthenticateRequest(name=user, password=password))
    except Exception as error:
        if "authentication failed" in str(error):
            return False
        raise
    return True


async def enable_auth(etcd: Etcd, state: AuthState, root_password: str | None) -> list[str]:
    """Give etcd the root user (with the root role) it needs, then turn authentication on.

    ``root_password`` is needed only when the root user does not exist yet.
    """
    done = []
    if ROOT not in state.users:
        await etcd.auth("UserAdd", rpc.AuthUserAddRequest(name=ROOT, password=root_password))
        done.append("add user root")
    if ROOT not in state.roles:
        await etcd.auth("RoleAdd", rpc.AuthRoleAddRequest(name=ROOT))
        done.append("add role root")
    if ROOT not in state.users.get(ROOT, frozenset()):
        await etcd.auth("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=ROOT, role=ROOT))
        done.append("grant role root to user root")
    await etcd.auth("AuthEnable", rpc.AuthEnableRequest())
    done.append("enable authentication")
    return done
