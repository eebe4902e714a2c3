"""Issue 9, finding 10: every reconnect loop survives any outage length."""

from __future__ import annotations

import math

from agents.common.backoff import Backoff


def test_ten_thousand_attempts_never_raise_and_stay_bounded() -> None:
    for initial, maximum, factor in ((0.1, 5.0, 2.0), (0.1, 2.0, 2.0), (0.05, 2.0, 2.0),
                                     (1.0, 30.0, 10.0)):  # fmt: skip
        backoff = Backoff(initial=initial, maximum=maximum, factor=factor)
        delays = [backoff.next_delay() for _ in range(10_000)]
        assert all(math.isfinite(d) and 0 <= d <= maximum for d in delays), (initial, factor)
        # Still backing off near the maximum after a very long outage.
        assert min(delays[-100:]) >= maximum / 2
        backoff.reset()
        assert backoff.next_delay() <= initial
