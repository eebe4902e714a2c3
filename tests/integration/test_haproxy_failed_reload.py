"""Issue 9, finding 9, against a real HAProxy master: after a reload that
fails (a listener that cannot bind), the master CLI still answers, the
failure is reported with HAProxy's reason at once, and the next reload works.

HAProxy 2.6 changes the master CLI's prompt after a failed reload
(``master[ReloadFailed]> `` instead of ``master> ``, measured with 2.6.12).
"""

from __future__ import annotations

import socket
import time

import pytest

from agents.discoverer.config import render_config
from agents.discoverer.haproxy import HaproxyError
from tests.integration.upstreams import (
    HttpUpstream,
    catalog,
    http_once,
    running_sink,
    server,
    service,
)
from tests.stack import free_port

pytestmark = pytest.mark.integration


async def test_master_answers_and_reloads_again_after_a_failed_reload() -> None:
    web = await HttpUpstream("w1").start()
    web_port, taken, later_port = free_port(), free_port(), free_port()
    base = service("web", web_port, server("w1", web.port))
    blocker = socket.socket()  # no SO_REUSEPORT: HAProxy cannot bind next to it
    blocker.bind(("127.0.0.1", taken))
    blocker.listen()
    try:
        async with running_sink(catalog(base)) as h:
            master = h.sink.master
            before = await master.show_proc()
            bad = catalog(base, service("blocked", taken, server("w1", web.port)))
            await master.write_config(render_config(bad, h.sink.options))  # -c does not bind
            began = time.monotonic()
            with pytest.raises(HaproxyError) as failure:
                await master.reload()
            took = time.monotonic() - began
            assert "bind" in str(failure.value) or "in use" in str(failure.value), failure.value
            assert took < 5.0, f"the failed reload took {took:.1f}s to be noticed"
            # The master still answers its CLI ...
            after = await master.show_proc()
            assert after.failed == before.failed + 1, (before, after)
            # ... and the next reload, without the bad listener, works.
            good = catalog(base, service("later", later_port, server("w1", web.port)))
            await master.write_config(render_config(good, h.sink.options))
            proc = await master.reload()
            assert proc.worker_pid not in (None, before.worker_pid)
            answer = await http_once(later_port)
            assert answer is not None and answer[1] == "w1", answer
    finally:
        blocker.close()
        await web.stop()
