"""``pilotfish env create|list|delete``: environments enforced by etcd's access control.

Run by an operator with etcd's root user (``--etcd-username root`` and
``PILOTFISH_ETCD_PASSWORD`` or ``--etcd-password-file``; nothing while
authentication is still off). Exit codes: 0 done, 1 etcd refused or failed,
2 bad input.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agents.common.etcd import Etcd, EtcdError
from agents.common.logging import configure_logging
from agents.common.schema import (
    EnvironmentRecord,
    SchemaError,
    environment_key,
    parse_environment,
)
from agents.common.settings import EnvSettings
from agents.env import auth
from agents.env.model import (
    KINDS,
    ROOT,
    AddUser,
    AuthState,
    ChangePassword,
    Environment,
    EnvironmentView,
    Kind,
    check_name,
    default_prefix,
    env_file,
    environments,
    plan_create,
    plan_delete,
    read_env_file,
)

ACTIONS = ("create", "list", "delete")
AddFlags = Callable[..., None]


class EnvFailed(Exception):
    """Stop with this one line (exit 1)."""


def add_env_command(sub: Any, add_flags: AddFlags) -> None:
    """Register ``pilotfish env ACTION [NAME]`` with the settings' flags (not --prefix)."""
    help_text = "create, list or delete environments (etcd users and roles per prefix)"
    parser = sub.add_parser("env", help=help_text, description=help_text)
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument("name", nargs="?", help="the environment (create, delete)")
    add_flags(parser, EnvSettings, skip=frozenset({"prefix"}))


def run_env(args: dict[str, Any], describe_error: Callable[..., str]) -> int:
    action, name = args.pop("action"), args.pop("name")
    try:
        settings = EnvSettings(**{k: v for k, v in args.items() if v is not None})
        if action != "list":
            if name is None:
                raise ValueError(f"env {action} needs the environment's NAME")
            check_name(name)
    except ValidationError as error:
        print(f"pilotfish env: {describe_error(error, EnvSettings)}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"pilotfish env: {error}", file=sys.stderr)
        return 2
    configure_logging("warning", "console")  # the output is the report; warnings to stderr
    try:
        lines = asyncio.run(_run(action, name, settings))
    except (EnvFailed, EtcdError, OSError) as error:
        print(f"pilotfish env {action}: {_one_line(error)}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join((str(error) or type(error).__name__).removeprefix("etcdserver: ").split())


async def _run(action: str, name: str | None, settings: EnvSettings) -> list[str]:
    async with Etcd(settings) as etcd:
        if action == "list":
            return await list_environments(etcd, settings)
        assert name is not None
        if action == "create":
            env = Environment(name, settings.env_prefix or default_prefix(name))
            return await create(etcd, env, settings)
        return await delete(etcd, name, settings)


# --- create ------------------------------------------------------------------------------


def env_dir(settings: EnvSettings, env: Environment) -> Path:
    return Path(settings.env_dir) / env.name


def env_path(settings: EnvSettings, env: Environment, kind: Kind) -> Path:
    return env_dir(settings, env) / f"{kind}.env"


async def _state(etcd: Etcd, settings: EnvSettings) -> AuthState:
    if await etcd.auth_enabled() and settings.etcd_username is None:
        raise EnvFailed(
            "etcd has authentication on: give --etcd-username root and its password "
            "(PILOTFISH_ETCD_PASSWORD or --etcd-password-file)"
        )
    return await auth.read_state(etcd)


async def create(etcd: Etcd, env: Environment, settings: EnvSettings) -> list[str]:
    state = await _state(etcd, settings)
    known = _known_passwords(settings, env)
    renewed = set(settings.rotate_users.split(",")) if settings.rotate else set()
    for kind in KINDS:
        user = env.user(kind)
        if user not in state.users or kind in renewed:
            continue
        password = known.get(kind)
        if password is None:
            raise EnvFailed(
                f"user {user} exists but its password is in no file "
                f"({env_path(settings, env, kind)}): give --rotate to issue a new one"
            )
        if state.enabled and not await auth.password_works(etcd, user, password):
            raise EnvFailed(
                f"etcd refuses the password in {env_path(settings, env, kind)} for {user}: "
                "give --rotate to issue a new one"
            )
    done: list[str] = []
    passwords = dict(known)
    for action in plan_create(env, state, [k for k in KINDS if k in renewed]):
        password = None
        if isinstance(action, AddUser | ChangePassword):
            password = passwords[action.kind] = new_password()
        await auth.apply(etcd, action, password)
        done.append(action.describe())
    done += await _write_record(etcd, env)
    for kind in KINDS:
        text = env_file(env, kind, passwords[kind], _connection(settings))
        path = env_path(settings, env, kind)
        if write_private(path, text):
            done.append(f"write {path}")
    if not state.enabled:
        if settings.enable_auth:
            done += await _enable_auth(etcd, state, settings)
        else:
            done.append(
                "WARNING: etcd's authentication is off: these roles restrict nothing until "
                "it is on (pilotfish env create NAME --enable-auth)"
            )
    head = f"environment {env.name} ({env.prefix}):"
    return [head, *(f"  {line}" for line in done)] if done else [f"{head} nothing to change"]


def new_password() -> str:
    return secrets.token_urlsafe(24)


def _known_passwords(settings: EnvSettings, env: Environment) -> dict[Kind, str]:
    known: dict[Kind, str] = {}
    for kind in KINDS:
        try:
            text = env_path(settings, env, kind).read_text()
        except FileNotFoundError:
            continue
        password = read_env_file(text).get("PILOTFISH_ETCD_PASSWORD")
        if password:
            known[kind] = password
    return known


def _connection(settings: EnvSettings) -> dict[str, str | None]:
    def absolute(path: str | None) -> str | None:
        return str(Path(path).absolute()) if path and settings.agent_tls_paths else None

    return {
        "PILOTFISH_ETCD_HOST": settings.agent_etcd_host or settings.etcd_host,
        "PILOTFISH_ETCD_CACERT": absolute(settings.etcd_cacert),
        "PILOTFISH_ETCD_CERT": absolute(settings.agent_cert or settings.etcd_cert),
        "PILOTFISH_ETCD_KEY": absolute(settings.agent_key or settings.etcd_key),
        "PILOTFISH_ETCD_SERVER_NAME": settings.etcd_server_name,
    }


async def _write_record(etcd: Etcd, env: Environment) -> list[str]:
    record = EnvironmentRecord(name=env.name, prefix=env.prefix)
    _rev, items = await etcd.get_prefix(environment_key(env.name))
    current = next((i.value for i in items if i.key == environment_key(env.name).encode()), None)
    if current is not None and json.loads(current) == json.loads(record.to_json()):
        return []
    await etcd.put(environment_key(env.name), record.to_json())
    return [f"record the environment in {environment_key(env.name)}"]


def write_private(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` with mode 0600 (directory 0700), atomically; False if
    it holds that already."""
    try:
        if path.read_text() == text and path.stat().st_mode & 0o777 == 0o600:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:  # mkstemp creates it 0600
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


async def _enable_auth(etcd: Etcd, state: AuthState, settings: EnvSettings) -> list[str]:
    done = []
    password = settings.etcd_password if settings.etcd_username == ROOT else None
    if ROOT not in state.users and password is None:
        password = new_password()
        path = Path(settings.env_dir) / "root.env"
        text = f"PILOTFISH_ETCD_USERNAME={ROOT}\nPILOTFISH_ETCD_PASSWORD={password}\n"
        write_private(path, text)
        done.append(f"write {path} (etcd's root user: keep it safe)")
    elif ROOT in state.users and settings.etcd_username != ROOT:
        raise EnvFailed(
            "etcd's root user exists: give --etcd-username root and its password "
            "to enable authentication"
        )
    done = [*(await auth.enable_auth(etcd, state, password)), *done]
    # From now on etcd wants a token: this command continues as root.
    etcd.username, etcd.password, etcd.auth_off = ROOT, password or etcd.password, False
    etcd.client.metadata = None
    return done


async def _prefix_of(etcd: Etcd, name: str, state: AuthState) -> str:
    """The prefix ``name`` was created with: its roles say, else its record, else the default."""
    for env in environments(state):
        if env.name == name and env.prefix:
            return env.prefix
    _rev, items = await etcd.get_prefix(environment_key(name))
    for item in items:
        try:
            return parse_environment(item.key, item.value).prefix
        except SchemaError:
            continue
    return default_prefix(name)


# --- list and delete -------------------------------------------------------------------


async def list_environments(etcd: Etcd, settings: EnvSettings) -> list[str]:
    state = await _state(etcd, settings)
    found = environments(state)
    if settings.output == "json":
        return [json.dumps(_as_json(state, found), indent=2)]
    lines = [f"authentication: {'on' if state.enabled else 'OFF (roles restrict nothing)'}"]
    if not found:
        return [*lines, "no environments (pilotfish env create NAME)"]
    rows = [("ENVIRONMENT", "PREFIX", "ROLE", "USERS", "MAY")]
    for env in found:
        for role in env.roles:
            may = ", ".join(p.describe() for p in role.permissions) or "nothing"
            users = ",".join(role.users) or "-"
            rows.append((env.name, env.prefix or "?", role.role, users, may))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    return lines


def _as_json(state: AuthState, found: list[EnvironmentView]) -> dict[str, Any]:
    return {
        "authentication": state.enabled,
        "environments": [
            {
                "name": env.name,
                "prefix": env.prefix,
                "roles": [
                    {
                        "role": role.role,
                        "kind": role.kind,
                        "users": list(role.users),
                        "permissions": [
                            {"access": p.access, "key": p.key, "range_end": p.end}
                            for p in role.permissions
                        ],
                    }
                    for role in env.roles
                ],
            }
            for env in found
        ],
    }


async def delete(etcd: Etcd, name: str, settings: EnvSettings) -> list[str]:
    state = await _state(etcd, settings)
    env = Environment(name, settings.env_prefix or await _prefix_of(etcd, name, state))
    done = []
    for action in plan_delete(env, state):
        await auth.apply(etcd, action)
        done.append(action.describe())
    if await etcd.delete(environment_key(env.name)):
        done.append(f"delete {environment_key(env.name)}")
    if settings.purge:
        deleted = await etcd.delete_prefix(f"{env.prefix}/")
        done.append(f"delete the {deleted} keys under {env.prefix}/")
    for kind in KINDS:
        path = env_path(settings, env, kind)
        if path.exists():
            path.unlink()
            done.append(f"delete {path}")
    head = f"environment {env.name} ({env.prefix}):"
    return [head, *(f"  {line}" for line in done)] if done else [f"{head} nothing to delete"]
