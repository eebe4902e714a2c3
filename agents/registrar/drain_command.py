"""``pilotfish drain CONTAINER`` and ``pilotfish undrain CONTAINER``: operator commands.

Run on the container's host with the registrar's etcd settings. The container
(name or id) is resolved through the local Docker engine; the request is the
key ``<prefix>/drains/<container-id>``, which the host's registrar turns into
the instances' ``draining`` state (and back to ``up`` when it is deleted).

``--wait`` then waits, bounded by ``--timeout``, until the registrar has
rewritten every instance of the container and every live discoverer serving
its services has applied that revision (their status keys,
``<prefix>/discoverers/``); a drain reports the sessions left, and with
``--idle`` also waits until none is left (then stopping the container cuts
no connection). Exit codes: 0
done, 1 timeout or etcd/Docker away (the waiting parties named), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from agents.common.consumers import read_statuses, sessions_left, stragglers
from agents.common.docker_events import DockerSource, DockerUnavailable
from agents.common.drains import (
    cancel_drain,
    registrations_of,
    request_drain,
    revisions_to_apply,
)
from agents.common.etcd import Etcd, EtcdError
from agents.common.logging import configure_logging, describe
from agents.common.schema import DiscovererStatus, State
from agents.common.settings import DrainSettings

COMMANDS = {
    "drain": "mark a container's instances draining (no new connections) until undrained",
    "undrain": "withdraw a drain request: the container's instances serve again",
}
_POLL_S = 0.1


class BadInput(Exception):
    """Exit code 2: the container is unknown, or a setting is bad."""


def add_parsers(
    sub: Any, add_flags: Callable[[argparse.ArgumentParser, type[DrainSettings]], None]
) -> None:
    """Register ``drain`` and ``undrain`` on the CLI's subparsers."""
    for command, help_text in COMMANDS.items():
        parser = sub.add_parser(command, help=help_text, description=help_text)
        parser.add_argument("container", metavar="CONTAINER", help="container name or id")
        add_flags(parser, DrainSettings)


def main(command: str, args: dict[str, Any]) -> int:
    from agents.cli import describe_error  # the CLI's one-line error for a bad setting

    container = args.pop("container")
    given = {k: v for k, v in args.items() if v is not None}
    try:
        settings = DrainSettings(**given)
    except ValidationError as error:
        print(f"pilotfish {command}: {describe_error(error, DrainSettings)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        return asyncio.run(run(command, container, settings))
    except BadInput as error:
        print(f"pilotfish {command}: {error}", file=sys.stderr)
        return 2


async def run(command: str, container: str, settings: DrainSettings) -> int:
    docker = DockerSource(settings.docker_host)
    try:
        info = await docker.inspect(container)
    except DockerUnavailable as error:
        print(f"pilotfish {command}: Docker: {describe(error)}", file=sys.stderr)
        return 1
    finally:
        await docker.close()
    if info is None:
        raise BadInput(f"no such container {container!r} on {settings.docker_host}")
    name = info.name or info.id[:12]
    async with Etcd(settings) as etcd:
        try:
            if command == "drain":
                await request_drain(etcd, settings.prefix, info.id, settings.reason)
                print(f"drain requested: {name} ({info.id[:12]})")
            else:
                await cancel_drain(etcd, settings.prefix, info.id)
                print(f"drain withdrawn: {name} ({info.id[:12]})")
            if not settings.wait:
                return 0
            state: State = "draining" if command == "drain" else "up"
            return await wait_applied(etcd, settings, info.id, state)
        except EtcdError as error:
            print(f"pilotfish {command}: etcd: {describe(error)}", file=sys.stderr)
            return 1


@dataclass
class Progress:
    """Where a wait stands: what it still waits for (empty: done)."""

    rewritten: bool = False
    revisions: dict[str, int] | None = None
    behind: dict[str, list[str]] | None = None  # service -> discoverers behind
    sessions: dict[str, int] | None = None
    discoverers: int = 0

    @property
    def done(self) -> bool:
        return self.rewritten and not any((self.behind or {}).values())

    def waiting_for(self) -> str:
        if self.done:
            left = ", ".join(f"{d}: {n}" for d, n in (self.sessions or {}).items())
            return f"sessions still open ({left})"
        if not self.rewritten:
            return "the registrar has not rewritten the container's instances (is it running?)"
        names = sorted({d for ids in (self.behind or {}).values() for d in ids})
        return "discoverers that have not applied it: " + ", ".join(names)


def progress_of(
    revisions: dict[str, int] | None,
    statuses: dict[str, DiscovererStatus],
    keys: list[str],
) -> Progress:
    """Pure: how far the drain (or undrain) has got."""
    if revisions is None:
        return Progress()
    behind = {service: stragglers(statuses, service, rev) for service, rev in revisions.items()}
    return Progress(
        rewritten=True,
        revisions=revisions,
        behind=behind,
        sessions=sessions_left(statuses, keys),
        discoverers=sum(
            1 for s in statuses.values() if any(s.serves(service) for service in revisions)
        ),
    )


async def wait_applied(etcd: Etcd, settings: DrainSettings, container_id: str, state: State) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.timeout
    progress = Progress()
    while True:
        registrations = await registrations_of(etcd, settings.prefix, container_id)
        if not registrations:
            print("the container has no registrations: nothing to wait for")
            return 0
        statuses = await read_statuses(etcd, settings.prefix)
        revisions = revisions_to_apply(registrations, state)
        progress = progress_of(revisions, statuses, sorted(registrations))
        idle_enough = not (settings.idle and state == "draining" and progress.sessions)
        if progress.done and idle_enough:
            break
        if loop.time() >= deadline:
            print(
                f"not applied within {settings.timeout:g}s: {progress.waiting_for()}",
                file=sys.stderr,
            )
            return 1
        await asyncio.sleep(_POLL_S)
    revision = max((progress.revisions or {}).values(), default=0)
    print(f"applied by {progress.discoverers} discoverer(s) at revision {revision} ({state})")
    if state == "draining":
        left = progress.sessions or {}
        detail = ", ".join(f"{d}: {n}" for d, n in left.items())
        print(f"sessions left: {sum(left.values())}" + (f" ({detail})" if detail else ""))
    return 0
