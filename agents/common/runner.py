"""Process-level supervision shared by both agents: event loop, signals, exit."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from agents.common.logging import get_logger

log = get_logger("pilotfish")


def install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the agents work on the default loop too
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; SIGTERM / SIGINT set ``stop`` for a graceful exit.

    A second signal cancels whatever is left, so an operator is never stuck.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if stop.is_set() and task is not None:
            task.cancel()
            return
        log.info("signal received, stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await main(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
