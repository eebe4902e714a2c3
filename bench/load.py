"""Open-loop HTTP load in its own process, one new connection per request, every failure kept.

    .venv/bin/python bench/load.py --port 8080 --rate 200 --duration 60 [--failures-out F.json]

Sends ``rate * duration`` GETs on schedule, each on a fresh connection with
``Connection: close``; never more, and none later than ``duration + 30`` s (a
client that far behind counts the rest as its own failures). A request
succeeds on a 200 read to the end within ``--budget`` s (2 s) of being sent;
anything else fails, and for every failure the record says when it was due,
sent and given up, and how it failed.

Who failed it: the client can starve (a busy host, a CPU hog beside it), and
a starved client times out requests the proxy answered in time. So the
kernel, not the client's event loop, says when each byte of the answer
arrived: ``SO_TIMESTAMPNS`` on the socket stamps every ``recvmsg`` with the
time the kernel received the data, whenever the client gets round to reading
it. The rule (``classify``):

- ``client``: the answer's status line (or its whole 200 answer) was in the
  kernel within ``budget`` s of the request being written, but the client
  had not read it when its timer fired; or the connection was established on
  the first SYN (no retransmission, ``TCP_INFO``) but the client never got
  round to writing the request in time; or the client ran out of its own
  resources (``EADDRNOTAVAIL``, ``EMFILE``, ``ENFILE``, ``ENOBUFS``).
- ``proxy``: everything else: refused, reset, closed without an answer,
  not 200, a SYN not answered in time (the proxy not accepting), or no
  answer in the kernel within the budget.

A status line in time does not prove the whole answer was (a body read to
the close of the connection carries no length): bench/e2e.py settles each
request that timed out waiting for its answer with HAProxy's own log line
for it (``split_by_haproxy``), which also tells a slow server from a slow
proxy.

It also reports its own lag: how late each request was sent against its
schedule, and the stalls of its event loop (a 5 ms ticker's overshoot). A
client that falls behind never sends faster than ``rate`` to catch up: its
own burst would be a load nobody asked for.

Prints one JSON object; ``--failures-out`` gets every failure record.
Standard library only, so it starts fast and measures nothing of the agents.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import faulthandler
import json
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

TICK_S = 0.005
SEND_GRACE_S = 30.0  # a starved client may fall this far behind, then stops sending
PCTS = {"p50": 50, "p99": 99, "max": 100}
CLIENT_ERRNOS = {errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Linux's SO_TIMESTAMPNS (SO_TIMESTAMPNS_OLD, 64-bit timespec); Python does not name it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_CMSG_SPACE = socket.CMSG_SPACE(16)
# struct tcp_info: u8 state, ca_state, retransmits, probes, backoff, options, wscale x2,
# then u32 fields; tcpi_total_retrans is the 26th u32 (offset 8 + 25 * 4).
_TOTAL_RETRANS_OFFSET = 8 + 25 * 4


@dataclass
class Attempt:
    due: float  # wall clock (time.time()) the schedule wanted it sent
    started: float = 0.0  # connect() issued
    connected: float = 0.0
    sent: float = 0.0  # request written (just before)
    ended: float = 0.0  # answer complete, error seen or given up
    data: bytearray = field(default_factory=bytearray)
    first_byte_kernel: float = 0.0  # SO_TIMESTAMPNS of the first chunk
    status_kernel: float = 0.0  # of the chunk that completed the status line
    error: str = ""
    syn_retransmits: int | None = None
    port: int = 0  # the client's source port: finds the request in HAProxy's log


@dataclass
class Failure:
    due: float  # seconds from the start of the run
    sent: float | None
    failed: float
    how: str  # timeout-connect, timeout-answer, refused, reset, empty, status 503, ...
    cls: str  # proxy or client
    why: str  # the evidence the class rests on
    answered_after_ms: float | None  # kernel time of the status line - sent, if ever seen
    port: int  # the client's source port (0: never bound)


def _status_line_done(data: bytes | bytearray) -> bool:
    return b"\r\n" in data[:64] or len(data) >= 64


def _status(data: bytes | bytearray) -> int | None:
    parts = bytes(data[:32]).split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def _recv_into(sock: socket.socket, attempt: Attempt) -> bool:
    """Read what the kernel holds (non-blocking); True at end of stream."""
    while True:
        try:
            chunk, ancdata, _flags, _addr = sock.recvmsg(65536, _CMSG_SPACE)
        except BlockingIOError:
            return False
        stamp = 0.0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanos = struct.unpack("qq", payload[:16])
                stamp = seconds + nanos / 1e9
        if not chunk:
            return True
        stamp = stamp or time.time()
        if not attempt.data:
            attempt.first_byte_kernel = stamp
        had_status = _status_line_done(attempt.data)
        attempt.data += chunk
        if not had_status and _status_line_done(attempt.data):
            attempt.status_kernel = stamp


def _syn_retransmits(sock: socket.socket) -> int | None:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        return int(struct.unpack_from("I", info, _TOTAL_RETRANS_OFFSET)[0])
    except (OSError, struct.error):
        return None


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def one_request(host: str, port: int, budget: float, attempt: Attempt) -> None:
    loop = asyncio.get_running_loop()
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    done: asyncio.Future[None] = loop.create_future()
    reading = False
    try:
        attempt.started = time.time()
        deadline = loop.time() + budget
        try:
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, (host, port))
        except TimeoutError:
            attempt.error = "timeout-connect"
            if _connected(sock):
                attempt.syn_retransmits = _syn_retransmits(sock)
            return
        attempt.connected = time.time()
        attempt.port = sock.getsockname()[1]
        attempt.sent = time.time()
        # Budget from the moment the request is written: the proxy's share.
        deadline = loop.time() + budget
        await loop.sock_sendall(sock, request)

        def readable() -> None:
            try:
                if _recv_into(sock, attempt) and not done.done():
                    done.set_result(None)
            except OSError as error:
                if not done.done():
                    done.set_exception(error)

        loop.add_reader(sock.fileno(), readable)
        reading = True
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(done)
        except TimeoutError:
            attempt.error = "timeout-answer"
            # What the kernel already holds, with its arrival time: the loop may
            # have been too late to run ``readable`` before its timer fired.
            with contextlib.suppress(OSError):
                _recv_into(sock, attempt)
    except OSError as error:
        attempt.error = _errname(error)
    finally:
        attempt.ended = time.time()
        if reading:
            loop.remove_reader(sock.fileno())
        if not done.done():
            done.cancel()
        elif not done.cancelled() and done.exception() is not None and not attempt.error:
            attempt.error = _errname(done.exception())  # type: ignore[arg-type]
        sock.close()


def _errname(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError):
        return "reset"
    if isinstance(error, OSError) and error.errno is not None:
        return errno.errorcode.get(error.errno, type(error).__name__)
    return type(error).__name__


def outcome(attempt: Attempt) -> str:
    """'' if the request succeeded, else how it failed."""
    if attempt.error:
        return attempt.error
    if not attempt.data:
        return "empty"
    status = _status(attempt.data)
    if status is None:
        return "garbled"
    return "" if status == 200 else f"status {status}"


def classify(attempt: Attempt, how: str, budget: float) -> tuple[str, str]:
    """(class, evidence) of one failure: see the module docstring."""
    if how in {errno.errorcode[e] for e in CLIENT_ERRNOS}:
        return "client", f"client out of resources ({how})"
    if how == "never-sent":
        return "client", "the client fell more than the budget behind its schedule"
    if how == "timeout-connect":
        if attempt.syn_retransmits == 0:
            return "client", "connected on the first SYN; the client never wrote in time"
        if attempt.syn_retransmits is None:
            return "proxy", "no connection within the budget"
        return "proxy", f"connection needed {attempt.syn_retransmits} SYN retransmissions"
    if how == "timeout-answer":
        if attempt.status_kernel and attempt.status_kernel - attempt.sent <= budget:
            took = (attempt.status_kernel - attempt.sent) * 1000
            return "client", f"status line in the kernel {took:.0f} ms after sending, unread"
        if attempt.status_kernel:
            took = (attempt.status_kernel - attempt.sent) * 1000
            return "proxy", f"status line only {took:.0f} ms after sending"
        return "proxy", "no answer in the kernel within the budget"
    return "proxy", f"the proxy's side: {how}"


async def ticker(stop: asyncio.Event, stalls: list[tuple[float, float]]) -> None:
    """Overshoot of a 5 ms sleep: how long the loop could not run on time."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(TICK_S)
        late = time.monotonic() - before - TICK_S
        if late > 0.002:
            stalls.append((time.time(), late))


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))
    return round(ordered[int(index)], 1)


async def open_loop(
    host: str, port: int, rate: float, duration: float, budget: float
) -> tuple[dict[str, Any], list[Failure]]:
    count = int(rate * duration)
    stop = asyncio.Event()
    stalls: list[tuple[float, float]] = []
    tick = asyncio.create_task(ticker(stop, stalls))
    start_wall, start = time.time(), time.monotonic()
    attempts: list[Attempt] = []
    tasks = []
    sent_at = start - 1 / rate
    for i in range(count):
        # On schedule, but never faster than ``rate``: a client that was starved
        # does not catch up in a burst (a burst it made would fail requests that
        # the proxy would have served at the rate asked for). The lag is reported.
        at = max(start + i / rate, sent_at + 1 / rate)
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        sent_at = time.monotonic()
        attempt = Attempt(due=start_wall + i / rate)
        attempts.append(attempt)
        if time.monotonic() - start > duration + SEND_GRACE_S:
            attempt.error = "never-sent"  # bounded in time: a starved client stops here
            continue
        tasks.append(asyncio.create_task(one_request(host, port, budget, attempt)))
    sending_took = time.monotonic() - start
    print(f"load: sent in {sending_took:.1f} s", file=sys.stderr, flush=True)
    # Every request ends by itself within 2 budgets (connect, then answer); bounded anyway.
    await asyncio.wait(tasks, timeout=2 * budget + 5)
    for task in tasks:
        task.cancel()
    for task in tasks:  # a bug in the client must not pass for a failed request
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError("load generator bug") from task.exception()
    stop.set()
    await tick
    failures = []
    for attempt in attempts:
        how = outcome(attempt)
        if not how:
            continue
        cls, why = classify(attempt, how, budget)
        answered = (attempt.status_kernel - attempt.sent) * 1000 if attempt.status_kernel else None
        failures.append(
            Failure(
                due=round(attempt.due - start_wall, 3),
                sent=round(attempt.sent - start_wall, 3) if attempt.sent else None,
                failed=round(attempt.ended - start_wall, 3),
                how=how,
                cls=cls,
                why=why,
                answered_after_ms=None if answered is None else round(answered, 1),
                port=attempt.port,
            )
        )
    send_lag = [(a.started - a.due) * 1000 for a in attempts if a.started]
    served = {bytes(a.data).rpartition(b"\r\n\r\n")[2].strip() for a in attempts if not outcome(a)}
    stall_ms = [late * 1000 for _, late in stalls]
    # Answered: request written → status line in the kernel (the proxy's time, not the client's).
    answered = [(a.status_kernel - a.sent) * 1000 for a in attempts if not outcome(a)]
    summary = {
        "start_wall": round(start_wall, 3),  # failure times are seconds after this
        "total": count,
        "failed": len(failures),
        "proxy": sum(f.cls == "proxy" for f in failures),
        "client": sum(f.cls == "client" for f in failures),
        "why": dict(collections.Counter(f.how for f in failures)),
        "why_proxy": dict(collections.Counter(f.how for f in failures if f.cls == "proxy")),
        "backends": len(served),
        "answer_ms": {p: _pct(answered, q) for p, q in PCTS.items()},
        "late_s": round(sending_took - duration, 2),
        "lag": {
            "send_ms": {p: _pct(send_lag, q) for p, q in PCTS.items()},
            "stall_ms": {p: _pct(stall_ms, q) for p, q in PCTS.items()},
            "stalls": len(stalls),
            "stalled_s": round(sum(stall_ms) / 1000, 2),
        },
    }
    return summary, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds a request may take")
    parser.add_argument("--failures-out", help="write every failure record here (JSON)")
    args = parser.parse_args()
    if not args.host.startswith("127."):
        parser.error("load goes to 127.0.0.0/8 only")
    hung_after = args.duration + SEND_GRACE_S + 4 * args.budget + 20
    faulthandler.dump_traceback_later(hung_after, exit=True)
    summary, failures = asyncio.run(
        open_loop(args.host, args.port, args.rate, args.duration, args.budget)
    )
    if args.failures_out:
        with open(args.failures_out, "w") as out:
            json.dump([asdict(f) for f in failures], out)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
