"""Watch: snapshot then ordered deltas, resume without loss, progress, fan-out, overflow."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer
from registry_service.model import InstanceSpec, ServingStatus
from tests.registry_service.conftest import (
    StartRegistry,
    instance,
    memory_only,
    memory_store,
    read,
)

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub as Stub

SNAPSHOT, UPSERT, REMOVE, PROGRESS = (
    pb.WatchEvent.SNAPSHOT,
    pb.WatchEvent.UPSERT,
    pb.WatchEvent.REMOVE,
    pb.WatchEvent.PROGRESS,
)
SERVING = ServingStatus.SERVING


async def read_until(call: Any, stop: int) -> list[pb.WatchEvent]:
    """Read events, skipping progress, until one reaches revision ``stop``."""
    events: list[pb.WatchEvent] = []
    while not events or events[-1].revision < stop:
        event = await read(call)
        if event.type != PROGRESS:
            events.append(event)
    return events


async def test_snapshot_then_deltas_with_strictly_increasing_revisions(stub: Stub) -> None:
    first = await stub.Register(pb.RegisterRequest(instance=instance(1)))
    call = stub.Watch(pb.WatchRequest(service="echo"))
    snapshot = await read(call)
    assert snapshot.type == SNAPSHOT and [i.instance_id for i in snapshot.instances] == ["echo-1"]
    second = await stub.Register(pb.RegisterRequest(instance=instance(2)))
    await stub.Register(pb.RegisterRequest(instance=instance(1, service="other")))  # not watched
    await stub.Heartbeat(pb.HeartbeatRequest(lease_id=second.lease_id, status=pb.DRAINING))
    last = await stub.Deregister(pb.DeregisterRequest(lease_id=first.lease_id))
    events = await read_until(call, last.revision)
    call.cancel()
    assert [(e.type, e.instances[0].instance_id) for e in events] == [
        (UPSERT, "echo-2"),
        (UPSERT, "echo-2"),
        (REMOVE, "echo-1"),
    ]
    assert events[1].instances[0].status == pb.DRAINING
    revisions = [snapshot.revision] + [e.revision for e in events]
    assert revisions == sorted(set(revisions)), "revisions must strictly increase"
    assert all(e.registry_epoch == snapshot.registry_epoch for e in events)


async def test_resume_after_reconnect_loses_nothing(stub: Stub) -> None:
    call = stub.Watch(pb.WatchRequest())
    seen = [await read(call)]
    await stub.Register(pb.RegisterRequest(instance=instance(1)))
    seen += await read_until(call, seen[0].revision + 1)
    call.cancel()  # the watcher drops off ...
    changes = []
    for n in range(2, 6):  # ... and misses these
        changes.append((await stub.Register(pb.RegisterRequest(instance=instance(n)))).revision)
    resumed = stub.Watch(pb.WatchRequest(since_revision=seen[-1].revision))
    missed = await read_until(resumed, changes[-1])
    resumed.cancel()
    assert [e.type for e in missed] == [UPSERT] * 4
    assert [e.revision for e in missed] == changes
    assert [e.instances[0].instance_id for e in missed] == [f"echo-{n}" for n in range(2, 6)]


async def test_resume_from_a_revision_too_old_or_unknown_gets_a_snapshot(
    start_registry: StartRegistry,
) -> None:
    server = await start_registry(RegistryConfig(history_size=16, preservation_share=1.0))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        start = (await stub.Discover(pb.DiscoverRequest())).revision
        for n in range(30):
            await stub.Register(pb.RegisterRequest(instance=instance(n)))
        for since in (start, start + 1, server.store.revision + 1000):
            call = stub.Watch(pb.WatchRequest(since_revision=since))
            event = await read(call)
            call.cancel()
            assert event.type == SNAPSHOT and len(event.instances) == 30
            assert event.revision == server.store.revision


async def test_idle_streams_get_progress(stub: Stub) -> None:
    call = stub.Watch(pb.WatchRequest(service="quiet"))
    snapshot = await read(call)
    progress = await read(call)
    call.cancel()
    assert progress.type == PROGRESS and progress.revision >= snapshot.revision


async def test_many_watchers_share_one_fan_out(registry: RegistryServer, stub: Stub) -> None:
    calls = [stub.Watch(pb.WatchRequest(service="echo")) for _ in range(50)]
    for call in calls:
        assert (await read(call)).type == SNAPSHOT
    assert registry.servicer.hub.watchers == 50
    rendered = 0
    original = registry.servicer._render.event

    def counting(*args: object) -> pb.WatchEvent:
        nonlocal rendered
        rendered += 1
        return original(*args)  # type: ignore[arg-type]

    registry.servicer._render.event = counting  # type: ignore[method-assign, assignment]
    last = (await stub.Register(pb.RegisterRequest(instance=instance(1)))).revision
    for call in calls:
        events = await read_until(call, last)
        assert [e.revision for e in events] == [last]
        call.cancel()
    assert rendered == 1, "one change must be rendered once, whatever the number of watchers"


@memory_only("100 changes with no await between them need the store itself; etcd's come one by one")
async def test_watcher_that_falls_behind_gets_a_fresh_snapshot(
    start_registry: StartRegistry,
) -> None:
    server = await start_registry(RegistryConfig(watch_queue_size=16, preservation_share=1.0))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        call = stub.Watch(pb.WatchRequest())
        assert (await read(call)).type == SNAPSHOT
        # 100 changes in one go, with no chance for the stream to drain its queue.
        for n in range(100):
            spec = InstanceSpec(instance_id=f"i{n}", service="bulk", address=f"10.0.0.1:{n + 1}")
            memory_store(server).register(spec, 5.0, ServingStatus.SERVING)
        event = await read(call)
        while event.type == PROGRESS:
            event = await read(call)
        assert event.type == SNAPSHOT and len(event.instances) == 100
        assert event.revision == server.store.revision
        await stub.Register(pb.RegisterRequest(instance=instance(1)))
        after = await read_until(call, server.store.revision)
        assert after[-1].revision > event.revision and after[-1].type == UPSERT
        call.cancel()


async def test_shutdown_ends_watch_streams_cleanly(start_registry: StartRegistry) -> None:
    server = await start_registry()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Stub = pb_grpc.RegistryStub(channel)
        call = stub.Watch(pb.WatchRequest())
        await read(call)
        closing = asyncio.create_task(server.close(grace=5.0))

        async def drain() -> None:
            while await call.read() is not EOF:
                pass

        await asyncio.wait_for(drain(), timeout=3)  # ends well before the 5 s grace
        assert await call.code() == grpc.StatusCode.OK
        await closing


@memory_only("changes the store itself while the stream is held at its yield")
async def test_changes_made_while_a_message_is_being_sent_are_not_lost(
    registry: RegistryServer,
) -> None:
    # Drive the stream handler directly: it is suspended at the yield of the snapshot,
    # exactly where a slow network would hold it, while another change lands.
    stream = registry.servicer.Watch(pb.WatchRequest(), context=None)  # type: ignore[arg-type]
    snapshot = await anext(stream)
    assert snapshot.type == SNAPSHOT and not snapshot.instances
    late = memory_store(registry).register(
        InstanceSpec(instance_id="late", service="svc", address="10.0.0.2:1"),
        30.0,
        ServingStatus.SERVING,
    )
    event = await asyncio.wait_for(anext(stream), 5)
    await stream.aclose()  # type: ignore[attr-defined]
    assert (event.type, event.revision) == (UPSERT, late.revision)
    assert event.instances[0].instance_id == "late"


async def test_health_watchers_see_not_serving_when_shutdown_begins(
    start_registry: StartRegistry,
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = await start_registry()
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        call = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(call.read(), 5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        closing = asyncio.create_task(server.close(grace=2.0))
        second = await asyncio.wait_for(call.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await closing


BIG = {f"k{k:02d}".ljust(128, "x"): "v" * 1024 for k in range(64)}


def big_spec(n: int) -> InstanceSpec:
    return InstanceSpec(
        instance_id=f"big{n}", service="bulk", address=f"10.0.0.3:{n + 1}", metadata=BIG
    )


@memory_only("30 changes with no await between them need the store itself")
async def test_a_stalled_watcher_holds_at_most_its_queue_bytes(
    start_registry: StartRegistry,
) -> None:
    server = await start_registry(RegistryConfig(watch_queue_bytes=1 << 20, preservation_share=1.0))
    stream = server.servicer.Watch(pb.WatchRequest(), context=None)  # type: ignore[arg-type]
    assert (await anext(stream)).type == SNAPSHOT
    # While the stream is held at its yield, 15 big register+deregister pairs: 30 events,
    # far under the count bound (4096) but about 2.2 MB against a 1 MiB byte bound.
    for n in range(15):
        inst = memory_store(server).register(big_spec(n), 30.0, ServingStatus.SERVING)
        memory_store(server).deregister(inst.lease_id)
    event = await asyncio.wait_for(anext(stream), 5)
    await stream.aclose()  # type: ignore[attr-defined]
    assert event.type == SNAPSHOT and not event.instances
    assert event.revision == server.store.revision


@memory_only("changes the store itself while the replay is held at its yield")
async def test_a_resume_whose_backlog_leaves_the_history_mid_replay_gets_a_snapshot(
    start_registry: StartRegistry,
) -> None:
    server = await start_registry(RegistryConfig(history_size=16, preservation_share=1.0))
    store = memory_store(server)
    start = store.revision
    for n in range(5):
        store.register(InstanceSpec(f"i{n}", "svc", f"10.0.0.4:{n + 1}"), 30.0, SERVING)
    request = pb.WatchRequest(since_revision=start)
    stream = server.servicer.Watch(request, context=None)  # type: ignore[arg-type]
    assert (await anext(stream)).revision == start + 1
    # The reader stalls while 20 more changes push the rest of its backlog out.
    for n in range(5, 25):
        store.register(InstanceSpec(f"i{n}", "svc", f"10.0.0.4:{n + 1}"), 30.0, SERVING)
    event = await asyncio.wait_for(anext(stream), 5)
    await stream.aclose()  # type: ignore[attr-defined]
    assert event.type == SNAPSHOT and len(event.instances) == 25
    assert event.revision == store.revision


async def test_rendered_messages_are_kept_for_live_instances_only(
    registry: RegistryServer, stub: Stub
) -> None:
    start = registry.store.revision
    call = stub.Watch(pb.WatchRequest())  # a watcher, so every change is rendered
    assert (await read(call)).type == SNAPSHOT
    leases = [(await stub.Register(pb.RegisterRequest(instance=instance(n)))) for n in range(5)]
    for reply in leases:
        await stub.Deregister(pb.DeregisterRequest(lease_id=reply.lease_id))
    await read_until(call, registry.store.revision)
    # A resume replays (and renders) instances that are gone by now.
    resumed = stub.Watch(pb.WatchRequest(since_revision=start))
    await read_until(resumed, registry.store.revision)
    call.cancel()
    resumed.cancel()
    await stub.Register(pb.RegisterRequest(instance=instance(7)))
    await stub.Discover(pb.DiscoverRequest(service="echo"))
    assert len(registry.servicer._render) == 1


async def test_changes_at_one_revision_arrive_whole_and_a_resume_after_them_misses_none(
    stub: Stub, backend: str
) -> None:
    """Heartbeats that change at once: on etcd their records go in one transaction, at
    one revision; a watcher gets that revision as one message, never split, so that
    resuming after any revision it saw loses nothing."""
    leases = [
        (await stub.Register(pb.RegisterRequest(instance=instance(n)))).lease_id for n in range(30)
    ]
    call = stub.Watch(pb.WatchRequest(service="echo"))
    snapshot = await read(call)
    await asyncio.gather(
        *(
            stub.Heartbeat(pb.HeartbeatRequest(lease_id=lease, status=pb.DRAINING))
            for lease in leases
        )
    )
    messages: list[pb.WatchEvent] = []
    changed: list[str] = []
    while len(changed) < len(leases):
        event = await read(call)
        if event.type != PROGRESS:
            assert event.type == UPSERT, event
            messages.append(event)
            changed += [i.instance_id for i in event.instances if i.status == pb.DRAINING]
    call.cancel()
    assert sorted(changed) == sorted(f"echo-{n}" for n in range(30))
    revisions = [snapshot.revision] + [m.revision for m in messages]
    assert revisions == sorted(set(revisions)), "one message per revision, increasing"
    if backend != "memory":
        assert len(messages) < len(leases), "etcd: heartbeats' writes share transactions"
    last = messages[-1].revision
    for k in sorted(
        {k for k in (0, len(messages) // 2, len(messages) - 2) if k < len(messages) - 1}
    ):
        resumed = stub.Watch(pb.WatchRequest(service="echo", since_revision=messages[k].revision))
        replayed = await read_until(resumed, last)
        resumed.cancel()
        assert [e.type for e in replayed] == [UPSERT] * len(replayed)
        assert [i.instance_id for e in replayed for i in e.instances] == [
            i.instance_id for m in messages[k + 1 :] for i in m.instances
        ]
