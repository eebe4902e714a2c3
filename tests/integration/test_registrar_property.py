"""Property: no container label or name, however hostile, stops or fools the registrar.

A running registrar process on the real dockerd and etcd; each example
starts one container with labels drawn below (long strings, newlines, ``%``,
quotes, ``#``, odd unicode, huge numbers, many tags and attributes, values
at and over the limits) next to one well-formed container. After every
example: the well-formed container is registered with the right value,
every value under the prefix parses, the process is alive and /healthz is
healthy, and the hostile container is either registered or named in
/healthz's ``quarantined``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from registrar_kit import (
    DockerCli,
    EtcdView,
    eventually,
    http_get,
    registrar_process,
    settings_for,
    unique,
)

from agents.common.settings import RegistrarSettings
from agents.common.validation import MAX_ATTRIBUTES, MAX_TAGS

pytestmark = pytest.mark.integration

HOSTILE_CHARACTERS = "\n\r\t %\"'#\\;{}$`=,:/ \x00\x7f\u2028\u202e\ufeffé漢😀"
hostile_text = st.one_of(
    st.text(alphabet=st.sampled_from(HOSTILE_CHARACTERS + "aZ09.-_"), max_size=40),
    st.text(max_size=30),  # any unicode
    st.text(alphabet="ab-", min_size=250, max_size=300),  # around the 255 limits
    st.integers(min_value=5_000, max_value=20_000).map(lambda n: "x\n" * n),  # long
    st.integers(min_value=-(2**80), max_value=2**80).map(str),  # huge numbers
    st.sampled_from(["", "tcp", "http", "true", "8080", "0", "65536", "web", "a" * 64]),
)
many_tags = st.integers(min_value=0, max_value=MAX_TAGS * 3).map(
    lambda n: ",".join(f"t{i}" for i in range(n))
)
label_keys = st.one_of(
    st.sampled_from(
        [
            "pilotfish.service",
            "pilotfish.8080.service",
            "pilotfish.tags",
            "pilotfish.8080.tags",
            "pilotfish.mode",
            "pilotfish.weight",
            "pilotfish.check",
            "pilotfish.port",
            "pilotfish.8080.port",
            "SERVICE_NAME",
            "SERVICE_8080_NAME",
            "SERVICE_TAGS",
        ]
    ),
    hostile_text.map(lambda text: "pilotfish.attr." + text[:100]),
    hostile_text.map(lambda text: "SERVICE_" + text[:100]),
)


@st.composite
def hostile_labels(draw: st.DrawFn) -> dict[str, str]:
    labels = draw(st.dictionaries(label_keys, hostile_text, max_size=8))
    if draw(st.booleans()):
        labels[draw(st.sampled_from(["pilotfish.tags", "SERVICE_TAGS"]))] = draw(many_tags)
    if draw(st.booleans()):  # many attributes, each at or over the value limit
        count = draw(st.integers(min_value=1, max_value=MAX_ATTRIBUTES + 16))
        size = draw(st.sampled_from([1, 255, 256]))
        labels.update({f"pilotfish.attr.k{n:03d}": "v" * size for n in range(count)})
    # Never the ignore labels: every container either registers or is refused.
    return {k: v for k, v in labels.items() if "IGNORE" not in k.upper() and k}


container_names = st.one_of(
    st.none(),
    hostile_text.map(lambda text: text[:60]),  # mostly refused by dockerd itself
    st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,40}", fullmatch=True),
    st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{150,200}", fullmatch=True),  # valid for Docker
)


class Stage:
    """The registrar process and the well-formed container, for the whole property."""

    def __init__(self, docker: DockerCli, view: EtcdView, settings: RegistrarSettings) -> None:
        self.docker = docker
        self.view = view
        self.settings = settings
        self.process: asyncio.subprocess.Process | None = None
        self.well_formed = ""

    async def health(self) -> tuple[int, dict[str, Any]]:
        status, body = await http_get(self.settings.admin_address, "/healthz")
        return status, json.loads(body)

    async def processed(self, cid: str) -> bool:
        """Registered, or refused by name: the registrar has handled ``cid``."""
        if await self.view.of_container(cid):
            return True
        _status, health = await self.health()
        return any(entry.get("container") == cid[:12] for entry in health["quarantined"])

    async def check(self) -> None:
        assert self.process is not None and self.process.returncode is None, "registrar died"
        (well,) = (await self.view.of_container(self.well_formed)).values()  # all values parse
        assert (well.service, well.tags, well.attributes) == (
            "wellformed",
            ("a", "b"),
            {"team": "core"},
        )
        assert (well.address, well.port) == (
            self.docker.publish_ip,
            await self.docker.host_port(self.well_formed),
        )
        status, health = await self.health()
        assert status == 200 and health["ok"], health


@contextlib.asynccontextmanager
async def staged(
    docker: DockerCli, view: EtcdView, settings: RegistrarSettings, log: Path, whoami: str
) -> AsyncIterator[Stage]:
    stage = Stage(docker, view, settings)
    with log.open("wb") as stderr:
        stage.process = await registrar_process(settings, stderr=stderr.fileno())
        try:
            stage.well_formed = await docker.run(
                whoami, "-l", "pilotfish.service=wellformed", "-l", "pilotfish.tags=a,b",
                "-l", "pilotfish.attr.team=core",
            )  # fmt: skip
            await eventually(lambda: view.of_container(stage.well_formed), within=15)
            yield stage
        finally:
            if stage.process.returncode is None:
                stage.process.kill()
            await stage.process.wait()


@pytest.fixture
async def stage(
    docker: DockerCli,
    etcd_endpoint: str,
    reg_prefix: str,
    view: EtcdView,
    whoami: str,
    tmp_path: Path,
) -> AsyncIterator[Stage]:
    settings = settings_for(docker, etcd_endpoint, reg_prefix, ttl=10)
    async with staged(docker, view, settings, tmp_path / "registrar.log", whoami) as ready:
        yield ready


@settings(
    max_examples=24,  # about a third are names dockerd refuses at once
    deadline=None,  # containers start in a second or so on vfs
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each step starts a container
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(labels=hostile_labels(), name=container_names)
@example(labels={"pilotfish.tags": ",".join(f"t{n}" for n in range(40))}, name=None)
@example(labels={f"pilotfish.attr.{'k' * 50}{n:02d}": "v" * 255 for n in range(64)}, name=None)
@example(
    labels={"pilotfish.service": "web\nlisten x", "pilotfish.weight": "9" * 30}, name="a" * 150
)
@example(labels={"pilotfish.attr.x": "a%b#c'd\"e", "blob": "x" * 600_000}, name=None)
async def test_hostile_labels_and_names_never_stop_or_fool_the_registrar(
    stage: Stage, labels: dict[str, str], name: str | None, whoami: str
) -> None:
    try:
        cid = await stage.docker.run_api(whoami, labels, name=name and unique(name[:180]))
    except aiodocker.DockerError as refused:  # dockerd's own refusal: not our concern
        assert refused.status == 400, refused
        event("dockerd refused the container")
        return
    try:
        await eventually(lambda: stage.processed(cid), within=10)
        event("registered" if await stage.view.of_container(cid) else "refused by the registrar")
        await stage.check()
    finally:
        await stage.docker("rm", "-f", cid, check=False)
        stage.docker.started.remove(cid)
