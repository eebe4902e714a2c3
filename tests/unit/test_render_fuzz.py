"""Fuzz: nothing that reaches the renderer or the command builders escapes the grammar."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agents.common.schema import NAME_PATTERN, Instance
from agents.discoverer import commands as cmd
from agents.discoverer.config import ConfigError, RenderOptions, grammar_violations, render_config
from agents.discoverer.haproxy.sink import _commands
from agents.discoverer.model import Server, Service, build_catalog
from agents.discoverer.plan import (
    AddServer,
    RemoveServer,
    SetAddress,
    SetDrain,
    SetReady,
    SetWeight,
)

OPTIONS = RenderOptions(state_dir="/run/pilotfish", stats_address="127.0.0.1:1936")

names = st.one_of(st.from_regex(NAME_PATTERN, fullmatch=True), st.text(max_size=70))
addresses = st.one_of(
    st.ip_addresses().map(str), st.text(max_size=40), st.just("127.0.0.1\nlisten x")
)
ints = st.one_of(st.integers(min_value=-10, max_value=70000), st.integers())
instance_fields = st.fixed_dictionaries(
    {
        "service": names,
        "host_id": names,
        "address": addresses,
        "port": ints,
        "private_port": ints,
        "container_id": st.one_of(st.from_regex(r"[0-9a-f]{12,64}", fullmatch=True), st.text()),
        "mode": st.sampled_from(["tcp", "http", "https", "tcp\n"]),
        "weight": ints,
        "check": st.booleans(),
        "state": st.sampled_from(["up", "draining", "down"]),
        "frontend_port": st.one_of(st.none(), ints),
    }
)


def _instances(raw: list[dict[str, Any]]) -> list[Instance]:
    instances = []
    for fields in raw:
        with contextlib.suppress(ValidationError):
            instances.append(Instance.model_validate(fields))
    return instances


def _all_commands(backend: str, server: Server) -> list[str]:
    lines: list[str] = []
    for action in (
        AddServer(backend, server),
        SetAddress(backend, server),
        SetWeight(backend, server.name, server.weight),
        SetReady(backend, server.name),
        SetDrain(backend, server.name),
        RemoveServer(backend, server.name),
    ):
        lines += _commands(action)
    name = server.name
    lines += [cmd.del_server(backend, name), cmd.shutdown_sessions(backend, name)]
    lines += [cmd.set_state(backend, name, "maint"), cmd.show_stat_servers(backend)]
    return lines


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(instance_fields, max_size=8))
def test_instances_render_only_grammar_lines(raw: list[dict[str, Any]]) -> None:
    catalog, _ = build_catalog(_instances(raw))
    text = render_config(catalog, OPTIONS)
    assert grammar_violations(text) == []
    for service in catalog.values():
        for server in service.servers.values():
            for line in _all_commands(service.name, server):
                assert "\n" not in line and "\r" not in line
                assert cmd.validate_command(line) == line


@settings(max_examples=300, deadline=None)
@given(names, ints, names, addresses, ints, ints, st.sampled_from(["tcp", "http", "x y"]))
def test_unvalidated_models_are_refused_or_clean(
    service: str, bind: int, name: str, address: str, port: int, weight: int, mode: str
) -> None:
    # Bypassing the schema: the renderer and the builders still refuse bad values.
    server = Server(name=name, address=address, port=port, weight=weight)
    catalog = {service: Service(service, bind, mode, {name: server})}  # type: ignore[arg-type]
    try:
        text = render_config(catalog, OPTIONS)
    except ConfigError:
        pass
    else:
        assert grammar_violations(text) == []
    try:
        lines = _all_commands(service, server)
    except cmd.CommandError:
        return
    for line in lines:
        assert cmd.validate_command(line) == line


@given(st.text(max_size=80))
def test_validate_command_refuses_injection(tail: str) -> None:
    line = f"set server web/a state ready{tail}"
    try:
        cmd.validate_command(line)
    except cmd.CommandError:
        return
    assert "\n" not in line and tail in ("",)


@given(st.text(max_size=30))
def test_bad_options_are_refused(value: str) -> None:
    for options in (
        RenderOptions(state_dir=value),
        RenderOptions(state_dir="/run/x", stats_address=value),
        RenderOptions(state_dir="/run/x", bind_address=value),
    ):
        try:
            text = render_config({}, options)
        except ConfigError:
            continue
        assert grammar_violations(text) == []
