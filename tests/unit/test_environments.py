"""The pure side of environments: roles and users to create, and the access check."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.common.access import (
    PROBE,
    AccessDenied,
    Probe,
    ancestors,
    checked,
    probes_for,
    verdict,
)
from agents.common.schema import SchemaError, environment_key, parse_environment
from agents.env.model import (
    AddRole,
    AddUser,
    AuthState,
    ChangePassword,
    DeleteRole,
    DeleteUser,
    Environment,
    GrantPermission,
    GrantRole,
    Permission,
    RevokePermission,
    RevokeRole,
    env_file,
    environments,
    plan_create,
    plan_delete,
    range_end,
    read_env_file,
    roles_covering,
)

DEV = Environment("dev", "/pilotfish/dev")
PROD = Environment("prod", "/pilotfish/prod")


def applied(state: AuthState, actions: list[object]) -> AuthState:
    """What etcd holds after ``actions`` (a model of the Auth service)."""
    roles = dict(state.roles)
    users = dict(state.users)
    for action in actions:
        match action:
            case AddRole(role=role):
                roles[role] = frozenset()
            case GrantPermission(role=role, permission=p):
                roles[role] = roles[role] | {p}
            case RevokePermission(role=role, permission=p):
                roles[role] = roles[role] - {p}
            case AddUser(user=user):
                users[user] = frozenset()
            case GrantRole(user=user, role=role):
                users[user] = users[user] | {role}
            case RevokeRole(user=user, role=role):
                users[user] = users[user] - {role}
            case DeleteUser(user=user):
                del users[user]
            case DeleteRole(role=role):
                del roles[role]
    return AuthState(state.enabled, roles, users)


def test_range_end_is_etcds_prefix_end() -> None:
    assert range_end("/pilotfish/dev/") == "/pilotfish/dev0"
    assert Permission.on_prefix("/a/", "read") == Permission("/a/", "/a0", "read")


def test_the_registrar_role_writes_its_prefix_and_the_discoverer_only_its_status() -> None:
    registrar = DEV.permissions("registrar")
    discoverer = DEV.permissions("discoverer")
    writes = {p.key for p in registrar if p.allows_write()}
    assert writes == {"/pilotfish/dev/"}
    assert {p.key for p in discoverer if p.allows_write()} == {"/pilotfish/dev/discoverers/"}
    for permissions in (registrar, discoverer):
        assert not any(p.covers("/pilotfish/prod/services/x") for p in permissions)
        assert not any(p.covers("/pilotfish/dev2/services/x") for p in permissions)


def test_create_from_nothing_then_again_changes_nothing() -> None:
    state = AuthState(enabled=True)
    actions = plan_create(DEV, state)
    assert [a for a in actions if isinstance(a, AddUser)] == [
        AddUser("pilotfish-dev-registrar", "registrar"),
        AddUser("pilotfish-dev-discoverer", "discoverer"),
    ]
    after = applied(state, actions)
    assert plan_create(DEV, after) == []
    assert after.users["pilotfish-dev-registrar"] == {"pilotfish-dev-registrar"}


def test_rotate_changes_only_the_passwords_asked_for() -> None:
    state = applied(AuthState(True), plan_create(DEV, AuthState(True)))
    assert plan_create(DEV, state, ["registrar"]) == [
        ChangePassword("pilotfish-dev-registrar", "registrar")
    ]


def test_create_repairs_a_role_and_takes_a_second_environment_from_its_user() -> None:
    state = applied(AuthState(True), plan_create(DEV, AuthState(True)))
    state = applied(state, plan_create(PROD, state))
    wide = Permission.on_prefix("/pilotfish/", "readwrite")
    state.roles["pilotfish-dev-registrar"] = frozenset({wide})
    state.users["pilotfish-dev-registrar"] = frozenset(
        {"pilotfish-dev-registrar", "pilotfish-prod-registrar"}
    )
    actions = plan_create(DEV, state)
    assert RevokePermission("pilotfish-dev-registrar", wide) in actions
    assert RevokeRole("pilotfish-dev-registrar", "pilotfish-prod-registrar") in actions
    assert plan_create(DEV, applied(state, actions)) == []


@given(
    st.sets(st.sampled_from(["registrar", "discoverer"])),
    st.sets(st.sampled_from(["registrar", "discoverer"])),
    st.booleans(),
)
def test_create_converges_from_any_partial_state(
    roles_present: set[str], users_present: set[str], extra: bool
) -> None:
    full = applied(AuthState(True), plan_create(DEV, AuthState(True)))
    state = AuthState(
        True,
        {r: p for r, p in full.roles.items() if r.rsplit("-", 1)[1] in roles_present},
        {u: r for u, r in full.users.items() if u.rsplit("-", 1)[1] in users_present},
    )
    if extra and state.roles:
        role = next(iter(state.roles))
        state.roles[role] = state.roles[role] | {Permission.on_prefix("/", "readwrite")}
    after = applied(state, plan_create(DEV, state))
    assert after.roles == full.roles and after.users == full.users


def test_delete_removes_only_that_environment() -> None:
    state = applied(AuthState(True), plan_create(DEV, AuthState(True)))
    state = applied(state, plan_create(PROD, state))
    after = applied(state, plan_delete(DEV, state))
    assert [e.name for e in environments(after)] == ["prod"]
    assert plan_delete(DEV, after) == []


def test_environments_are_read_back_from_the_roles() -> None:
    state = applied(AuthState(True), plan_create(PROD, AuthState(True)))
    (view,) = environments(state)
    assert (view.name, view.prefix) == ("prod", "/pilotfish/prod")
    assert {r.role: r.users for r in view.roles} == {
        "pilotfish-prod-registrar": ("pilotfish-prod-registrar",),
        "pilotfish-prod-discoverer": ("pilotfish-prod-discoverer",),
    }
    assert roles_covering("/pilotfish/prod", state.roles) == [
        "pilotfish-prod-discoverer",
        "pilotfish-prod-registrar",
    ]
    assert roles_covering("/pilotfish/dev", state.roles) == []


@given(st.text(alphabet="abcXYZ019_-./:@", max_size=40))
def test_environment_files_read_back(value: str) -> None:
    text = env_file(DEV, "registrar", "s3cr3t-_x", {"PILOTFISH_ETCD_CACERT": value, "X": None})
    variables = read_env_file(text)
    assert variables["PILOTFISH_ETCD_PASSWORD"] == "s3cr3t-_x"
    assert variables["PILOTFISH_ETCD_USERNAME"] == "pilotfish-dev-registrar"
    assert variables["PILOTFISH_ETCD_CACERT"] == value
    assert "X" not in variables


def test_environment_records_are_checked() -> None:
    good = b'{"version": 1, "name": "dev", "prefix": "/pilotfish/dev"}'
    assert parse_environment(environment_key("dev"), good).prefix == "/pilotfish/dev"
    for key, value in (
        (environment_key("prod"), good),  # key and value disagree
        (environment_key("dev"), b'{"version": 1, "name": "dev", "prefix": "x\\ny"}'),
        (environment_key("dev"), b"x" * 5000),
    ):
        with pytest.raises(SchemaError):
            parse_environment(key, value)


# --- the access check ---------------------------------------------------------------------


def test_ancestors_are_the_levels_next_to_the_prefix() -> None:
    assert ancestors("/a/b/c") == ["/a/b", "/a", ""]
    assert ancestors("/dev") == [""]


def test_a_registrar_is_probed_in_its_siblings_and_next_to_its_prefix() -> None:
    probes = probes_for("registrar", ["/pilotfish/dev"], ["/pilotfish/prod", "/pilotfish/dev/x"])
    refused = {p.key for p in probes if not p.allowed}
    assert refused == {
        f"/pilotfish/prod/services/{PROBE}",
        f"/pilotfish/dev{PROBE}",
        f"/pilotfish/{PROBE}",
        f"/{PROBE}",
    }  # a nested prefix is not a sibling: the registrar's own role covers it
    needed = {(p.key, p.op) for p in probes if p.allowed}
    assert (f"/pilotfish/dev/services/{PROBE}", "write") in needed
    assert (f"/pilotfish/dev/drains/{PROBE}", "write") in needed


def test_the_verdict_names_what_is_missing_first() -> None:
    probes = probes_for("registrar", ["/pilotfish/prod"], ["/pilotfish/dev"])
    # dev's user with prod's prefix: nothing of prod allowed, dev's keys allowed.
    answers = [(p, p.key.startswith("/pilotfish/dev/")) for p in probes]
    fatal, warnings = verdict("pilotfish-dev-registrar", answers)
    assert "may not read /pilotfish/prod/services/" in fatal[0]
    assert any("may also write /pilotfish/dev/services/" in line for line in fatal)
    assert warnings == []


def test_a_discoverer_that_may_write_registrations_is_only_warned() -> None:
    probes = probes_for("discoverer", ["/p"])
    fatal, warnings = verdict("u", [(p, True) for p in probes])
    assert fatal == [] and len(warnings) == 1 and "needs to read only" in warnings[0]
    fatal, _ = verdict("u", [(p, p.op == "read") for p in probes])
    assert "may not write /p/discoverers/" in fatal[0]


def test_a_discoverer_without_a_status_key_needs_only_to_read() -> None:
    probes = probes_for("discoverer", ["/p"], publishes_status=False)
    fatal, _ = verdict("u", [(p, p.op == "read") for p in probes])
    assert fatal == []


def test_the_catalog_reads_every_prefix() -> None:
    probes = probes_for("catalog", ["/a", "/b"])
    assert probes == [
        Probe(f"/a/services/{PROBE}", "read", True, True, "the catalog"),
        Probe(f"/b/services/{PROBE}", "read", True, True, "the catalog"),
    ]


async def test_checked_returns_when_the_run_ends_before_the_check() -> None:
    async def never_proven() -> None:
        await asyncio.sleep(3600)  # etcd away: ensure_access retries on

    async def short_run() -> int:
        return 7

    assert await asyncio.wait_for(checked(never_proven(), short_run()), 5) == 7


async def test_checked_ends_the_run_when_access_is_refused() -> None:
    async def refused() -> None:
        raise AccessDenied("no")

    async def long_run() -> None:
        await asyncio.sleep(3600)

    with pytest.raises(AccessDenied):
        await asyncio.wait_for(checked(refused(), long_run()), 5)
