"""The store's rules, driven by a fake clock so timing is exact."""

from __future__ import annotations

import pytest

from registry_service import RegistryConfig
from registry_service.errors import AlreadyExists, LeaseNotFound
from registry_service.model import Event, EventKind, InstanceSpec, LoadReport, ServingStatus
from registry_service.store import RegistryStore
from tests.registry_service.conftest import Clock

SERVING = ServingStatus.SERVING


def spec(n: int = 1, address: str | None = None, service: str = "echo") -> InstanceSpec:
    return InstanceSpec(
        instance_id=f"i{n}",
        service=service,
        address=address or f"10.0.0.{n}:80",
        grpc_services=("test.Echo",),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_store(clock: Clock, **overrides: float) -> RegistryStore:
    settings: dict[str, float] = {
        "sweep_interval": 1.0,
        "removal_grace": 5.0,
        "preservation_share": 1.0,
    }
    settings.update(overrides)
    return RegistryStore(RegistryConfig(**settings), clock=clock)  # type: ignore[arg-type]


def test_lease_lapses_after_ttl_and_within_one_sweep(clock: Clock) -> None:
    store = make_store(clock)
    inst = store.register(spec(), 3.0, SERVING)
    assert inst.ttl == 3.0
    # Sweeps run every second; the lease must survive every sweep up to its TTL ...
    for _ in range(3):
        clock.now += 1.0
        store.sweep()
        assert store.get("i1") is not None and store.get("i1").lease_ok  # type: ignore[union-attr]
    # ... and be marked by the first sweep after it (TTL + at most one interval).
    clock.now += 1.0
    store.sweep()
    lapsed = store.get("i1")
    assert lapsed is not None and not lapsed.lease_ok and not lapsed.healthy
    assert store.discover("echo", "", include_unhealthy=False) == []
    assert [i.instance_id for i in store.discover("echo", "", include_unhealthy=True)] == ["i1"]


def test_lapsed_instance_is_removed_after_grace(clock: Clock) -> None:
    store = make_store(clock, removal_grace=5.0)
    store.register(spec(), 1.0, SERVING)
    clock.now += 2.0
    store.sweep()
    assert store.get("i1") is not None
    clock.now += 4.9
    store.sweep()
    assert store.get("i1") is not None
    clock.now += 0.2
    store.sweep()
    assert store.get("i1") is None
    assert store.stats.lapses == 1 and store.stats.removals == 1


def test_heartbeat_renews_and_unknown_or_lapsed_lease_is_not_found(clock: Clock) -> None:
    store = make_store(clock)
    inst = store.register(spec(), 2.0, SERVING)
    for _ in range(5):
        clock.now += 1.5
        store.heartbeat(inst.lease_id, SERVING, LoadReport())
        store.sweep()
    assert store.get("i1").lease_ok  # type: ignore[union-attr]
    with pytest.raises(LeaseNotFound):
        store.heartbeat("no-such-lease", SERVING, LoadReport())
    clock.now += 2.5
    store.sweep()
    with pytest.raises(LeaseNotFound):
        store.heartbeat(inst.lease_id, SERVING, LoadReport())
    # Registering again (what a client does on NOT_FOUND) restores the instance.
    again = store.register(spec(), 2.0, SERVING)
    assert again.lease_ok and again.lease_id != inst.lease_id


def test_ttl_is_clamped_and_defaulted(clock: Clock) -> None:
    store = make_store(clock, ttl_min=1.0, ttl_max=20.0, ttl_default=10.0)
    assert store.register(spec(1), 0.0, SERVING).ttl == 10.0
    assert store.register(spec(2), 0.01, SERVING).ttl == 1.0
    assert store.register(spec(3), 500.0, SERVING).ttl == 20.0


def test_same_id_from_other_address_conflicts_only_while_lease_is_live(clock: Clock) -> None:
    store = make_store(clock)
    store.register(spec(1, "10.0.0.1:80"), 1.0, SERVING)
    with pytest.raises(AlreadyExists):
        store.register(spec(1, "10.0.0.9:80"), 1.0, SERVING)
    # The same address re-registering is a restart of the same instance: allowed.
    store.register(spec(1, "10.0.0.1:80"), 1.0, SERVING)
    clock.now += 2.0
    store.sweep()
    moved = store.register(spec(1, "10.0.0.9:80"), 1.0, SERVING)
    assert moved.spec.address == "10.0.0.9:80"


def test_status_changes_publish_and_load_is_rate_limited(clock: Clock) -> None:
    store = make_store(clock, load_publish_interval=1.0)
    events: list[Event] = []
    store.subscribe(events.append)
    inst = store.register(spec(), 5.0, SERVING)
    store.heartbeat(inst.lease_id, SERVING, LoadReport())  # nothing changed
    assert len(events) == 1
    store.heartbeat(inst.lease_id, SERVING, LoadReport(in_flight=1))
    assert len(events) == 2  # the first load report goes out at once
    store.heartbeat(inst.lease_id, ServingStatus.DRAINING, LoadReport(in_flight=1))
    assert len(events) == 3 and events[-1].instance.status is ServingStatus.DRAINING
    clock.now += 0.5
    store.heartbeat(inst.lease_id, ServingStatus.DRAINING, LoadReport(in_flight=3))
    assert len(events) == 3  # too soon after the last publication: held back
    store.sweep()
    assert len(events) == 3
    clock.now += 0.6
    store.sweep()  # the sweep sends the held report once it is due
    assert len(events) == 4 and events[-1].instance.load.in_flight == 3
    clock.now += 1.0
    store.heartbeat(inst.lease_id, ServingStatus.DRAINING, LoadReport(in_flight=4))
    assert len(events) == 5 and events[-1].instance.load.in_flight == 4
    # A status change always goes out at once, whatever the load timing.
    store.heartbeat(inst.lease_id, ServingStatus.SERVING, LoadReport(in_flight=4))
    assert len(events) == 6
    store.heartbeat(inst.lease_id, ServingStatus.DRAINING, LoadReport(in_flight=4))
    assert not store.discover("echo", "", include_unhealthy=False)  # DRAINING is not routable


def test_revisions_increase_by_one_per_event_and_history_replays(clock: Clock) -> None:
    store = make_store(clock)
    start = store.revision
    a = store.register(spec(1), 5.0, SERVING)
    store.register(spec(2, service="other"), 5.0, SERVING)
    store.deregister(a.lease_id)
    assert store.revision == start + 3
    replay = store.events_since(start)
    assert replay is not None
    events = list(replay)
    assert [e.revision for e in events] == [start + 1, start + 2, start + 3]
    assert [e.kind for e in events] == [EventKind.UPSERT, EventKind.UPSERT, EventKind.REMOVE]
    only_echo = store.events_since(start, "echo")
    assert only_echo is not None and [e.revision for e in only_echo] == [start + 1, start + 3]
    assert list(store.events_since(store.revision) or [None]) == []
    assert store.events_since(store.revision + 10) is None  # a revision from another run


def test_history_that_cannot_bridge_the_gap_asks_for_a_snapshot(clock: Clock) -> None:
    store = RegistryStore(RegistryConfig(history_size=16, preservation_share=1.0), clock=clock)
    start = store.revision
    for n in range(40):
        store.register(spec(n), 5.0, SERVING)
    assert store.events_since(start) is None
    recent = store.events_since(store.revision - 10)
    assert recent is not None and len(list(recent)) == 10


def test_grpc_service_index_and_moves_between_services(clock: Clock) -> None:
    store = make_store(clock)
    store.register(spec(1), 5.0, SERVING)
    events: list[Event] = []
    store.subscribe(events.append)
    store.register(spec(1, service="renamed"), 5.0, SERVING)
    # Watchers of the old service must learn that the instance left it.
    assert [(e.kind, e.instance.spec.service) for e in events] == [
        (EventKind.REMOVE, "echo"),
        (EventKind.UPSERT, "renamed"),
    ]
    assert [i.instance_id for i in store.discover("", "test.Echo", False)] == ["i1"]
    assert store.discover("echo", "test.Echo", False) == []
    assert [s.name for s in store.services()] == ["renamed"]
