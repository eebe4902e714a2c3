"""The HAProxy sink: runtime API for instance changes, reloads for new listeners.

Thin I/O around the pure parts (``plan.diff``, ``commands``, ``config``):

- :class:`RuntimeClient`: one persistent prompt-mode connection to a CLI
  socket (~40 µs per command measured, against ~130 µs with one connection per
  command); a batch is pipelined and every line passes ``validate_command``.
- :class:`Master`: HAProxy in master-worker mode under us (or adopted through
  its sockets): config check + atomic write, start, reload via the master CLI.
- :class:`HaproxySink`: keeps a view of what the running worker serves, sends
  ``diff(view, desired)`` as runtime commands, coalesces reloads, removes
  servers in the background (drain → wait → maint → del), and brings HAProxy
  back with the full current state when it dies.

Consistency rule: whenever the view might be wrong (a failed batch, a reload, a
restart), it is marked stale and read back from HAProxy (``show stat`` +
``show servers state``) before the next diff. Commands are never blindly
retried — ``add server`` twice is an error — the diff against the real state
is.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import CollectorRegistry

from agents.common.backoff import Backoff
from agents.common.logging import OnceEvery, get_logger
from agents.common.settings import DiscovererSettings
from agents.discoverer import commands as cmd
from agents.discoverer.config import refused_services, render_config
from agents.discoverer.haproxy.master import Master
from agents.discoverer.haproxy.options import render_options
from agents.discoverer.haproxy.refusals import bind_error, culprits, main_alert
from agents.discoverer.haproxy.runtime import ADMIN_PROMPT, CLI_ERRORS, HaproxyError, RuntimeClient
from agents.discoverer.haproxy.state import parse_all_sessions, parse_sessions, parse_state
from agents.discoverer.metrics import SinkMetrics, new_metrics
from agents.discoverer.model import Catalog, Service
from agents.discoverer.plan import (
    Action,
    AddServer,
    Plan,
    RemoveServer,
    SetAddress,
    SetReady,
    SetWeight,
    diff,
)

log = get_logger("pilotfish.discoverer.haproxy")

_SUPERVISE_EVERY_S = 0.05
_RESYNC_EVERY_S = 1.0
_POLL_S = 0.05  # cap of the removal polls
# A listener or server HAProxy refused is tried again after this long (or as
# soon as its catalog entry changes): a port may be freed meanwhile.
_REFUSED_RETRY_S = 60.0


def _poll_delays() -> Iterator[float]:
    """5 ms, 10 ms, 20 ms … up to _POLL_S: most drains end within milliseconds
    (a command costs ~40 µs), a long one should not be polled hard."""
    delay = 0.005
    while True:
        yield delay
        delay = min(delay * 2, _POLL_S)


# -- the sink -----------------------------------------------------------------------


@dataclass
class _Status:
    reloads: int = 0
    restarts: int = 0
    last_error: str | None = None
    last_reload_s: float | None = None
    reload_reasons: list[str] = field(default_factory=list)


class HaproxySink:
    def __init__(self, settings: DiscovererSettings, metrics: SinkMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or new_metrics(CollectorRegistry())  # private unless given
        self.dir = Path(settings.state_dir).absolute()
        self.options = render_options(settings)
        self.master = Master(settings, self.dir)
        self.admin = RuntimeClient(self.dir / "admin.sock", ADMIN_PROMPT)
        self._desired: Catalog = {}
        self._view: Catalog = {}
        # The desired catalog the view matched after the last clean sync: the
        # next sync only compares the services whose entry changed since (the
        # catalog builder keeps unchanged services as the same objects).
        self._applied: Catalog | None = None
        self._stale = True
        self._lock = asyncio.Lock()
        self._removals: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._reload_wanted = asyncio.Event()
        self._reloading = False
        self._last_reload = -1e9
        self._last_resync = 0.0
        self._worker_pid: int | None = None
        self._started = False
        self._status = _Status()
        self._quiet = OnceEvery(60.0)
        # What HAProxy could not take, and the catalog entry it was refused
        # for: tried again when that entry changes, or after _REFUSED_RETRY_S.
        self._refused_listeners: dict[str, _Refusal] = {}
        self._refused_servers: dict[tuple[str, str], _Refusal] = {}
        self._screened: dict[str, Service] = {}  # the catalog entries checked already
        self._trimmed: dict[str, tuple[Service, Service]] = {}  # entry -> without refused servers

    # -- public API -------------------------------------------------------------

    async def start(self, catalog: Catalog) -> None:
        """Start (or adopt) HAProxy and make it serve ``catalog``.

        An HAProxy already answering on the state dir's master socket is adopted,
        never replaced: a restarted discoverer then only sends the difference,
        with no reload if every listener is already there.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._desired = self._screen(catalog)
        async with self._lock:
            if await self.master.answers():
                await self.master.adopt()
                log.info("attached to a running HAProxy", master_pid=self.master.pid)
            elif self.settings.attach:
                raise HaproxyError(f"--attach: no HAProxy answers on {self.master.socket}")
            else:
                await self._launch_locked()
            await self._sync_locked()
        self._started = True

    async def apply(self, catalog: Catalog) -> None:
        """Runtime commands for every instance change now; a reload later if needed."""
        self._desired = self._screen(catalog)
        async with self._lock:
            await self._sync_locked()

    async def run(self) -> None:
        """Supervise HAProxy and run the reload coalescer until cancelled."""
        reloader = asyncio.create_task(self._reloader(), name="haproxy-reloader")
        backoff = Backoff(initial=0.05, maximum=2.0)
        try:
            while True:
                try:
                    await self._supervise_once()
                    backoff.reset()
                    await asyncio.sleep(_SUPERVISE_EVERY_S)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    self._failed("supervise", error)
                    await backoff.wait()
        finally:
            reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloader

    async def close(self, stop_haproxy: bool = False) -> None:
        # Removals in progress stay draining in HAProxy: the next discoverer reads
        # them back and finishes the job.
        for task in list(self._removals.values()):
            task.cancel()
        await asyncio.gather(*self._removals.values(), return_exceptions=True)
        await self.admin.close()
        await self.master.cli.close()
        if stop_haproxy:
            await self.master.stop()

    def healthy(self) -> tuple[bool, dict[str, object]]:
        alive = self.master.alive()
        details: dict[str, object] = {
            "state_dir": str(self.dir),
            "master_pid": self.master.pid,
            "master_alive": alive,
            "worker_pid": self._worker_pid,
            "services": len(self._view),
            "servers": sum(len(s.servers) for s in self._view.values()),
            "removing": len(self._removals),
            "reload_pending": self._reload_wanted.is_set() or self._reloading,
            "reloads": self._status.reloads,
            "restarts": self._status.restarts,
            "last_reload_seconds": self._status.last_reload_s,
            "in_sync": not self._stale,
            "last_error": self._status.last_error,
        }
        return self._started and alive, details

    @property
    def worker_pid(self) -> int | None:
        return self._worker_pid

    @property
    def settled(self) -> bool:
        """Everything handed to :meth:`apply` is in HAProxy: no reload pending or
        running, the view in sync (a failed command is resynced first), HAProxy up."""
        return (
            self._started
            and not self._lock.locked()  # no sync or reload half done
            and not self._stale
            and not self._reload_wanted.is_set()
            and not self._reloading
            and self.master.alive()
        )

    async def sessions(self, servers: Collection[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """(backend, server) -> its current sessions + queued requests (0: gone).

        One `show stat <backend> 4 -1` per backend, pipelined on the admin socket.
        """
        backends = sorted({backend for backend, _ in servers})
        lines = [cmd.show_stat_servers(backend) for backend in backends]
        answers = await self.admin.read(lines)
        self._count(lines)
        by_backend = {b: parse_all_sessions(a) for b, a in zip(backends, answers, strict=True)}
        return {(b, s): by_backend[b].get(s, 0) for b, s in servers}

    def refused(self) -> dict[tuple[str, str | None], str]:
        """(service, server; None: its listener) -> why HAProxy could not take it."""
        refused: dict[tuple[str, str | None], str] = {
            (name, None): r.reason for name, r in self._refused_listeners.items()
        }
        refused.update({key: r.reason for key, r in self._refused_servers.items()})
        return refused

    # -- what HAProxy cannot take: left out, the rest goes on ---------------------

    def _screen(self, catalog: Catalog) -> Catalog:
        """``catalog`` less what was refused (listeners, servers) and is unchanged since."""
        now = time.monotonic()
        self._refused_listeners = {
            name: r
            for name, r in self._refused_listeners.items()
            if r.holds(catalog.get(name), now)
        }
        self._refused_servers = {
            key: r for key, r in self._refused_servers.items() if r.holds(catalog.get(key[0]), now)
        }
        for name, service in catalog.items():
            if self._screened.get(name) is not service:
                reason = refused_services({name: service}).get(name)
                if reason is not None:
                    self._refuse_listener(service, reason)
        self._screened = dict(catalog)
        return {
            name: self._without_refused_servers(service)
            for name, service in catalog.items()
            if name not in self._refused_listeners
        }

    def _without_refused_servers(self, service: Service) -> Service:
        refused = {s for (b, s) in self._refused_servers if b == service.name}
        if not refused:
            return service
        trimmed = self._trimmed.get(service.name)
        if trimmed is not None and trimmed[0] is service and refused == _missing(trimmed):
            return trimmed[1]  # the same object as last time: the diff skips it
        servers = {n: s for n, s in service.servers.items() if n not in refused}
        copy = Service(service.name, service.bind_port, service.mode, servers)
        self._trimmed[service.name] = (service, copy)
        return copy

    def _refuse_listener(self, service: Service, reason: str) -> None:
        self._refused_listeners[service.name] = _Refusal(service, reason, time.monotonic())
        self._desired = {n: s for n, s in self._desired.items() if n != service.name}
        log.warning("listener refused", service=service.name, port=service.bind_port,
                    reason=reason)  # fmt: skip

    def _refuse_server(self, backend: str, server: str, reason: str) -> None:
        entry = self._screened.get(backend)
        if entry is None:
            return
        self._refused_servers[(backend, server)] = _Refusal(entry, reason, time.monotonic())
        log.warning("server refused", backend=backend, server=server, reason=reason)

    def _refuse_unbindable(self, new: Catalog) -> None:
        """Leave out the new listeners whose port another process holds (not
        HAProxy: a port passing from one service to another is its own)."""
        ours = {service.bind_port for service in self._view.values()}
        for service in new.values():
            if service.bind_port in ours:
                continue
            error = bind_error(self.options.bind_address, service.bind_port)
            if error is not None:
                self._refuse_listener(service, error)

    def _refuse_culprits(
        self, error: HaproxyError, text: str, new: Catalog, *, blame_all_new: bool
    ) -> None:
        """After HAProxy refused a configuration: leave out the services it
        names (or else, on a reload, every new listener: the running ones
        keep their updates)."""
        named = culprits(str(error), text) & new.keys()
        if not named and not (blame_all_new and new):
            return  # not one service's fault: retried as a whole
        for name in named or new.keys():
            self._refuse_listener(new[name], f"HAProxy refused it: {main_alert(str(error))}")

    # -- sync: view → desired ---------------------------------------------------

    async def _sync_locked(self) -> None:
        if self._stale:
            await self._read_state()
        for key, task in list(self._removals.items()):
            wanted = self._desired.get(key[0])
            if wanted is not None and key[1] in wanted.servers:
                task.cancel()  # it came back: the diff turns it up again
                self._removals.pop(key, None)
        applied, self._applied = self._applied, None  # unknown until this sync succeeds
        plan = diff(self._view, self._desired, _changed(applied, self._desired))
        await self._execute(plan)
        if plan.reload:
            self._request_reload(plan)
        if not self._stale:
            self._applied = self._desired

    async def _read_state(self) -> None:
        reads = ["show stat", "show servers state", "show info"]
        stat, servers, info = await self.admin.read(reads)
        self._count(reads)
        self._view = parse_state(stat, servers)
        self._applied = None  # the view was read back: compare all of it
        pid = re.search(r"^Pid: (\d+)$", info, re.M)
        self._worker_pid = int(pid[1]) if pid else None
        self._stale = False
        self._last_resync = time.monotonic()

    async def _execute(self, plan: Plan) -> None:
        batch: list[str] = []
        owners: list[Action] = []  # the action each line of the batch is for
        removals: list[RemoveServer] = []
        for action in plan.actions:
            if isinstance(action, RemoveServer):
                if (action.backend, action.name) in self._removals:
                    continue
                removals.append(action)
            try:
                lines = _commands(action)
            except cmd.CommandError as error:  # a value no command may carry: that server only
                self._refuse_server(action.backend, _server_of(action), str(error))
                continue
            batch += lines
            owners += [action] * len(lines)
        if not batch:
            return
        answers = await self._send(batch)
        errors = [f"{line}: {a}" for line, a in zip(batch, answers, strict=True) if cmd.is_error(a)]
        for action, answer in zip(owners, answers, strict=True):
            if isinstance(action, AddServer) and cmd.is_error(answer):
                self._refuse_server(action.backend, action.server.name, f"add server: {answer}")
        for action in plan.actions:
            _update_view(self._view, action)
        self.metrics.changes_applied.inc(len(plan.actions))
        for action in removals:
            key = (action.backend, action.name)
            self._removals[key] = asyncio.create_task(self._remove(*key), name=f"remove {key}")
        if errors:
            # The view may now be wrong: read HAProxy's state back before the next diff.
            self._stale = True
            self._failed("runtime command", HaproxyError("; ".join(errors[:5])))

    async def _send(self, lines: list[str]) -> list[str]:
        try:
            answers = await self.admin.execute(lines)
        except CLI_ERRORS as error:
            self._stale = True  # unknown how much of the batch was applied
            raise HaproxyError(f"HAProxy admin socket: {error!r}") from error
        self._count(lines)
        return answers

    def _count(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.metrics.runtime_commands.labels(verb=cmd.verb(line)).inc()

    # -- removal: drain → wait → maint → del --------------------------------------

    async def _remove(self, backend: str, name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        started = loop.time()
        delays = _poll_delays()
        try:
            # Polled: HAProxy has no event for "last connection of a server closed".
            while loop.time() < deadline and await self._sessions(backend, name) > 0:  # noqa: ASYNC110
                await asyncio.sleep(next(delays))
            async with self._lock:
                await self._send([cmd.set_state(backend, name, "maint")])
            cut = False
            while True:
                async with self._lock:
                    (answer,) = await self._send([cmd.del_server(backend, name)])
                    if not cmd.is_error(answer) or cmd.is_not_found(answer):
                        _forget(self._view, backend, name)
                        break
                    if cmd.STILL_CONNECTED not in answer:
                        raise HaproxyError(f"del server {backend}/{name}: {answer}")
                    if not cut and loop.time() >= deadline:
                        # Drain timeout: cut what is left (bounded removal).
                        await self._send([cmd.shutdown_sessions(backend, name)])
                        cut = True
                await asyncio.sleep(next(delays))
            log.info("server removed", backend=backend, server=name, cut=cut,
                     seconds=round(loop.time() - started, 3))  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._stale = True  # the supervisor resyncs and retries the removal
            self._failed("remove server", error)
        finally:
            if self._removals.get((backend, name)) is asyncio.current_task():
                del self._removals[(backend, name)]

    async def _sessions(self, backend: str, name: str) -> int:
        line = cmd.show_stat_servers(backend)
        (answer,) = await self.admin.read([line])
        self._count([line])
        return parse_sessions(answer, name)

    # -- reloads ----------------------------------------------------------------

    def _request_reload(self, plan: Plan) -> None:
        if not self._reload_wanted.is_set():
            log.info("reload scheduled", reasons=list(plan.reasons[:5]), count=len(plan.reasons))
        self._reload_wanted.set()

    async def _reloader(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(initial=0.1, maximum=5.0)
        while True:
            await self._reload_wanted.wait()
            # Gather what arrives together (50 new services = 1 reload), then keep
            # at most one reload per reload_min_interval.
            await asyncio.sleep(self.settings.reload_delay)
            wait = self._last_reload + self.settings.reload_min_interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                async with self._lock:
                    # Cleared under the lock: what arrives from here on is in this reload.
                    self._reload_wanted.clear()
                    self._reloading = True
                    await self._reload_locked()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._failed("reload", error)
                self._reload_wanted.set()
                await backoff.wait()
            finally:
                self._reloading = False

    async def _reload_locked(self) -> None:
        if self._stale:
            await self._read_state()
        if not diff(self._view, self._desired).reload:
            return  # what needed it went away again meanwhile
        loop = asyncio.get_running_loop()
        began = loop.time()
        new = {n: s for n, s in self._desired.items() if n not in self._view}
        self._refuse_unbindable(new)
        if not diff(self._view, self._desired).reload:
            return  # only refused listeners needed it
        # Rendered from the full current catalog at reload time: runtime changes made
        # while the reload was pending are in it.
        text = render_config(self._desired, self.options)
        try:
            await self.master.write_config(text)
            proc = await self.master.reload()
        except HaproxyError as error:
            self._refuse_culprits(error, text, new, blame_all_new=True)
            raise
        self._after_new_worker()
        await self._read_new_worker(proc.worker_pid)
        await self._sync_locked()  # drains the draining servers (rendered weight 0)
        self._last_reload = loop.time()
        self._status.reloads += 1
        self._status.last_reload_s = round(self._last_reload - began, 4)
        self.metrics.reloads.inc()
        log.info("HAProxy reloaded", seconds=self._status.last_reload_s,
                 worker_pid=self._worker_pid, services=len(self._desired))  # fmt: skip

    async def _read_new_worker(self, pid: int | None) -> None:
        # The admin socket is handed over to the new worker: read the state from
        # it, not from the old one still finishing its connections.
        deadline = time.monotonic() + 5.0
        while True:
            await self._read_state()
            if pid is None or self._worker_pid == pid or time.monotonic() > deadline:
                return
            self.admin.reset()
            await asyncio.sleep(0.005)

    def _after_new_worker(self) -> None:
        # Removals in progress: their servers are not in the new config; the old
        # worker finishes their connections (bounded by hard-stop-after).
        for task in self._removals.values():
            task.cancel()
        self._removals.clear()
        self.admin.reset()
        self._stale = True

    # -- supervision --------------------------------------------------------------

    async def _supervise_once(self) -> None:
        if not self._started:
            return
        if not self.master.alive():
            if self._quiet.should_log("master"):
                log.warning("HAProxy is gone, starting it with the full state",
                            master_pid=self.master.pid)  # fmt: skip
            async with self._lock:
                if not self.master.alive():
                    await self._launch_locked()
                    await self._sync_locked()
            self._quiet.clear("master")
            log.info("HAProxy back", master_pid=self.master.pid, worker_pid=self._worker_pid)
        elif self._stale and time.monotonic() - self._last_resync > _RESYNC_EVERY_S:
            async with self._lock:
                self._last_resync = time.monotonic()
                await self._sync_locked()
        if self._status.last_error is not None and not self._stale:
            if self._quiet.active("error"):
                self._quiet.clear("error")
                log.info("HAProxy in sync again")
            self._status.last_error = None

    async def _launch_locked(self) -> None:
        began = time.monotonic()
        self._refuse_unbindable(self._desired)
        text = render_config(self._desired, self.options)
        try:
            await self.master.write_config(text)
            proc = await self.master.launch()
        except HaproxyError as error:
            self._refuse_culprits(error, text, dict(self._desired), blame_all_new=False)
            raise
        self._after_new_worker()
        await self._read_new_worker(proc.worker_pid)
        self._last_reload = asyncio.get_running_loop().time()
        self._status.restarts += 1
        self.metrics.restarts.inc()
        log.info("HAProxy started", master_pid=self.master.pid,
                 seconds=round(time.monotonic() - began, 4))  # fmt: skip

    def _failed(self, what: str, error: BaseException) -> None:
        self._status.last_error = f"{what}: {error}"
        if self._quiet.should_log("error"):
            log.warning("HAProxy operation failed", what=what, error=str(error))


@dataclass(frozen=True, slots=True)
class _Refusal:
    entry: Service  # the catalog entry it was refused for
    reason: str
    since: float

    def holds(self, current: Service | None, now: float) -> bool:
        """Still in force: the entry is unchanged and the retry time is not up."""
        return current is self.entry and now - self.since < _REFUSED_RETRY_S


def _missing(trimmed: tuple[Service, Service]) -> set[str]:
    return trimmed[0].servers.keys() - trimmed[1].servers.keys()


def _server_of(action: Action) -> str:
    return action.server.name if isinstance(action, AddServer | SetAddress) else action.name


def _commands(action: Action) -> list[str]:
    be = action.backend
    if isinstance(action, AddServer):
        s = action.server
        lines = [cmd.add_server(be, s.name, s.address, s.port, s.weight, s.check)]
        if s.check:
            lines.append(cmd.enable_health(be, s.name))
        # Dynamic servers start in maintenance; "state drain" also leaves it (measured),
        # so a server that is already draining never takes a connection.
        up = s.state == "up"
        lines.append(cmd.enable_server(be, s.name) if up else cmd.set_state(be, s.name, "drain"))
        return lines
    if isinstance(action, SetAddress):
        return [cmd.set_addr(be, action.server.name, action.server.address, action.server.port)]
    if isinstance(action, SetWeight):
        return [cmd.set_weight(be, action.name, action.weight)]
    if isinstance(action, SetReady):
        return [cmd.set_state(be, action.name, "ready")]
    # SetDrain, and the first step of RemoveServer: no new connections at once.
    return [cmd.set_state(be, action.name, "drain")]


def _changed(applied: Catalog | None, desired: Catalog) -> set[str] | None:
    """Services whose entry is not the one the view was synced to (None: all)."""
    if applied is None:
        return None
    return {n for n in applied.keys() | desired.keys() if applied.get(n) is not desired.get(n)}


def _update_view(view: Catalog, action: Action) -> None:
    service = view.get(action.backend)
    if service is None:
        return
    servers = service.servers
    if isinstance(action, AddServer):
        servers[action.server.name] = action.server
        return
    name = action.server.name if isinstance(action, SetAddress) else action.name
    have = servers.get(name)
    if have is None:
        return
    if isinstance(action, SetAddress):
        servers[name] = replace(have, address=action.server.address, port=action.server.port)
    elif isinstance(action, SetWeight):
        servers[name] = replace(have, weight=action.weight)
    elif isinstance(action, SetReady):
        servers[name] = replace(have, state="up")
    else:
        servers[name] = replace(have, state="draining")


def _forget(view: Catalog, backend: str, name: str) -> None:
    service = view.get(backend)
    if service is not None:
        service.servers.pop(name, None)
