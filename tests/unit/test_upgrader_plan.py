"""The upgrader's decisions: labels, which containers to replace, the copy, recovery."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents import cli
from agents.common.docker_events import ImageEvent, _parse_event
from agents.upgrader.docker import container_of, split_reference
from agents.upgrader.plan import (
    FROM_IMAGE_LABEL,
    NEXT_SUFFIX,
    PREVIOUS_SUFFIX,
    REPLACES_LABEL,
    BadLabel,
    Container,
    clone_config,
    decide,
    extra_networks,
    fixed_ports,
    follows_a_tag,
    read_labels,
    recover,
)

OLD_ID = "a" * 64
NEW_ID = "b" * 64
IMG_OLD = "sha256:" + "1" * 64
IMG_NEW = "sha256:" + "2" * 64


def web(**changes: Any) -> Container:
    fields: dict[str, Any] = {
        "id": OLD_ID,
        "name": "web",
        "image_ref": "app:live",
        "image_id": IMG_OLD,
        "labels": {"pilotfish.upgrade": "auto"},
    }
    return Container(**{**fields, **changes})


# --- labels and decisions -----------------------------------------------------------------


def test_labels_are_read_and_bad_ones_named() -> None:
    assert read_labels({"pilotfish.upgrade": "auto"}).opted == "auto"
    assert read_labels({}).opted == "unset"
    assert read_labels({"pilotfish.upgrade.order": "stop-first"}).order == "stop-first"
    for labels in (
        {"pilotfish.upgrade": "yes please"},
        {"pilotfish.upgrade.order": "random"},
        {REPLACES_LABEL: "not-an-id"},
        {FROM_IMAGE_LABEL: "sha256:xyz"},
    ):
        with pytest.raises(BadLabel, match=next(iter(labels))):
            read_labels(labels)


def test_a_moved_tag_upgrades_an_opted_in_container() -> None:
    decision = decide(web(), IMG_NEW, all_containers=False, failed={})
    assert decision is not None and decision.verdict == "upgrade"
    assert decision.target_image == IMG_NEW and "app:live" in decision.reason


def test_not_opted_in_is_not_a_candidate_unless_all() -> None:
    plain = web(labels={})
    assert decide(plain, IMG_NEW, all_containers=False, failed={}) is None
    decision = decide(plain, IMG_NEW, all_containers=True, failed={})
    assert decision is not None and decision.verdict == "upgrade"
    off = web(labels={"pilotfish.upgrade": "off"})
    assert decide(off, IMG_NEW, all_containers=True, failed={}) is None


def test_current_stopped_and_temporary_containers() -> None:
    current = decide(web(), IMG_OLD, all_containers=False, failed={})
    assert current is not None and current.verdict == "current"
    assert decide(web(state="exited"), IMG_NEW, all_containers=False, failed={}) is None
    for suffix in (NEXT_SUFFIX, PREVIOUS_SUFFIX):
        assert decide(web(name="web" + suffix), IMG_NEW, all_containers=True, failed={}) is None


def test_bad_label_is_refused_not_upgraded() -> None:
    decision = decide(web(labels={"pilotfish.upgrade": "always"}), IMG_NEW, all_containers=True,
                      failed={})  # fmt: skip
    assert decision is not None and decision.verdict == "refused"
    assert "pilotfish.upgrade=" in decision.reason


def test_failed_image_waits_for_the_tag_to_move() -> None:
    skipped = decide(web(), IMG_NEW, all_containers=False, failed={"web": IMG_NEW})
    assert skipped is not None and skipped.verdict == "skip"
    moved = decide(web(), "sha256:" + "3" * 64, all_containers=False, failed={"web": IMG_NEW})
    assert moved is not None and moved.verdict == "upgrade"


def test_rolled_back_image_does_not_come_back_by_itself() -> None:
    decision = decide(web(), IMG_NEW, all_containers=False, failed={}, previous_image=IMG_NEW)
    assert decision is not None and decision.verdict == "skip" and "rolled back" in decision.reason


def test_fixed_host_port_is_skipped_unless_stop_first() -> None:
    fixed = web(fixed_ports=("8080/tcp->80",))
    skipped = decide(fixed, IMG_NEW, all_containers=False, failed={})
    assert skipped is not None and skipped.verdict == "skip" and "8080/tcp->80" in skipped.reason
    labels = {"pilotfish.upgrade": "auto", "pilotfish.upgrade.order": "stop-first"}
    accepted = decide(web(fixed_ports=("8080/tcp->80",), labels=labels), IMG_NEW,
                      all_containers=False, failed={})  # fmt: skip
    assert accepted is not None and accepted.verdict == "upgrade"
    assert accepted.order == "stop-first"


def test_only_tags_can_move() -> None:
    assert follows_a_tag("app:live") and follows_a_tag("127.0.0.1:5000/app:v1")
    assert follows_a_tag("app")
    assert not follows_a_tag(IMG_OLD) and not follows_a_tag("1" * 12)
    assert not follows_a_tag("app@sha256:" + "1" * 64) and not follows_a_tag("")
    decision = decide(web(image_ref=IMG_OLD), IMG_NEW, all_containers=False, failed={})
    assert decision is not None and decision.verdict == "skip"


def test_split_reference() -> None:
    assert split_reference("app") == ("app", "latest")
    assert split_reference("app:v2") == ("app", "v2")
    assert split_reference("127.0.0.1:5000/app") == ("127.0.0.1:5000/app", "latest")
    assert split_reference("127.0.0.1:5000/app:v2") == ("127.0.0.1:5000/app", "v2")


# --- the copy ------------------------------------------------------------------------------

IMAGE_CONFIG = {
    "Cmd": ["/init"],
    "Env": ["PATH=/bin", "VERSION=1"],
    "Labels": {"maker": "x"},
    "ExposedPorts": {"8080/tcp": {}},
    "WorkingDir": "",
}


def inspect_doc(**host: Any) -> dict[str, Any]:
    return {
        "Id": OLD_ID,
        "Name": "/web",
        "Image": IMG_OLD,
        "Config": {
            "Hostname": OLD_ID[:12],
            "Image": "app:live",
            "Cmd": ["/init"],
            "Entrypoint": None,
            "Env": ["PATH=/bin", "VERSION=1", "FOO=bar"],
            "Labels": {"maker": "x", "pilotfish.upgrade": "auto", REPLACES_LABEL: "c" * 64},
            "ExposedPorts": {"8080/tcp": {}, "9000/tcp": {}},
            "WorkingDir": "/srv",
            "User": "",
            "StopSignal": "SIGQUIT",
            "StopTimeout": 20,
            "Healthcheck": {"Test": ["CMD", "true"]},
        },
        "HostConfig": {
            "NetworkMode": "appnet",
            "Binds": ["/data:/data:ro"],
            "RestartPolicy": {"Name": "always"},
            "PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
            **host,
        },
        "NetworkSettings": {
            "Networks": {
                "appnet": {"Aliases": ["web", OLD_ID[:12]], "IPAMConfig": None},
                "other": {"Aliases": ["w2"]},
            }
        },
        "State": {"Status": "running", "Health": {"Status": "healthy"}},
    }


def test_clone_keeps_what_the_container_set_and_takes_the_rest_from_the_new_image() -> None:
    extra = {REPLACES_LABEL: OLD_ID, FROM_IMAGE_LABEL: IMG_OLD}
    body = clone_config(inspect_doc(), IMAGE_CONFIG, "app:live", extra)
    assert body["Image"] == "app:live"
    assert body["Env"] == ["FOO=bar"]  # VERSION comes from the new image
    assert "Cmd" not in body  # the image's: the new image's CMD applies
    assert body["Labels"] == {"pilotfish.upgrade": "auto", **extra}
    assert body["ExposedPorts"] == {"9000/tcp": {}}
    assert (body["WorkingDir"], body["StopSignal"], body["StopTimeout"]) == ("/srv", "SIGQUIT", 20)
    assert body["Healthcheck"] == {"Test": ["CMD", "true"]}
    assert "Hostname" not in body  # Docker's default (the short id) is not copied
    host = body["HostConfig"]
    assert host["Binds"] == ["/data:/data:ro"] and host["RestartPolicy"] == {"Name": "always"}
    assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert body["NetworkingConfig"] == {"EndpointsConfig": {"appnet": {"Aliases": ["web"]}}}
    assert extra_networks(inspect_doc()) == [("other", {"Aliases": ["w2"]})]


def test_a_hostname_the_user_set_is_kept() -> None:
    doc = inspect_doc()
    doc["Config"]["Hostname"] = "api-1"
    assert clone_config(doc, IMAGE_CONFIG, "app:live", {})["Hostname"] == "api-1"


def test_fixed_ports_are_the_ones_with_a_host_port() -> None:
    assert fixed_ports(inspect_doc()["HostConfig"]) == ()
    host = {"PortBindings": {"8080/tcp": [{"HostIp": "", "HostPort": "80"}], "9/udp": [{}]}}
    assert fixed_ports(host) == ("8080/tcp->80",)
    assert container_of(inspect_doc(**host)).fixed_ports == ("8080/tcp->80",)


# --- recovery --------------------------------------------------------------------------------


def new_copy(state: str = "running", health: str = "none", labelled: bool = True) -> Container:
    labels = {REPLACES_LABEL: OLD_ID, FROM_IMAGE_LABEL: IMG_OLD} if labelled else {}
    return Container(NEW_ID, "web" + NEXT_SUFFIX, "app:live", IMG_NEW, labels, state, health)


def test_both_running_rolls_back() -> None:
    (plan,) = recover([web(), new_copy()])
    assert plan.kind == "roll_back" and plan.old is not None and plan.old.id == OLD_ID


def test_old_stopped_new_running_finishes() -> None:
    (plan,) = recover([web(state="exited"), new_copy()])
    assert plan.kind == "finish" and plan.base == "web"
    (renamed,) = recover([web(state="exited", name="web" + PREVIOUS_SUFFIX), new_copy()])
    assert renamed.kind == "finish"


def test_new_not_running_is_removed_or_old_restored() -> None:
    assert recover([web(), new_copy("created")])[0].kind == "remove_new"
    assert recover([web(state="exited"), new_copy("exited")])[0].kind == "restore_old"
    assert recover([web(state="exited"), new_copy(health="starting")])[0].kind == "restore_old"


def test_a_rollback_in_progress_finds_the_old_copy_by_name() -> None:
    (plan,) = recover([web(), new_copy(labelled=False)])
    assert plan.kind == "roll_back" and plan.old is not None and plan.old.name == "web"


def test_a_stale_replaces_label_falls_back_to_the_name() -> None:
    """A previous version brought back by a rollback names its own, long gone, predecessor."""
    stale = Container(NEW_ID, "web" + NEXT_SUFFIX, "app:live", IMG_NEW,
                      {REPLACES_LABEL: "e" * 64}, "running")  # fmt: skip
    (plan,) = recover([web(), stale])
    assert plan.kind == "roll_back" and plan.old is not None and plan.old.id == OLD_ID
    assert plan.brought_back  # put back as the previous version, not removed
    assert not recover([web(), new_copy()])[0].brought_back
    assert recover([web(), new_copy(labelled=False)])[0].brought_back


def test_name_taken_by_a_stranger_is_left_alone() -> None:
    stranger = web(id="d" * 64, labels={})
    (plan,) = recover([web(state="exited", name="web" + PREVIOUS_SUFFIX), new_copy(), stranger])
    assert plan.kind == "refused"


def test_a_replaces_label_naming_another_container_is_refused() -> None:
    stranger = web(name="db", state="exited")
    (plan,) = recover([stranger, new_copy()])
    assert plan.kind == "refused" and "db" in plan.reason


STATES = st.sampled_from(["running", "exited", "created", "missing"])
HEALTH = st.sampled_from(["none", "starting", "healthy", "unhealthy"])


@given(STATES, HEALTH, STATES, st.booleans(), st.booleans())
def test_recovery_leaves_exactly_one_running_copy(
    new_state: str, new_health: str, old_state: str, labelled: bool, old_renamed: bool
) -> None:
    """Whatever step the upgrader died at, the plan ends with one copy running, named."""
    new = None if new_state == "missing" else new_copy(new_state, new_health, labelled)
    old_name = "web" + PREVIOUS_SUFFIX if old_renamed and labelled else "web"
    old = None if old_state == "missing" else web(state=old_state, name=old_name)
    containers = [c for c in (new, old) if c is not None]
    plans = recover(containers)
    if new is None:
        assert plans == []
        return
    (plan,) = plans
    running = {c.id for c in containers if c.running}
    if plan.kind == "finish":
        running = {new.id}
    elif plan.kind in ("roll_back", "remove_new", "restore_old"):
        assert plan.old is not None
        running = {plan.old.id}
    assert plan.kind != "refused" and len(running) == 1


# --- the event source and the settings ---------------------------------------------------------


def test_image_events_are_typed() -> None:
    line = {
        "Type": "image",
        "Action": "tag",
        "Actor": {"ID": IMG_NEW, "Attributes": {"name": "app:live"}},
        "timeNano": 5,
    }
    event = _parse_event(json.dumps(line).encode())
    assert event == ImageEvent("tag", IMG_NEW, "app:live", 5)
    assert _parse_event(json.dumps({**line, "Action": "delete"}).encode()) is None


@pytest.mark.parametrize(
    "flags",
    [["--interval", "0"], ["--health-timeout", "-1"], ["--rollback", "a b"],
     ["--admin-address", "nowhere"], ["--docker-host", "ftp://x"]],
)  # fmt: skip
def test_a_bad_setting_exits_2_with_one_line(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["upgrade", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pilotfish upgrade: invalid setting") and err.count("\n") == 1
