"""CatalogBuilder: the incremental catalog gives what a full rebuild gives.

The oracle below is the straightforward definition (every instance, oldest
first; a service is created by its first instance whose port is free). The
builder is fed a sequence of states that share instance objects, as the
source's snapshots do, and must agree with the oracle on every one, conflicts
included. Unchanged services must come back as the same objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.common.schema import Instance, instance_key
from agents.discoverer.model import (
    Catalog,
    CatalogBuilder,
    Conflict,
    Service,
    build_catalog,
    server_of,
)

T0 = datetime(2026, 11, 27, tzinfo=UTC)


def oracle(
    instances: Iterable[Instance], only: frozenset[str] = frozenset()
) -> tuple[Catalog, list[Conflict]]:
    catalog: Catalog = {}
    conflicts: list[Conflict] = []
    ordered = sorted(
        (i for i in instances if not only or i.service in only),
        key=lambda i: (i.registered_at, i.service, i.server_name),
    )
    ports: dict[int, str] = {}
    for instance in ordered:
        service = catalog.get(instance.service)
        if service is None:
            owner = ports.get(instance.bind_port)
            if owner is not None:
                reason = f"port {instance.bind_port} is used by {owner}"
                conflicts.append(Conflict(instance.service, instance.server_name, reason))
                continue
            ports[instance.bind_port] = instance.service
            service = Service(instance.service, instance.bind_port, instance.mode)
            catalog[instance.service] = service
        elif (instance.bind_port, instance.mode) != service.listener:
            reason = (
                f"wants port {instance.bind_port}/{instance.mode}, service has "
                f"{service.bind_port}/{service.mode}"
            )
            conflicts.append(Conflict(instance.service, instance.server_name, reason))
        service.servers[instance.server_name] = server_of(instance)
    return catalog, conflicts


def _instance(
    service: str, host: int, container: int, port: int, frontend: int | None, mode: str, age: int
) -> Instance:
    return Instance(
        service=service,
        host_id=f"h{host}",
        address=f"10.0.0.{container + 1}",
        port=20000 + container,
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
    assert list(got[0].items()) == list(want[0].items())  # services in the same order
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
    builder = CatalogBuilder(only)
    told = CatalogBuilder(only)  # given the changed keys, as the agent does
    before: dict[str, Instance] = {}
    for picks in states:
        state = _keyed(pool, picks)
        want = oracle(state.values(), only)
        _same(builder.build(state), want)
        changed = {k for k in state.keys() | before.keys() if state.get(k) is not before.get(k)}
        _same(told.build(state, changed), want)
        _same(build_catalog(state.values(), only), want)
        before = state


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
    catalog, conflicts = builder.build({"a": older, "b": younger})
    assert list(catalog) == ["a"]
    assert conflicts == [Conflict("b", younger.server_name, "port 80 is used by a")]
    catalog, conflicts = builder.build({"b": younger})
    assert list(catalog) == ["b"] and conflicts == []
