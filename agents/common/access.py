"""What an agent may do in etcd, proven when it starts.

Each agent proves it can do what it needs in its own prefix (reads by reading
one key, writes by a transaction that can never succeed, so nothing is
written). A registrar (and the upgrader, with the registrar's user) also
proves that it is refused in the prefixes of its sibling environments and
next to its own prefix: etcd grants on key ranges and has no deny rule, so a
user with wider rights than one environment is the usual mistake, and
nothing else would notice it.

A refusal of what the agent needs, or a right it must not have, stops the
agent with one line (exit 2) instead of a retry loop. Running with etcd's
root rights in an environment that has roles is a warning.

The decisions (:func:`probes_for`, :func:`verdict`) are pure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from agents.common.backoff import Backoff
from agents.common.etcd import AuthenticationRefused, Etcd, EtcdError, is_permission_denied
from agents.common.logging import describe, get_logger
from agents.common.schema import ENVIRONMENTS_PREFIX, SchemaError, parse_environment
from agents.env.auth import read_state
from agents.env.model import AuthState, Permission, roles_covering

log = get_logger("pilotfish.access")

Agent = Literal["registrar", "upgrader", "discoverer", "catalog"]
# A key no agent ever writes: probes only ask whether they could.
PROBE = ".pilotfish-access-probe"
T = TypeVar("T")


class AccessDenied(Exception):
    """The agent may not do what it needs, or may do what it must not: one line."""


@dataclass(frozen=True, order=True)
class Probe:
    key: str
    op: Literal["read", "write"]
    allowed: bool  # what must be true
    fatal: bool  # False: only worth a warning
    purpose: str  # what it is for, or whose keys these are


def ancestors(prefix: str) -> list[str]:
    """``/a/b/c`` → ``["/a/b", "/a", ""]``: the levels next to which siblings live."""
    parts = prefix.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) if i else "" for i in range(len(parts) - 1, -1, -1)]


def probes_for(
    agent: Agent, prefixes: list[str], siblings: Iterable[str] = (), publishes_status: bool = True
) -> list[Probe]:
    """What ``agent`` must be allowed and refused; ``siblings``: other environments' prefixes.

    A discoverer that publishes its status must be allowed to write it: one that
    cannot is invisible to ``pilotfish drain --wait`` and the upgrader, which
    would then stop a container it still routes to.
    """
    if agent == "catalog":
        return [Probe(f"{p}/services/{PROBE}", "read", True, True, "the catalog") for p in prefixes]
    prefix = prefixes[0]
    if agent == "discoverer":
        status = Probe(f"{prefix}/discoverers/{PROBE}", "write", True, True, "its status key")
        return [
            Probe(f"{prefix}/services/{PROBE}", "read", True, True, "registrations"),
            *([status] if publishes_status else []),
            Probe(f"{prefix}/services/{PROBE}", "write", False, False, "registrations"),
        ]
    probes = [Probe(f"{prefix}/services/{PROBE}", "read", True, True, "registrations")]
    for area, purpose in (("services", "registrations"), ("hosts", "host claims")):
        probes.append(Probe(f"{prefix}/{area}/{PROBE}", "write", True, True, purpose))
    probes.append(Probe(f"{prefix}/drains/{PROBE}", "write", True, True, "drain requests"))
    for sibling in sorted(set(siblings)):
        if not _nested(sibling, prefix):
            probes.append(Probe(f"{sibling}/services/{PROBE}", "write", False, True, sibling))
    # Next to the prefix: a role on a parent, on everything, or on "/pilotfish/dev"
    # without the slash (which covers "/pilotfish/dev2/" too).
    probes.append(Probe(f"{prefix}{PROBE}", "write", False, True, "outside the prefix"))
    for parent in ancestors(prefix):
        probes.append(Probe(f"{parent}/{PROBE}", "write", False, True, "outside the prefix"))
    return probes


def _nested(one: str, other: str) -> bool:
    return one == other or one.startswith(other + "/") or other.startswith(one + "/")


def verdict(user: str | None, results: list[tuple[Probe, bool]]) -> tuple[list[str], list[str]]:
    """(fatal problems, warnings), one line each, from the probes' answers (in probe order)."""
    who = f"etcd user {user!r}" if user else "this agent (no etcd user)"
    fatal: list[str] = []
    warnings: list[str] = []
    # What it lacks first: that is what a wrong prefix or user shows as.
    for probe, allowed in sorted(results, key=lambda item: not item[0].allowed):
        if allowed == probe.allowed:
            continue
        where = probe.key.removesuffix(PROBE)
        if probe.allowed:
            line = (
                f"{who} may not {probe.op} {where} ({probe.purpose}): wrong --prefix or "
                "user, or its role lacks the right"
            )
        elif probe.purpose.startswith("/"):
            line = (
                f"{who} may also write {where}, another environment's prefix "
                f"({probe.purpose}): give each environment's agents only its own role"
            )
        elif probe.op == "write" and probe.fatal:
            line = (
                f"{who} may also write {where} ({probe.purpose}): its roles reach beyond "
                "the environment; give it only the environment's role"
            )
        else:
            line = f"{who} may write {where} ({probe.purpose}): it needs to read only"
        (fatal if probe.fatal else warnings).append(line)
    return fatal, warnings


# --- against etcd -----------------------------------------------------------------------


async def sibling_prefixes(etcd: Etcd, own: str) -> list[str]:
    """The other environments' prefixes from their records ([] if none may be read)."""
    try:
        _rev, items = await etcd.get_prefix(ENVIRONMENTS_PREFIX)
    except EtcdError as error:
        if is_permission_denied(error):
            return []
        raise
    found = []
    for item in items:
        try:
            record = parse_environment(item.key, item.value)
        except SchemaError as error:
            log.warning("environment record skipped", reason=str(error))
            continue
        if record.prefix != own:
            found.append(record.prefix)
    return found


async def check_access(
    etcd: Etcd, agent: Agent, prefixes: list[str], publishes_status: bool = True
) -> list[str]:
    """Prove the rights of ``agent``; the warnings. Raises :class:`AccessDenied`."""
    enabled = await etcd.auth_enabled()
    state = await _state_if_root(etcd)
    if state is not None:  # root's rights: everything allowed, nothing to prove refused
        why = f"it runs as {etcd.username!r}" if enabled else "authentication is off"
        return roles_unenforced(prefixes, state.roles, why)
    writer = agent in ("registrar", "upgrader")
    try:
        siblings = await sibling_prefixes(etcd, prefixes[0]) if writer else []
        probes = probes_for(agent, prefixes, siblings, publishes_status)
        answers = await asyncio.gather(
            *(etcd.may_write(p.key) if p.op == "write" else etcd.may_read(p.key) for p in probes)
        )
    except EtcdError as error:
        # No user, and no client certificate naming one: etcd knows no one to check.
        if etcd.username is None and "user name" in str(error):
            raise AccessDenied(
                "etcd has authentication on: give --etcd-username and the password "
                "(PILOTFISH_ETCD_PASSWORD or --etcd-password-file)"
            ) from None
        raise
    fatal, warnings = verdict(etcd.username, list(zip(probes, answers, strict=True)))
    if fatal:
        more = f" (and {len(fatal) - 1} more problems)" if len(fatal) > 1 else ""
        raise AccessDenied(fatal[0] + more)
    return warnings


async def _state_if_root(etcd: Etcd) -> AuthState | None:
    """etcd's users and roles if this agent may read them (root, or authentication
    off); None for everyone else."""
    try:
        return await read_state(etcd)
    except EtcdError as error:
        if is_permission_denied(error) or "user name" in str(error):
            return None  # not root: the normal case
        raise


def roles_unenforced(
    prefixes: list[str], roles: Mapping[str, frozenset[Permission]], why: str
) -> list[str]:
    """A warning per prefix that has roles while this agent has root's rights."""
    warnings = []
    for prefix in prefixes:
        covering = roles_covering(prefix, roles)
        if covering:
            warnings.append(
                f"this agent has etcd's root rights ({why}) in {prefix}, which has roles "
                f"({', '.join(covering)}): nothing keeps it out of other environments; "
                "give it the environment's user (pilotfish env create)"
            )
    return warnings


async def ensure_access(
    etcd: Etcd, agent: Agent, prefixes: list[str], publishes_status: bool = True
) -> None:
    """:func:`check_access` once etcd answers (retrying with backoff while it does not)."""
    backoff = Backoff(initial=0.2, maximum=5.0)
    waiting = False
    while True:
        try:
            warnings = await check_access(etcd, agent, prefixes, publishes_status)
            break
        except AuthenticationRefused as error:
            raise AccessDenied(str(error)) from None
        except EtcdError as error:
            if not waiting:
                log.warning("etcd access not checked yet, retrying", error=describe(error))
                waiting = True
            await backoff.wait()
    for warning in warnings:
        log.warning(warning)
    log.info("etcd access checked", agent=agent, user=etcd.username, prefixes=prefixes)


async def checked(check: Awaitable[None], run: Awaitable[T]) -> T:
    """Run ``run`` while ``check`` proves access; a refusal cancels ``run`` and is raised."""
    check_task, run_task = asyncio.ensure_future(check), asyncio.ensure_future(run)
    try:
        # FIRST_COMPLETED, not FIRST_EXCEPTION: a check still retrying (etcd away)
        # must not outlive a run that has finished.
        done, _ = await asyncio.wait({check_task, run_task}, return_when=asyncio.FIRST_COMPLETED)
        if check_task in done:
            check_task.result()  # AccessDenied; else proven: the run goes on
        return await run_task
    finally:
        for task in (check_task, run_task):
            task.cancel()
        await asyncio.gather(check_task, run_task, return_exceptions=True)
