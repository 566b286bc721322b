"""Bounds on what callers can make the registry hold, over the real gRPC API."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer
from tests.registry_service.conftest import (
    StartRegistry,
    instance,
    memory_only,
    memory_store,
    read,
)

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub as Stub

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# The largest metadata validation accepts: 64 keys of 128 characters, values of 1024.
BIG = {f"k{k:02d}".ljust(128, "x"): "v" * 1024 for k in range(64)}


async def refused(stub: Stub, inst: pb.Instance) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Register(pb.RegisterRequest(instance=inst))
    assert err.value.code() == EXHAUSTED, err.value
    return err.value.details() or ""


async def serve(start_registry: StartRegistry, **settings: int) -> RegistryServer:
    return await start_registry(RegistryConfig(preservation_share=1.0, **settings))


async def test_register_beyond_max_instances_is_resource_exhausted(
    start_registry: StartRegistry,
) -> None:
    server = await serve(start_registry, max_instances=3)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        leases = [
            (await stub.Register(pb.RegisterRequest(instance=instance(n, service=f"s{n}"))))
            for n in range(3)
        ]
        message = await refused(stub, instance(9, service="s9"))
        assert "3 instances" in message and "--max-instances" in message, message
        # At the bound, an instance registering again (a restart, a lost lease) still fits.
        again = await stub.Register(pb.RegisterRequest(instance=instance(0, service="s0")))
        assert again.lease_id != leases[0].lease_id
        await stub.Deregister(pb.DeregisterRequest(lease_id=leases[1].lease_id))
        await stub.Register(pb.RegisterRequest(instance=instance(9, service="s9")))
        listing = await stub.ListServices(pb.ListServicesRequest())
        assert listing.state.instances_total == 3


async def test_register_beyond_max_instances_per_service_is_resource_exhausted(
    start_registry: StartRegistry,
) -> None:
    server = await serve(start_registry, max_instances_per_service=2)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        for n in range(2):
            await stub.Register(pb.RegisterRequest(instance=instance(n)))
        message = await refused(stub, instance(2))
        assert "'echo'" in message and "--max-instances-per-service" in message, message
        await stub.Register(pb.RegisterRequest(instance=instance(1)))  # re-registering fits
        await stub.Register(pb.RegisterRequest(instance=instance(2, service="other")))
        # Moving an instance into the full service is a new member of it: refused too,
        # and the instance keeps its place in its old service.
        await refused(stub, instance(2, service="echo", instance_id="other-2"))
        found = await stub.Discover(pb.DiscoverRequest(service="other"))
        assert [i.instance_id for i in found.instances] == ["other-2"]


async def test_register_beyond_max_instances_bytes_is_resource_exhausted(
    start_registry: StartRegistry,
) -> None:
    # Each BIG instance holds about 80 KB; the budget fits three of them.
    server = await serve(start_registry, max_instances_bytes=300_000)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        accepted = 0
        while accepted < 10:
            try:
                await stub.Register(pb.RegisterRequest(instance=instance(accepted, metadata=BIG)))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == EXHAUSTED
                message = exc.details() or ""
                break
            accepted += 1
        assert accepted == 3, accepted
        assert "300000 bytes" in message and "--max-instances-bytes" in message, message
        # Small instances still fit, and so does a big one registering again.
        await stub.Register(pb.RegisterRequest(instance=instance(50)))
        await stub.Register(pb.RegisterRequest(instance=instance(0, metadata=BIG)))
        assert server.store.instances_bytes <= 300_000


@memory_only("reads the memory store's history, and counts on consecutive revisions")
async def test_history_byte_bound_evicts_and_a_resume_past_it_gets_a_snapshot(
    start_registry: StartRegistry,
) -> None:
    server = await serve(start_registry, history_bytes=1 << 20)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        start = (await stub.Discover(pb.DiscoverRequest())).revision
        for n in range(40):  # 80 events of about 80 KB each: 6 MB against a 1 MiB bound
            reply = await stub.Register(pb.RegisterRequest(instance=instance(n, metadata=BIG)))
            await stub.Deregister(pb.DeregisterRequest(lease_id=reply.lease_id))
        await stub.Register(pb.RegisterRequest(instance=instance(99)))
        history = memory_store(server).history
        assert history.bytes <= 1 << 20 and 0 < len(history) < 40, (history.bytes, len(history))
        call = stub.Watch(pb.WatchRequest(since_revision=start))
        event = await read(call)
        call.cancel()
        assert event.type == pb.WatchEvent.SNAPSHOT, event.type
        assert [i.instance_id for i in event.instances] == ["echo-99"]
        # A resume the bounded history still reaches gets the deltas it missed.
        recent = server.store.revision - 3
        call = stub.Watch(pb.WatchRequest(since_revision=recent))
        replayed = [await read(call) for _ in range(3)]
        call.cancel()
        assert [e.revision for e in replayed] == [recent + 1, recent + 2, recent + 3]
        assert [e.type for e in replayed][-1] == pb.WatchEvent.UPSERT
