"""The Registry API end to end: a real server, real clients, generated stubs."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer
from tests.registry_service.conftest import StartRegistry, instance, read

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub as Stub


async def test_register_heartbeat_discover_deregister(stub: Stub) -> None:
    reply = await stub.Register(
        pb.RegisterRequest(
            instance=instance(1, metadata={"version": "2"}, weight=5, zone="a"), ttl_ms=3000
        )
    )
    assert reply.ttl_ms == 3000 and reply.heartbeat_interval_ms == 1000 and reply.lease_id
    await stub.Register(pb.RegisterRequest(instance=instance(2)))
    await stub.Heartbeat(
        pb.HeartbeatRequest(
            lease_id=reply.lease_id,
            status=pb.SERVING,
            load=pb.LoadReport(in_flight=7, queue_depth=1, cpu_percent=12.5, memory_bytes=1 << 20),
        )
    )
    found = await stub.Discover(pb.DiscoverRequest(service="echo"))
    by_id = {i.instance_id: i for i in found.instances}
    assert set(by_id) == {"echo-1", "echo-2"}
    one = by_id["echo-1"]
    assert (one.weight, one.zone, dict(one.metadata)) == (5, "a", {"version": "2"})
    assert one.load.in_flight == 7 and one.load.cpu_percent == 12.5 and one.healthy
    assert by_id["echo-2"].weight == 100  # unset weight means the default
    by_grpc = await stub.Discover(pb.DiscoverRequest(grpc_service="test.Echo"))
    assert len(by_grpc.instances) == 2
    await stub.Deregister(pb.DeregisterRequest(lease_id=reply.lease_id))
    after = await stub.Discover(pb.DiscoverRequest(service="echo"))
    assert [i.instance_id for i in after.instances] == ["echo-2"]
    assert after.revision > found.revision


async def test_not_serving_instances_are_listed_only_on_request(stub: Stub) -> None:
    reply = await stub.Register(pb.RegisterRequest(instance=instance(1)))
    await stub.Heartbeat(pb.HeartbeatRequest(lease_id=reply.lease_id, status=pb.NOT_SERVING))
    assert not (await stub.Discover(pb.DiscoverRequest(service="echo"))).instances
    everyone = await stub.Discover(pb.DiscoverRequest(service="echo", include_unhealthy=True))
    assert [i.status for i in everyone.instances] == [pb.NOT_SERVING]


async def test_lapsed_lease_reaches_watchers_as_unhealthy_never_before_its_ttl(stub: Stub) -> None:
    # When it lapses (TTL + at most one sweep) is the store's rule, checked exactly with a
    # fake clock in test_store.py. Over the API: watchers see the lapse as an UPSERT with
    # healthy=false, Discover lists the instance only on request, and the lapse never comes
    # before the TTL has passed: a bound that holds however slow the machine is.
    watch = stub.Watch(pb.WatchRequest(service="echo"))
    assert (await read(watch)).type == pb.WatchEvent.SNAPSHOT
    before_register = time.monotonic()
    reply = await stub.Register(pb.RegisterRequest(instance=instance(1), ttl_ms=1000))
    seen: list[pb.WatchEvent] = []
    while not seen or seen[-1].type == pb.WatchEvent.PROGRESS or seen[-1].instances[0].healthy:
        seen.append(await read(watch))
    lapsed_after = time.monotonic() - before_register
    watch.cancel()
    changes = [e for e in seen if e.type != pb.WatchEvent.PROGRESS]
    assert [(e.type, e.instances[0].healthy) for e in changes] == [
        (pb.WatchEvent.UPSERT, True),
        (pb.WatchEvent.UPSERT, False),
    ]
    assert changes[0].revision == reply.revision < changes[1].revision
    assert lapsed_after >= 1.0, lapsed_after
    assert not (await stub.Discover(pb.DiscoverRequest(service="echo"))).instances
    found = await stub.Discover(pb.DiscoverRequest(service="echo", include_unhealthy=True))
    assert [i.healthy for i in found.instances] == [False]


async def test_heartbeat_after_expiry_is_not_found_and_reregistering_works(
    stub: Stub, short_ttl: float
) -> None:
    # The shortest lease the backend grants (etcd's are whole seconds), then silence.
    ttl_ms = round(short_ttl * 1000)
    reply = await stub.Register(pb.RegisterRequest(instance=instance(1), ttl_ms=ttl_ms))
    assert reply.ttl_ms == ttl_ms
    deadline = time.monotonic() + 5 + 10 * short_ttl
    while True:
        await asyncio.sleep(0.1)
        try:
            await stub.Heartbeat(pb.HeartbeatRequest(lease_id=reply.lease_id, status=pb.SERVING))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert "register again" in (exc.details() or "")
            break
        assert time.monotonic() < deadline, "lease never lapsed"
        await asyncio.sleep(2 * short_ttl)  # stop heartbeating so it lapses
    again = await stub.Register(pb.RegisterRequest(instance=instance(1), ttl_ms=5000))
    await stub.Heartbeat(pb.HeartbeatRequest(lease_id=again.lease_id, status=pb.SERVING))
    found = await stub.Discover(pb.DiscoverRequest(service="echo"))
    assert [i.instance_id for i in found.instances] == ["echo-1"]


async def test_restarted_registry_refills_from_heartbeats(start_registry: StartRegistry) -> None:
    first = await start_registry()
    address = first.address
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        leases = [
            (await stub.Register(pb.RegisterRequest(instance=instance(n)))).lease_id
            for n in range(3)
        ]
        old_revision = (await stub.Discover(pb.DiscoverRequest())).revision
        await first.close(grace=0.2)
        second = await start_registry(listen=address)
        # What a client library does: heartbeat, and register again on NOT_FOUND.
        for n, lease in enumerate(leases):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Heartbeat(pb.HeartbeatRequest(lease_id=lease), wait_for_ready=True)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await stub.Register(pb.RegisterRequest(instance=instance(n)))
        found = await stub.Discover(pb.DiscoverRequest(service="echo"))
        assert sorted(i.instance_id for i in found.instances) == ["echo-0", "echo-1", "echo-2"]
        # Revisions never go back, even across a restart.
        assert found.revision > old_revision
        assert second.port == first.port


async def test_many_concurrent_clients_register_and_heartbeat(registry: RegistryServer) -> None:
    channels = [grpc.aio.insecure_channel(registry.address) for _ in range(4)]
    try:
        stubs: list[Stub] = [pb_grpc.RegistryStub(ch) for ch in channels]

        async def life(n: int) -> None:
            stub = stubs[n % len(stubs)]
            reply = await stub.Register(pb.RegisterRequest(instance=instance(n), ttl_ms=5000))
            for beat in range(5):
                await stub.Heartbeat(
                    pb.HeartbeatRequest(
                        lease_id=reply.lease_id,
                        status=pb.SERVING,
                        load=pb.LoadReport(in_flight=beat),
                    )
                )

        await asyncio.gather(*(life(n) for n in range(200)))
        found = await stubs[0].Discover(pb.DiscoverRequest(service="echo"))
        assert len(found.instances) == 200 and all(i.healthy for i in found.instances)
        assert registry.store.stats.heartbeats == 1000
        listing = await stubs[0].ListServices(pb.ListServicesRequest())
        assert listing.state.instances_healthy == 200
        assert [(s.name, s.instances) for s in listing.services] == [("echo", 200)]
    finally:
        for ch in channels:
            await ch.close(None)


async def test_health_and_reflection_are_served(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "shoal.registry.v1.Registry"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    assert isinstance(reply, reflection_pb2.ServerReflectionResponse)
    names = {s.name for s in reply.list_services_response.service}
    assert {"shoal.registry.v1.Registry", "grpc.health.v1.Health"} <= names


async def test_list_services_reports_state(stub: Stub, registry: RegistryServer) -> None:
    await stub.Register(pb.RegisterRequest(instance=instance(1)))
    await stub.Register(
        pb.RegisterRequest(
            instance=instance(1, service="store", grpc_services=["test.Store", "test.Admin"])
        )
    )
    listing = await stub.ListServices(pb.ListServicesRequest())
    assert [(s.name, list(s.grpc_services)) for s in listing.services] == [
        ("echo", ["test.Echo"]),
        ("store", ["test.Admin", "test.Store"]),
    ]
    assert not listing.state.self_preservation
    assert listing.state.registry_epoch == registry.store.epoch


FLEET = 5


async def test_self_preservation_is_visible_over_the_api(start_registry: StartRegistry) -> None:
    config = RegistryConfig(
        ttl_min=0.2,
        sweep_interval=0.1,
        preservation_share=0.5,
        preservation_window=5.0,
        preservation_max=30.0,
    )
    server = await start_registry(config)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        # Registered together with a TTL well above the time that takes on a loaded
        # machine, so they lapse within a sweep or two of each other. Five, not four:
        # however a loaded machine splits their lapses over two sweeps (say two, then
        # three), more than half stay overdue once self-preservation holds them.
        replies = await asyncio.gather(
            *(
                stub.Register(pb.RegisterRequest(instance=instance(n), ttl_ms=1000))
                for n in range(FLEET)
            )
        )
        leases = {n: reply.lease_id for n, reply in enumerate(replies)}

        async def heartbeat_all() -> None:
            for n, lease in leases.items():
                try:
                    await stub.Heartbeat(pb.HeartbeatRequest(lease_id=lease, status=pb.SERVING))
                except grpc.aio.AioRpcError as exc:
                    # Two may have been evicted by a sweep just before the mass lapse.
                    assert exc.code() == grpc.StatusCode.NOT_FOUND
                    reply = await stub.Register(
                        pb.RegisterRequest(instance=instance(n), ttl_ms=1000)
                    )
                    leases[n] = reply.lease_id

        # All go silent together: the registry should blame itself and hold evictions.
        deadline = time.monotonic() + 5
        while not (
            listing := await stub.ListServices(pb.ListServicesRequest())
        ).state.self_preservation:
            assert time.monotonic() < deadline, "never entered self-preservation"
            await asyncio.sleep(0.1)
        assert "lapsed" in listing.state.self_preservation_reason
        await asyncio.sleep(0.5)  # several sweeps, and still nothing more is evicted
        found = await stub.Discover(pb.DiscoverRequest(service="echo"))
        assert len(found.instances) >= 3 and found.self_preservation
        deadline = time.monotonic() + 5
        while (await stub.ListServices(pb.ListServicesRequest())).state.self_preservation:
            assert time.monotonic() < deadline, "never left self-preservation"
            await heartbeat_all()  # heartbeats return
            await asyncio.sleep(0.05)
        await heartbeat_all()
        found = await stub.Discover(pb.DiscoverRequest(service="echo"))
        assert len(found.instances) == FLEET and not found.self_preservation
