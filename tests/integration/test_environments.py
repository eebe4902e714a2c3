"""Environments on one etcd, enforced by etcd's access control (issue 13).

A real etcd with authentication on (tokens forgotten after 1 s unused), two
environments ``dev`` and ``prod`` created by ``pilotfish env create``, and the
agents run as deployed: ``python -m agents ...`` with the environment file's
variables. Everything runs twice: plain, and over TLS with client certificates.

One etcd, one engine and one set of agents (a registrar and a discoverer per
environment, on the same engine) per variant, shared by the module's tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e_kit import (
    REPO,
    Agent,
    Consumer,
    discoverer_flags,
    fetch,
    free_port,
    server_name,
    server_states,
    serving,
    wait_for,
)
from registrar_kit import DockerCli

from agents.common.etcd import Etcd, EtcdError, is_permission_denied
from agents.common.settings import CommonSettings
from agents.env.model import read_env_file
from tests.stack import Dockerd, TlsFiles, make_tls_files
from tests.stack import Etcd as EtcdServer

pytestmark = pytest.mark.integration

ROOT_PASSWORD = "pilotfish-root-" + uuid.uuid4().hex[:8]
ENVS = ("dev", "prod")
WITHIN = 30.0  # seconds: a loaded 2-core machine


@dataclass
class World:
    etcd: EtcdServer
    tls: TlsFiles | None
    env_dir: Path
    log_dir: Path
    docker: DockerCli
    host_ip: str
    image: str
    service: str
    port: int  # the service's frontend port (on 127.0.0.1 for dev, 127.0.0.2 for prod)
    agents: dict[str, Agent] = field(default_factory=dict)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    containers: dict[str, list[str]] = field(default_factory=dict)  # env -> container ids

    def env_vars(self, env: str, kind: str) -> dict[str, str]:
        return read_env_file((self.env_dir / env / f"{kind}.env").read_text())

    def root_settings(self, **extra: Any) -> dict[str, str]:
        """``PILOTFISH_*`` variables of an operator connecting as etcd's root."""
        values = {
            "PILOTFISH_ETCD_HOST": self.etcd.endpoint,
            "PILOTFISH_ETCD_USERNAME": "root",
            "PILOTFISH_ETCD_PASSWORD": ROOT_PASSWORD,
            **self.tls_vars(),
        }
        return {**values, **extra}

    def tls_vars(self) -> dict[str, str]:
        if self.tls is None:
            return {}
        return {
            "PILOTFISH_ETCD_CACERT": str(self.tls.ca),
            "PILOTFISH_ETCD_CERT": str(self.tls.client_cert),
            "PILOTFISH_ETCD_KEY": str(self.tls.client_key),
        }

    def client(self, variables: Mapping[str, str], prefix: str | None = None) -> Etcd:
        """The project's etcd layer with an environment file's (or root's) settings."""
        settings: dict[str, Any] = {
            name.removeprefix("PILOTFISH_").lower(): value for name, value in variables.items()
        }
        if prefix is not None:
            settings["prefix"] = prefix
        settings["etcd_timeout"] = 5.0
        return Etcd(CommonSettings(**settings))

    def pilotfish(self, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
        """``python -m agents ARGS`` with ``variables`` (and nothing of ours)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PILOTFISH_")}
        return subprocess.run(
            [sys.executable, "-m", "agents", *args],
            cwd=REPO,
            env={**env, **variables},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start_registrar(
        self, env: str, name: str, host_id: str, ttl: int = 15, **variables: str
    ) -> Agent:
        flags = {
            "docker_host": self.docker.url,
            "host_ip": self.host_ip,
            "host_id": host_id,
            "environment": env,
            "ttl": ttl,
            "admin_address": f"127.0.0.1:{free_port()}",
        }
        env_vars = {**self.env_vars(env, "registrar"), **variables}
        return Agent.start(name, "register", flags, self.log_dir, env=env_vars)


@pytest.fixture(scope="module", params=["plain", "tls"])
async def world(
    request: pytest.FixtureRequest, stack_dir: Path, dockerd: Dockerd
) -> AsyncIterator[World]:
    variant = request.param
    base = stack_dir / f"envs-{variant}"
    tls = make_tls_files(base / "tls") if variant == "tls" else None
    server = EtcdServer(stack_dir, f"env{variant}", extra_args=["--auth-token-ttl=1"], tls=tls)
    docker = DockerCli(dockerd.url, publish_ip=dockerd.host_ip)
    world = World(
        etcd=server,
        tls=tls,
        env_dir=base / "environments",
        log_dir=base / "logs",
        docker=docker,
        host_ip=dockerd.host_ip,
        image=dockerd.whoami,
        service="web" + uuid.uuid4().hex[:6],
        port=free_port("127.0.0.1", "127.0.0.2"),
    )
    with server:  # started
        try:
            _create_environments(world)
            await _start_agents(world)
            yield world
        finally:
            for agent in world.agents.values():
                agent.stop()
            await docker.cleanup()
            for agent in world.agents.values():
                if agent.popen is not None and agent.popen.returncode not in (0, -15):
                    print(agent.tail())


def _create_environments(world: World) -> None:
    common = ["--env-dir", str(world.env_dir)]
    # Authentication still off: the first create turns it on and makes root.
    first = world.pilotfish(
        "env", "create", "dev", "--enable-auth", *common, **world.root_settings()
    )
    assert first.returncode == 0, first.stderr
    assert "enable authentication" in first.stdout
    second = world.pilotfish("env", "create", "prod", *common, **world.root_settings())
    assert second.returncode == 0, second.stderr


async def _start_agents(world: World) -> None:
    for index, env in enumerate(ENVS):
        world.agents[f"{env}-registrar"] = world.start_registrar(env, f"{env}-registrar", "envhost")
        variables = world.env_vars(env, "discoverer")
        consumer, flags = discoverer_flags(
            variables["PILOTFISH_ETCD_HOST"],
            variables["PILOTFISH_PREFIX"],
            world.log_dir.parent / f"d-{env}",
            bind=f"127.0.0.{index + 1}",
        )
        world.consumers[env] = consumer
        world.agents[f"{env}-discoverer"] = Agent.start(
            f"{env}-discoverer",
            "discover",
            flags,
            world.log_dir,
            marker=str(consumer.state_dir),
            env=variables,
        )
        world.containers[env] = [await run_container(world, env)]
    for env in ENVS:
        await wait_for(
            lambda env=env: registered(world, env, world.containers[env]),
            WITHIN,
            what=f"{env}'s container registered",
        )


async def registered(world: World, env: str, container_ids: list[str]) -> bool:
    keys = await keys_under(world, f"/pilotfish/{env}/services/")
    return all(any(c in key for key in keys) for c in container_ids)


async def run_container(world: World, env: str) -> str:
    return await world.docker.run(
        world.image,
        "-l",
        f"pilotfish.environment={env}",
        "-l",
        f"pilotfish.service={world.service}",
        "-l",
        f"pilotfish.port={world.port}",
    )


# --- helpers -------------------------------------------------------------------------------


async def keys_under(world: World, prefix: str) -> dict[str, int]:
    """Every key under ``prefix`` (read as root) and its lease."""
    async with world.client(world.root_settings()) as etcd:
        _revision, items = await etcd.get_prefix(prefix)
    return {item.key.decode(): item.lease for item in items}


async def exit_code(agent: Agent, within: float = WITHIN) -> int | None:
    assert agent.popen is not None
    try:
        return await asyncio.to_thread(agent.popen.wait, within)
    except subprocess.TimeoutExpired:
        return None


def agent_lines(agent: Agent, startswith: str) -> list[str]:
    return [
        line
        for line in agent.log_path.read_text(errors="replace").splitlines()
        if line.startswith(startswith)
    ]


def log_events(agent: Agent, event: str) -> list[dict[str, Any]]:
    found = []
    for line in agent.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event", "").startswith(event):
                found.append(record)
    return found


async def routed_by(world: World, env: str, container_ids: list[str]) -> dict[str, str]:
    """Wait until ``env``'s HAProxy serves every one of ``container_ids``; its servers."""
    names = {server_name("envhost", c) for c in container_ids}
    states: dict[str, str] = {}

    async def serves_all() -> bool:
        nonlocal states
        states = await server_states(world.consumers[env].stats) or {}
        return all(serving(states.get(name)) for name in names)

    try:
        await wait_for(serves_all, WITHIN, what=f"{env}'s HAProxy serves {sorted(names)}")
    except AssertionError as error:
        keys = sorted(await keys_under(world, f"/pilotfish/{env}/"))
        agents = [a.tail(15) for name, a in world.agents.items() if name.startswith(env)]
        health = await healthz(world.consumers[env].admin)
        lines = [str(error), f"states {states}", f"keys {keys}", f"healthz {health}", *agents]
        raise AssertionError("\n".join(lines)) from None
    return states


async def healthz(agent_flags_address: str) -> dict[str, Any]:
    reply = await fetch(*_host_port(agent_flags_address), "/healthz")
    return dict(json.loads(reply.body)) if reply.body.startswith("{") else {}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def admin_address(agent: Agent) -> str:
    return agent.argv[agent.argv.index("--admin-address") + 1]


# --- the matrix ------------------------------------------------------------------------------


async def test_a_registrar_with_devs_user_cannot_write_a_key_into_prod(world: World) -> None:
    dev = world.env_vars("dev", "registrar")
    async with world.client(dev, prefix="/pilotfish/prod") as etcd:
        for area in ("services/web/h/0123456789ab:80", "hosts/h", "drains/" + "a" * 64):
            with pytest.raises(EtcdError) as refused:
                await etcd.put(f"/pilotfish/prod/{area}", b"{}")
            assert is_permission_denied(refused.value)
    before = await keys_under(world, "/pilotfish/prod/")

    intruder = world.start_registrar(
        "dev", "dev-into-prod", "intruder", PILOTFISH_PREFIX="/pilotfish/prod"
    )
    assert await exit_code(intruder) == 2, intruder.tail()
    (line,) = agent_lines(intruder, "pilotfish register:")
    assert "may not read /pilotfish/prod/services/" in line, line
    after = await keys_under(world, "/pilotfish/prod/")
    assert after == before
    assert not [key for key in after if "intruder" in key]


async def test_a_registrar_whose_user_also_holds_another_environments_role_stops(
    world: World,
) -> None:
    root = f"root:{ROOT_PASSWORD}"
    user, password = "wide-" + uuid.uuid4().hex[:6], "wide-password"
    world.etcd.etcdctl("user", "add", f"{user}:{password}", user=root)
    try:
        for role in ("pilotfish-dev-registrar", "pilotfish-prod-registrar"):
            world.etcd.etcdctl("user", "grant-role", user, role, user=root)
        wide = world.start_registrar(
            "dev",
            "dev-wide",
            "wide",
            PILOTFISH_ETCD_USERNAME=user,
            PILOTFISH_ETCD_PASSWORD=password,
        )
        assert await exit_code(wide) == 2, wide.tail()
        (line,) = agent_lines(wide, "pilotfish register:")
        assert "may also write /pilotfish/prod/services/" in line, line
    finally:
        world.etcd.etcdctl("user", "delete", user, user=root)


async def test_each_discoverer_routes_only_its_environments_containers(world: World) -> None:
    for index, env in enumerate(ENVS):
        mine = world.containers[env]
        states = await routed_by(world, env, mine)
        others = {server_name("envhost", c) for e in ENVS if e != env for c in world.containers[e]}
        assert not set(states) & others, f"{env} routes another environment's container"
        reply = await fetch(f"127.0.0.{index + 1}", world.port)
        assert reply.ok and reply.body in {c[:12] for c in mine}, reply
        keys = await keys_under(world, f"/pilotfish/{env}/services/")
        assert keys and all(any(c in key for c in mine) for key in keys), keys


async def test_a_discoverers_user_cannot_write_anywhere_but_its_status_key(
    world: World,
) -> None:
    prod = world.env_vars("prod", "discoverer")
    probe = "a" * 64
    forbidden = [
        f"/pilotfish/prod/services/web/h/{probe[:12]}:80",
        "/pilotfish/prod/hosts/h",
        f"/pilotfish/prod/drains/{probe}",
        f"/pilotfish/dev/services/web/h/{probe[:12]}:80",
        "/pilotfish/x",
        "/x",
        "/pilotfish-environments/prod",
    ]
    async with world.client(prod) as etcd:
        for key in forbidden:
            for write in (etcd.put(key, b"{}"), etcd.delete(key)):
                with pytest.raises(EtcdError) as refused:
                    await write
                assert is_permission_denied(refused.value), key
        assert await etcd.may_read("/pilotfish/prod/services/x")
        assert not await etcd.may_read("/pilotfish/dev/services/x")
        # Its own status key (interfaces §4) is the one place it may write.
        assert await etcd.may_write("/pilotfish/prod/discoverers/x")
    everything = await keys_under(world, "/")
    assert not [key for key in forbidden[:-1] if key in everything]
    async with world.client(world.root_settings()) as etcd:
        _revision, (record,) = await etcd.get_prefix(forbidden[-1])
    assert json.loads(record.value)["prefix"] == "/pilotfish/prod"  # not "{}"


async def test_refused_writes_are_logged_once_and_shown_until_the_role_is_repaired(
    world: World,
) -> None:
    registrar = world.agents["dev-registrar"]
    address = admin_address(registrar)
    root = f"root:{ROOT_PASSWORD}"
    role = "pilotfish-dev-registrar"
    world.etcd.etcdctl("role", "revoke-permission", role, "/pilotfish/dev/", "--prefix", user=root)
    kept = await keys_under(world, "/pilotfish/dev/services/")
    container = await run_container(world, "dev")
    world.containers["dev"].append(container)

    async def refused() -> bool:
        etcd = (await healthz(address)).get("etcd", {})
        return bool(etcd.get("writes_refused"))

    await wait_for(refused, WITHIN, what="/healthz shows the refused writes")
    await asyncio.sleep(1.5)  # several retries, each refused
    assert len(log_events(registrar, "etcd refuses this registrar's writes")) == 1
    # Repaired by running the command again: the role gets its permission back.
    repair = world.pilotfish("env", "create", "dev", "--env-dir", str(world.env_dir),
                             **world.root_settings())  # fmt: skip
    assert repair.returncode == 0, repair.stderr
    assert "grant readwrite /pilotfish/dev/*" in repair.stdout

    async def accepted() -> bool:
        return not await refused()

    await wait_for(accepted, WITHIN, what="/healthz shows writes accepted again")
    await routed_by(world, "dev", world.containers["dev"])
    now = await keys_under(world, "/pilotfish/dev/services/")
    assert set(kept) <= set(now) and any(container in key for key in now)
    assert len(log_events(registrar, "etcd accepts this registrar's writes again")) == 1


async def test_rotating_a_registrars_password_and_restarting_it_keeps_every_registration(
    world: World,
) -> None:
    before = await keys_under(world, "/pilotfish/prod/services/")
    assert before
    old = world.env_vars("prod", "registrar")
    deletes: list[str] = []
    async with world.client(world.root_settings()) as watcher:
        revision = await watcher.revision()

        async def watch() -> None:
            async for event in watcher.watch_prefix("/pilotfish/prod/services/", revision + 1):
                if event.value is None:
                    deletes.append(event.key.decode())

        watching = asyncio.create_task(watch())
        try:
            rotate = world.pilotfish("env", "create", "prod", "--rotate", "--rotate-users",
                                     "registrar", "--env-dir", str(world.env_dir),
                                     **world.root_settings())  # fmt: skip
            assert rotate.returncode == 0, rotate.stderr
            assert "give user pilotfish-prod-registrar a new password" in rotate.stdout
            assert "discoverer" not in rotate.stdout  # its password (and agent) left alone
            new = world.env_vars("prod", "registrar")
            assert new["PILOTFISH_ETCD_PASSWORD"] != old["PILOTFISH_ETCD_PASSWORD"]
            async with world.client(old) as stale:
                with pytest.raises(EtcdError, match="refused user"):
                    await stale.get_prefix("/pilotfish/prod/services/")

            world.agents["prod-registrar"].stop()
            world.agents["prod-registrar"] = world.start_registrar(
                "prod", "prod-registrar-rotated", "envhost"
            )

            async def all_on_a_new_lease() -> bool:
                now = await keys_under(world, "/pilotfish/prod/services/")
                return set(now) == set(before) and all(now[key] != before[key] for key in before)

            await wait_for(all_on_a_new_lease, WITHIN, what="every key re-put on the new lease")
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    assert deletes == []
    again = world.pilotfish("env", "create", "prod", "--env-dir", str(world.env_dir),
                            **world.root_settings())  # fmt: skip
    assert again.returncode == 0 and "nothing to change" in again.stdout, again


async def test_a_killed_registrars_keys_expire_with_its_lease_under_each_environments_user(
    world: World,
) -> None:
    doomed = {
        env: world.start_registrar(env, f"{env}-doomed", f"doomed-{env}", ttl=2) for env in ENVS
    }
    try:

        async def registered(env: str) -> bool:
            keys = await keys_under(world, f"/pilotfish/{env}/")
            return any(f"/services/{world.service}/doomed-{env}/" in key for key in keys) and (
                f"/pilotfish/{env}/hosts/doomed-{env}" in keys
            )

        for env in ENVS:
            await wait_for(lambda env=env: registered(env), WITHIN, what=f"{env} registered")
        for agent in doomed.values():
            agent.kill()
        for env in ENVS:

            async def expired(env: str = env) -> bool:
                return not [k for k in await keys_under(world, "/pilotfish/") if "doomed" in k]

            await wait_for(expired, WITHIN, what="the killed registrars' keys expired")
        for env in ENVS:  # the environments' own registrars are untouched
            assert await keys_under(world, f"/pilotfish/{env}/hosts/envhost")
    finally:
        for agent in doomed.values():
            agent.stop()


async def test_a_discoverer_keeps_its_watch_across_token_expiry_and_an_etcd_restart(
    world: World,
) -> None:
    await asyncio.sleep(2.5)  # every token unused for longer than --auth-token-ttl=1
    world.containers["prod"].append(await run_container(world, "prod"))
    await routed_by(world, "prod", world.containers["prod"])

    await asyncio.to_thread(world.etcd.stop)
    await asyncio.to_thread(world.etcd.start)  # every token is gone
    world.containers["prod"].append(await run_container(world, "prod"))
    await routed_by(world, "prod", world.containers["prod"])
    dev_states = await server_states(world.consumers["dev"].stats) or {}
    assert not {server_name("envhost", c) for c in world.containers["prod"]} & set(dev_states)


def test_environment_files_are_private_and_name_the_environment(world: World) -> None:
    for env in ENVS:
        for kind in ("registrar", "discoverer"):
            path = world.env_dir / env / f"{kind}.env"
            assert path.stat().st_mode & 0o777 == 0o600
            variables = read_env_file(path.read_text())
            assert variables["PILOTFISH_PREFIX"] == f"/pilotfish/{env}"
            assert variables["PILOTFISH_ETCD_USERNAME"] == f"pilotfish-{env}-{kind}"
            assert len(variables["PILOTFISH_ETCD_PASSWORD"]) >= 24
            if world.tls is not None:
                assert variables["PILOTFISH_ETCD_CACERT"] == str(world.tls.ca)
    listing = world.pilotfish("env", "list", "--output", "json", **world.root_settings())
    assert listing.returncode == 0, listing.stderr
    found = json.loads(listing.stdout)
    assert found["authentication"] is True
    assert {e["name"]: e["prefix"] for e in found["environments"]} == {
        "dev": "/pilotfish/dev",
        "prod": "/pilotfish/prod",
    }


async def test_a_discoverer_and_a_catalog_with_another_environments_user_stop_at_once(
    world: World,
) -> None:
    dev = world.env_vars("dev", "discoverer")
    wrong = {**dev, "PILOTFISH_PREFIX": "/pilotfish/prod"}
    state_dir = world.log_dir.parent / "d-wrong"
    _consumer, flags = discoverer_flags(dev["PILOTFISH_ETCD_HOST"], "/pilotfish/prod", state_dir)
    discoverer = Agent.start(
        "dev-discoverer-in-prod", "discover", flags, world.log_dir, str(state_dir), env=wrong
    )
    catalog = Agent.start(
        "dev-catalog-in-prod",
        "catalog",
        {"address": f"127.0.0.1:{free_port()}"},
        world.log_dir,
        env=wrong,
    )
    try:
        for agent, command in ((discoverer, "discover"), (catalog, "catalog")):
            assert await exit_code(agent) == 2, agent.tail()
            (line,) = agent_lines(agent, f"pilotfish {command}:")
            assert "may not read /pilotfish/prod/services/" in line, line
    finally:
        discoverer.stop()
        catalog.stop()


async def test_an_agent_running_as_root_in_an_environment_with_roles_is_warned(
    world: World,
) -> None:
    root = world.root_settings(PILOTFISH_PREFIX="/pilotfish/dev")
    agent = world.start_registrar("dev", "dev-as-root", "as-root", **root)
    try:

        async def warned() -> bool:
            return bool(log_events(agent, "this agent has etcd's root rights"))

        await wait_for(warned, WITHIN, what="the root warning")
        (warning,) = log_events(agent, "this agent has etcd's root rights")
        assert warning["level"] == "warning" and "pilotfish-dev-registrar" in warning["event"]
        assert agent.alive()
    finally:
        agent.stop()


async def test_delete_removes_users_roles_and_files_and_purge_the_keys(world: World) -> None:
    common = ["--env-dir", str(world.env_dir)]
    root = world.root_settings()
    created = world.pilotfish("env", "create", "scratch", *common, **root)
    assert created.returncode == 0, created.stderr
    scratch = world.env_vars("scratch", "registrar")
    async with world.client(scratch) as etcd:
        await etcd.put("/pilotfish/scratch/services/x", b"{}")
    deleted = world.pilotfish("env", "delete", "scratch", "--purge", *common, **root)
    assert deleted.returncode == 0, deleted.stderr
    assert "delete role pilotfish-scratch-registrar" in deleted.stdout
    assert "delete the 1 keys under /pilotfish/scratch/" in deleted.stdout
    assert not (world.env_dir / "scratch" / "registrar.env").exists()
    assert await keys_under(world, "/pilotfish/scratch/") == {}
    listing = json.loads(world.pilotfish("env", "list", "--output", "json", **root).stdout)
    assert sorted(e["name"] for e in listing["environments"]) == ["dev", "prod"]
    with pytest.raises(EtcdError, match="refused user"):
        async with world.client(scratch) as etcd:
            await etcd.get_prefix("/pilotfish/scratch/")
    again = world.pilotfish("env", "delete", "scratch", *common, **root)
    assert again.returncode == 0 and "nothing to delete" in again.stdout, again
