"""Self-preservation: entering on mass lapse, and always leaving by itself."""

from __future__ import annotations

import pytest

from registry_service import RegistryConfig
from registry_service.model import InstanceSpec, LoadReport, ServingStatus
from registry_service.preservation import SelfPreservation
from registry_service.store import RegistryStore
from tests.registry_service.conftest import Clock

SERVING = ServingStatus.SERVING


def fleet(clock: Clock, n: int = 10, **overrides: float) -> tuple[RegistryStore, list[str]]:
    settings: dict[str, float] = {
        "preservation_share": 0.5,
        "preservation_window": 10.0,
        "preservation_max": 30.0,
        "removal_grace": 2.0,
    }
    settings.update(overrides)
    store = RegistryStore(RegistryConfig(**settings), clock=clock)  # type: ignore[arg-type]
    leases = []
    for i in range(n):
        spec = InstanceSpec(instance_id=f"i{i}", service="svc", address=f"10.0.0.{i + 1}:80")
        leases.append(store.register(spec, 2.0, SERVING).lease_id)
    return store, leases


def beat(store: RegistryStore, leases: list[str]) -> None:
    for lease in leases:
        store.heartbeat(lease, SERVING, LoadReport())


def test_minority_lapse_is_evicted_normally() -> None:
    clock = Clock()
    store, leases = fleet(clock)
    clock.now += 3.0
    beat(store, leases[:6])  # 4 of 10 go silent: under the 50 % share
    store.sweep()
    assert not store.preservation.active
    assert sum(1 for i in store.instances() if not i.lease_ok) == 4


def test_mass_lapse_holds_evictions_and_returning_heartbeats_end_it() -> None:
    clock = Clock()
    store, leases = fleet(clock)
    clock.now += 3.0
    beat(store, leases[:3])  # 7 of 10 silent at once: looks like we are cut off
    store.sweep()
    assert store.preservation.active
    assert "7 of 10" in store.preservation.reason
    assert all(i.lease_ok for i in store.instances())
    clock.now += 5.0
    store.sweep()  # still held, nothing removed either
    assert len(store) == 10 and store.preservation.active
    # The partition heals: the silent ones' leases were never expired, so they renew.
    beat(store, leases)
    clock.now += 0.5
    store.sweep()
    assert not store.preservation.active
    assert all(i.lease_ok for i in store.instances())


def test_preservation_ends_after_its_time_bound_and_then_evicts() -> None:
    clock = Clock()
    store, leases = fleet(clock, preservation_max=30.0)
    clock.now += 3.0
    beat(store, leases[:2])
    store.sweep()
    assert store.preservation.active
    # The 8 really are gone; only two keep heartbeating.
    for _ in range(31):
        clock.now += 1.0
        beat(store, leases[:2])
        store.sweep()
    assert not store.preservation.active
    assert sorted(i.instance_id for i in store.instances() if i.lease_ok) == ["i0", "i1"]
    # The backlog it just evicted must not throw it straight back in.
    clock.now += 1.0
    beat(store, leases[:2])
    store.sweep()
    assert not store.preservation.active
    clock.now += 2.5
    beat(store, leases[:2])
    store.sweep()
    assert len(store) == 2  # removed after the grace
    assert store.preservation.entered_total == 1


def test_lapses_spread_over_the_window_add_up() -> None:
    clock = Clock()
    store, leases = fleet(clock, removal_grace=100.0)
    clock.now += 3.0
    beat(store, leases[3:])
    store.sweep()  # 3 lapse
    assert not store.preservation.active
    clock.now += 3.0
    beat(store, leases[6:])
    store.sweep()  # 3 more within the window: 6 of 10
    assert store.preservation.active


def test_one_instance_lapsing_twice_counts_once() -> None:
    clock = Clock()
    store, leases = fleet(clock, n=3, removal_grace=0.5)
    flaky = InstanceSpec(instance_id="i0", service="svc", address="10.0.0.1:80")
    for _ in range(2):  # i0 lapses, comes back, lapses again, all within the window
        clock.now += 3.0
        beat(store, leases[1:])
        store.sweep()
        assert not store.preservation.active, store.preservation.reason
        clock.now += 0.5
        store.sweep()  # removed after the grace
        leases[0] = store.register(flaky, 2.0, SERVING).lease_id
    assert store.stats.lapses == 2
    assert store.preservation.entered_total == 0


def test_small_registries_never_enter() -> None:
    clock = Clock()
    store, _ = fleet(clock, n=2)
    clock.now += 3.0
    store.sweep()
    assert not store.preservation.active
    assert all(not i.lease_ok for i in store.instances())


@pytest.mark.parametrize("overdue,total,expected", [(0, 10, True), (5, 10, True), (6, 10, False)])
def test_threshold_is_strictly_more_than_the_share(
    overdue: int, total: int, expected: bool
) -> None:
    sp = SelfPreservation(share=0.5, window=10.0, max_duration=60.0, min_instances=3)
    assert sp.allow_evictions(0.0, [f"i{n}" for n in range(overdue)], total) is expected
