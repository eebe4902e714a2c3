"""Who this registrar is: its default host id and the claim it holds in etcd. Pure.

A host id is the host segment of every key a registrar writes, and a
registrar deletes every key of its host id that it did not write: two
registrars with one host id delete each other's keys. So each one claims
``<prefix>/hosts/<host-id>`` on its lease, and the claim says which Docker
engine it serves. A claim held for the same engine is the registrar's own
previous run (a restart, kill -9) and is taken over; any other holder stops
the registrar.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.common import validation
from agents.common.schema import validate_prefix

# The readable part of a default host id: a host id of up to 32 characters
# reaches HAProxy's server names whole (validation.MAX_HOST_IN_SERVER_NAME).
MAX_HOST_LABEL = 19
# A claim is read back from etcd, where anyone with write access may have put
# it: its fields are plain words, so a log line can name them as they are.
WORD_PATTERN = r"^[A-Za-z0-9_.:+-]{0,255}$"


class Engine(BaseModel):
    """The Docker engine a registrar serves, as its ``/info`` describes it."""

    model_config = ConfigDict(frozen=True, strict=True)

    id: str = Field(max_length=255)
    name: str = Field(max_length=255)
    root_dir: str = Field(max_length=4096)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> Engine:
        return cls(
            id=str(info.get("ID") or "")[:255],
            name=str(info.get("Name") or "")[:255],
            root_dir=str(info.get("DockerRootDir") or "")[:4096],
        )

    @property
    def fingerprint(self) -> str:
        """sha256 of the engine ID and its data root, in hex.

        The ID alone is not unique: it comes from /etc/docker/key.json, which
        engines sharing one /etc (several on a machine) and VMs cloned from one
        image have in common; their data roots or names tell them apart.
        """
        return hashlib.sha256(f"{self.id}\n{self.root_dir}".encode()).hexdigest()


def default_host_id(engine: Engine) -> str:
    """``<first label of the engine's name>-<12 hex of its fingerprint>``: stable, unique."""
    label = re.sub(r"[^A-Za-z0-9_-]", "-", engine.name.split(".")[0])
    label = label.lstrip("_-")[:MAX_HOST_LABEL] or "docker"
    return validation.name(f"{label}-{engine.fingerprint[:12]}", "host id")


def claim_key(prefix: str, host_id: str) -> str:
    return f"{validate_prefix(prefix)}/hosts/{validation.name(host_id, 'host id')}"


class Holder(BaseModel):
    """The value of a host claim: which registrar holds it, for which engine."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    engine_id: str = Field(pattern=WORD_PATTERN)
    engine_name: str = Field(pattern=WORD_PATTERN)
    engine_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    hostname: str = Field(pattern=WORD_PATTERN)
    pid: int = Field(ge=0, le=2**32)
    started_at: str = Field(pattern=WORD_PATTERN)

    @classmethod
    def of(cls, engine: Engine, hostname: str, pid: int, started_at: datetime) -> Holder:
        return cls(
            engine_id=_word(engine.id),
            engine_name=_word(engine.name),
            engine_fingerprint=engine.fingerprint,
            hostname=_word(hostname),
            pid=pid,
            started_at=started_at.isoformat(timespec="seconds"),
        )

    @classmethod
    def parse(cls, value: bytes) -> Holder | None:
        """The holder a claim names; None if it is not a claim (then it is not ours)."""
        try:
            return cls.model_validate_json(value)
        except ValidationError:
            return None

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def same_engine(self, other: Holder) -> bool:
        return (self.engine_fingerprint, self.engine_name) == (
            other.engine_fingerprint,
            other.engine_name,
        )

    def describe(self) -> str:
        return (
            f"pid {self.pid} on {self.hostname or '?'} for engine {self.engine_name or '?'} "
            f"({self.engine_id[:14] or '?'}), since {self.started_at}"
        )


def _word(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:+-]", "-", text)[:255]
