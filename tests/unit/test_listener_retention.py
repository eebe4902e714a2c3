"""A service scaled to zero keeps its listener (no reload) for a while."""

from __future__ import annotations

from agents.common.schema import Instance
from agents.discoverer.model import CatalogBuilder


def inst(service: str, n: int, bind: int = 8080, mode: str = "tcp") -> Instance:
    return Instance(
        service=service,
        host_id="h",
        address="10.0.0.1",
        port=30000 + n,
        private_port=bind,
        container_id=f"{n:012x}",
        mode=mode,
    )


def test_emptied_service_keeps_listener_until_retention_passes() -> None:
    builder = CatalogBuilder(retention=60.0)
    web = inst("web", 1)
    catalog, _ = builder.build({"k1": web}, now=0.0)
    listener = catalog["web"].listener
    catalog, _ = builder.build({}, now=1.0)
    assert catalog["web"].servers == {} and catalog["web"].listener == listener
    assert builder.retention_ends_at == 61.0
    retained = catalog["web"]
    catalog, _ = builder.build({}, now=30.0)
    assert catalog["web"] is retained  # same object: the sink skips it
    catalog, _ = builder.build({}, now=61.0)
    assert "web" not in catalog and builder.retention_ends_at is None
    catalog, _ = builder.build({}, now=200.0)
    assert catalog == {}  # not re-retained


def test_back_before_retention_ends_same_listener() -> None:
    builder = CatalogBuilder(retention=60.0)
    builder.build({"k1": inst("web", 1)}, now=0.0)
    builder.build({}, now=1.0)
    catalog, _ = builder.build({"k2": inst("web", 2)}, now=2.0)
    assert list(catalog["web"].servers) and catalog["web"].bind_port == 8080
    assert builder.retention_ends_at is None


def test_port_claimed_by_another_service_ends_retention() -> None:
    builder = CatalogBuilder(retention=60.0)
    builder.build({"k1": inst("web", 1)}, now=0.0)
    builder.build({}, now=1.0)
    catalog, conflicts = builder.build({"k2": inst("api", 2)}, now=2.0)
    assert set(catalog) == {"api"} and catalog["api"].bind_port == 8080
    assert conflicts == []


def test_retention_zero_drops_at_once() -> None:
    builder = CatalogBuilder()
    builder.build({"k1": inst("web", 1)}, now=0.0)
    catalog, _ = builder.build({}, now=1.0)
    assert catalog == {}


def test_only_filter_applies_to_retained() -> None:
    builder = CatalogBuilder(frozenset({"web"}), retention=60.0)
    builder.build({"k1": inst("web", 1), "k2": inst("api", 2, bind=9090)}, now=0.0)
    catalog, _ = builder.build({}, now=1.0)
    assert set(catalog) == {"web"}
