"""CatalogBuilder: the incremental catalog gives what a full rebuild gives.

The oracle below is the straightforward definition of the rules (see
CatalogBuilder's docstring), given the ports each service owned before. The
builder is fed a sequence of states that share instance objects, as the
source's snapshots do, and must agree with the oracle on every one, conflicts
included. Unchanged services must come back as the same objects.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.common.schema import Instance, instance_key
from agents.discoverer.model import (
    Catalog,
    CatalogBuilder,
    Conflict,
    ListenRules,
    Service,
    build_catalog,
    server_of,
)

T0 = datetime(2026, 11, 27, tzinfo=UTC)
RULES = ListenRules(reserved_ports={9000: "the stats page"}, bind_address="127.0.0.1")


def oracle(
    state: dict[str, Instance],
    created: dict[str, int],
    owners: dict[int, str],
    only: frozenset[str] = frozenset(),
    rules: ListenRules = RULES,
) -> tuple[Catalog, list[Conflict], dict[int, str]]:
    ordered = sorted(
        (
            ((created[k], i.service, i.server_name), k, i)
            for k, i in state.items()
            if not only or i.service in only
        ),
    )
    listener: dict[str, Instance] = {}
    ports: dict[int, str] = {}
    for port, owner in sorted(owners.items()):
        mine = [i for _, _, i in ordered if i.service == owner and i.bind_port == port]
        if mine:
            listener[owner], ports[port] = mine[0], owner
    waiting: list[Conflict] = []
    for _, key, i in ordered:
        if i.service in listener:
            continue
        if i.bind_port in rules.reserved_ports:
            reason = f"port {i.bind_port} is reserved for {rules.reserved_ports[i.bind_port]}"
        elif i.bind_port in ports:
            reason = f"port {i.bind_port} is used by {ports[i.bind_port]}"
        else:
            listener[i.service], ports[i.bind_port] = i, i.service
            continue
        waiting.append(Conflict(key, i.service, i.server_name, reason))
    conflicts = [c for c in waiting if c.service not in listener]
    catalog: Catalog = {}
    for name in sorted(listener):
        first = listener[name]
        service = catalog[name] = Service(name, first.bind_port, first.mode)
        taken: dict[str, str] = {}
        for _, key, i in ordered:
            if i.service != name:
                continue
            if i.mode != service.mode:
                reason = f"mode {i.mode} differs from the listener's {service.mode}"
            elif i.server_name in taken:
                reason = f"server name {i.server_name} is taken by {taken[i.server_name]}"
            elif i.address == "127.0.0.1" and i.port == service.bind_port:
                reason = f"{i.address}:{i.port} is the service's own listener"
            else:
                if i.bind_port != service.bind_port:
                    reason = f"wants port {i.bind_port}, service listens on {service.bind_port}"
                    conflicts.append(Conflict(key, name, i.server_name, reason, routed=True))
                taken[i.server_name] = key
                service.servers[i.server_name] = server_of(i)
                continue
            conflicts.append(Conflict(key, name, i.server_name, reason))
    return catalog, conflicts, {p: s for p, s in ports.items()}


def _instance(
    service: str, host: int, container: int, port: int, frontend: int | None, mode: str, age: int
) -> Instance:
    return Instance(
        service=service,
        host_id=f"h{host}",
        # A few point at 127.0.0.1:80, the listener of a service on port 80.
        address="127.0.0.1" if container == 5 else f"10.0.0.{container + 1}",
        port=80 if container == 5 else 20000 + container,
        private_port=port,
        container_id=f"{container:012x}" + "0" * 52,
        frontend_port=frontend,
        mode=mode,  # type: ignore[arg-type]
        weight=age % 200 + 1,
        registered_at=T0 + timedelta(seconds=age),
    )


# Few services, ports and ages, so services fight over ports, ages tie across
# services and modes disagree inside a service.
instances = st.builds(
    _instance,
    service=st.sampled_from(["a", "b", "c", "d"]),
    host=st.integers(0, 2),
    container=st.integers(0, 5),
    port=st.sampled_from([80, 81, 8080]),
    frontend=st.sampled_from([None, None, 80, 9000]),
    mode=st.sampled_from(["tcp", "http"]),
    age=st.integers(0, 6),
)


def _keyed(pool: list[Instance], picks: list[int]) -> dict[str, Instance]:
    state: dict[str, Instance] = {}
    for n in picks:
        instance = pool[n % len(pool)]
        state[instance_key("/p", instance)] = instance  # a later pick replaces an earlier one
    return state


def _same(got: tuple[Catalog, list[Conflict]], want: tuple[Catalog, list[Conflict]]) -> None:
    assert list(got[0].items()) == list(want[0].items())
    for name, service in want[0].items():
        assert list(got[0][name].servers) == list(service.servers)
    assert sorted(got[1], key=repr) == sorted(want[1], key=repr)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.lists(instances, min_size=1, max_size=14),
    states=st.lists(st.lists(st.integers(0, 30), max_size=12), min_size=1, max_size=6),
    only=st.sampled_from([frozenset(), frozenset({"a", "c"})]),
)
def test_builder_agrees_with_a_full_rebuild_on_every_state(
    pool: list[Instance], states: list[list[int]], only: frozenset[str]
) -> None:
    builder = CatalogBuilder(only, RULES)
    told = CatalogBuilder(only, RULES)  # given the changed keys, as the agent does
    before: dict[str, Instance] = {}
    created: dict[str, int] = {}
    owners: dict[int, str] = {}
    for revision, picks in enumerate(states):
        state = _keyed(pool, picks)
        for key, instance in state.items():  # a key put anew is created anew
            if before.get(key) is not instance:
                created[key] = revision * 100 + len(created)
        *want, owners = oracle(state, created, owners, only)
        _same(builder.build(state, created=created), (want[0], want[1]))
        changed = {k for k in state.keys() | before.keys() if state.get(k) is not before.get(k)}
        _same(told.build(state, changed, created), (want[0], want[1]))
        before = state


def test_build_catalog_takes_the_given_order_as_creation_order() -> None:
    a = _instance("a", 0, 1, 80, None, "tcp", 9)
    b = _instance("b", 0, 2, 80, None, "tcp", 1)
    catalog, conflicts = build_catalog([a, b])
    assert list(catalog) == ["a"] and [c.service for c in conflicts] == ["b"]


def test_unchanged_services_are_the_same_objects() -> None:
    a1 = _instance("a", 0, 1, 80, None, "tcp", 1)
    b1 = _instance("b", 0, 2, 81, None, "tcp", 2)
    b2 = _instance("b", 1, 3, 81, None, "tcp", 3)
    builder = CatalogBuilder()
    first, _ = builder.build({"a1": a1, "b1": b1})
    second, _ = builder.build({"a1": a1, "b1": b1, "b2": b2})
    assert second["a"] is first["a"]
    assert second["b"] is not first["b"]
    assert list(second["b"].servers) == [b1.server_name, b2.server_name]
    third, _ = builder.build({"b1": b1, "b2": b2})
    assert "a" not in third
    assert third["b"] is second["b"]


def test_a_freed_port_goes_to_the_next_service_in_line() -> None:
    older = _instance("a", 0, 1, 80, None, "tcp", 1)
    younger = _instance("b", 0, 2, 80, None, "tcp", 2)
    builder = CatalogBuilder()
    catalog, conflicts = builder.build({"a": older, "b": younger}, created={"a": 1, "b": 2})
    assert list(catalog) == ["a"]
    assert conflicts == [Conflict("b", "b", younger.server_name, "port 80 is used by a")]
    catalog, conflicts = builder.build({"b": younger}, created={"b": 2})
    assert list(catalog) == ["b"] and conflicts == []


def test_the_owner_keeps_its_port_whatever_the_clocks_say() -> None:
    # b was created before a's current instance, but a owns port 80 and keeps
    # it while any of its instances wants it: a registrar restart, a clock
    # that jumps or a replaced container never hands the port over.
    a1 = _instance("a", 0, 1, 80, None, "tcp", 5)
    b1 = _instance("b", 0, 2, 80, None, "tcp", 0)
    a2 = _instance("a", 1, 3, 80, None, "tcp", 0)
    builder = CatalogBuilder()
    catalog, _ = builder.build({"a1": a1}, created={"a1": 1})
    catalog, _ = builder.build({"a1": a1, "b1": b1}, created={"a1": 1, "b1": 2})
    assert list(catalog) == ["a"]
    catalog, _ = builder.build({"a1": a1, "b1": b1, "a2": a2}, created={"a1": 1, "b1": 2, "a2": 3})
    catalog, conflicts = builder.build({"b1": b1, "a2": a2}, created={"b1": 2, "a2": 3})
    assert list(catalog) == ["a"] and list(catalog["a"].servers) == [a2.server_name]
    assert [c.key for c in conflicts] == ["b1"]


def test_an_instance_of_another_mode_is_quarantined() -> None:
    tcp = _instance("a", 0, 1, 80, None, "tcp", 0)
    http = _instance("a", 1, 2, 80, None, "http", 0)
    catalog, conflicts = CatalogBuilder().build({"t": tcp, "h": http}, created={"t": 1, "h": 2})
    assert list(catalog["a"].servers) == [tcp.server_name]
    assert conflicts == [
        Conflict("h", "a", http.server_name, "mode http differs from the listener's tcp")
    ]


def test_a_reserved_port_is_never_claimed() -> None:
    stats = _instance("a", 0, 1, 9000, None, "tcp", 0)
    catalog, conflicts = CatalogBuilder(rules=RULES).build({"s": stats}, created={"s": 1})
    assert catalog == {}
    assert conflicts[0].reason == "port 9000 is reserved for the stats page"
