"""bench/load.py: whom a failed request is counted against; a short run against a server."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

LOAD_PY = Path(__file__).resolve().parents[2] / "bench" / "load.py"


@pytest.fixture(scope="module")
def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load", LOAD_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def attempt(load: ModuleType, **fields: object) -> object:
    return load.Attempt(due=100.0, started=100.0, connected=100.001, sent=100.001, **fields)


def test_an_answer_in_the_kernel_within_the_budget_is_the_clients_failure(
    load: ModuleType,
) -> None:
    late_reader = attempt(load, status_kernel=101.5)
    assert load.classify(late_reader, "timeout-answer", 2.0)[0] == "client"


def test_no_answer_or_a_late_one_is_the_proxys(load: ModuleType) -> None:
    assert load.classify(attempt(load), "timeout-answer", 2.0)[0] == "proxy"
    too_late = attempt(load, status_kernel=102.5)
    assert load.classify(too_late, "timeout-answer", 2.0)[0] == "proxy"


@pytest.mark.parametrize("how", ["refused", "reset", "empty", "garbled", "status 503"])
def test_what_the_proxy_said_is_the_proxys(load: ModuleType, how: str) -> None:
    assert load.classify(attempt(load), how, 2.0)[0] == "proxy"


def test_connect_timeouts_split_on_syn_retransmissions(load: ModuleType) -> None:
    handshake_done = attempt(load, syn_retransmits=0)
    assert load.classify(handshake_done, "timeout-connect", 2.0)[0] == "client"
    unanswered = attempt(load, syn_retransmits=2)
    assert load.classify(unanswered, "timeout-connect", 2.0)[0] == "proxy"
    assert load.classify(attempt(load), "timeout-connect", 2.0)[0] == "proxy"


@pytest.mark.parametrize("how", ["EADDRNOTAVAIL", "EMFILE", "never-sent"])
def test_the_clients_own_limits_are_the_clients(load: ModuleType, how: str) -> None:
    assert load.classify(attempt(load), how, 2.0)[0] == "client"


async def test_a_short_run_counts_answers_and_refusals(load: ModuleType) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        summary, failures = await load.open_loop("127.0.0.1", port, 50.0, 0.2, 2.0)
    assert (summary["total"], summary["failed"], failures) == (10, 0, [])
    assert summary["answer_ms"]["max"] is not None  # kernel timestamps were read

    summary, failures = await load.open_loop("127.0.0.1", port, 50.0, 0.1, 2.0)
    assert summary["failed"] == summary["proxy"] == 5
    assert {f.how for f in failures} == {"refused"}
