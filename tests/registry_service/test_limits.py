"""Bounds on what callers can make the registry hold, over the real gRPC API."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer
from tests.registry_service.conftest import StartRegistry, instance, read

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub as Stub

# The largest metadata validation accepts: 64 keys of 128 characters, values of 1024.
BIG = {f"k{k:02d}".ljust(128, "x"): "v" * 1024 for k in range(64)}


async def serve(start_registry: StartRegistry, **settings: int) -> RegistryServer:
    return await start_registry(RegistryConfig(preservation_share=1.0, **settings))


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
        history = server.store.history
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
