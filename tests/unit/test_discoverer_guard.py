"""The empty-prefix rule, end to end through PrefixState and the guard."""

from __future__ import annotations

from agents.common.schema import Instance, instance_key
from agents.discoverer.guard import EmptyPrefixGuard
from agents.discoverer.source import PrefixState

PREFIX = "/pf"


def inst(n: int, host: str) -> Instance:
    return Instance(
        service="web",
        host_id=host,
        address="127.0.0.1",
        port=20000 + n,
        private_port=80,
        container_id=f"{n:012x}",
    )


def key(i: Instance) -> str:
    return instance_key(PREFIX, i)


def setup(*instances: Instance) -> tuple[PrefixState, EmptyPrefixGuard]:
    s = PrefixState(PREFIX)
    s.replace(10, [(key(i), i.to_json(), 5, 5) for i in instances])
    g = EmptyPrefixGuard()
    g.filter(dict(s.instances), s.empty_cause)
    return s, g


def served(s: PrefixState, g: EmptyPrefixGuard) -> set[str]:
    return {i.server_name for i in g.filter(dict(s.instances), s.empty_cause).values()}


def names(*instances: Instance) -> set[str]:
    return {i.server_name for i in instances}


def test_wipe_holds_last_known_and_alarms_then_recovers() -> None:
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s, g = setup(a, b)
    s.apply(key(a), None, 11)
    s.apply(key(b), None, 11)
    assert served(s, g) == names(a, b)
    assert g.alarm and g.cause == "wipe" and g.held == 2
    # Still empty in later batches (compaction + re-list too): still held.
    s.replace(40, [])
    assert served(s, g) == names(a, b) and g.alarm
    # Keys come back: what etcd says is served, alarm cleared.
    s.apply(key(a), a.to_json(), 41)
    assert served(s, g) == names(a)
    assert not g.alarm and g.held == 0


def test_one_host_lease_expiry_removes_everything() -> None:
    instances = [inst(i, "host-a") for i in range(3)]
    s, g = setup(*instances)
    for i in instances:
        s.apply(key(i), None, 11)
    assert served(s, g) == set()
    assert not g.alarm


def test_hosts_leaving_one_by_one_removes_everything() -> None:
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s, g = setup(a, b)
    s.apply(key(a), None, 11)
    assert served(s, g) == names(b)
    s.apply(key(b), None, 12)
    assert served(s, g) == set()
    assert not g.alarm


def test_last_instance_of_a_small_deployment() -> None:
    a = inst(1, "host-a")
    s, g = setup(a)
    s.apply(key(a), None, 11)
    assert served(s, g) == set()
    assert not g.alarm


def test_relist_finding_nothing_holds() -> None:
    a = inst(1, "host-a")
    s, g = setup(a)
    s.replace(99, [])
    assert served(s, g) == names(a)
    assert g.alarm and g.cause == "relist"


def test_empty_at_startup_is_not_an_alarm() -> None:
    s, g = setup()
    assert served(s, g) == set()
    assert not g.alarm


def test_after_an_ordinary_emptying_a_relist_does_not_alarm() -> None:
    a = inst(1, "host-a")
    s, g = setup(a)
    s.apply(key(a), None, 11)
    assert served(s, g) == set()
    s.replace(99, [])
    assert served(s, g) == set()
    assert not g.alarm


def test_burst_of_two_hosts_in_separate_revisions_folded_in_one_batch() -> None:
    # The consumer may see both deletions in one snapshot; they were still
    # separate revisions (two leases), so no alarm.
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s, g = setup(a, b)
    s.apply(key(a), None, 11)
    s.apply(key(b), None, 12)
    assert served(s, g) == set()
    assert not g.alarm
