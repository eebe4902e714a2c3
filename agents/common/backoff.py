"""Exponential backoff with jitter, for every reconnect loop."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    def __init__(self, initial: float = 0.1, maximum: float = 5.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.attempt = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor**self.attempt)
        # Stop growing the exponent once the cap is reached: factor**1024 is
        # past a float's range, and an outage may last that many attempts.
        if base < self.maximum:
            self.attempt += 1
        # Full jitter keeps many agents from reconnecting to a recovering etcd in step.
        return base / 2 + random.uniform(0, base / 2)

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self.attempt = 0
