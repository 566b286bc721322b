"""A sidecar given several registry replicas: it starts past a dead one and moves on
when the one in use stops.

The two registries here are plain in-memory servers that share nothing, which is
enough for the client side: which replica each call goes to, and when it moves. With
replicas over one store (etcd) the lease and the revisions are the same on both; the
etcd tests check that heartbeats then go on with no lapse and the watch resumes
without a snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from proxy_sidecar import SidecarServer
from registry_service import RegistryServer
from tests.proxy_sidecar.conftest import FAST_REGISTRY, Echo, routable, sidecar_config, wait_for
from tests.proxy_sidecar.upstream import Upstream


def closed_port() -> str:
    """An address where nothing listens: a port the kernel gave out and took back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@contextlib.asynccontextmanager
async def pair(
    registries: str | list[str], upstream: Upstream
) -> AsyncIterator[tuple[SidecarServer, SidecarServer]]:
    """A sidecar registering ``upstream`` and a client sidecar, both on ``registries``."""
    async with (
        SidecarServer(
            "127.0.0.1:0",
            registries,
            sidecar_config(),
            service="echo",
            app=upstream.address,
            inbound="127.0.0.1:0",
        ) as worker,
        SidecarServer("127.0.0.1:0", registries, sidecar_config()) as client,
    ):
        yield worker, client


async def answers(client: SidecarServer) -> bool:
    async with grpc.aio.insecure_channel(client.address) as channel:
        answer: bytes = await Echo(channel).unary(b"hi", timeout=5)
    return answer.endswith(b"hi")


@pytest.fixture
async def second_registry() -> AsyncIterator[RegistryServer]:
    async with RegistryServer("127.0.0.1:0", FAST_REGISTRY) as server:
        yield server


async def test_a_dead_first_replica_is_passed_over_for_registering_and_discovering(
    registry, upstreams
):
    dead = closed_port()
    # The comma-separated form, as --registry and SHOAL_SIDECAR_REGISTRY give it.
    async with pair(f"{dead},{registry.address}", upstreams[0]) as (worker, client):
        await wait_for(lambda: registry.store.instances(), what="registered at the live one")
        await wait_for(lambda: routable(client) == 1, what="discovered through the live one")
        assert worker.registry_addresses == (dead, registry.address)
        assert worker.registry_address == client.registry_address == registry.address
        assert await answers(client)


async def test_when_the_replica_in_use_stops_membership_and_watch_move_to_the_next(
    registry, second_registry, upstreams, caplog
):
    caplog.set_level(logging.INFO)
    first, second = registry.address, second_registry.address
    async with pair([first, second], upstreams[0]) as (worker, client):
        await wait_for(lambda: registry.store.instances(), what="registered at the first")
        await wait_for(lambda: routable(client) == 1, what="routable through the first")
        membership = worker.membership
        assert membership is not None
        registrations = membership.registrations

        stopped = time.monotonic()
        await registry.close(grace=0)
        # The second replica shares no state, so the heartbeat there gets NOT_FOUND and
        # the sidecar registers again: at once, then within a random share of an
        # interval. Over a shared store (etcd) the heartbeat simply goes on.
        await wait_for(lambda: second_registry.store.instances(), what="registered at the next")
        moved_after = time.monotonic() - stopped
        assert membership.registrations == registrations + 1
        (instance,) = second_registry.store.instances()
        assert instance.spec.address == worker.inbound_address
        # A heartbeat every TTL/3 = 0.5 s: one to fail over, one pause before registering,
        # and slack for a loaded machine; still far from a lease that lapses unseen.
        assert moved_after < 1.5 + 3.0

        for sidecar in (worker, client):
            assert sidecar.registry_address == second
        await wait_for(lambda: worker.discovery.connected, what="the worker's watch at the next")
        await wait_for(lambda: client.discovery.connected, what="the client's watch at the next")
        policy = worker.policy
        assert policy is not None
        await wait_for(lambda: policy.connected, what="the policy watch at the next")
        await wait_for(lambda: routable(client) == 1, what="routable through the next")
        assert await answers(client)

    moves = [r for r in caplog.records if "; moving to " in r.getMessage()]
    warnings = [r for r in moves if r.levelno == logging.WARNING]
    # Said once per sidecar, naming both replicas; not once per attempt or per user.
    assert 1 <= len(warnings) <= 2
    assert all(first in r.getMessage() and second in r.getMessage() for r in warnings)


async def test_heartbeats_that_cannot_reach_any_replica_keep_trying_each_in_turn(
    registry, upstreams
):
    dead = closed_port()
    async with pair([registry.address, dead], upstreams[0]) as (worker, _client):
        membership = worker.membership
        assert membership is not None
        await wait_for(lambda: membership.heartbeats >= 1, what="a heartbeat")
        address = registry.address
        await registry.close(grace=0)
        await wait_for(lambda: worker.registry_address == dead, what="moved to the dead one")
        # Back at the first once it returns (empty: it answers NOT_FOUND, so: register).
        async with RegistryServer(address, FAST_REGISTRY) as back:
            await wait_for(lambda: back.store.instances(), what="registered where it came back")
            assert worker.registry_address == address
