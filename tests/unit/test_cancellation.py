"""A cancel that arrives just as a call completes must not be lost.

On Python 3.11, ``asyncio.wait_for`` returns the inner result and drops such a
cancel; a registrar being stopped then kept its lease keeper running and the
stop hung (seen once in CI). The agents bound calls with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio

import pytest

from agents.common.etcd import Etcd, EtcdError
from agents.common.settings import CommonSettings


async def test_etcd_call_keeps_a_cancel_that_races_the_answer() -> None:
    etcd = Etcd(CommonSettings(etcd_host="127.0.0.1:1"))  # never connected
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    call = asyncio.create_task(etcd._call(lambda: answer, deadline=5))
    await asyncio.sleep(0)  # the call is now waiting for the answer
    answer.set_result(7)  # the answer and the cancel land in the same loop turn
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_etcd_call_deadline_is_an_etcd_error() -> None:
    etcd = Etcd(CommonSettings(etcd_host="127.0.0.1:1"))
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(EtcdError, match=r"did not answer within 0\.01s"):
        await etcd._call(lambda: never, deadline=0.01)
