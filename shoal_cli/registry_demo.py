"""A short narrated run of a registry: what ``shoal registry-demo`` shows a new user."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer

__all__ = ["run_registry_demo"]

_TYPES = {
    pb.WatchEvent.SNAPSHOT: "snapshot",
    pb.WatchEvent.UPSERT: "upsert",
    pb.WatchEvent.REMOVE: "remove",
    pb.WatchEvent.PROGRESS: "progress",
}


def _describe(event: pb.WatchEvent, base: int) -> str:
    kind = _TYPES.get(event.type, "?")
    members = ", ".join(
        f"{i.instance_id}@{i.address} {'healthy' if i.healthy else 'LAPSED'} "
        f"{pb.ServingStatus.Name(i.status)}"
        for i in event.instances
    )
    return f"  watch  rev {event.revision - base:<3} {kind:<8} {members}"


async def _watch(stub: pb_grpc.RegistryAsyncStub, say: Callable[[str], None]) -> None:
    base = -1
    async for event in stub.Watch(pb.WatchRequest(service="echo")):
        # Revisions start at the registry's start time in microseconds; show them from 0.
        base = event.revision if base < 0 else base
        if event.type != pb.WatchEvent.PROGRESS:
            say(_describe(event, base))


async def run_registry_demo(say: Callable[[str], None]) -> None:
    """Register three instances, let one lapse, and show what discovery and watchers see."""
    config = RegistryConfig(
        ttl_default=1.5,
        ttl_min=0.5,
        sweep_interval=0.25,
        removal_grace=1.0,
        watch_progress_interval=1.0,
    )
    async with RegistryServer("127.0.0.1:0", config) as server:
        say(f"registry serving on {server.address} (TTL 1.5s, sweep 0.25s, removal grace 1s)")
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RegistryStub(channel)
            watcher = asyncio.create_task(_watch(stub, say))
            await asyncio.sleep(0.2)
            leases = {}
            for n in range(1, 4):
                reply = await stub.Register(
                    pb.RegisterRequest(
                        instance=pb.Instance(
                            instance_id=f"echo-{n}",
                            service="echo",
                            address=f"127.0.0.1:{9000 + n}",
                            grpc_services=["demo.Echo"],
                            zone="local",
                        )
                    )
                )
                leases[n] = reply.lease_id
                say(
                    f"register echo-{n}: lease granted for {reply.ttl_ms} ms, "
                    f"heartbeat every {reply.heartbeat_interval_ms} ms"
                )
            await asyncio.sleep(0.2)
            say("echo-1 and echo-2 heartbeat; echo-3 goes silent ...")
            for _ in range(10):
                for n in (1, 2):
                    await stub.Heartbeat(
                        pb.HeartbeatRequest(
                            lease_id=leases[n],
                            status=pb.SERVING,
                            load=pb.LoadReport(in_flight=n, cpu_percent=10.0 * n),
                        )
                    )
                await asyncio.sleep(0.3)
            found = await stub.Discover(pb.DiscoverRequest(grpc_service="demo.Echo"))
            say(f"discover demo.Echo -> {[i.instance_id for i in found.instances]}")
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(lease_id=leases[3], status=pb.SERVING))
            except grpc.aio.AioRpcError as exc:
                say(f"echo-3 heartbeats late -> {exc.code().name}: {exc.details()}")
            await stub.Deregister(pb.DeregisterRequest(lease_id=leases[2]))
            say("echo-2 deregisters (draining)")
            await asyncio.sleep(0.3)
            listing = await stub.ListServices(pb.ListServicesRequest())
            for svc in listing.services:
                say(
                    f"list: service {svc.name}: {svc.healthy}/{svc.instances} healthy, "
                    f"serves {list(svc.grpc_services)}"
                )
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    say("registry stopped. Run your own with: shoal registry --listen 127.0.0.1:7700")
