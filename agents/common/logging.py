"""structlog set-up: JSON lines when not on a terminal, readable lines on one."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def describe(error: BaseException) -> str:
    """An error for a log line or /healthz: its text, or its type when it has none
    (str(TimeoutError()) is "")."""
    return str(error) or type(error).__name__


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class OnceEvery:
    """Log a repeating condition once, then at most every ``interval`` seconds.

    A peer that stays away must not fill the log with one line per retry.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def should_log(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is None or now - last >= self.interval:
            self._last[key] = now
            return True
        self.suppressed[key] = self.suppressed.get(key, 0) + 1
        return False

    def clear(self, key: str) -> int:
        """Forget ``key`` (the condition ended); return how many lines were held back."""
        self._last.pop(key, None)
        return self.suppressed.pop(key, 0)

    def active(self, key: str) -> bool:
        return key in self._last
