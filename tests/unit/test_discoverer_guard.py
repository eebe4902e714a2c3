"""The empty-prefix rule, end to end through PrefixState and the guard."""

from __future__ import annotations

from agents.common.prefix_state import PrefixState
from agents.common.schema import Instance, instance_key
from agents.discoverer.guard import EmptyPrefixGuard

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
    g = EmptyPrefixGuard(hold_for=20.0, window=5.0)
    g.filter(dict(s.instances), s.empty_cause, now=0.0)
    return s, g


def served(
    s: PrefixState, g: EmptyPrefixGuard, now: float = 1.0, reconnected_at: float | None = None
) -> set[str]:
    served = g.filter(dict(s.instances), s.empty_cause, now=now, reconnected_at=reconnected_at)
    return {i.server_name for i in served.values()}


def names(*instances: Instance) -> set[str]:
    return {i.server_name for i in instances}


def test_wipe_holds_last_known_and_alarms_until_every_host_is_back() -> None:
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s, g = setup(a, b)
    s.apply(key(a), None, 11)
    s.apply(key(b), None, 11)
    assert served(s, g) == names(a, b)
    assert g.alarm and g.cause == "wipe" and g.held == 2
    # Still empty in later batches (compaction + re-list too): still held.
    s.replace(40, [])
    assert served(s, g, now=2.0) == names(a, b) and g.alarm
    # One container started meanwhile: served beside the held ones, still held.
    c = inst(3, "host-a")
    s.apply(key(c), c.to_json(), 41)
    assert served(s, g, now=3.0) == names(a, b, c) and g.alarm
    # Its registrar put the others back: host-a complete, host-b not yet.
    s.apply(key(a), a.to_json(), 42)
    assert served(s, g, now=3.5) == names(a, b, c) and g.alarm
    s.apply(key(b), b.to_json(), 43)
    assert served(s, g, now=4.0) == names(a, b, c)
    assert not g.alarm and g.held == 0


def test_a_hold_ends_after_hold_for() -> None:
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s, g = setup(a, b)
    s.apply(key(a), None, 11)
    s.apply(key(b), None, 11)
    assert served(s, g, now=1.0) == names(a, b) and g.alarm
    assert served(s, g, now=20.5) == names(a, b) and g.alarm
    assert served(s, g, now=21.5) == set() and not g.alarm


def test_one_host_lease_expiry_removes_everything() -> None:
    instances = [inst(i, "host-a") for i in range(3)]
    s, g = setup(*instances)
    for i in instances:
        s.apply(key(i), None, 11)
    assert served(s, g) == set()
    assert not g.alarm


def test_hosts_leaving_slower_than_the_window_removes_everything() -> None:
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s, g = setup(a, b)
    s.apply(key(a), None, 11)
    assert served(s, g, now=1.0) == names(b)
    s.apply(key(b), None, 12)
    assert served(s, g, now=7.0) == set()
    assert not g.alarm


def test_two_hosts_lost_within_the_window_in_separate_revisions_hold() -> None:
    # After an etcd outage the registrars' leases expire one revision after
    # another, seconds apart: a mass loss, not two hosts dying.
    hosts = [inst(n, f"host-{n}") for n in range(4)]
    s, g = setup(*hosts)
    s.apply(key(hosts[0]), None, 11)
    assert served(s, g, now=1.0) == names(*hosts[1:])
    s.apply(key(hosts[1]), None, 12)
    s.apply(key(hosts[2]), None, 13)
    assert served(s, g, now=3.0) == names(*hosts)
    assert g.alarm and g.cause == "mass-loss"


def test_after_a_reconnect_the_window_is_hold_for() -> None:
    hosts = [inst(n, f"host-{n}") for n in range(3)]
    s, g = setup(*hosts)
    s.apply(key(hosts[0]), None, 11)
    assert served(s, g, now=100.0, reconnected_at=99.0) == names(*hosts[1:])
    s.apply(key(hosts[1]), None, 12)
    assert served(s, g, now=112.0, reconnected_at=99.0) == names(*hosts)
    assert g.alarm and g.cause == "mass-loss"


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
    assert served(s, g, now=1.0) == set()
    s.replace(99, [])
    assert served(s, g, now=7.0) == set()
    assert not g.alarm


def test_burst_of_two_hosts_in_separate_revisions_folded_in_one_batch_holds() -> None:
    # Two leases expiring in consecutive revisions, seen in one snapshot.
    a, b = inst(1, "host-a"), inst(2, "host-b")
    s, g = setup(a, b)
    s.apply(key(a), None, 11)
    s.apply(key(b), None, 12)
    assert served(s, g) == names(a, b)
    assert g.alarm
