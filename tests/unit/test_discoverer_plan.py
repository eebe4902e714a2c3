"""diff(): which runtime actions, in which order, and when a reload is needed."""

from __future__ import annotations

from agents.discoverer.haproxy import parse_sessions, parse_show_proc, parse_state
from agents.discoverer.model import Catalog, Server, Service
from agents.discoverer.plan import (
    AddServer,
    RemoveServer,
    SetAddress,
    SetDrain,
    SetReady,
    SetWeight,
    diff,
)


def srv(name: str, port: int = 80, **extra: object) -> Server:
    return Server(name=name, address="10.0.0.1", port=port, **extra)  # type: ignore[arg-type]


def cat(*services: Service) -> Catalog:
    return {s.name: s for s in services}


def svc(name: str, *servers: Server, port: int = 8080, mode: str = "tcp") -> Service:
    return Service(name, port, mode, {s.name: s for s in servers})  # type: ignore[arg-type]


def test_same_catalog_is_an_empty_plan() -> None:
    c = cat(svc("web", srv("a"), srv("b", state="draining")))
    assert diff(c, c).empty


def test_new_server_is_added_without_reload() -> None:
    plan = diff(cat(svc("web", srv("a"))), cat(svc("web", srv("a"), srv("b"))))
    assert plan.actions == (AddServer("web", srv("b")),) and not plan.reload


def test_removed_server_is_removed_after_adds() -> None:
    plan = diff(cat(svc("web", srv("a"))), cat(svc("web", srv("b"))))
    assert plan.actions == (AddServer("web", srv("b")), RemoveServer("web", "a"))
    assert not plan.reload


def test_state_weight_and_address_changes() -> None:
    current = cat(
        svc("web", srv("a"), srv("b", state="draining"), srv("c"), srv("d", state="maint"))
    )
    desired = cat(svc("web", srv("a", weight=5), srv("b", weight=9), srv("c", state="draining"),
                      srv("d", port=81)))  # fmt: skip
    plan = diff(current, desired)
    assert not plan.reload
    assert plan.actions == (
        SetAddress("web", srv("d", port=81)),
        SetReady("web", "b"),
        SetReady("web", "d"),
        SetWeight("web", "a", 5),
        SetWeight("web", "b", 9),
        SetWeight("web", "d", 100),
        SetDrain("web", "c"),
    )


def test_draining_weight_is_not_compared() -> None:
    current = cat(svc("web", srv("a", weight=0, state="draining")))
    desired = cat(svc("web", srv("a", weight=100, state="draining")))
    assert diff(current, desired).empty


def test_listener_changes_need_a_reload() -> None:
    base = cat(svc("web", srv("a")))
    assert diff(base, cat(svc("web", srv("a"), port=9090))).reload
    assert diff(base, cat(svc("web", srv("a"), mode="http"))).reload
    new = diff(base, cat(svc("web", srv("a")), svc("api", srv("x"), port=9000)))
    assert new.reload and new.actions == ()  # the new backend's servers come with the config


def test_removed_service_drains_and_reloads() -> None:
    plan = diff(cat(svc("web", srv("a")), svc("old", srv("x"), port=1)), cat(svc("web", srv("a"))))
    assert plan.reload and plan.actions == (RemoveServer("old", "x"),)


def test_check_change_needs_a_reload() -> None:
    plan = diff(cat(svc("web", srv("a"))), cat(svc("web", srv("a", check=True))))
    assert plan.reload and plan.actions == ()


STAT = """# pxname,svname,qcur,scur,mode
_stats,FRONTEND,,0,http
fe_8080_web,FRONTEND,,0,http
web,a,0,2,http
web,BACKEND,0,2,http
fe_9000_empty,FRONTEND,,0,tcp
empty,BACKEND,0,0,tcp
"""
HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
    "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord "
    "srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port"
)
SERVERS = f"""1
{HEADER}
4 web 1 a 10.0.0.1 2 0 100 100 1 1 0 2 6 0 0 0 - 80 - 0 0 - - 0
4 web 2 b 10.0.0.1 2 8 0 0 0 1 0 2 0 0 0 0 - 81 - 0 0 - - 0
4 web 3 c 0:0::1 0 1 7 7 0 1 0 0 2 0 0 0 - 82 - 0 0 - - 0
"""


def test_parse_state() -> None:
    state = parse_state(STAT, SERVERS)
    assert set(state) == {"web", "empty"}
    assert state["web"].listener == (8080, "http") and state["empty"].listener == (9000, "tcp")
    servers = state["web"].servers
    assert servers["a"] == Server("a", "10.0.0.1", 80, 100, True, "up")
    assert servers["b"].state == "draining" and servers["b"].port == 81
    assert servers["c"] == Server("c", "::1", 82, 7, False, "maint")  # check configured, not on
    assert parse_sessions(STAT, "a") == 2 and parse_sessions(STAT, "zz") == 0


def test_parse_show_proc() -> None:
    text = """#<PID>          <type>          <reloads>       <uptime>        <version>
11805           master          1 [failed: 0]   0d00h00m01s     2.6.12-1+deb12u4
# workers
11853           worker          0               0d00h00m00s     2.6.12-1+deb12u4
11808           worker          1               0d00h00m01s     2.6.12-1+deb12u4
# programs
"""
    info = parse_show_proc(text)
    assert (info.master_pid, info.reloads, info.failed, info.worker_pid) == (11805, 1, 0, 11853)


def test_diff_restricted_to_changed_services_ignores_the_rest() -> None:
    current = cat(svc("web", srv("a")), svc("api", srv("x"), port=9000), svc("old", port=9100))
    desired = cat(svc("web", srv("a"), srv("b")), svc("api", port=9000), svc("new", port=9200))
    full = diff(current, desired)
    assert diff(current, desired, only={"web", "api", "old", "new"}) == full
    only_web = diff(current, desired, only={"web"})
    assert only_web.actions == (AddServer("web", srv("b")),) and not only_web.reload
    gone = diff(current, desired, only={"old", "missing"})
    assert gone.reload and gone.actions == ()
    assert diff(current, desired, only=set()).empty
