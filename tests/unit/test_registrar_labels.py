"""The registrar's pure core: inspect → ContainerInfo → instances → reconcile."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from agents.common.container import ContainerInfo, container_from_inspect
from agents.common.schema import Instance, instance_key
from agents.registrar.labels import desired_instances, draining, image_service_name
from agents.registrar.reconcile import reconcile

NOW = datetime(2024, 1, 1, tzinfo=UTC)
CID = "a1b2c3d4e5f6" + "0" * 52
PREFIX = "/pf"


@dataclass(frozen=True)
class Opts:
    host_ip: str = "10.0.0.5"
    host_id: str = "hostA"
    internal: bool = False
    explicit: bool = False
    environment: str = ""


def inspect_doc(
    *,
    image: str = "registry:5000/team/whoami:1.2",
    labels: dict[str, str] | None = None,
    env: list[str] | None = None,
    ports: dict[str, Any] | None = None,
    exposed: dict[str, Any] | None = None,
    status: str = "running",
    paused: bool = False,
    health: str | None = None,
    ip: str = "172.17.0.2",
) -> dict[str, Any]:
    state: dict[str, Any] = {"Status": status, "Running": status == "running", "Paused": paused}
    if health:
        state["Health"] = {"Status": health}
    return {
        "Id": CID,
        "Name": "/web1",
        "Image": "sha256:" + "f" * 64,
        "State": state,
        "Config": {
            "Image": image,
            "Labels": labels or {},
            "Env": env or ["PATH=/bin"],
            "ExposedPorts": exposed or {"8080/tcp": {}},
        },
        "NetworkSettings": {
            "IPAddress": ip,
            "Ports": ports
            if ports is not None
            else {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}]},
            "Networks": {"bridge": {"IPAddress": ip}},
        },
    }


def instances_of(doc: dict[str, Any], **opts: Any) -> tuple[list[Instance], list[Any]]:
    return desired_instances(container_from_inspect(doc), Opts(**opts), NOW)


def test_inspect_is_read_into_plain_data() -> None:
    doc = inspect_doc(
        env=["A=1", "SERVICE_TAGS=x,y", "EMPTY="],
        ports={
            "8080/tcp": [
                {"HostIp": "0.0.0.0", "HostPort": "32768"},
                {"HostIp": "::", "HostPort": "32768"},
            ],
            "9000/udp": None,
        },
        exposed={"8080/tcp": {}, "9000/udp": {}, "7000/tcp": {}},
        health="starting",
    )
    info = container_from_inspect(doc)
    assert info.name == "web1" and info.image == "registry:5000/team/whoami:1.2"
    assert info.env["A"] == "1" and info.env["EMPTY"] == ""
    assert info.health == "starting" and info.state == "running"
    assert info.ips == ("172.17.0.2",)
    published = [p for p in info.ports if p.host_port is not None]
    assert [(p.private_port, p.host_ip, p.host_port) for p in published] == [
        (8080, "0.0.0.0", 32768),
        (8080, "::", 32768),
    ]
    exposed_only = {(p.private_port, p.protocol) for p in info.ports if p.host_port is None}
    assert exposed_only == {(9000, "udp"), (7000, "tcp")}


def test_paused_state_is_seen() -> None:
    assert container_from_inspect(inspect_doc(paused=True)).state == "paused"


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("registry:5000/team/app:1.2@sha256:" + "a" * 64, "app"),
        ("app", "app"),
        ("library/app:latest", "app"),
        ("localhost:5000/app", "app"),
        ("sha256:" + "a" * 64, ""),
        ("a" * 64, ""),
    ],
)
def test_image_service_name(image: str, name: str) -> None:
    assert image_service_name(image) == name


def test_one_published_port_registers_with_host_ip_and_host_port() -> None:
    (instance,), refusals = instances_of(inspect_doc())
    assert refusals == []
    assert (instance.service, instance.address, instance.port, instance.private_port) == (
        "whoami",
        "10.0.0.5",
        32768,
        8080,
    )
    assert instance.host_id == "hostA" and instance.container_name == "web1"
    assert instance.registered_at == NOW and instance.state == "up"


def test_specific_binding_ip_is_used_instead_of_host_ip() -> None:
    doc = inspect_doc(ports={"8080/tcp": [{"HostIp": "127.0.0.2", "HostPort": "4000"}]})
    (instance,), _ = instances_of(doc)
    assert (instance.address, instance.port) == ("127.0.0.2", 4000)


def test_ipv4_and_ipv6_bindings_of_one_port_register_once() -> None:
    doc = inspect_doc(
        ports={
            "8080/tcp": [
                {"HostIp": "0.0.0.0", "HostPort": "32768"},
                {"HostIp": "::", "HostPort": "32768"},
            ]
        }
    )
    instances, _ = instances_of(doc)
    assert len(instances) == 1


def test_several_ports_get_port_suffix_unless_named_per_port() -> None:
    doc = inspect_doc(
        env=["SERVICE_9090_NAME=admin"],
        ports={
            "8080/tcp": [{"HostIp": "", "HostPort": "1"}],
            "9090/tcp": [{"HostIp": "", "HostPort": "2"}],
            "53/udp": [{"HostIp": "", "HostPort": "3"}],
        },
    )
    instances, _ = instances_of(doc)
    assert sorted(i.service for i in instances) == ["admin", "whoami-8080"]


def test_service_name_precedence() -> None:
    base = {"env": ["SERVICE_NAME=fromenv", "SERVICE_8080_NAME=fromport"]}
    (i,), _ = instances_of(inspect_doc(**base))
    assert i.service == "fromport"
    (i,), _ = instances_of(inspect_doc(env=["SERVICE_NAME=fromenv"]))
    assert i.service == "fromenv"
    (i,), _ = instances_of(inspect_doc(labels={"pilotfish.service": "fromlabel"}, **base))
    assert i.service == "fromlabel"
    labels = {"pilotfish.service": "x", "pilotfish.8080.service": "perport"}
    (i,), _ = instances_of(inspect_doc(labels=labels))
    assert i.service == "perport"
    (i,), _ = instances_of(inspect_doc(labels={"SERVICE_NAME": "labelvar"}, env=["SERVICE_NAME=e"]))
    assert i.service == "labelvar"


@pytest.mark.parametrize(
    "source",
    [
        {"env": ["SERVICE_IGNORE=1"]},
        {"env": ["SERVICE_IGNORE=yes"]},
        {"labels": {"pilotfish.ignore": "true"}},
        {"labels": {"pilotfish.ignore": ""}},
        {"env": ["SERVICE_8080_IGNORE=1"]},
    ],
)
def test_ignored(source: dict[str, Any]) -> None:
    assert instances_of(inspect_doc(**source)) == ([], [])


def test_ignore_false_registers() -> None:
    instances, _ = instances_of(inspect_doc(labels={"pilotfish.ignore": "false"}))
    assert len(instances) == 1


def test_bad_ignore_value_skips_the_container_with_a_refusal() -> None:
    instances, refusals = instances_of(inspect_doc(labels={"pilotfish.ignore": "maybe"}))
    assert instances == [] and refusals[0].label == "pilotfish.ignore"


def test_an_environment_registers_only_its_labelled_containers() -> None:
    assert len(instances_of(inspect_doc())[0]) == 1  # no --environment: every container
    assert instances_of(inspect_doc(), environment="prod") == ([], [])
    dev = inspect_doc(labels={"pilotfish.environment": "dev"})
    assert instances_of(dev, environment="prod") == ([], [])
    prod = inspect_doc(labels={"pilotfish.environment": "prod"})
    assert len(instances_of(prod, environment="prod")[0]) == 1


def test_explicit_registers_only_named_containers_or_ports() -> None:
    assert instances_of(inspect_doc(), explicit=True) == ([], [])
    (i,), _ = instances_of(inspect_doc(labels={"pilotfish.service": "x"}), explicit=True)
    assert i.service == "x"
    (i,), _ = instances_of(inspect_doc(env=["SERVICE_NAME=y"]), explicit=True)
    assert i.service == "y"
    doc = inspect_doc(
        env=["SERVICE_9090_NAME=admin"],
        ports={
            "8080/tcp": [{"HostIp": "", "HostPort": "1"}],
            "9090/tcp": [{"HostIp": "", "HostPort": "2"}],
        },
    )
    (i,), _ = instances_of(doc, explicit=True)
    assert i.service == "admin"


def test_internal_uses_container_ip_and_private_port_and_exposed_ports() -> None:
    doc = inspect_doc(ports={}, exposed={"8080/tcp": {}, "9090/tcp": {}})
    assert instances_of(doc) == ([], [])
    instances, _ = instances_of(doc, internal=True)
    assert sorted((i.service, i.address, i.port) for i in instances) == [
        ("whoami-8080", "172.17.0.2", 8080),
        ("whoami-9090", "172.17.0.2", 9090),
    ]


def test_internal_without_container_ip_registers_nothing() -> None:
    doc = inspect_doc(ip="")
    doc["NetworkSettings"]["Networks"] = {}
    assert instances_of(doc, internal=True)[0] == []


def test_tags_attributes_and_routing_fields() -> None:
    doc = inspect_doc(
        env=["SERVICE_TAGS=a,b,,a", "SERVICE_REGION=eu", "SERVICE_8080_REGION=us", "SERVICE_9_X=1"],
        labels={
            "pilotfish.attr.team": "core",
            "pilotfish.mode": "http",
            "pilotfish.weight": "7",
            "pilotfish.check": "yes",
            "pilotfish.port": "80",
        },
    )
    (i,), refusals = instances_of(doc)
    assert refusals == []
    assert i.tags == ("a", "b")
    assert i.attributes == {"region": "us", "team": "core"}
    assert (i.mode, i.weight, i.check, i.frontend_port) == ("http", 7, True, 80)


def test_label_tags_win_over_env_tags() -> None:
    doc = inspect_doc(env=["SERVICE_TAGS=e"], labels={"pilotfish.tags": "l1, l2"})
    (i,), _ = instances_of(doc)
    assert i.tags == ("l1", "l2")


@pytest.mark.parametrize(
    ("labels", "label"),
    [
        ({"pilotfish.service": "bad name"}, "pilotfish.service"),
        ({"pilotfish.service": "web\nbackend evil"}, "pilotfish.service"),
        ({"pilotfish.service": 'web"'}, "pilotfish.service"),
        ({"pilotfish.service": "web#x"}, "pilotfish.service"),
        ({"pilotfish.service": "a" * 300}, "pilotfish.service"),
        ({"pilotfish.weight": "ten"}, "pilotfish.weight"),
        ({"pilotfish.weight": "257"}, "pilotfish.weight"),
        ({"pilotfish.weight": "-1"}, "pilotfish.weight"),
        ({"pilotfish.port": "80a"}, "pilotfish.port"),
        ({"pilotfish.port": "0"}, "pilotfish.port"),
        ({"pilotfish.mode": "udp"}, "pilotfish.mode"),
        ({"pilotfish.check": "perhaps"}, "pilotfish.check"),
    ],
)
def test_bad_container_wide_label_skips_the_container(labels: dict[str, str], label: str) -> None:
    instances, refusals = instances_of(inspect_doc(labels=labels))
    assert instances == []
    assert [(r.label, r.skipped, r.container_name) for r in refusals] == [
        (label, "container", "web1")
    ]
    assert "\n" not in refusals[0].reason and len(refusals[0].reason) < 200


def test_bad_per_port_label_skips_only_that_port() -> None:
    doc = inspect_doc(
        labels={"pilotfish.9090.weight": "x"},
        ports={
            "8080/tcp": [{"HostIp": "", "HostPort": "1"}],
            "9090/tcp": [{"HostIp": "", "HostPort": "2"}],
        },
    )
    instances, refusals = instances_of(doc)
    assert [i.private_port for i in instances] == [8080]
    assert [(r.label, r.skipped) for r in refusals] == [("pilotfish.9090.weight", "port 9090")]


def test_bad_tag_or_attribute_is_dropped_alone() -> None:
    doc = inspect_doc(
        env=["SERVICE_TAGS=good,b#d", "SERVICE_DESCRIPTION=has spaces"],
        labels={"pilotfish.attr.x y": "1"},
    )
    (i,), refusals = instances_of(doc)
    assert i.tags == ("good",) and i.attributes == {}
    assert sorted((r.label, r.skipped) for r in refusals) == [
        ("SERVICE_DESCRIPTION", "attribute"),
        ("SERVICE_TAGS", "tag"),
        ("pilotfish.attr.x y", "attribute"),
    ]


def test_frontend_port_with_several_ports_is_ambiguous() -> None:
    doc = inspect_doc(
        labels={"pilotfish.port": "80"},
        ports={
            "8080/tcp": [{"HostIp": "", "HostPort": "1"}],
            "9090/tcp": [{"HostIp": "", "HostPort": "2"}],
        },
    )
    instances, refusals = instances_of(doc)
    assert instances == [] and refusals[0].label == "pilotfish.port"


def test_image_id_without_a_name_is_refused() -> None:
    instances, refusals = instances_of(inspect_doc(image="sha256:" + "a" * 64))
    assert instances == [] and refusals[0].label == "image"


@pytest.mark.parametrize(
    ("health", "registered"),
    [("starting", False), ("healthy", True), ("unhealthy", False), (None, True)],
)
def test_healthcheck_gates_registration(health: str | None, registered: bool) -> None:
    instances, _ = instances_of(inspect_doc(health=health))
    assert bool(instances) is registered
    if registered:
        assert instances[0].health == (health or "none")


@pytest.mark.parametrize("doc", [inspect_doc(paused=True), inspect_doc(status="exited")])
def test_paused_or_stopped_registers_nothing(doc: dict[str, Any]) -> None:
    assert instances_of(doc) == ([], [])


def test_draining_marks_state_only() -> None:
    (i,), _ = instances_of(inspect_doc())
    (d,) = draining([i])
    assert d.state == "draining" and not d.same_registration(i)
    assert d.model_copy(update={"state": "up"}).same_registration(i)


# --- reconcile --------------------------------------------------------------------------


def make(service: str = "web", host: str = "hostA", cid: str = CID, port: int = 8080) -> Instance:
    return Instance(
        service=service,
        host_id=host,
        address="10.0.0.5",
        port=30000 + port % 1000,
        private_port=port,
        container_id=cid,
    )


def keyed(*instances: Instance) -> dict[str, Instance]:
    return {instance_key(PREFIX, i): i for i in instances}


def test_reconcile_puts_missing_and_changed_and_deletes_ghosts_of_this_host() -> None:
    keep, change, new = make(port=1), make(port=2), make(port=3)
    ghost, other_host = make(port=4), make(host="hostB", port=5)
    desired = keyed(keep, change, new)
    changed = change.model_copy(update={"weight": 5})
    actual: dict[str, Instance | bytes | None] = {
        **keyed(keep),
        instance_key(PREFIX, change): changed.to_json(),
        **keyed(ghost, other_host),
    }
    plan = reconcile(desired, actual, PREFIX, "hostA")
    assert plan.puts == sorted([instance_key(PREFIX, change), instance_key(PREFIX, new)])
    assert plan.deletes == [instance_key(PREFIX, ghost)]


def test_reconcile_ignores_registration_time() -> None:
    i = make()
    later = i.model_copy(update={"registered_at": datetime(2030, 1, 1, tzinfo=UTC)})
    assert reconcile(keyed(i), keyed(later), PREFIX, "hostA").puts == []
    assert (
        reconcile(keyed(i), {instance_key(PREFIX, i): later.to_json()}, PREFIX, "hostA").puts == []
    )


def test_reconcile_rewrites_unknown_or_unreadable_values() -> None:
    i = make()
    key = instance_key(PREFIX, i)
    assert reconcile(keyed(i), {key: None}, PREFIX, "hostA").puts == [key]
    assert reconcile(keyed(i), {key: b"{not json"}, PREFIX, "hostA").puts == [key]


def test_reconcile_never_deletes_other_hosts_or_foreign_keys() -> None:
    actual: dict[str, Instance | bytes | None] = {
        **keyed(make(host="hostB")),
        f"{PREFIX}/services/web/hostA/not-a-container": b"x",
        "/elsewhere/services/web/hostA/" + CID + ":80": b"x",
    }
    assert reconcile({}, actual, PREFIX, "hostA").deletes == []


def test_reconcile_deletes_unreadable_values_of_this_host() -> None:
    key = instance_key(PREFIX, make())
    assert reconcile({}, {key: b"garbage"}, PREFIX, "hostA").deletes == [key]


def test_options_protocol_accepts_settings() -> None:
    from agents.common.settings import RegistrarSettings

    settings = RegistrarSettings(host_id="h1", host_ip="10.1.1.1")
    info = container_from_inspect(inspect_doc())
    (i,), _ = desired_instances(info, settings, NOW)
    assert (i.host_id, i.address) == ("h1", "10.1.1.1")
    assert isinstance(replace(info, state="paused"), ContainerInfo)
