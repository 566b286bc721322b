"""Operator commands, the sidecar and the dashboard given several registry replicas.

The registries are plain in-memory servers in this process (sharing nothing, which is
enough to see which replica each command reaches); ``shoal`` runs as a user runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer
from shoal_cli.dashboard.server import DashboardServer
from tests.proxy_sidecar.test_replicas import closed_port
from tests.shoal_cli.conftest import SHOAL
from tests.shoal_cli.test_registry_ops import populate

QUICK = RegistryConfig(sweep_interval=0.2, watch_progress_interval=1.0)


async def spawn(*args: str, **env: str) -> asyncio.subprocess.Process:
    """``shoal ARGS`` running, with ``env`` added to the environment, its output piped."""
    return await asyncio.create_subprocess_exec(
        *SHOAL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )


async def shoal(*args: str, **env: str) -> tuple[int, str, str]:
    proc = await spawn(*args, **env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: "), err
    return lines[0]


@pytest.fixture
async def live() -> AsyncIterator[RegistryServer]:
    async with RegistryServer("127.0.0.1:0", QUICK) as server:
        await asyncio.to_thread(populate, server.address)
        yield server


@pytest.fixture
async def other() -> AsyncIterator[RegistryServer]:
    async with RegistryServer("127.0.0.1:0", QUICK) as server:
        yield server


async def test_ls_answers_from_the_first_replica_reached(live: RegistryServer) -> None:
    code, out, err = await shoal("ls", "--registry", f"{closed_port()},{live.address}", "--json")
    assert code == 0, err
    assert [i["instance_id"] for i in json.loads(out)["instances"]] == ["w0", "w1"]


async def test_the_replicas_can_come_from_shoal_registry(live: RegistryServer) -> None:
    code, out, err = await shoal("ls", "--json", SHOAL_REGISTRY=f"{closed_port()},{live.address}")
    assert code == 0, err
    assert len(json.loads(out)["instances"]) == 2


async def test_policy_and_stats_pass_over_a_dead_replica(live: RegistryServer) -> None:
    registries = f"{closed_port()},{live.address}"
    code, out, err = await shoal("policy", "show", "--registry", registries, "--json")
    assert code == 0, err
    assert json.loads(out)["version"] > 0
    # Reached: the registry answered, listing no worker with a sidecar to ask.
    code, _, err = await shoal("stats", "--registry", registries)
    assert code == 2
    assert "lists no worker or sidecar" in one_error_line(err)


async def test_an_answer_other_than_unavailable_is_final(live: RegistryServer) -> None:
    # A gRPC server that is not a registry answers UNIMPLEMENTED: not a reason to go on.
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        code, _, err = await shoal("ls", "--registry", f"127.0.0.1:{port},{live.address}")
    finally:
        await server.stop(0)
    assert code == 2
    assert "UNIMPLEMENTED" in one_error_line(err)


async def test_no_replica_reached_is_one_line_naming_them_all() -> None:
    dead = [closed_port(), closed_port()]
    code, _, err = await shoal("ls", "--registry", ",".join(dead))
    assert code == 2
    line = one_error_line(err)
    assert all(address in line for address in dead) and "UNAVAILABLE" in line


@pytest.mark.parametrize("registries", ["127.0.0.1:7700,,127.0.0.1:7701", "127.0.0.1:99999"])
@pytest.mark.parametrize("command", [["ls"], ["watch"], ["sidecar"], ["policy", "show"]])
async def test_a_bad_replica_list_is_a_user_error(command: list[str], registries: str) -> None:
    code, _, err = await shoal(*command, "--registry", registries)
    assert code == 2
    assert "--registry" in one_error_line(err)


async def test_watch_moves_to_the_next_replica_when_the_one_in_use_stops(
    live: RegistryServer, other: RegistryServer
) -> None:
    await asyncio.to_thread(populate, other.address)
    registries = f"{live.address},{other.address}"
    proc = await spawn("watch", "--registry", registries, "--json", "--count", "2")
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert first["type"] == "SNAPSHOT"
        await live.close(grace=0)
        # The other replica shares no history, so it answers the resume with a snapshot;
        # over a shared store it would replay what came after the revision shown.
        second = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert second["registry_epoch"] != first["registry_epoch"]
        said = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
        assert f"watching at {other.address}" in said and live.address in said
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_sidecar_takes_its_replicas_from_its_env_var(live: RegistryServer) -> None:
    registries = f"{closed_port()},{live.address}"
    proc = await spawn(
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        SHOAL_SIDECAR_REGISTRY=registries,
        SHOAL_LOG_LEVEL="WARNING",
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        # Its stderr is not read: the few warnings it logs fit the pipe.
        assert line.startswith("shoal sidecar serving on "), line
        async with grpc.aio.insecure_channel(live.address) as channel:
            stub = pb_grpc.RegistryStub(channel)
            for _ in range(200):
                listing = await stub.ListServices(pb.ListServicesRequest(), timeout=5)
                if listing.state.watchers >= 1:
                    break
                await asyncio.sleep(0.05)
            assert listing.state.watchers >= 1, "the sidecar never watched the live replica"
    finally:
        proc.terminate()
        await proc.wait()


async def test_the_dashboard_follows_the_first_replica_reached(live: RegistryServer) -> None:
    async with DashboardServer("127.0.0.1:0", f"{closed_port()},{live.address}") as server:
        for _ in range(200):
            if server.view.connected and len(server.view.members) == 2:
                break
            await asyncio.sleep(0.05)
        assert server.view.connected and len(server.view.members) == 2
