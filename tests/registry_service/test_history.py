"""The change history: bounded by count and by bytes, replayed without pinning memory."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from registry_service import RegistryConfig
from registry_service.history import History, Replay
from registry_service.model import (
    Event,
    EventKind,
    Instance,
    InstanceSpec,
    LoadReport,
    ServingStatus,
)
from registry_service.store import RegistryStore
from tests.registry_service.conftest import Clock

BIG = MappingProxyType({f"k{k:02d}".ljust(128, "x"): "v" * 1024 for k in range(64)})


def spec(n: int, metadata: MappingProxyType[str, str] = BIG) -> InstanceSpec:
    return InstanceSpec(
        instance_id=f"i{n}", service="echo", address=f"10.0.0.1:{n + 1}", metadata=metadata
    )


def event(revision: int, inst: Instance, kind: EventKind = EventKind.UPSERT) -> Event:
    return Event(kind, revision, inst)


def test_events_of_one_lease_count_its_spec_once() -> None:
    history = History(max_events=1000, max_bytes=1 << 30)
    inst = Instance(spec(1), "lease", 10.0)
    history.append(event(1, inst))
    first = history.bytes
    assert first > 64 * 1024, "the metadata's characters must be counted"
    for revision in range(2, 12):  # load changes: new Instance values, the same spec
        history.append(
            event(revision, Instance(inst.spec, "lease", 10.0, load=LoadReport(revision)))
        )
    per_event = (history.bytes - first) / 10
    assert 0 < per_event < 1024, per_event
    other = Instance(spec(2), "lease2", 10.0)
    history.append(event(12, other))
    assert history.bytes - first - 10 * per_event > 64 * 1024


def test_byte_bound_evicts_oldest_and_gives_the_bytes_back() -> None:
    history = History(max_events=20, max_bytes=400_000)
    for revision in range(1, 21):
        history.append(event(revision, Instance(spec(revision), f"l{revision}", 10.0)))
        assert history.bytes <= 400_000
    assert 1 <= len(history) <= 5
    assert history.first_revision == 21 - len(history)
    # Once the count bound pushes every big event out, the bytes counted drop to what
    # small events hold.
    for revision in range(21, 41):
        history.append(event(revision, Instance(spec(revision, MappingProxyType({})), "l", 10.0)))
    assert len(history) == 20 and history.bytes < 20 * 2048


def test_replay_reads_lazily_and_says_when_the_history_moved_past_it() -> None:
    history = History(max_events=16, max_bytes=1 << 30)
    small = MappingProxyType({"v": "1"})
    for revision in range(1, 11):
        history.append(event(revision, Instance(spec(revision, small), "l", 10.0)))
    replay = history.replay(after=4, until=10, service="")
    assert replay is not None
    it = iter(replay)
    assert next(it).revision == 5
    # The reader stalls while 20 more changes push revisions 6..10 out of the history.
    for revision in range(11, 31):
        history.append(event(revision, Instance(spec(revision, small), "l", 10.0)))
    assert list(it) == [] and replay.lost
    assert history.replay(after=2, until=30, service="") is None


def test_store_history_is_bounded_by_bytes() -> None:
    config = RegistryConfig(history_bytes=1 << 20, preservation_share=1.0)
    store = RegistryStore(config, clock=Clock())
    start = store.revision
    for n in range(30):
        inst = store.register(spec(n), 5.0, ServingStatus.SERVING)
        store.deregister(inst.lease_id)
    assert store.history.bytes <= 1 << 20
    assert store.events_since(start) is None
    recent = store.events_since(store.revision - 4)
    assert recent is not None
    assert [e.kind for e in recent] == [EventKind.UPSERT, EventKind.REMOVE] * 2


def small_event(revision: int) -> Event:
    return event(revision, Instance(spec(revision, MappingProxyType({})), "l", 10.0))


def revisions(replay: Replay | None) -> list[int]:
    assert replay is not None
    return [e.revision for e in replay]


def test_a_history_with_gaps_finds_each_event_and_replays_across_the_gaps() -> None:
    # etcd's revisions: increasing, with gaps where other keys changed.
    history = History(max_events=100, max_bytes=1 << 30, start=5)
    for revision in (10, 13, 20):
        history.append(small_event(revision))
    assert {r for r in range(30) if history.get(r) is not None} == {10, 13, 20}
    assert revisions(history.replay(after=5, until=20, service="")) == [10, 13, 20]
    assert revisions(history.replay(after=11, until=20, service="")) == [13, 20]
    assert revisions(history.replay(after=10, until=15, service="")) == [13]
    assert revisions(history.replay(after=20, until=25, service="")) == []
    # Complete only from its start: what came before it may be missing.
    assert history.replay(after=4, until=20, service="") is None


def test_a_history_with_gaps_is_complete_from_the_last_event_it_let_go() -> None:
    history = History(max_events=16, max_bytes=1 << 30, start=0)
    for n in range(20):
        history.append(small_event(10 * n + 3))  # 3, 13, ..., 193
    assert history.floor == 33 and history.first_revision == 43
    assert history.replay(after=32, until=193, service="") is None
    assert revisions(history.replay(after=33, until=193, service=""))[:2] == [43, 53]
    # Between two held events is as good as the one before: nothing was there.
    assert revisions(history.replay(after=40, until=60, service="")) == [43, 53]


def test_a_replay_across_gaps_is_lost_once_eviction_passes_where_it_is() -> None:
    history = History(max_events=16, max_bytes=1 << 30)
    for n in range(10):
        history.append(small_event(2 * n + 1))  # 1, 3, ..., 19
    assert history.floor == 0  # by default: just before the first event
    replay = history.replay(after=0, until=19, service="")
    assert replay is not None
    it = iter(replay)
    assert next(it).revision == 1
    for n in range(10, 30):
        history.append(small_event(2 * n + 1))
    assert list(it) == [] and replay.lost


def test_revisions_must_increase() -> None:
    history = History(max_events=16, max_bytes=1 << 30, start=10)
    with pytest.raises(ValueError, match="does not follow 10"):
        history.append(small_event(10))
    history.append(small_event(12))
    with pytest.raises(ValueError, match="does not follow 12"):
        history.append(small_event(11))


def test_one_revision_may_hold_several_events_and_replays_hand_them_on_whole() -> None:
    # One etcd transaction that wrote three records: three events at revision 12.
    history = History(max_events=100, max_bytes=1 << 30, start=10)
    history.append(small_event(11))
    for n in range(3):
        history.append(Event(EventKind.UPSERT, 12, Instance(spec(n, MappingProxyType({})), "l", 1)))
    history.append(small_event(14))
    assert [e.instance.instance_id for e in history.group_after(11)] == ["i0", "i1", "i2"]
    assert revisions(history.replay(after=10, until=14, service="")) == [11, 12, 12, 12, 14]
    assert revisions(history.replay(after=12, until=14, service="")) == [14]
    assert revisions(history.replay(after=11, until=12, service="")) == [12, 12, 12]
    with pytest.raises(ValueError, match="does not follow 14"):
        history.append(small_event(13))
