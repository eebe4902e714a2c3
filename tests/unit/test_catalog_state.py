"""The catalog's pure core: snapshots of the prefix source in, summaries and events out."""

from __future__ import annotations

from typing import Any

from agents.catalog import state as state_module
from agents.catalog.state import ServiceIndex
from agents.cli import build_parser, load_settings
from agents.common.prefix_state import PrefixState
from agents.common.schema import Instance, instance_key
from agents.common.settings import CatalogSettings

PREFIX = "/pf"


def inst(n: int, service: str = "web", host: str = "h1", **extra: Any) -> Instance:
    return Instance(
        service=service,
        host_id=host,
        address="127.0.0.1",
        port=10000 + n,
        private_port=8080,
        container_id=f"{n:012x}",
        **extra,
    )


class Feed:
    """A PrefixState driven by hand, as the etcd source drives it."""

    def __init__(self, *initial: Instance) -> None:
        self.source = PrefixState(PREFIX, report_bad=lambda *_: None)
        self.index = ServiceIndex(PREFIX)
        self.revision = 10
        entries = [
            (instance_key(PREFIX, i), i.to_json(), n + 1, n + 1) for n, i in enumerate(initial)
        ]
        self.source.replace(self.revision, entries)
        assert self.index.apply(self.source.take_batch()) is None  # the first list

    def put(self, *instances: Instance) -> Any:
        self.revision += 1
        for instance in instances:
            self.source.apply(instance_key(PREFIX, instance), instance.to_json(), self.revision)
        return self.index.apply(self.source.take_batch())

    def delete(self, *instances: Instance) -> Any:
        self.revision += 1
        for instance in instances:
            self.source.apply(instance_key(PREFIX, instance), None, self.revision)
        return self.index.apply(self.source.take_batch())


def test_summaries_count_serving_and_draining_and_take_the_oldest_port() -> None:
    feed = Feed(inst(1, tags=("a",)), inst(2, host="h2", tags=("b",), frontend_port=9000))
    (web,) = feed.index.services().services
    assert (web.port, web.instances, web.serving, web.draining) == (8080, 2, 2, 0)
    assert web.hosts == ("h1", "h2") and web.tags == ("a", "b")
    event = feed.put(inst(1, tags=("a",), state="draining"))
    assert event.revision == 11 and event.services["web"].draining == 1
    assert feed.index.services().revision == 11


def test_each_change_names_only_the_services_it_touched() -> None:
    feed = Feed(inst(1), inst(2, service="db"))
    event = feed.put(inst(3, service="cache"))
    assert list(event.services) == ["cache"]
    event = feed.delete(inst(2, service="db"))
    assert event.services == {"db": None}
    assert [s.name for s in feed.index.services().services] == ["cache", "web"]
    assert feed.index.service("db") is None
    detail = feed.index.service("web")
    assert detail is not None and [i.container_id for i in detail.instances] == ["000000000001"]


def test_a_relist_after_compaction_sends_what_differs() -> None:
    feed = Feed(inst(1), inst(2, service="db"))
    feed.revision = 50
    kept, added = inst(1), inst(3, service="cache")
    feed.source.replace(
        feed.revision, [(instance_key(PREFIX, i), i.to_json(), 40, 40) for i in (kept, added)]
    )
    event = feed.index.apply(feed.source.take_batch())
    assert event.revision == 50
    assert set(event.services) == {"web", "db", "cache"} and event.services["db"] is None
    assert [s.name for s in feed.index.services().services] == ["cache", "web"]


def test_filters_by_name_tag_and_host() -> None:
    feed = Feed(inst(1, tags=("blue",)), inst(2, service="api", host="h9", tags=("green",)))
    names = lambda **f: [s.name for s in feed.index.services(**f).services]  # noqa: E731
    assert names(name="AP") == ["api"]
    assert names(tag="blue") == ["web"]
    assert names(host="h9") == ["api"]
    assert names(name="x") == []


def test_replay_after_a_revision_and_reset_when_too_old() -> None:
    feed = Feed(inst(1))
    first = feed.put(inst(2, service="a"))
    second = feed.put(inst(3, service="b"))
    assert feed.index.since(first.revision) == [second]
    assert feed.index.since(10) == [first, second]
    assert feed.index.since(second.revision) == []
    assert feed.index.since(9) is None  # before the catalog's first list
    assert feed.index.since(99) is None  # from another etcd


def test_history_is_bounded_and_the_floor_moves(monkeypatch: Any) -> None:
    monkeypatch.setattr(state_module, "HISTORY", 3)
    feed = Feed()
    events = [feed.put(inst(n, service=f"s{n}")) for n in range(5)]
    assert len(feed.index.history) == 3
    assert feed.index.since(events[0].revision) is None
    assert feed.index.since(events[1].revision) == events[2:]


def test_a_big_change_is_a_reset(monkeypatch: Any) -> None:
    monkeypatch.setattr(state_module, "MAX_SERVICES_PER_EVENT", 2)
    feed = Feed()
    event = feed.put(*(inst(n, service=f"s{n}") for n in range(3)))
    assert event.reset and event.services == {}


def test_refused_entries_are_counted_and_listed() -> None:
    feed = Feed(inst(1))
    feed.revision += 1
    feed.source.apply(f"{PREFIX}/services/<b>/h/abcdefabcdef:1", b"{}", feed.revision)
    event = feed.index.apply(feed.source.take_batch())
    assert event.quarantined == 1 and event.services == {}
    (refused,) = feed.index.quarantined()
    assert refused.key.endswith("<b>/h/abcdefabcdef:1") and "does not match" in refused.reason


def test_host_counts() -> None:
    feed = Feed(inst(1), inst(2), inst(3, service="db", host="h2"))
    one, two, three = (f"{n:012x}" for n in (1, 2, 3))
    assert feed.index.host_counts() == {
        "h1": (2, (one, two), ("web",)),
        "h2": (1, (three,), ("db",)),
    }


def test_prefix_flag_may_be_repeated() -> None:
    args = vars(build_parser().parse_args(["catalog", "--prefix", "/dev", "--prefix", "/prod/"]))
    settings = load_settings(args.pop("command"), args)
    assert isinstance(settings, CatalogSettings)
    assert settings.prefixes == ["/dev", "/prod"] and settings.address == "127.0.0.1:9103"
    assert CatalogSettings(prefix="/a,/b,/a").prefixes == ["/a", "/b"]
