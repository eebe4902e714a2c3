"""The pure parts of the status key and the drain requests, and the publisher on a fake etcd."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from agents.common.drains import revisions_to_apply
from agents.common.etcd import EtcdError
from agents.common.schema import DiscovererStatus, Instance, drain_key, instance_key
from agents.common.settings import DiscovererSettings, DrainSettings
from agents.discoverer.haproxy.state import parse_all_sessions
from agents.discoverer.model import build_catalog
from agents.discoverer.status import (
    Applied,
    StatusPublisher,
    applied_state,
    build_status,
    default_discoverer_id,
    same_status,
)
from agents.registrar.drain_command import progress_of
from agents.registrar.drain_watch import DrainRequests, gone_drains

PREFIX = "/pf"
NOW = datetime(2026, 12, 2, tzinfo=UTC)


def inst(n: int, service: str = "web", state: str = "up") -> Instance:
    return Instance.model_validate(
        {
            "service": service,
            "host_id": "host-a",
            "address": "127.0.0.1",
            "port": 30000 + n,
            "private_port": 80,
            "container_id": f"{n:064x}",
            "state": state,
        }
    )


def keyed(*instances: Instance) -> dict[str, Instance]:
    return {instance_key(PREFIX, i): i for i in instances}


# -- what the status says ---------------------------------------------------------------


def test_applied_state_lists_routed_services_and_draining_servers() -> None:
    instances = keyed(inst(1), inst(2, state="draining"), inst(3, "db", state="draining"))
    catalog, _ = build_catalog(i for i in instances.values() if i.service == "web")
    applied = applied_state(7, instances, catalog, service_filter=())
    assert applied.revision == 7 and applied.services == ("web",)
    drained = inst(2, state="draining")
    assert applied.draining == {instance_key(PREFIX, drained): ("web", drained.server_name)}


def test_a_services_filter_is_reported_even_before_an_instance_exists() -> None:
    catalog, _ = build_catalog([inst(1)])
    assert applied_state(1, keyed(inst(1)), catalog, {"web", "api"}).services == ("api", "web")


def test_build_status_fills_sessions_and_unknown_counts_are_zero() -> None:
    key = instance_key(PREFIX, inst(2))
    applied = Applied(9, ("web",), {key: ("web", "srv")})
    status = build_status("consumer-1", applied, True, {("web", "srv"): 4}, NOW)
    assert status.revision == 9 and status.draining == {key: 4} and status.serves_all
    assert build_status("consumer-1", applied, True, {}, NOW).draining == {key: 0}
    later = build_status("consumer-1", applied, True, {("web", "srv"): 4}, datetime.now(UTC))
    assert same_status(status, later)  # only the time differs: no put
    assert not same_status(None, status)


@pytest.mark.parametrize(
    ("hostname", "admin", "stats", "expected"),
    [
        ("consumer.example.com", "127.0.0.1:9102", "127.0.0.1:1936", "consumer-9102"),
        ("box", "off", "127.0.0.1:1936", "box-1936"),
        ("box", "off", "off", "box-0"),
        ("_weird host!", "127.0.0.1:9", "off", "weird-host-9"),
        ("", "127.0.0.1:9", "off", "discoverer-9"),
        ("a" * 100, "127.0.0.1:9102", "off", "a" * 58 + "-9102"),
    ],
)
def test_default_discoverer_id(hostname: str, admin: str, stats: str, expected: str) -> None:
    assert default_discoverer_id(hostname, admin, stats) == expected
    DiscovererStatus(id=expected, agent_version="1", revision=0, serves_all=True)  # valid


def test_parse_all_sessions() -> None:
    answer = "# pxname,svname,qcur,qmax,scur\nweb,a,0,0,3\nweb,b,1,0,2\nweb,BACKEND,0,0,5\n"
    assert parse_all_sessions(answer) == {"a": 3, "b": 3}
    assert parse_all_sessions("Unknown backend.") == {}


# -- drain requests -----------------------------------------------------------------------

CID = "ab" * 32


def test_drain_requests_from_list_and_events_bad_keys_ignored_bad_values_count() -> None:
    state = DrainRequests(PREFIX)
    good = drain_key(PREFIX, CID).encode()
    with capture_logs() as logs:
        changed = state.replace(5, [(good, b"garbage", 4), (b"/pf/drains/abc", b"{}", 3)])
        state.replace(5, [(good, b"garbage", 4), (b"/pf/drains/abc", b"{}", 3)])  # again
    assert changed == {CID} and state.requested == {CID}
    assert len(logs) == 2  # one line per bad entry, not per list
    other = drain_key(PREFIX, "cd" * 32).encode()
    assert state.apply(other, b"{}", 6) == "cd" * 32
    assert state.apply(other, b"{}", 7) is None  # already drained: no change
    assert state.apply(good, None, 8) == CID
    assert state.apply(good, None, 9) is None
    assert state.apply(other, None, 3) is None  # older than what we have
    assert state.requested == {"cd" * 32}


def test_only_destroyed_containers_of_this_host_lose_their_drain_request() -> None:
    requested = {"a", "b", "c", "d"}
    known = {"a", "b", "c"}
    exists = {"a": False, "b": True}  # c: Docker could not say
    assert gone_drains(requested, known, exists) == {"a"}
    assert gone_drains(requested, set(), {"d": False}) == set()  # another host's


def test_revisions_to_apply_waits_for_every_instance_in_the_state() -> None:
    one, two = inst(1, state="draining"), inst(2, "db", state="draining")
    both = {"k1": (one, 10), "k2": (two, 12), "k3": (inst(3, state="draining"), 11)}
    assert revisions_to_apply(both, "draining") == {"web": 11, "db": 12}
    assert revisions_to_apply({**both, "k4": (inst(4), 13)}, "draining") is None
    assert revisions_to_apply({"k": (None, 3)}, "draining") is None


def test_progress_names_the_discoverers_behind() -> None:
    def status(name: str, revision: int, *services: str) -> DiscovererStatus:
        return DiscovererStatus(
            id=name,
            agent_version="1",
            revision=revision,
            services=services,
            serves_all=not services,
            draining={"/pf/services/web/h/" + "a" * 12 + ":80": 2},
        )

    statuses = {"a": status("a", 20), "b": status("b", 5, "web"), "c": status("c", 1, "db")}
    keys = ["/pf/services/web/h/" + "a" * 12 + ":80"]
    progress = progress_of({"web": 10}, statuses, keys)
    assert not progress.done and progress.discoverers == 2
    assert progress.waiting_for() == "discoverers that have not applied it: b"
    assert progress_of({"web": 5}, statuses, keys).done
    assert progress_of({"web": 5}, statuses, keys).sessions == {"a": 2, "b": 2, "c": 2}
    assert not progress_of(None, statuses, keys).done


# -- the publisher, on a fake etcd and HAProxy -----------------------------------------


class FakeEtcd:
    def __init__(self) -> None:
        self.puts: list[tuple[str, bytes, int | None]] = []
        self.refuse: str | None = None

    async def grant(self, ttl: int) -> int:
        return 77

    async def refresh(self, lease_id: int) -> int:
        return 10

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        if self.refuse:
            raise EtcdError(self.refuse)
        self.puts.append((key, value, lease))
        return len(self.puts)


class FakeHaproxy:
    settled = True

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    async def sessions(self, servers: Collection[tuple[str, str]]) -> dict[tuple[str, str], int]:
        return {s: self.counts.get(s, 0) for s in servers}


async def _until(check: object, within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


async def test_publisher_puts_on_change_only_and_survives_a_refused_put() -> None:
    etcd, haproxy = FakeEtcd(), FakeHaproxy()
    publisher = StatusPublisher(
        etcd,  # type: ignore[arg-type]
        PREFIX,
        "consumer-1",
        service_filter=(),
        haproxy=haproxy,
        interval=0.05,
    )
    catalog, _ = build_catalog([inst(1)])
    task = asyncio.create_task(publisher.run())
    try:
        publisher.applied(5, keyed(inst(1)), catalog)
        await _until(lambda: len(etcd.puts) == 1)
        key, value, lease = etcd.puts[0]
        assert key == "/pf/discoverers/consumer-1" and lease == 77
        assert DiscovererStatus.model_validate_json(value).revision == 5
        publisher.applied(5, keyed(inst(1)), catalog)  # nothing new
        await asyncio.sleep(0.15)
        assert len(etcd.puts) == 1

        etcd.refuse = "etcdserver: permission denied"
        with capture_logs() as logs:
            for revision in (6, 7, 8):
                publisher.applied(revision, keyed(inst(1)), catalog)
                await asyncio.sleep(0.1)
            assert publisher.error.endswith("permission denied")
            etcd.refuse = None
            await _until(
                lambda: publisher.published is not None and publisher.published.revision == 8
            )
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1  # once per outage
        assert any(e["event"] == "discoverer status published again" for e in logs)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_publisher_waits_for_haproxy_and_rereads_sessions_while_some_are_left() -> None:
    etcd, haproxy = FakeEtcd(), FakeHaproxy()
    haproxy.settled = False  # a reload pending: the revision is not applied yet
    publisher = StatusPublisher(
        etcd,  # type: ignore[arg-type]
        PREFIX,
        "consumer-1",
        service_filter=(),
        haproxy=haproxy,
        interval=0.01,
    )
    drained = inst(1, state="draining")
    catalog, _ = build_catalog([drained])
    haproxy.counts[("web", drained.server_name)] = 2
    task = asyncio.create_task(publisher.run())
    try:
        publisher.applied(3, keyed(drained), catalog)
        await asyncio.sleep(0.2)
        assert etcd.puts == []
        haproxy.settled = True
        await _until(lambda: publisher.published is not None)
        assert publisher.published is not None
        assert list(publisher.published.draining.values()) == [2]
        haproxy.counts[("web", drained.server_name)] = 0  # the last connection closed
        await _until(
            lambda: (
                publisher.published is not None
                and list(publisher.published.draining.values()) == [0]
            )
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("model", "values"),
    [
        (DiscovererSettings, {"discoverer_id": "bad id"}),
        (DiscovererSettings, {"discoverer_id": "x" * 64}),
        (DiscovererSettings, {"status_interval": 0}),
        (DiscovererSettings, {"status_ttl": 1}),
        (DrainSettings, {"reason": "a\nb"}),
        (DrainSettings, {"timeout": 0}),
        (DrainSettings, {"docker_host": "/var/run/docker.sock"}),
    ],
)
def test_bad_status_and_drain_settings_are_refused(
    model: type[DiscovererSettings | DrainSettings], values: dict[str, object]
) -> None:
    with pytest.raises(ValidationError):
        model(**values)  # type: ignore[arg-type]
