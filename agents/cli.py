"""``pilotfish register``, ``discover``, ``catalog``, and ``drain`` / ``undrain``.

Flags are generated from the settings models, so a flag, a ``PILOTFISH_*``
variable and a seed variable (``HOST_IP``, ``ETCD_HOST``, ``DOCKER_HOST``)
always mean the same thing. A bad setting stops the agent with one line and
exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pydantic import ValidationError

from agents import __version__
from agents.common.access import AccessDenied
from agents.common.logging import configure_logging
from agents.common.runner import install_event_loop_policy, run_until_signal
from agents.common.settings import (
    CatalogSettings,
    CommonSettings,
    DiscovererSettings,
    RegistrarSettings,
    UpgraderSettings,
)
from agents.env.command import add_env_command, run_env
from agents.registrar import drain_command

COMMANDS: dict[str, tuple[type[CommonSettings], str]] = {
    "register": (RegistrarSettings, "register this host's containers in etcd"),
    "discover": (DiscovererSettings, "route to registered containers through HAProxy"),
    "catalog": (CatalogSettings, "serve the service catalog: web UI, JSON API, live events"),
    "upgrade": (UpgraderSettings, "replace containers whose image tag moved, start-first"),
}


# Never echoed in an error line (it would end up in a journal).
SECRETS = frozenset({"etcd_password", "stats_user", "stats_password"})


def _env_only(field: Any) -> bool:
    """Secrets that must not be flags: a command line is visible to every user in ps."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("env_only") is True


def _add_flags(
    parser: argparse.ArgumentParser,
    model: type[CommonSettings],
    skip: frozenset[str] = frozenset(),
) -> None:
    for name, field in model.model_fields.items():
        if _env_only(field) or name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        env = f"PILOTFISH_{name.upper()}"
        help_text = f"{field.description or ''} [env {env}]".strip()
        if field.annotation is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get(
            "repeatable"
        ):
            parser.add_argument(
                flag, dest=name, action="append", metavar=name.upper(), help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pilotfish", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"pilotfish {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (model, help_text) in COMMANDS.items():
        _add_flags(sub.add_parser(command, help=help_text, description=help_text), model)
    drain_command.add_parsers(sub, _add_flags)
    add_env_command(sub, _add_flags)
    return parser


def load_settings(command: str, flags: dict[str, Any]) -> CommonSettings:
    model = COMMANDS[command][0]
    given: dict[str, Any] = {
        name: ",".join(value) if isinstance(value, list) else value  # a repeated flag
        for name, value in flags.items()
        if value is not None
    }
    return model(**given)


def _field_name(model: type[CommonSettings], loc: str) -> str:
    """The field behind an alias (errors name ``PILOTFISH_ETCD_HOST`` or ``ETCD_HOST``)."""
    for name, field in model.model_fields.items():
        aliases = getattr(field.validation_alias, "choices", [])
        if loc == name or loc.lower() in (str(alias).lower() for alias in aliases):
            return name
    return loc


def describe_error(error: ValidationError, model: type[CommonSettings]) -> str:
    first = error.errors()[0]
    message = " ".join(first["msg"].removeprefix("Value error, ").split())
    if not first["loc"]:  # a check across settings: its message names them
        return f"invalid settings: {message}"
    name = _field_name(model, str(first["loc"][0]))
    field = model.model_fields.get(name)
    flag = "--" + name.replace("_", "-")
    where = f"PILOTFISH_{name.upper()}" if field and _env_only(field) else flag
    shown = "" if name in SECRETS else f" (got {first.get('input')!r})"
    return f"invalid setting {name} ({where}): {message}{shown}"


def preflight(settings: CommonSettings) -> str | None:
    """What would fail at the first render, found before anything starts (None: fine)."""
    if isinstance(settings, DiscovererSettings):
        from agents.discoverer.haproxy import check_settings

        return check_settings(settings)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command in drain_command.COMMANDS:
        return drain_command.main(command, args)
    if command == "env":
        return run_env(args, describe_error)
    try:
        settings = load_settings(command, args)
    except ValidationError as error:
        reason = describe_error(error, COMMANDS[command][0])
        print(f"pilotfish {command}: {reason}", file=sys.stderr)
        return 2
    problem = preflight(settings)
    if problem is not None:
        print(f"pilotfish {command}: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    install_event_loop_policy()
    try:
        _serve(command, settings)
    except AccessDenied as error:  # the user's etcd rights: one line, no retry loop
        print(f"pilotfish {command}: {error}", file=sys.stderr)
        _leave(2)
    _leave(0)


def _serve(command: str, settings: CommonSettings) -> None:
    if command == "register":
        from agents.registrar.agent import serve as serve_registrar
        from agents.registrar.host_claim import HostIdTaken

        assert isinstance(settings, RegistrarSettings)
        try:
            asyncio.run(run_until_signal(lambda stop: serve_registrar(settings, stop)))
        except HostIdTaken:
            _leave(2)  # logged where it was found, with the holder's name
    elif command == "upgrade":
        from agents.upgrader.agent import run as run_upgrader

        assert isinstance(settings, UpgraderSettings)
        _leave(run_upgrader(settings))
    elif command == "catalog":
        from agents.catalog.agent import serve as serve_catalog

        assert isinstance(settings, CatalogSettings)
        asyncio.run(run_until_signal(lambda stop: serve_catalog(settings, stop)))
    else:
        from agents.discoverer.agent import serve as serve_discoverer

        assert isinstance(settings, DiscovererSettings)
        asyncio.run(run_until_signal(lambda stop: serve_discoverer(settings, stop)))


def _leave(code: int) -> NoReturn:
    """Exit now that the agent has shut down cleanly: flush and skip finalization.

    Tearing the interpreter down (gRPC's and the loaded modules' objects) costs
    a large part of the time from SIGTERM to exit, more on a busy machine, and
    nothing is left to do by then: serve() closed every task, socket and
    subprocess handle.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
