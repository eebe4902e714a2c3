"""The etcd connection: what aetcd itself does not provide.

- several endpoints with failover (a gRPC ``ipv4:`` multi-address target);
- gRPC keepalive, so a hung (SIGSTOPped) member is noticed in seconds instead
  of every call and watch hanging silently (etcd refuses pings more often
  than every 5 s);
- a deadline on every unary call;
- a watch that reports the revision of every event, so callers can resume;
- watches of single keys, any number of them multiplexed on the client's one
  watch stream (aetcd keeps one gRPC stream and tells events apart by watch
  id), for a registrar that guards the keys it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The discoverer forks HAProxy; gRPC's fork handlers are not needed (the child
# execs at once) and only print a warning on every fork. Set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import aetcd
import aetcd.exceptions
import aetcd.utils
import aetcd.watcher
import grpc

from agents.common.logging import get_logger
from agents.common.settings import CommonSettings, is_ipv6

log = get_logger("pilotfish.etcd")

# Measured (STACK-FACTS.md): without all of these, a frozen member hangs calls
# for 30 s and a watch on it receives nothing, silently.
GRPC_OPTIONS: dict[str, Any] = {
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.http2.ping_timeout_ms": 2000,
    # Reconnect quickly once a member is back (default backoff grows to 120 s).
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    # gRPC's default 4 MiB cap breaks the initial list at ~10,000 instances
    # (measured: 4.3 MB); etcdctl lifts it the same way.
    "grpc.max_receive_message_length": -1,
}

# etcd refuses a transaction of more operations than --max-txn-ops (default 128).
TXN_OPS = 100

EtcdError = aetcd.exceptions.ClientError
RevisionCompacted = aetcd.exceptions.RevisionCompactedError


def is_lease_not_found(error: BaseException) -> bool:
    return "lease not found" in str(error)


def is_refused_for_good(error: BaseException) -> bool:
    """etcd (or gRPC) refuses the request itself: sending it again cannot help.

    etcd answers INVALID_ARGUMENT ("request is too large", …); gRPC refuses a
    message over its size limits before it leaves (RESOURCE_EXHAUSTED).
    """
    text = str(error)
    return isinstance(error, aetcd.exceptions.InvalidArgumentError) or (
        "too large" in text or "larger than max" in text
    )


def is_permission_denied(error: BaseException) -> bool:
    """etcd's access control refused the request (the user's roles do not allow it)."""
    cause = error.__cause__
    if isinstance(cause, aetcd.rpc.AioRpcError):
        return bool(cause.code() == grpc.StatusCode.PERMISSION_DENIED)
    return "permission denied" in str(error)


class AuthenticationRefused(EtcdError):  # type: ignore[misc,valid-type]
    """etcd refused the user name or password: retrying with the same ones cannot help."""


# etcd's answers that mean "no token needed / token missing" (etcd 3.4 has no AuthStatus).
_AUTH_NOT_ENABLED = "authentication is not enabled"
_USER_EMPTY = "user name is empty"
_INVALID_TOKEN = "invalid auth token"


def grpc_target(endpoints: list[tuple[str, int]]) -> tuple[str, int]:
    """(host, port) for aetcd, which joins them as ``host:port``.

    One endpoint is passed through (a DNS name works; an IPv6 literal gets its
    brackets: ``[::1]:2379``). Several become gRPC's ``ipv4:a:p,b:p`` or
    ``ipv6:[a]:p,[b]:p`` target, which needs IP literals of one family: names
    are resolved once, here, to IPv4 (settings refuse a mix of families).
    """
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return (f"[{host}]" if is_ipv6(host) else host), port
    if all(is_ipv6(host) for host, _ in endpoints):
        family, addresses = "ipv6", [f"[{host}]:{port}" for host, port in endpoints]
    else:
        family, addresses = "ipv4", [f"{_resolve(host)}:{port}" for host, port in endpoints]
    head, _, last_port = ",".join(addresses).rpartition(":")
    return f"{family}:{head}", int(last_port)


def _resolve(host: str) -> str:
    try:
        socket.inet_aton(host)
        return host
    except OSError:
        return socket.gethostbyname(host)


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    lease: int
    mod_revision: int
    # When the key was created; kept by every later put to it. No client can
    # set or reset it: what decides between instances (port ownership).
    create_revision: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A PUT (value set) or a DELETE (value None) at ``revision``."""

    key: bytes
    value: bytes | None
    revision: int
    create_revision: int = 0  # of the key (0 for a delete)
    lease: int = 0  # the key's lease (0 for a delete, or no lease)


# Called with each event of one watched key, or once with the error that ended
# the watch: RevisionCompacted (this key only) or the stream's end (every watch).
KeyCallback = Callable[[WatchEvent | Exception], None]


def _as_etcd_error(error: BaseException) -> Exception:
    """What aetcd's own calls would raise for ``error`` (its watcher hands them out raw)."""
    try:
        aetcd.exceptions._handle_exception(error)
    except Exception as converted:
        return converted
    return RuntimeError(str(error))  # pragma: no cover (_handle_exception always raises)


def _watch_event(event: Any) -> WatchEvent:
    deleted = event.kind == aetcd.rtypes.EventKind.DELETE
    return WatchEvent(
        key=event.kv.key,
        value=None if deleted else event.kv.value,
        revision=event.kv.mod_revision,
        create_revision=0 if deleted else event.kv.create_revision,
        lease=0 if deleted else event.kv.lease,
    )


class Etcd:
    """Thin async face over aetcd; every failure surfaces as :data:`EtcdError`."""

    def __init__(self, settings: CommonSettings) -> None:
        host, port = grpc_target(settings.endpoints)
        self.target = f"{host}:{port}"
        self.timeout = settings.etcd_timeout
        options = dict(GRPC_OPTIONS)
        if settings.etcd_server_name:
            options["grpc.ssl_target_name_override"] = settings.etcd_server_name
        self.client = _Client(
            _channel_credentials(settings) if settings.etcd_tls else None,
            host=host,
            port=port,
            # No credentials here: aetcd would authenticate inside connect(),
            # which then fails while etcd is down; _call authenticates lazily.
            timeout=None,  # per call, below: the watch stream must not time out
            options=options,
        )
        self.request_count = 0  # every RPC this process made (for benchmarks)
        self.username, self.password = settings.etcd_username, settings.etcd_password
        self._auth_lock = asyncio.Lock()
        # Credentials given, but etcd has authentication off: calls go without a
        # token until etcd asks for one (someone enabled authentication).
        self.auth_off = False

    async def __aenter__(self) -> Etcd:
        await self.client.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self, within: float = 0.5) -> None:
        """Close the channel; never longer than ``within`` (a stopping agent must not hang).

        aetcd's close first shuts its watcher down, which queues a request for
        the watch stream: with etcd frozen, nothing reads that queue.
        """
        try:
            async with asyncio.timeout(within):
                await self.client.close()
        except Exception:  # closing a broken channel must not mask the real error
            log.debug("etcd close failed", exc_info=True)
            channel = self.client.channel
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()  # cancels every call and stream at once

    async def _call(self, call: Callable[[], Awaitable[Any]], deadline: float | None = None) -> Any:
        """``call()`` within ``deadline``; once more after renewing a rejected auth token."""
        timeout = deadline or self.timeout
        if self.username is not None and self.client.metadata is None and not self.auth_off:
            await self._authenticate(None, timeout)
        token = self.client.metadata
        try:
            return await self._within(call, timeout)
        except (aetcd.exceptions.UnauthenticatedError, aetcd.exceptions.InvalidArgumentError) as e:
            token_wanted = isinstance(e, aetcd.exceptions.UnauthenticatedError) or (
                _USER_EMPTY in str(e)
            )
            if self.username is None or not token_wanted:
                raise
        self.auth_off = False
        await self._authenticate(token, timeout)
        return await self._within(call, timeout)

    async def _within(self, call: Callable[[], Awaitable[Any]], seconds: float) -> Any:
        self.request_count += 1
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the
            # result and drops a cancel that arrives as the call completes, so a
            # stopping agent could hang on a task that never saw its cancel.
            async with asyncio.timeout(seconds):
                return await call()
        except TimeoutError:
            raise aetcd.exceptions.ConnectionTimeoutError(
                f"etcd did not answer within {seconds}s"
            ) from None

    async def _authenticate(self, rejected: object, within: float) -> None:
        """A new auth token. etcd forgets tokens when it restarts and after
        ``--auth-token-ttl`` (300 s) unused; aetcd only authenticates on connect."""
        async with self._auth_lock:
            if self.client.metadata is not rejected:
                return  # another call renewed it meanwhile
            request = aetcd.rpc.AuthenticateRequest(name=self.username, password=self.password)
            try:
                async with asyncio.timeout(within):
                    await self.client.connect()  # no-op once connected (aetcd connects lazily)
                    reply = await aetcd.rpc.AuthStub(self.client.channel).Authenticate(request)
            except aetcd.rpc.AioRpcError as error:
                details = error.details() or ""
                if _AUTH_NOT_ENABLED in details:
                    self.auth_off = True
                    log.warning(
                        "etcd has authentication off: the etcd user is not used, "
                        "and etcd's access control keeps no environment apart",
                        user=self.username,
                    )
                    return
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    reason = details.removeprefix("etcdserver: ")
                    raise AuthenticationRefused(
                        f"etcd refused user {self.username!r}: {reason}"
                    ) from None
                raise EtcdError(f"etcd authentication failed: {details}") from None
            except TimeoutError:
                raise EtcdError(f"etcd authentication: no answer within {within}s") from None
            self.client.metadata = (("token", reply.token),)
            # Unary calls read client.metadata; aetcd's watcher keeps its own copy
            # for the watch stream it opens next (tests/integration/test_etcd_layer.py).
            if self.client._watcher is not None:
                self.client._watcher._metadata = self.client.metadata
            log.info("etcd authenticated", user=self.username, renewed=rejected is not None)

    async def auth(self, method: str, request: Any) -> Any:
        """One call of etcd's Auth service (users, roles, permissions), which aetcd
        does not wrap: its generated stub, with this client's token and deadline."""

        async def call() -> Any:
            await self.client.connect()
            stub = getattr(aetcd.rpc.AuthStub(self.client.channel), method)
            try:
                return await stub(request, metadata=self.client.metadata)
            except aetcd.rpc.AioRpcError as error:
                raise _as_etcd_error(error) from error

        return await self._call(call)

    async def auth_enabled(self) -> bool:
        """Whether etcd enforces authentication.

        etcd 3.4 has no AuthStatus call: there, authenticating a user that
        cannot exist answers "not enabled" or "authentication failed". (A
        token-less call would not do: with client certificates, etcd takes the
        certificate's name as the user.)
        """

        async def call() -> bool:
            await self.client.connect()
            stub = aetcd.rpc.AuthStub(self.client.channel)
            try:
                reply = await stub.Status(aetcd.rpc.AuthStatusRequest())
                return bool(reply.enabled)
            except (aetcd.rpc.AioRpcError, AttributeError) as error:
                unknown = isinstance(error, AttributeError) or (
                    error.code() == grpc.StatusCode.UNIMPLEMENTED
                )
                if not unknown:
                    raise _as_etcd_error(error) from error
            try:
                await stub.Authenticate(aetcd.rpc.AuthenticateRequest(name="", password=""))
            except aetcd.rpc.AioRpcError as error:
                if _AUTH_NOT_ENABLED in (error.details() or ""):
                    return False
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    return True  # "authentication failed, invalid user ID or password"
                raise _as_etcd_error(error) from error
            return True

        return bool(await self._within(call, self.timeout))

    async def may_read(self, key: str) -> bool:
        """Whether this user may read ``key`` (a one-key range: nothing else is read)."""
        try:
            await self._call(lambda: self.client.get(key.encode()))
        except EtcdError as error:
            if is_permission_denied(error):
                return False
            raise
        return True

    async def may_write(self, key: str) -> bool:
        """Whether this user may write ``key``, proven without writing it.

        A transaction whose condition never holds (a version below 0) with the
        put in its success branch: etcd checks the rights of every branch
        before it evaluates the condition, so it answers "permission denied"
        or "condition false", and the key is never touched. (The condition
        reads the key: a write-only grant answers False. Every role that
        pilotfish env creates reads wherever it writes.)
        """
        ops = self.client.transactions
        raw = key.encode()
        try:
            succeeded, _ = await self._call(
                lambda: self.client.transaction(
                    compare=[ops.version(raw) < 0], success=[ops.put(raw, b"")], failure=[]
                )
            )
        except EtcdError as error:
            if is_permission_denied(error):
                return False
            raise
        if succeeded:  # cannot happen; if it did, the probe key was written: take it back
            await self.delete(key)
        return True

    @property
    def write_timeout(self) -> float:
        # A put takes milliseconds; one sent to a leader that just died must be
        # retried after the election (1-1.5 s measured), not after the full
        # timeout (measured: a container started during an election was
        # registered 5.3 s later with 5 s here). Writes are idempotent.
        return min(self.timeout, 1.5)

    async def get_prefix(self, prefix: str, keys_only: bool = False) -> tuple[int, list[KeyValue]]:
        """All keys under ``prefix`` and the store revision they were read at
        (``keys_only``: every value empty, a fraction of the bytes)."""
        result = await self._call(
            lambda: self.client.get_prefix(prefix.encode(), keys_only=keys_only)
        )
        items = [
            KeyValue(kv.key, kv.value, kv.lease, kv.mod_revision, kv.create_revision)
            for kv in result
        ]
        return result.header.revision, items

    async def get_prefixes(self, prefixes: list[str]) -> tuple[int, list[KeyValue]]:
        """All keys under each of ``prefixes``, read at one revision.

        The first :data:`TXN_OPS` ranges are read in one transaction; any
        more at that transaction's revision (compacted meanwhile:
        :data:`RevisionCompacted`, as for a watch).
        """
        ranges = [(p.encode(), aetcd.utils.prefix_range_end(p.encode())) for p in prefixes]
        return await self._read_ranges(ranges)

    async def get_keys(self, keys: list[str]) -> tuple[int, list[KeyValue]]:
        """The keys of ``keys`` that exist, read at one revision (as :meth:`get_prefixes`)."""
        return await self._read_ranges([(key.encode(), b"") for key in keys])

    async def _read_ranges(self, ranges: list[tuple[bytes, bytes]]) -> tuple[int, list[KeyValue]]:
        def request(key: bytes, end: bytes, revision: int = 0) -> Any:
            return aetcd.rpc.RangeRequest(key=key, range_end=end, revision=revision)

        first = aetcd.rpc.TxnRequest(
            success=[aetcd.rpc.RequestOp(request_range=request(*r)) for r in ranges[:TXN_OPS]]
        )
        reply = await self._call(lambda: self._kv("Txn", first))
        revision = int(reply.header.revision)
        kvs = [kv for response in reply.responses for kv in response.response_range.kvs]
        for key, end in ranges[TXN_OPS:]:
            kvs.extend((await self._range(request(key, end, revision))).kvs)
        items = [KeyValue(kv.key, kv.value, kv.lease, kv.mod_revision, kv.create_revision)
                 for kv in kvs]  # fmt: skip
        return revision, items

    async def _range(self, request: Any) -> Any:
        return await self._call(lambda: self._kv("Range", request))

    async def _kv(self, method: str, request: Any) -> Any:
        """A raw call of etcd's KV service, its errors turned into what aetcd's own calls raise."""
        await self.client.connect()  # aetcd connects lazily: kvstub exists from here on
        try:
            return await getattr(self.client.kvstub, method)(request, metadata=self.client.metadata)
        except Exception as error:
            raise _as_etcd_error(error) from None

    async def lease_keys(self, lease_id: int) -> list[str]:
        """The keys attached to a lease (none if it is gone)."""
        reply = await self._call(lambda: self.client.get_lease_info(lease_id, keys=True))
        return [key.decode(errors="replace") for key in reply.keys]

    async def revision(self) -> int:
        """etcd's current store revision (the member's status: needs no right on any key)."""

        async def status() -> Any:
            await self.client.connect()
            try:
                return await self.client.maintenancestub.Status(
                    aetcd.rpc.StatusRequest(), metadata=self.client.metadata
                )
            except aetcd.rpc.AioRpcError as error:
                raise _as_etcd_error(error) from error

        return int((await self._call(status)).header.revision)

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        result = await self._call(
            lambda: self.client.put(key.encode(), value, lease=lease), self.write_timeout
        )
        return int(result.header.revision)

    async def put_if(
        self, key: str, value: bytes, *, mod_revision: int, lease: int | None = None
    ) -> tuple[bool, KeyValue | None]:
        """Put ``key`` only if its mod_revision is ``mod_revision`` (0: only if absent).

        One transaction: (True, None) when put; otherwise (False, what the key
        holds now, or None if it is gone meanwhile).
        """
        ops = self.client.transactions
        raw = key.encode()
        succeeded, responses = await self._call(
            lambda: self.client.transaction(
                compare=[ops.mod(raw) == mod_revision],
                success=[ops.put(raw, value, lease=lease)],
                failure=[ops.get(raw)],
            ),
            self.write_timeout,
        )
        if succeeded:
            return True, None
        found = responses[0] if responses else []
        if not found:
            return False, None
        current, meta = found[0]
        return False, KeyValue(meta.key, current, meta.lease, meta.mod_revision)

    async def delete(self, key: str) -> bool:
        result = await self._call(lambda: self.client.delete(key.encode()), self.write_timeout)
        return bool(result and result.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; how many were deleted."""
        result = await self._call(lambda: self.client.delete_prefix(prefix.encode()))
        return int(result.deleted) if result else 0

    async def grant(self, ttl: int) -> int:
        lease = await self._call(lambda: self.client.lease(ttl), self.write_timeout)
        return int(lease.id)

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive; the remaining TTL, 0 if the lease is gone."""
        reply = await self._call(lambda: self.client.refresh_lease(lease_id), self.write_timeout)
        return int(reply.TTL) if reply is not None else 0

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on a lease (LeaseTimeToLive, without its keys); -1 if it is gone."""
        reply = await self._call(lambda: self.client.get_lease_info(lease_id, keys=False))
        return int(reply.TTL)

    async def revoke(self, lease_id: int) -> None:
        await self._call(lambda: self.client.revoke_lease(lease_id))

    async def watch_prefix(
        self,
        prefix: str,
        start_revision: int,
        on_created: Callable[[], None] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Events under ``prefix`` from ``start_revision`` on.

        Raises :data:`RevisionCompacted` if that revision is gone, and
        :data:`EtcdError` when the stream breaks: callers resume from the last
        revision they saw + 1. ``on_created`` is called once etcd has accepted
        the watch (before any event), so callers can report it as healthy.
        """
        watch = await self._create_watch(
            lambda: self.client.watch_prefix(prefix.encode(), start_revision=start_revision)
        )
        if on_created is not None:
            on_created()
        try:
            async for event in watch:
                yield _watch_event(event)
        finally:
            # The stream may already be dead; cancelling is best effort.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await watch.cancel()

    async def watch_prefixes(
        self,
        starts: dict[str, int],
        on_created: Callable[[], None] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Events under each prefix of ``starts`` (prefix -> its start revision), merged.

        One etcd watch per prefix, all on the client's one watch stream; each
        prefix's events come in revision order. Errors as :meth:`watch_prefix`
        (the first watch that fails ends them all).
        """
        if len(starts) == 1:
            ((prefix, start),) = starts.items()
            async for event in self.watch_prefix(prefix, start, on_created):
                yield event
            return
        queue: asyncio.Queue[WatchEvent | BaseException | None] = asyncio.Queue()
        created = 0

        def one_created() -> None:
            nonlocal created
            created += 1
            if created == len(starts) and on_created is not None:
                on_created()

        async def pump(prefix: str, start: int) -> None:
            try:
                async for event in self.watch_prefix(prefix, start, one_created):
                    queue.put_nowait(event)
                queue.put_nowait(None)  # the stream ended quietly
            except asyncio.CancelledError:
                raise
            except BaseException as error:  # handed to the reader, which raises it
                queue.put_nowait(error)

        pumps = [asyncio.create_task(pump(p, s), name=f"watch {p}") for p, s in starts.items()]
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def watch_key(self, key: str, start_revision: int, on_event: KeyCallback) -> int:
        """Watch one key from ``start_revision`` on; the watch id, for :meth:`cancel_watch`.

        All such watches share the client's one watch stream. ``on_event`` runs
        in the stream's task: it must not block. It receives each event, or the
        error that ended the watch: :data:`RevisionCompacted` (this key's start
        revision is gone) or an :data:`EtcdError` when the stream broke, which
        ends every watch on it. A watch that etcd does not confirm within the
        call deadline raises :data:`EtcdError`, and the stream is reset, so that
        a late confirmation cannot be taken for the next watch's.
        """

        async def deliver(item: Any) -> None:
            if item is None:
                return  # our own close (aetcd's watcher shut down): nothing to report
            if isinstance(item, BaseException):
                on_event(_as_etcd_error(item))
            else:
                on_event(_watch_event(item))

        async def create() -> int:
            await self.client.connect()
            try:
                callback = await self.client._watcher.add_callback(
                    key.encode(), deliver, start_revision=start_revision
                )
            except aetcd.exceptions.ClientError:
                raise
            except Exception as error:  # the raw gRPC error of a broken stream
                raise _as_etcd_error(error) from None
            return int(callback.watch_id)

        try:
            return int(await self._create_watch(create))
        except aetcd.exceptions.ConnectionTimeoutError as error:
            await self._reset_watch_stream(error)
            raise

    async def cancel_watch(self, watch_id: int) -> None:
        """Stop one watch of :meth:`watch_key` (nothing if the stream is gone already)."""
        watcher = self.client._watcher
        if watcher is not None:
            await self._call(lambda: watcher.cancel(watch_id))

    async def _create_watch(self, create: Callable[[], Awaitable[Any]]) -> Any:
        """``create()`` a watch; once more on a new stream if etcd refused a stale token.

        etcd checks a watch's rights with the token its stream was opened with
        and cancels the watch ("permission denied", or "invalid auth token" in
        the cancel reason) when it no longer knows that token (it restarted, or
        the token timed out before the stream was reopened); the unary calls'
        renewal never sees it. So: a new token, a new stream, one more try; a
        second refusal is a real one.
        """
        try:
            return await self._call(create)
        except EtcdError as error:
            stale = is_permission_denied(error) or _INVALID_TOKEN in str(error)
            if self.username is None or self.auth_off or not stale:
                raise
            refused = error
        await self._authenticate(self.client.metadata, self.timeout)
        await self._reset_watch_stream(refused)
        return await self._call(create)

    async def _reset_watch_stream(self, error: Exception) -> None:
        watcher = self.client._watcher
        if watcher is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await watcher._terminate_stream(error)


def _channel_credentials(settings: CommonSettings) -> grpc.ChannelCredentials:
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.etcd_cacert),  # None: the system's CAs
        private_key=read(settings.etcd_key),
        certificate_chain=read(settings.etcd_cert),
    )


class _Watcher(aetcd.watcher.Watcher):  # type: ignore[misc]
    """aetcd's watcher, told when etcd cancels a watch.

    aetcd ignores a response's ``canceled`` flag: a watch etcd refused
    ("permission denied") or ended would look created and stay silent forever.
    Compaction keeps aetcd's own handling.
    """

    async def _handle_response(self, response: Any) -> None:
        if not response.canceled or response.compact_revision != 0:
            await super()._handle_response(response)
            return
        error = aetcd.exceptions.ClientError(response.cancel_reason or "watch canceled by etcd")
        async with self._lock:
            if response.created and self._new_callback is not None:
                self._new_callback.error = error  # add_callback raises it
                self._new_callback_ready.notify_all()
                return
            callback = self._callbacks.pop(response.watch_id, None)
        if callback is not None:
            await self._process_callback(callback, error)


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client, over TLS when given channel credentials.

    aetcd.Client.connect() opens plain-text channels only. With credentials,
    connect() is aetcd 1.x's with a secure channel and without its
    authentication (Etcd authenticates lazily); tests/integration/test_etcd_layer.py
    runs it against an etcd that requires client certificates.
    """

    def __init__(self, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._channel_credentials = credentials

    async def connect(self) -> None:
        if self._channel_credentials is None:
            await super().connect()
            if not isinstance(getattr(self, "_watcher", None), _Watcher):  # no await since made
                stub = aetcd.rpc.WatchStub(getattr(self, "channel"))  # noqa: B009 (untyped)
                self._watcher = _Watcher(stub, timeout=self._timeout, metadata=self.metadata)
            return
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = aetcd.rpc.secure_channel(
            target, self._channel_credentials, options=self._options.items()
        )
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = _Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()
