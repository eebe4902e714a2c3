"""The etcd side of the discoverer without etcd: state, bad entries, batching, resume."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agents.common.backoff import Backoff
from agents.common.etcd import KeyValue, RevisionCompacted, WatchEvent
from agents.common.prefix_source import EtcdSource
from agents.common.prefix_state import PrefixState
from agents.common.schema import Instance, instance_key

PREFIX = "/pf"


def inst(n: int, host: str = "host-a", service: str = "web", **extra: Any) -> Instance:
    return Instance(
        service=service,
        host_id=host,
        address="127.0.0.1",
        port=10000 + n,
        private_port=8080 + (n % 100),
        container_id=f"{n:012x}",
        **extra,
    )


def entry(instance: Instance) -> tuple[str, bytes]:
    return instance_key(PREFIX, instance), instance.to_json()


class Bad:
    def __init__(self) -> None:
        self.lines: list[tuple[str, int, str]] = []

    def __call__(self, key: str, revision: int, reason: str) -> None:
        self.lines.append((key, revision, reason))


def state() -> tuple[PrefixState, Bad]:
    bad = Bad()
    return PrefixState(PREFIX, bad), bad


# -- list, then events -------------------------------------------------------


def test_list_then_events() -> None:
    s, _ = state()
    a, b = inst(1), inst(2)
    s.replace(10, [(*entry(a), 5, 5)])
    assert list(s.instances.values()) == [a]
    assert s.revision == 10
    snap = s.take_batch()
    assert snap.relisted and snap.revision == 10 and snap.added == ()
    assert snap.changed is None  # a full list: anything may have changed
    s.apply(*entry(b), 11, 11)
    s.apply(entry(a)[0], None, 12)
    snap = s.take_batch()
    assert list(snap.instances.values()) == [b]
    assert snap.added == (b,)
    assert not snap.relisted
    assert snap.changed == {entry(a)[0], entry(b)[0]}
    assert s.keys == {entry(b)[0]: 11}
    assert not s.pending
    assert s.take_batch().changed == frozenset()


def test_replayed_older_revision_is_ignored() -> None:
    s, _ = state()
    a = inst(1)
    s.apply(*entry(a), 20, 20)
    s.apply(entry(a)[0], None, 19)  # an old event replayed: must not undo rev 20
    assert len(s.instances) == 1


def test_snapshot_is_a_copy() -> None:
    s, _ = state()
    s.apply(*entry(inst(1)), 2, 2)
    snap = s.take_batch()
    s.apply(*entry(inst(2)), 3, 3)
    assert len(snap.instances) == 1


# -- bad entries ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        (f"{PREFIX}/services/web/host-a/{'a' * 12}:80", b"not json"),
        (f"{PREFIX}/services/web/host-a/{'a' * 12}:80", b'{"service": "web"}'),
        (f"{PREFIX}/services/web/host-a/{'a' * 12}:80", b"\xff\xfe"),
        (f"{PREFIX}/services/we b/host-a/{'a' * 12}:80", inst(1).to_json()),
        (f"{PREFIX}/services/web/host-a/nothex:80", inst(1).to_json()),
        (f"{PREFIX}/services/web/host-a/{'a' * 12}:99999", inst(1).to_json()),
        (f"{PREFIX}/services/web/extra/host-a/{'a' * 12}:80", inst(1).to_json()),
    ],
)
def test_bad_entry_is_skipped_and_reported(key: str, value: bytes) -> None:
    s, bad = state()
    s.apply(key, value, 7)
    assert s.instances == {}
    assert key in s.keys  # still a key of the prefix
    assert [(k, r) for k, r, _ in bad.lines] == [(key, 7)]


def _crafted(instance: Instance, **fields: Any) -> bytes:
    data = json.loads(instance.to_json())
    data.update(fields)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    "fields",
    [
        {"service": "web\n  server evil 1.2.3.4:80"},
        {"address": "evil.example.com"},
        {"address": "127.0.0.1 check"},
        {"port": 0},
        {"port": 70000},
        {"weight": 1000},
        {"tags": ["a b"]},
        {"service": "other"},  # key and value disagree
    ],
)
def test_crafted_values_never_become_instances(fields: dict[str, Any]) -> None:
    s, bad = state()
    good = inst(1)
    key = instance_key(PREFIX, good)
    s.apply(key, _crafted(good, **fields), 3)
    assert s.instances == {}
    assert len(bad.lines) == 1


def test_bad_entry_logged_once_per_key_and_revision() -> None:
    s, bad = state()
    key = f"{PREFIX}/services/web/host-a/{'b' * 12}:80"
    s.replace(5, [(key, b"junk", 4, 4)])
    s.replace(9, [(key, b"junk", 4, 4)])  # a re-list: same revision, no new line
    assert len(bad.lines) == 1
    s.apply(key, b"junk again", 10)  # rewritten: a new revision, one new line
    assert len(bad.lines) == 2
    s.apply(key, None, 11)
    s.apply(key, b"junk", 12)
    assert len(bad.lines) == 3


def test_bad_value_over_a_good_key_removes_the_instance() -> None:
    s, _ = state()
    a = inst(1)
    key, value = entry(a)
    s.apply(key, value, 2)
    s.apply(key, b"{broken", 3)
    assert s.instances == {}


def test_bad_entry_logs_one_line() -> None:
    s = PrefixState(PREFIX)  # the default reporter: the structlog logger
    with capture_logs() as logs:
        s.apply(f"{PREFIX}/services/web/h/{'c' * 12}:80", b"junk", 2, 2)
        s.replace(3, [(f"{PREFIX}/services/web/h/{'c' * 12}:80", b"junk", 2, 2)])
    assert [entry["event"] for entry in logs] == ["skipping etcd entry that does not parse"]
    assert logs[0]["revision"] == 2


def test_good_entries_around_a_bad_one_keep_working() -> None:
    s, bad = state()
    a, b = inst(1), inst(2, host="host-b")
    s.replace(
        3,
        [
            (*entry(a), 1, 1),
            (f"{PREFIX}/services/web/host-a/{'d' * 12}:1", b"[]", 2, 2),
            (*entry(b), 3, 3),
        ],
    )
    assert set(s.instances) == {entry(a)[0], entry(b)[0]}
    assert len(bad.lines) == 1


# -- why the prefix is empty (the guard's input) ------------------------------


def test_wipe_of_several_hosts_in_one_revision() -> None:
    s, _ = state()
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s.replace(5, [(*entry(a), 3, 3), (*entry(b), 4, 4)])
    s.apply(entry(a)[0], None, 6)
    assert s.empty_cause is None
    s.apply(entry(b)[0], None, 6)  # same revision: delete --prefix
    assert s.empty_cause == "wipe"


def test_lease_expiry_of_the_only_host_is_ordinary() -> None:
    s, _ = state()
    instances = [inst(i, "host-a") for i in range(5)]
    s.replace(5, [(*entry(i), 3, 3) for i in instances])
    for instance in instances:  # one lease: every key in one revision
        s.apply(entry(instance)[0], None, 6)
    assert s.instances == {}
    assert s.empty_cause == "deletes"


def test_hosts_leaving_one_after_the_other_is_ordinary() -> None:
    s, _ = state()
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s.replace(5, [(*entry(a), 3, 3), (*entry(b), 4, 4)])
    s.apply(entry(a)[0], None, 6)  # host-a's lease expires
    s.apply(entry(b)[0], None, 7)  # then host-b's
    assert s.empty_cause == "deletes"


def test_last_instance_removed() -> None:
    s, _ = state()
    a = inst(1)
    s.apply(*entry(a), 2, 2)
    s.apply(entry(a)[0], None, 3)
    assert s.empty_cause == "deletes"


def test_wipe_then_refill_in_one_transaction_is_not_empty() -> None:
    s, _ = state()
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s.replace(5, [(*entry(a), 3, 3), (*entry(b), 4, 4)])
    s.apply(entry(a)[0], None, 6)
    s.apply(entry(b)[0], None, 6)
    s.apply(*entry(a), 6, 6)
    assert s.empty_cause is None


def test_relist_empty_after_instances() -> None:
    s, _ = state()
    s.replace(5, [(*entry(inst(1)), 3, 3)])
    s.replace(50, [])
    assert s.empty_cause == "relist"


def test_startup_empty_is_not_a_wipe() -> None:
    s, _ = state()
    s.replace(5, [])
    assert s.empty_cause is None


def test_relist_keeps_an_earlier_wipe() -> None:
    s, _ = state()
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s.replace(5, [(*entry(a), 3, 3), (*entry(b), 4, 4)])
    s.apply(entry(a)[0], None, 6)
    s.apply(entry(b)[0], None, 6)
    s.replace(60, [])
    assert s.empty_cause == "wipe"


def test_bad_values_count_as_gone_for_the_wipe_rule() -> None:
    s, _ = state()
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s.replace(5, [(*entry(a), 3, 3), (*entry(b), 4, 4)])
    s.apply(entry(a)[0], b"x", 6)
    s.apply(entry(b)[0], b"x", 6)
    assert s.empty_cause == "wipe"


# -- EtcdSource with a scripted etcd ---------------------------------------------


class FakeEtcd:
    """get_prefix from a dict; watch_prefix fed from a queue of events / errors."""

    def __init__(self, entries: dict[str, bytes] | None = None) -> None:
        self.entries = dict(entries or {})
        self.revision = 10
        self.lists = 0
        self.watch_starts: list[int] = []
        self.queue: asyncio.Queue[WatchEvent | BaseException | None] = asyncio.Queue()
        self.fail_list: list[BaseException] = []
        self.fail_watch_create: list[BaseException] = []

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        if self.fail_list:
            raise self.fail_list.pop(0)
        self.lists += 1
        items = [KeyValue(k.encode(), v, 0, 1) for k, v in sorted(self.entries.items())]
        return self.revision, items

    async def watch_prefix(
        self, prefix: str, start_revision: int, on_created: Callable[[], None] | None = None
    ) -> AsyncIterator[WatchEvent]:
        self.watch_starts.append(start_revision)
        if self.fail_watch_create:
            raise self.fail_watch_create.pop(0)
        if on_created:
            on_created()
        while True:
            item = await self.queue.get()
            if item is None:
                return  # the stream just ends
            if isinstance(item, BaseException):
                raise item
            yield item

    def put(self, instance: Instance) -> None:
        self.revision += 1
        key, value = entry(instance)
        self.entries[key] = value
        self.queue.put_nowait(WatchEvent(key.encode(), value, self.revision))

    def delete(self, instance: Instance) -> None:
        self.revision += 1
        key = entry(instance)[0]
        self.entries.pop(key, None)
        self.queue.put_nowait(WatchEvent(key.encode(), None, self.revision))


def source(fake: FakeEtcd) -> EtcdSource:
    return EtcdSource(fake, PREFIX, backoff=Backoff(initial=0.001, maximum=0.002))  # type: ignore[arg-type]


async def test_first_snapshot_is_the_list_then_watch_from_next_revision() -> None:
    a = inst(1)
    fake = FakeEtcd(dict([entry(a)]))
    src = source(fake)
    updates = src.updates()
    snap = await anext(updates)
    assert snap.relisted and list(snap.instances.values()) == [a]
    b = inst(2)
    fake.put(b)
    snap = await asyncio.wait_for(anext(updates), 1)
    assert set(snap.instances) == {entry(a)[0], entry(b)[0]}
    assert fake.watch_starts == [11]
    assert src.watching
    await updates.aclose()


async def test_a_lone_event_is_not_delayed() -> None:
    fake = FakeEtcd()
    updates = source(fake).updates()
    await anext(updates)
    fake.put(inst(1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(anext(updates), 1)
    assert loop.time() - started < 0.01
    await updates.aclose()


async def test_a_burst_is_folded_into_few_snapshots() -> None:
    fake = FakeEtcd()
    updates = source(fake).updates()
    await anext(updates)
    for i in range(1000):
        fake.put(inst(i, host=f"h{i % 7}"))
    snapshots = []
    while True:
        snap = await asyncio.wait_for(anext(updates), 1)
        snapshots.append(snap)
        if len(snap.instances) == 1000:
            break
    assert len(snapshots) <= 2
    assert sum(len(s.added) for s in snapshots) == 1000
    await updates.aclose()


async def test_watch_error_resumes_from_last_revision_plus_one() -> None:
    from agents.common.etcd import EtcdError

    fake = FakeEtcd()
    src = source(fake)
    updates = src.updates()
    await anext(updates)
    fake.put(inst(1))
    await anext(updates)
    fake.queue.put_nowait(EtcdError("connection lost"))
    fake.fail_watch_create = [EtcdError("refused"), EtcdError("refused")]
    fake.put(inst(2))  # "missed" while down: replayed by the resumed watch
    snap = await asyncio.wait_for(anext(updates), 1)
    assert len(snap.instances) == 2
    assert fake.watch_starts == [11, 12, 12, 12]
    assert fake.lists == 1  # no re-list for an ordinary error
    assert src.restarts == 3
    await updates.aclose()


async def test_stream_end_resumes() -> None:
    fake = FakeEtcd()
    updates = source(fake).updates()
    await anext(updates)
    fake.queue.put_nowait(None)
    fake.put(inst(1))
    snap = await asyncio.wait_for(anext(updates), 1)
    assert len(snap.instances) == 1
    assert fake.watch_starts == [11, 11]
    await updates.aclose()


async def test_compaction_relists_and_replaces_the_state() -> None:
    a, b = inst(1), inst(2)
    fake = FakeEtcd(dict([entry(a)]))
    src = source(fake)
    updates = src.updates()
    await anext(updates)
    # While the watch was down, a went and b came, and the history is gone.
    fake.entries = dict([entry(b)])
    fake.revision = 100
    fake.fail_watch_create = [RevisionCompacted(50)]
    fake.queue.put_nowait(RuntimeError("broken stream"))
    snap = await asyncio.wait_for(anext(updates), 1)
    assert snap.relisted
    assert list(snap.instances.values()) == [b]
    assert fake.lists == 2
    assert fake.watch_starts[-1] == 101
    await updates.aclose()


async def test_outage_is_logged_once() -> None:
    from agents.common.etcd import EtcdError

    fake = FakeEtcd()
    src = source(fake)
    updates = src.updates()
    await anext(updates)
    with capture_logs() as logs:
        fake.fail_watch_create = [EtcdError("refused")] * 20
        fake.queue.put_nowait(EtcdError("lost"))
        fake.put(inst(1))
        await asyncio.wait_for(anext(updates), 2)
    events = [e["event"] for e in logs]
    assert events.count("etcd watch broken, resuming from the last revision seen") == 1
    assert events.count("etcd watch restored") == 1
    await updates.aclose()


async def test_list_failure_at_startup_is_retried() -> None:
    from agents.common.etcd import EtcdError

    fake = FakeEtcd(dict([entry(inst(1))]))
    fake.fail_list = [EtcdError("down")] * 3
    src = source(fake)
    updates = src.updates()
    snap = await asyncio.wait_for(anext(updates), 1)
    assert len(snap.instances) == 1
    assert not src.status()["watching"] or src.watching
    await updates.aclose()


# -- one watch per service (--services) ----------------------------------------


def test_per_service_ranges_keep_their_own_revision() -> None:
    ranges = [f"{PREFIX}/services/api/", f"{PREFIX}/services/web/"]
    s = PrefixState(PREFIX, Bad(), ranges)
    web, api, api2 = inst(1), inst(2, service="api"), inst(3, service="api")
    s.replace(10, [])
    assert s.resume_revision(ranges[0]) == s.resume_revision(ranges[1]) == 11
    s.apply(*entry(web), 15, 15)
    # The api watch delivers an older revision after the web one: still applied.
    s.apply(*entry(api), 12, 12)
    assert set(s.instances) == {entry(web)[0], entry(api)[0]}
    assert s.revision == 15
    assert s.resume_revision(ranges[0]) == 13 and s.resume_revision(ranges[1]) == 16
    # A resumed api watch replays revision 12 (dropped) and goes on.
    s.apply(entry(api)[0], None, 11)
    s.apply(*entry(api2), 13, 13)
    assert set(s.instances) == {entry(web)[0], entry(api)[0], entry(api2)[0]}
    s.replace(20, [])
    assert s.resume_revision(ranges[0]) == 21


# -- snapshots without copying the whole state ---------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=30), min_size=1, max_size=40
    )
)
def test_snapshots_stay_what_they_were(batches: list[list[tuple[int, bool]]]) -> None:
    """Every snapshot equals the state when it was taken, whatever happens after."""
    s = PrefixState(PREFIX, Bad())
    s.replace(1, [(*entry(inst(n)), 1, 1) for n in range(0, 40, 2)])
    taken = [(s.take_batch(), dict(s.instances), dict(s.created))]
    revision = 2
    for batch in batches:
        for n, put in batch:
            key, value = entry(inst(n))
            s.apply(key, value if put else None, revision, revision)
            revision += 1
        taken.append((s.take_batch(), dict(s.instances), dict(s.created)))
    for snap, instances, created in taken:
        assert dict(snap.instances) == instances and len(snap.instances) == len(instances)
        assert dict(snap.created) == created
        for n in range(41):
            key = entry(inst(n))[0]
            assert snap.instances.get(key) == instances.get(key)
            assert (key in snap.instances) == (key in instances)
