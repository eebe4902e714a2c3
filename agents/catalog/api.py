"""The catalog's JSON API as pydantic models, and its OpenAPI document. Pure.

Every response names the etcd revision it reflects, so a client can open the
event stream from exactly there (``/api/v1/events?since=REVISION``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from agents import __version__
from agents.common.schema import Instance


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class InstanceOut(_Out):
    key: str
    host_id: str
    address: str
    port: int
    private_port: int
    protocol: Literal["tcp", "udp"]
    container_id: str
    container_name: str
    image: str
    tags: tuple[str, ...]
    attributes: dict[str, str]
    health: str
    state: Literal["up", "draining"]
    mode: Literal["tcp", "http"]
    weight: int
    check: bool
    consumer_port: int
    registered_at: datetime
    create_revision: int = Field(description="etcd create_revision of the key")

    @classmethod
    def of(cls, key: str, instance: Instance, create_revision: int) -> InstanceOut:
        return cls(
            key=key,
            host_id=instance.host_id,
            address=instance.address,
            port=instance.port,
            private_port=instance.private_port,
            protocol=instance.protocol,
            container_id=instance.container_id,
            container_name=instance.container_name,
            image=instance.image,
            tags=instance.tags,
            attributes=instance.attributes,
            health=instance.health,
            state=instance.state,
            mode=instance.mode,
            weight=instance.weight,
            check=instance.check,
            consumer_port=instance.bind_port,
            registered_at=instance.registered_at,
            create_revision=create_revision,
        )


class ServiceSummary(_Out):
    name: str
    mode: Literal["tcp", "http"] = Field(description="the mode of its oldest instance")
    port: int = Field(description="consumer port: 127.0.0.1:PORT on a consumer host")
    instances: int
    serving: int
    draining: int
    hosts: tuple[str, ...]
    tags: tuple[str, ...]


class ServiceDetail(_Out):
    prefix: str
    revision: int
    service: ServiceSummary
    instances: tuple[InstanceOut, ...]


class ServiceList(_Out):
    prefix: str
    revision: int
    ready: bool = Field(description="the first full list of etcd has been read")
    total: int = Field(description="services before filtering")
    quarantined: int = Field(description="etcd entries refused by the schema")
    services: tuple[ServiceSummary, ...]


class Refused(_Out):
    key: str
    reason: str


class QuarantineList(_Out):
    prefix: str
    revision: int
    total: int
    entries: tuple[Refused, ...]


class HostOut(_Out):
    host_id: str
    instances: int
    containers: int
    container_ids: tuple[str, ...] = Field(description="the containers registered from it")
    services: tuple[str, ...]
    claimed: bool = Field(description="a registrar holds <prefix>/hosts/<host-id>")
    lease_alive: bool
    ttl_left: int | None = Field(description="seconds left on the claim's lease")
    holder: str | None = Field(description="which registrar holds the claim")


class HostList(_Out):
    prefix: str
    revision: int
    hosts: tuple[HostOut, ...]


class ConsumerOut(_Out):
    id: str
    applied_revision: int
    behind: int = Field(description="revisions behind the newest one")
    services: tuple[str, ...]
    serves_all: bool = Field(description="no --services filter: it serves any new service")
    version: str
    draining: int = Field(description="draining instances it still has as servers")
    sessions: int = Field(description="sessions left on them")
    updated_at: datetime


class ConsumerList(_Out):
    prefix: str
    revision: int
    consumers: tuple[ConsumerOut, ...]


class Environment(_Out):
    prefix: str
    revision: int
    ready: bool
    services: int


class Environments(_Out):
    version: str = __version__
    etcd_host: str = Field(description="what a consumer passes as --etcd-host")
    environments: tuple[Environment, ...]


class ChangeEvent(_Out):
    """One Server-Sent Event: the services changed at ``revision`` (None: gone).

    ``reset``: too much changed (or the client's revision is too old to
    replay): fetch ``/api/v1/services`` again.
    """

    revision: int
    reset: bool = False
    services: dict[str, ServiceSummary | None] = Field(default_factory=dict)
    quarantined: int = 0


_MODELS = (
    ServiceList,
    ServiceDetail,
    HostList,
    ConsumerList,
    QuarantineList,
    Environments,
    ChangeEvent,
)

_PREFIX_PARAM = {
    "name": "prefix",
    "in": "query",
    "required": False,
    "description": "which environment (one of --prefix); default: the first",
    "schema": {"type": "string"},
}


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _get(summary: str, model: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": [_PREFIX_PARAM, *params],
            "responses": {
                "200": {
                    "description": "OK; header X-Etcd-Revision is the revision it reflects",
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}
                    },
                },
                "404": {"description": "no such service or environment"},
            },
        }
    }


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``/api/v1/``."""
    _, schema = models_json_schema(
        [(model, "serialization") for model in _MODELS],
        ref_template="#/components/schemas/{model}",
    )
    events = _get(
        "Server-Sent Events: one `change` per etcd revision",
        "ChangeEvent",
        [_query("since", "replay every change after this revision (or header Last-Event-ID)")],
    )
    events["get"]["responses"]["200"]["content"] = {
        "text/event-stream": {"schema": {"$ref": "#/components/schemas/ChangeEvent"}}
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "pilotfish catalog", "version": __version__},
        "paths": {
            "/api/v1/environments": _get("The prefixes served", "Environments", []),
            "/api/v1/services": _get(
                "Every service with its counts",
                "ServiceList",
                [
                    _query("name", "substring of the service name"),
                    _query("tag", "a tag some instance carries"),
                    _query("host", "a host id some instance runs on"),
                ],
            ),
            "/api/v1/services/{name}": _get(
                "One service and its instances",
                "ServiceDetail",
                [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            ),
            "/api/v1/hosts": _get("Every registrar's host", "HostList", []),
            "/api/v1/consumers": _get("Every discoverer publishing its status", "ConsumerList", []),
            "/api/v1/quarantined": _get("etcd entries refused", "QuarantineList", []),
            "/api/v1/events": events,
        },
        "components": {"schemas": schema.get("$defs", {})},
    }
