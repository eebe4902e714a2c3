"""Issue 9, finding 8: a cancelled runtime-API exchange must not leave HAProxy's
answers out of step with the commands (against a real HAProxy admin socket).

The connection of a cancelled exchange may still receive the answer to the
cancelled command; the client must close it, so the next ``execute`` reads
the answer to *its* command.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from agents.discoverer.haproxy import RuntimeClient
from tests.integration.upstreams import catalog, running_sink, server, service
from tests.stack import free_port

pytestmark = pytest.mark.integration

# Enough static servers that `show stat` answers several hundred kB (read in many chunks).
SERVERS = 3000


def is_show_info(answer: str) -> bool:
    return answer.startswith("Name: HAProxy") and "\nPid: " in answer


def is_show_stat(answer: str) -> bool:
    return answer.startswith("# pxname,")


async def _cancel_after(client: RuntimeClient, lines: list[str], how: str, value: float) -> str:
    """Start ``execute(lines)``, cancel it after ``value`` loop turns or seconds."""
    task = asyncio.create_task(client.execute(lines))
    if how == "turns":
        for _ in range(int(value)):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(value)
    task.cancel()
    outcome = "cancelled"
    try:
        await task
        outcome = "completed"  # too late to cancel: fine, the answers matched
    except asyncio.CancelledError:
        pass
    return outcome


async def _show_info_after(client: RuntimeClient, what: str) -> None:
    try:
        (answer,) = await client.execute(["show info"])
    except TimeoutError:
        raise AssertionError(
            f"after {what}, `show info` got no answer within {client.timeout}s: HAProxy "
            "2.6 keeps the CLI session of a connection closed while pipelined commands "
            "were pending, and its admin socket accepts no connection beyond 10 sessions "
            "(measured); closing mid-answer runs the socket out of sessions"
        ) from None
    assert is_show_info(answer), f"after {what}, `show info` got: {answer[:120]!r}"


async def test_cancelled_exchange_does_not_shift_the_next_answer() -> None:
    big = service("big", free_port(), *(server(f"s{i}", 1 + i) for i in range(SERVERS)), mode="tcp")
    async with running_sink(catalog(big)) as h:
        client = RuntimeClient(h.sink.admin.path, h.sink.admin.prompt)
        try:
            (info,) = await client.execute(["show info"])
            assert is_show_info(info), info[:200]
            (stat,) = await client.execute(["show stat"])
            assert is_show_stat(stat) and len(stat) > 200_000, len(stat)
            outcomes: list[str] = []
            # Cancelled at every early loop turn (before, at and after the write) ...
            cases: list[tuple[str, float]] = [("turns", n) for n in range(8)]
            # ... and while the big answer is being read.
            cases += [("seconds", s) for s in (0.0005, 0.001, 0.002, 0.004, 0.008)]
            for how, value in cases:
                outcome = await _cancel_after(client, ["show stat"], how, value)
                outcomes.append(outcome)
                await _show_info_after(client, f"cancelling `show stat` ({how}={value}, {outcome})")
            assert "cancelled" in outcomes, outcomes
        finally:
            await client.close()


async def test_cancelled_pipelined_reads_do_not_shift_or_block_the_next_answer() -> None:
    """The sink's own read of HAProxy's state (three commands pipelined), cancelled
    mid-answer again and again (a shutdown, a cancelled apply): every next command
    still gets its own answer, however many times it happens."""
    big = service("big", free_port(), *(server(f"s{i}", 1 + i) for i in range(SERVERS)), mode="tcp")
    reads = ["show stat", "show servers state", "show info"]
    async with running_sink(catalog(big)) as h:
        client = RuntimeClient(h.sink.admin.path, h.sink.admin.prompt, timeout=3.0)
        try:
            await _show_info_after(client, "connecting")
            outcomes: list[str] = []
            for n in range(15):
                delay = (0.0005, 0.001, 0.0015, 0.002, 0.003)[n % 5]
                outcome = await _cancel_after(client, reads, "seconds", delay)
                outcomes.append(outcome)
                await _show_info_after(
                    client, f"{n + 1} cancelled pipelined reads (last: {delay}s, {outcome})"
                )
            assert "cancelled" in outcomes, outcomes
        finally:
            await client.close()


async def test_timed_out_exchange_does_not_shift_the_next_answer() -> None:
    big = service("big", free_port(), *(server(f"s{i}", 1 + i) for i in range(SERVERS)), mode="tcp")
    async with running_sink(catalog(big)) as h:
        client = RuntimeClient(h.sink.admin.path, h.sink.admin.prompt, timeout=0.002)
        try:
            timeouts = 0
            for _ in range(10):
                client.timeout = 5.0
                (answer,) = await client.execute(["show info"])  # connected, in prompt mode
                assert is_show_info(answer), answer[:120]
                client.timeout = 0.002
                began = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await client.execute(["show stat"])
                    continue
                timeouts += 1
                assert time.monotonic() - began < 1.0
                client.timeout = 5.0
                (answer,) = await client.execute(["show info"])
                assert is_show_info(answer), f"after a timeout `show info` got {answer[:120]!r}"
            assert timeouts > 0, "show stat never timed out at 2 ms: make the state bigger"
        finally:
            await client.close()
