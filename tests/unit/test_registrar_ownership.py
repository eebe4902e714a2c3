"""Which events on a registrar's own keys are its own writes (agents.registrar.ownership),
and the sink putting keys back when they are not (against the in-memory etcd)."""

from __future__ import annotations

import asyncio

from agents.common.schema import instance_key
from agents.registrar.agent import etcd_problem
from agents.registrar.ownership import Change, Ownership
from tests.unit.test_registrar_sink import PREFIX, FakeEtcd, make, running, until

K = "/pf/services/web/h1/c:80"


def written(value: bytes = b"v1", lease: int = 7, revision: int = 10) -> Ownership:
    owned = Ownership()
    owned.sending(K, value, lease)
    assert owned.sent(K, revision) is None
    return owned


def test_our_own_write_and_older_events_are_not_foreign() -> None:
    owned = written()
    assert owned.judge(K, 10, b"v1", 7) is None  # the event of our put
    assert owned.judge(K, 9, None) is None  # before our put
    assert owned.judge(K, 12, b"v1", 7) is None  # the very same value and lease again


def test_a_delete_or_another_value_or_lease_after_our_write_is_foreign() -> None:
    owned = written()
    assert owned.judge(K, 11, None) is Change.DELETED
    assert owned.judge(K, 11, b"v0", 7) is Change.CHANGED
    assert owned.judge(K, 11, b"v1", 8) is Change.CHANGED  # a restore: old lease


def test_keys_not_ours_or_released_are_not_judged() -> None:
    owned = written()
    assert owned.judge("/pf/services/web/h1/other:80", 11, None) is None
    owned.release(K)
    assert owned.judge(K, 11, None) is None
    assert owned.watch_from(K) is None


def test_an_event_of_the_write_in_flight_is_ours_even_before_its_answer() -> None:
    owned = written()
    owned.sending(K, b"v2", 7)
    assert owned.judge(K, 11, b"v2", 7) is None  # arrives before put's answer
    assert owned.sent(K, 11) is None
    assert owned.watch_from(K) == 12


def test_a_foreign_change_during_a_write_is_settled_by_the_write_revision() -> None:
    owned = written()
    owned.sending(K, b"v2", 7)
    assert owned.judge(K, 12, None) is None  # ambiguous while in flight
    # Our put landed before the delete (11 < 12): the key is gone, put it back.
    assert owned.sent(K, 11) is Change.DELETED
    owned.sending(K, b"v2", 7)
    assert owned.judge(K, 13, None) is None
    assert owned.sent(K, 14) is None  # our put came after the delete: it restored it


def test_a_failed_write_forgets_what_it_saw_and_a_first_write_that_failed_is_not_guarded() -> None:
    owned = Ownership()
    owned.sending(K, b"v1", 7)
    owned.unsent(K)
    assert K not in owned
    owned = written()
    owned.sending(K, b"v2", 7)
    owned.judge(K, 11, None)
    owned.unsent(K)
    assert owned.sent(K, 12) is None and owned.watch_from(K) == 13


def test_compacted_history_means_put_it_back_unless_a_write_is_in_flight() -> None:
    owned = written()
    assert owned.compacted(K) is Change.UNKNOWN
    owned.sending(K, b"v2", 7)
    assert owned.compacted(K) is None


def test_adopted_keys_are_guarded_from_their_revision() -> None:
    owned = Ownership()
    owned.adopt(K, b"v1", 7, 40)
    assert owned.watch_from(K) == 41
    assert owned.judge(K, 40, b"v1", 7) is None
    assert owned.judge(K, 41, None) is Change.DELETED


# --- health -----------------------------------------------------------------------------


def test_health_names_any_failing_etcd_call_at_once_not_a_ttl_later() -> None:
    fine = {"lease_id": 5, "lease_age": 1.0, "ttl": 30.0}
    assert etcd_problem(**fine, lease_error="", write_error="", watch_error="") == ""
    for field in ("lease_error", "write_error", "watch_error"):
        errors = {"lease_error": "", "write_error": "", "watch_error": ""} | {field: "boom"}
        assert etcd_problem(**fine, **errors) == "boom"
    stale = etcd_problem(
        lease_id=5, lease_age=31, ttl=30, lease_error="", write_error="", watch_error=""
    )
    assert stale.startswith("lease not refreshed")
    assert etcd_problem(
        lease_id=None, lease_age=0, ttl=30, lease_error="", write_error="", watch_error=""
    )


# --- the sink puts keys back --------------------------------------------------------------


async def test_keys_deleted_or_changed_behind_the_sinks_back_are_put_back() -> None:
    fake = FakeEtcd()
    async with running(fake, ttl=30) as sink:
        a, b = make(1, cid="aa" * 32), make(2, cid="bb" * 32)
        sink.replace_all({a.container_id: [a], b.container_id: [b]})
        await until(lambda: sink.backlog == 0 and sink.watches.watched == 2)
        key_a, key_b = instance_key(PREFIX, a), instance_key(PREFIX, b)
        puts = len(fake.log)
        fake.foreign_delete(key_a)
        fake.foreign_put(key_b, b'{"rubbish": 1}')
        await until(lambda: key_a in fake.kv and fake.kv[key_b][0] == b.to_json())
        assert fake.kv[key_a] == (a.to_json(), sink.keeper.lease_id)
        assert fake.kv[key_b][1] == sink.keeper.lease_id
        assert sink.restored_total == 2
        await asyncio.sleep(0.1)
        assert len(fake.log) == puts + 2  # one put per key put back, no loop


async def test_no_write_while_nothing_changes_and_withdrawn_keys_are_not_put_back() -> None:
    fake = FakeEtcd()
    async with running(fake, ttl=30) as sink:
        a = make(1)
        sink.replace_all({a.container_id: [a]})
        await until(lambda: sink.backlog == 0 and sink.watches.watched == 1)
        sink.set_container(a.container_id, [])
        await until(lambda: sink.backlog == 0 and sink.watches.watched == 0)
        writes = len(fake.log)
        await asyncio.sleep(0.2)
        fake.foreign_put(instance_key(PREFIX, a), a.to_json())  # not ours any more
        await asyncio.sleep(0.1)
        assert len(fake.log) == writes and sink.restored_total == 0


async def test_after_the_watch_stream_broke_what_happened_meanwhile_is_replayed() -> None:
    fake = FakeEtcd()
    async with running(fake, ttl=30) as sink:
        a = make(1)
        sink.replace_all({a.container_id: [a]})
        await until(lambda: sink.backlog == 0 and sink.watches.watched == 1)
        fake.down = True
        fake.break_watches()
        await until(lambda: sink.watches.error != "")
        fake.kv.pop(instance_key(PREFIX, a))
        fake._changed(instance_key(PREFIX, a), None)  # deleted while we could not see
        fake.down = False
        await until(lambda: instance_key(PREFIX, a) in fake.kv, within=5)
        await until(lambda: sink.watches.error == "", within=5)
        assert sink.restored_total == 1


async def test_history_gone_back_after_an_outage_means_reconcile_every_key() -> None:
    fake = FakeEtcd()
    async with running(fake, ttl=30) as sink:
        a, b = make(1, cid="aa" * 32), make(2, cid="bb" * 32)
        sink.replace_all({a.container_id: [a]})
        await until(lambda: sink.backlog == 0 and sink.watches.watched == 1)
        lease = sink.keeper.lease_id
        assert lease is not None
        # etcd restored from a backup taken before a's put (b a ghost of then):
        # its revisions are lower than those of our writes.
        fake.down = True
        fake.break_watches()
        fake.kv = {instance_key(PREFIX, b): (b.to_json(), lease)}
        fake.rev = 1
        fake.history = []
        fake.down = False
        await until(lambda: set(fake.kv) == {instance_key(PREFIX, a)}, within=5)
        await until(lambda: sink.watches.watched == 1 and sink.watches.error == "", within=5)
        fake.foreign_delete(instance_key(PREFIX, a))  # watched again, from the new history
        await until(lambda: instance_key(PREFIX, a) in fake.kv)
