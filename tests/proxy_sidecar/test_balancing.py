"""Balancers end to end: spread, stickiness, and steering away from a slow instance."""

from __future__ import annotations

import asyncio
import collections

import grpc
import pytest

from tests.proxy_sidecar.conftest import served_by, sidecar_config


async def _count(mesh, n, metadata=()):
    counts: collections.Counter[str] = collections.Counter()
    for i in range(n):
        call = mesh.echo.unary(b"%d" % i, metadata=metadata)
        await call
        counts[await served_by(call)] += 1
    return counts


async def test_round_robin_spreads_evenly(make_mesh):
    mesh = await make_mesh(sidecar_config(lb="round_robin"))
    counts = await _count(mesh, 60)
    assert sorted(counts) == ["up0", "up1", "up2"]
    assert all(18 <= c <= 22 for c in counts.values()), counts


async def test_consistent_hash_sticks_per_key(make_mesh):
    mesh = await make_mesh(sidecar_config(lb="consistent_hash"))
    owners = {}
    for key in (f"user-{i}" for i in range(20)):
        counts = await _count(mesh, 4, metadata=[("shoal-hash-key", key)])
        assert len(counts) == 1, f"{key} moved between instances: {counts}"
        owners[key] = next(iter(counts))
    assert len(set(owners.values())) >= 2, "keys should spread over instances"


async def test_peak_ewma_sends_less_to_a_slow_instance(make_mesh):
    mesh = await make_mesh(sidecar_config(lb="peak_ewma"))
    slow = mesh.by_name("up1")
    slow.delay = 0.05
    before = {u.name: u.total for u in mesh.upstreams}

    async def worker():
        for _ in range(30):
            await mesh.echo.unary(b"x")

    await asyncio.gather(*(worker() for _ in range(4)))
    served = {u.name: u.total - before[u.name] for u in mesh.upstreams}
    fast = min(served["up0"], served["up2"])
    assert served["up1"] < fast / 2, served


async def test_service_override_by_metadata(make_mesh):
    mesh = await make_mesh()
    assert mesh.channel is not None
    missing = mesh.channel.unary_unary("/nope.Missing/Unary")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await missing(b"hi")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no instance in the mesh serves gRPC service 'nope.Missing'" in str(info.value.details())
    # With the override the call is routed to test.Other's instances: the app answers.
    before = sum(u.total for u in mesh.upstreams)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await missing(b"hi", metadata=[("shoal-target-service", "test.Other")])
    assert info.value.details() == "Method not found!"
    echo = mesh.channel.unary_unary("/test.Echo/Unary")
    assert (await echo(b"hi", metadata=[("shoal-target-service", "test.Other")])).endswith(b":hi")
    assert sum(u.total for u in mesh.upstreams) == before + 1
