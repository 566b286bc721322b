"""EtcdBackend against a real 3-member etcd: replicas, leases, expiry, self-preservation.

Each test keeps to a key prefix of its own on the module's cluster, and starts its
replicas (each with a client of its own, as separate processes would have) through the
``replicas`` fixture, which closes them and checks that none of their tasks is left.
Leases are 1-2 s; waits are bounded, and nothing asserts how fast etcd is.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from types import MappingProxyType

import pytest

from registry_service import RegistryConfig, feed
from registry_service.backend import Backend
from registry_service.errors import AlreadyExists, LeaseNotFound, LimitReached, StoreUnavailable
from registry_service.etcd import EtcdClient
from registry_service.etcd_store import EtcdBackend
from registry_service.model import (
    Event,
    EventKind,
    Instance,
    InstanceSpec,
    LoadReport,
    ServingStatus,
)
from tests.etcd_cluster import EtcdCluster, etcd_cluster_fixture, free_ports, requires_etcd  # noqa: F401
from tests.proxy_sidecar.conftest import wait_for
from tests.registry_service.conftest import FAST as API_FAST

pytestmark = requires_etcd

SERVING, DRAINING = ServingStatus.SERVING, ServingStatus.DRAINING
UPSERT, REMOVE = EventKind.UPSERT, EventKind.REMOVE
# The API tests' settings, but with leases of whole seconds, as etcd's are.
FAST = replace(API_FAST, ttl_min=1.0)

Replicas = Callable[..., Awaitable[EtcdBackend]]


@pytest.fixture
async def replicas(etcd_cluster: EtcdCluster) -> AsyncIterator[Replicas]:
    prefix = f"/test/{uuid.uuid4().hex}/".encode()
    made: list[tuple[EtcdBackend, EtcdClient]] = []

    async def start(
        config: RegistryConfig = FAST, endpoints: list[str] | None = None
    ) -> EtcdBackend:
        client = EtcdClient(endpoints or etcd_cluster.endpoints, timeout=2.0)
        backend = EtcdBackend(config, client, prefix=prefix, start_timeout=5.0)
        made.append((backend, client))
        await backend.start()
        return backend

    yield start
    for backend, client in made:
        await backend.close()
        await client.aclose()
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("etcd-backend")]
    assert not left, left


def spec(n: int, service: str = "echo", **fields: object) -> InstanceSpec:
    values: dict[str, object] = {
        "instance_id": f"{service}-{n}",
        "service": service,
        "address": f"127.0.0.1:{10_000 + n}",
        "grpc_services": ("test.Echo",),
    }
    values.update(fields)
    return InstanceSpec(**values)  # type: ignore[arg-type]


def recorder(backend: EtcdBackend) -> list[Event]:
    events: list[Event] = []
    backend.view.subscribe(events.append)
    return events


def changes(events: list[Event]) -> list[tuple[EventKind, int, str, bool]]:
    return [(e.kind, e.revision, e.instance.instance_id, e.instance.lease_ok) for e in events]


async def test_the_backend_meets_the_interface(replicas: Replicas) -> None:
    backend: Backend = await replicas()  # mypy checks the rest
    assert backend.view.epoch and backend.view.revision > 0


async def test_register_heartbeat_deregister_round_trip_publishes_each_change_once(
    replicas: Replicas,
) -> None:
    a = await replicas()
    events = recorder(a)
    inst = await a.register(spec(1), 1.0, SERVING)
    assert a.view.get("echo-1") is inst and inst.lease_ok and inst.ttl == 1.0
    assert int(inst.lease_id, 16) > 0 and a.view.service_of_lease(inst.lease_id) == "echo"
    same = await a.heartbeat(inst.lease_id, SERVING, LoadReport())
    assert same is inst  # nothing changed: nothing written
    draining = await a.heartbeat(inst.lease_id, DRAINING, LoadReport(in_flight=2))
    assert (draining.status, draining.load.in_flight) == (DRAINING, 2)
    assert draining.revision > inst.revision and a.view.get("echo-1") is draining
    await a.deregister(inst.lease_id)
    assert a.view.get("echo-1") is None and len(a.view) == 0
    assert changes(events)[:2] == [
        (UPSERT, inst.revision, "echo-1", True),
        (UPSERT, draining.revision, "echo-1", True),
    ]
    assert [e.kind for e in events] == [UPSERT, UPSERT, REMOVE]
    assert events[2].revision > draining.revision
    replay = a.view.events_since(inst.revision - 1)
    assert replay is not None and list(replay) == events
    with pytest.raises(LeaseNotFound, match="register again"):
        await a.heartbeat(inst.lease_id, SERVING, LoadReport())
    stats = a.stats
    assert (stats.registrations, stats.heartbeats, stats.deregistrations) == (1, 2, 1)
    assert stats.heartbeats_not_found == 1


async def test_a_registration_through_one_replica_is_seen_by_another_at_the_same_revision(
    replicas: Replicas,
) -> None:
    a, b = await replicas(), await replicas()
    assert a.view.epoch == b.view.epoch
    before = b.view.revision
    inst = await a.register(spec(1, metadata=MappingProxyType({"v": "2"})), 2.0, SERVING)
    await wait_for(lambda: b.view.get("echo-1") is not None, 10)
    seen = b.view.get("echo-1")
    assert seen is not None and seen.revision == inst.revision
    assert seen.spec == inst.spec and seen.lease_id == inst.lease_id
    replay = b.view.events_since(before)
    assert replay is not None
    assert changes(list(replay)) == [(UPSERT, inst.revision, "echo-1", True)]
    assert b.view.discover("", "test.Echo", False) == [seen]
    assert b.view.grpc_owners("test.Echo") == {"echo"}
    assert b.view.address_owners(inst.spec.address) == {"echo"}
    assert [(s.name, s.instances, s.healthy) for s in b.view.services()] == [("echo", 1, 1)]


async def test_a_heartbeat_through_another_replica_renews_the_lease(replicas: Replicas) -> None:
    a, b = await replicas(), await replicas()
    inst = await a.register(spec(1), 2.0, SERVING)
    await wait_for(lambda: b.view.service_of_lease(inst.lease_id) == "echo", 10)
    for _ in range(10):  # 3 s, more than the TTL: renewed only through B
        await b.heartbeat(inst.lease_id, SERVING, LoadReport())
        await asyncio.sleep(0.3)
    for view in (a.view, b.view):
        held = view.get("echo-1")
        assert held is not None and held.lease_ok and view.overdue() == []
        assert view.lease_age("echo-1") <= 2.0
    assert b.stats.heartbeats == 10 and a.stats.lapses == b.stats.lapses == 0


async def test_a_lapsed_lease_is_unhealthy_on_every_replica_then_the_leader_alone_removes_it(
    replicas: Replicas,
) -> None:
    a, b = await replicas(), await replicas()
    await wait_for(lambda: a.election.leader, 10)
    assert not b.election.leader
    seen_a, seen_b = recorder(a), recorder(b)
    inst = await b.register(spec(1), 1.0, SERVING)
    views = (a.view, b.view)

    def lapsed() -> bool:
        return all((i := v.get("echo-1")) is not None and not i.lease_ok for v in views)

    await wait_for(lapsed, 15)
    assert b.view.service_of_lease(inst.lease_id) is None
    await wait_for(lambda: all(v.get("echo-1") is None for v in views), 15)
    # The mirrors may show the removal before the leader has its transaction's reply.
    await wait_for(lambda: (a.stats.lapses, a.stats.removals) == (1, 1), 5)
    assert (b.stats.lapses, b.stats.removals) == (0, 0)
    assert changes(seen_a) == changes(seen_b)
    assert [(kind, ok) for kind, _, _, ok in changes(seen_b)] == [
        (UPSERT, True),
        (UPSERT, False),
        (REMOVE, False),
    ]


async def test_closing_the_leader_hands_the_sweep_to_another_replica(replicas: Replicas) -> None:
    a, b = await replicas(), await replicas()
    await wait_for(lambda: a.election.leader, 10)
    await a.close()  # revokes its lease, and so the leader key
    await wait_for(lambda: b.election.leader, 10)
    await b.register(spec(1), 1.0, SERVING)
    await wait_for(lambda: b.view.get("echo-1") is None, 15)
    await wait_for(lambda: (b.stats.lapses, b.stats.removals) == (1, 1), 5)
    assert a.stats.removals == 0


async def test_a_live_instance_cannot_be_taken_over_from_another_address(
    replicas: Replicas,
) -> None:
    a, b = await replicas(), await replicas()
    first = await a.register(spec(1), 2.0, SERVING)
    await wait_for(lambda: b.view.get("echo-1") is not None, 10)
    with pytest.raises(AlreadyExists, match="cannot take it over"):
        await b.register(spec(1, address="127.0.0.1:9"), 2.0, SERVING)
    # From its own address it registers again: a new lease, and the old one is revoked.
    again = await b.register(spec(1), 2.0, SERVING)
    assert again.lease_id != first.lease_id and again.revision > first.revision
    await wait_for(lambda: a.view.get("echo-1") == again, 10)
    with pytest.raises(LeaseNotFound):
        await a.heartbeat(first.lease_id, SERVING, LoadReport())
    await a.heartbeat(again.lease_id, SERVING, LoadReport())


async def test_unknown_and_malformed_leases_are_not_found(replicas: Replicas) -> None:
    a = await replicas()
    for lease in ("not-hex", "0", "123abc"):
        with pytest.raises(LeaseNotFound, match="register again"):
            await a.heartbeat(lease, SERVING, LoadReport())
        with pytest.raises(LeaseNotFound):
            await a.deregister(lease)
    assert a.stats.heartbeats_not_found == 3


async def test_limits_refuse_registrations_even_when_they_race(replicas: Replicas) -> None:
    a = await replicas(RegistryConfig(max_instances=3, max_instances_per_service=2))
    await a.register(spec(1), 2.0, SERVING)
    await a.register(spec(2), 2.0, SERVING)
    with pytest.raises(LimitReached, match="limit per service"):
        await a.register(spec(3), 2.0, SERVING)
    # Three race for the last place: the ones still on their way count against it.
    results = await asyncio.gather(
        *(a.register(spec(n, service=f"s{n}"), 2.0, SERVING) for n in range(3)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if isinstance(r, LimitReached)) == 2
    assert len(a.view) == 3
    big = MappingProxyType({f"k{k:02d}": "v" * 1024 for k in range(64)})
    b = await replicas(RegistryConfig(max_instances_bytes=64 * 1024))
    with pytest.raises(LimitReached, match="bytes"):
        await b.register(spec(9, metadata=big), 2.0, SERVING)


async def test_mass_lapse_holds_evictions_on_every_replica_until_heartbeats_return(
    replicas: Replicas,
) -> None:
    config = replace(FAST, preservation_share=0.5, preservation_window=10.0, preservation_max=30.0)
    a, b = await replicas(config), await replicas(config)
    views = (a.view, b.view)
    # Registered together, so that their leases end within one of etcd's expiry checks.
    await asyncio.gather(*(a.register(spec(n), 1.0, SERVING) for n in range(4)))
    await wait_for(lambda: all(v.preservation.active for v in views), 15)
    for view in views:
        assert "lapsed" in view.preservation.reason and view.preservation.entered_total == 1
    removed = a.stats.removals
    await asyncio.sleep(1.5)  # many sweeps, and three times the grace
    assert a.stats.removals == removed and b.stats.removals == 0
    for view in views:
        # One may have been evicted by a sweep just before the rest lapsed.
        assert len(view) >= 3 and all(i.lease_ok for i in view.instances())
        assert view.preservation.seconds_active(view.now()) > 1.0
    # Heartbeats return: the leases have ended, so the instances register again.
    for n in range(4):
        await b.register(spec(n), 2.0, SERVING)
    await wait_for(lambda: not any(v.preservation.active for v in views), 15)
    for view in views:
        assert len(view) == 4 and all(i.healthy for i in view.instances())
        assert view.preservation.entered_total == 1


async def test_start_raises_store_unavailable_when_etcd_cannot_be_reached() -> None:
    endpoints = [f"127.0.0.1:{port}" for port in free_ports(2)]
    async with EtcdClient(endpoints, timeout=0.5) as client:
        backend = EtcdBackend(FAST, client, start_timeout=2.0)
        with pytest.raises(StoreUnavailable, match="did not answer"):
            await backend.start()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("etcd-backend")]


class Relay:
    """A TCP relay to one etcd member, which a test cuts and restores on the same port,
    or freezes: connections stay open and new ones are taken, but nothing gets through,
    as when a network drops every packet."""

    def __init__(self, target: str) -> None:
        self._host, port = target.rsplit(":", 1)
        self._target_port = int(port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._streams: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for stream in list(self._streams):
            stream.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._streams |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    await self._flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._streams -= {writer, up_writer}


@pytest.fixture
async def relay(etcd_cluster: EtcdCluster) -> AsyncIterator[Relay]:
    relay = Relay(etcd_cluster.endpoints[0])
    await relay.open()
    yield relay
    relay.thaw()
    if relay._server is not None:
        await relay.cut()


async def cut_off(
    replicas: Replicas, relay: Relay
) -> tuple[EtcdBackend, EtcdBackend, Instance, list[Event]]:
    """Replica A reaching etcd through ``relay`` and B directly, an instance registered
    through A that both see, A's events from then on; then the relay cut."""
    a = await replicas(endpoints=[relay.address])
    b = await replicas()
    one = await a.register(spec(1), 5.0, SERVING)
    await wait_for(lambda: b.view.get("echo-1") is not None, 10)
    seen = recorder(a)
    await relay.cut()
    return a, b, one, seen


async def test_an_outage_fails_writes_keeps_reads_and_the_mirror_catches_up(
    replicas: Replicas, relay: Relay
) -> None:
    a, b, one, seen = await cut_off(replicas, relay)
    with pytest.raises(StoreUnavailable):
        await a.register(spec(2), 5.0, SERVING)
    with pytest.raises(StoreUnavailable):
        await a.heartbeat(one.lease_id, DRAINING, LoadReport())
    assert a.view.get("echo-1") == one  # fail-static: the last mirror still answers
    two = await b.register(spec(2), 5.0, SERVING)
    await b.deregister(one.lease_id)
    removed = b.view.revision
    await relay.open()
    await wait_for(lambda: a.view.revision >= removed, 15)
    assert a.view.get("echo-1") is None and a.view.get("echo-2") == two
    assert changes(seen) == [
        (UPSERT, two.revision, "echo-2", True),
        (REMOVE, removed, "echo-1", True),
    ]
    await a.heartbeat(two.lease_id, SERVING, LoadReport())


async def test_a_mirror_behind_a_compaction_lists_again_and_hands_on_the_differences(
    replicas: Replicas, relay: Relay, etcd_cluster: EtcdCluster
) -> None:
    a, b, one, seen = await cut_off(replicas, relay)
    before = a.view.revision
    two = await b.register(spec(2), 5.0, SERVING)
    await b.deregister(one.lease_id)
    async with EtcdClient(etcd_cluster.endpoints) as client:
        await client.compact(await client.put(b"/test/compact-marker", b""))
    await relay.open()
    await wait_for(lambda: a.view.get("echo-1") is None and a.view.get("echo-2") == two, 15)
    # In revision order; the removal's own revision went with the history, so it takes
    # one of the gap's that no other change has.
    kinds = {(kind, instance_id) for kind, _, instance_id, _ in changes(seen)}
    assert kinds == {(UPSERT, "echo-2"), (REMOVE, "echo-1")} and len(seen) == 2
    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions)) and before < revisions[0]
    assert revisions[-1] <= a.view.revision
    assert next(e for e in seen if e.kind is UPSERT).revision == two.revision
    # The history cannot bridge the gap: a watcher from before it needs a snapshot.
    assert a.view.events_since(before) is None
    assert a.view.events_since(a.view.revision) is not None


async def test_a_watch_silent_behind_a_network_that_drops_everything_is_opened_again(
    replicas: Replicas, relay: Relay, etcd_cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A watches through a member whose network then drops every packet: no
    error reaches it and etcd's progress notices stop, so until its idle timeout (60 s)
    only the feed's quorum check can tell that the watch brings nothing any more."""
    monkeypatch.setattr(feed, "CHECK", 1.0)
    a = await replicas(endpoints=[relay.address, *etcd_cluster.endpoints[1:]])
    b = await replicas()
    await a.register(spec(1), 5.0, SERVING)
    await wait_for(lambda: b.view.get("echo-1") is not None, 10)
    relay.freeze()
    two = await b.register(spec(2), 5.0, SERVING)
    # Two checks (one may fall while the change is in flight), each after a read that
    # first times out on the frozen member (2 s) and then goes to another.
    await wait_for(lambda: a.view.get("echo-2") == two, 15)
    # And A's own writes show in its mirror again (read your writes).
    three = await a.register(spec(3), 5.0, SERVING)
    assert a.view.get("echo-3") == three
