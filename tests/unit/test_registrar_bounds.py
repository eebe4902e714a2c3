"""Sizes are bounded where labels enter: tags, attributes, the whole registration."""

from __future__ import annotations

from agents.common.schema import Instance
from agents.common.validation import MAX_ATTRIBUTES, MAX_TAGS, MAX_VALUE_BYTES
from agents.registrar.container import container_from_inspect
from agents.registrar.labels import MAX_REFUSALS, desired_instances
from tests.unit.test_registrar_labels import NOW, Opts, inspect_doc


def registered(labels: dict[str, str]) -> tuple[list[Instance], list[tuple[str, str, str]]]:
    container = container_from_inspect(inspect_doc(labels=labels))
    instances, refusals = desired_instances(container, Opts(), NOW)
    return instances, [(r.label, r.reason, r.skipped) for r in refusals]


def test_tags_beyond_the_limit_are_dropped_with_one_refusal() -> None:
    tags = [f"t{n}" for n in range(MAX_TAGS + 10)]
    (instance,), refusals = registered({"pilotfish.tags": ",".join(tags)})
    assert instance.tags == tuple(tags[:MAX_TAGS])
    ((label, reason, skipped),) = refusals
    assert (label, skipped) == ("pilotfish.tags", "tag")
    assert f"{MAX_TAGS + 10} tags" in reason and str(MAX_TAGS) in reason


def test_attributes_beyond_the_limit_are_dropped_by_name_with_one_refusal() -> None:
    labels = {f"pilotfish.attr.a{n:03d}": "v" for n in range(MAX_ATTRIBUTES + 5)}
    (instance,), refusals = registered(labels)
    kept = instance.attributes
    assert list(kept) == [f"a{n:03d}" for n in range(MAX_ATTRIBUTES)]
    ((label, reason, skipped),) = refusals
    assert (label, skipped) == ("attributes", "attribute") and str(MAX_ATTRIBUTES) in reason


def test_a_registration_over_the_value_limit_refuses_its_container() -> None:
    labels = {f"pilotfish.attr.{'k' * 50}{n:02d}": "v" * 255 for n in range(MAX_ATTRIBUTES)}
    instances, refusals = registered(labels)
    assert instances == []
    ((label, reason, skipped),) = refusals
    assert (label, skipped) == ("container labels", "container")
    assert str(MAX_VALUE_BYTES) in reason


def test_a_registration_at_the_limits_is_registered_whole() -> None:
    labels = {f"pilotfish.attr.a{n:02d}": "v" * 200 for n in range(MAX_ATTRIBUTES)}
    labels["pilotfish.tags"] = ",".join(f"t{n}" for n in range(MAX_TAGS))
    (instance,), refusals = registered(labels)
    assert refusals == []
    assert len(instance.to_json()) <= MAX_VALUE_BYTES


def test_one_container_names_at_most_max_refusals_and_always_what_it_skipped() -> None:
    bad_tags = ",".join(f"bad%{n}" for n in range(1000))
    instances, refusals = registered({"pilotfish.tags": bad_tags, "pilotfish.mode": "udp\n"})
    assert instances == [] and len(refusals) == MAX_REFUSALS
    assert refusals[-1][0] == "pilotfish.mode" and refusals[-1][2] == "container"
    assert refusals[-2] == ("labels", "986 more tags or attributes refused", "tag or attribute")
