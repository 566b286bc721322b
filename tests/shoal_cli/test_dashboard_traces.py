"""The dashboard's trace store, with hand-built spans: grouping, roots, tree order, bounds,
eviction, traces whose parts have not all come, and what it takes under load."""

from __future__ import annotations

from typing import Any

import pytest

from shoal_cli.dashboard.traces import (
    ADJUST_EVERY,
    MAX_SHOWN,
    MAX_SHOWN_SPANS,
    Span,
    TraceStore,
    tree_order,
)

MS = 1_000_000
T1, T2 = f"{1:032x}", f"{2:032x}"


def span(
    trace: str, span_id: str, parent: str = "", start: float = 0, end: float = 10, **more: Any
) -> Span:
    """A span of ``trace``, times in ms from an epoch a second in."""
    fields: dict[str, Any] = {"name": f"op-{span_id}", "service": f"svc-{span_id}", "kind": 2}
    fields.update(more)
    return Span(
        trace_id=trace,
        span_id=span_id,
        parent_id=parent,
        start_ns=round(1e9 + start * MS),
        end_ns=round(1e9 + end * MS),
        **fields,
    )


def one_call(trace: str = T1) -> list[Span]:
    """A call's spans as the mesh makes them, sent out of order."""
    return [
        span(trace, "exec", "worker", 4, 8, service="worker", name="worker.execute", kind=1),
        span(trace, "worker", "inbound", 2, 9, service="worker", name="Echo"),
        span(trace, "client", "", 0, 10, service="client-sidecar", name="Echo", kind=3),
        span(trace, "queue", "worker", 3, 4, service="worker", name="worker.queue", kind=1),
        span(trace, "inbound", "client", 1, 9.5, service="worker-sidecar", name="Echo"),
    ]


def spread_ids(count: int) -> list[str]:
    """Trace ids whose low 64 bits spread over the range, as random ones do."""
    return [f"{i * 0x9E3779B97F4A7C15 % 2**128:032x}" for i in range(1, count + 1)]


def recent(store: TraceStore) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = store.as_json()["recent"]
    return found


def test_a_calls_spans_come_out_as_one_tree_depth_first_with_children_by_start() -> None:
    store = TraceStore()
    store.add(one_call())
    [trace] = recent(store)
    spans = trace["spans"]
    assert [(s["id"], s["depth"]) for s in spans] == [
        ("client", 0),
        ("inbound", 1),
        ("worker", 2),
        ("queue", 3),
        ("exec", 3),
    ]
    assert (trace["root"], trace["service"], trace["span_count"]) == ("Echo", "client-sidecar", 5)
    assert trace["services"] == ["client-sidecar", "worker-sidecar", "worker"]
    assert trace["duration_ms"] == 10.0 and trace["start"] == 1.0 and not trace["error"]
    assert (spans[3]["offset_ms"], spans[3]["duration_ms"], spans[3]["kind"]) == (
        3.0,
        1.0,
        "internal",
    )
    assert spans[0]["kind"] == "client" and spans[0]["status"] == "unset"


def test_spans_are_grouped_by_trace_and_the_newest_trace_comes_first() -> None:
    store = TraceStore()
    later = [span(T2, "b", start=50, end=60)]
    store.add([*one_call(T1)[:2], *later, *one_call(T1)[2:]])
    assert [t["trace_id"] for t in recent(store)] == [T2, T1]
    assert [t["span_count"] for t in recent(store)] == [1, 5]


def test_without_its_root_a_trace_shows_the_earliest_orphan_and_the_stretch_it_covers() -> None:
    store = TraceStore()
    # The worker's spans came first; the sidecars' export is yet to come.
    store.add(s for s in one_call() if s.service == "worker")
    [trace] = recent(store)
    assert (trace["root"], trace["service"]) == ("Echo", "worker")
    assert trace["duration_ms"] == 7.0  # the worker span, the only root
    store.add([span(T1, "stray", "missing", 20, 30, service="other")])
    [trace] = recent(store)
    assert [(s["id"], s["depth"]) for s in trace["spans"]][-1] == ("stray", 0)
    assert trace["duration_ms"] == 28.0  # two pieces: from the first start to the last end
    store.add(s for s in one_call() if s.service != "worker")
    [trace] = recent(store)
    assert trace["spans"][0]["id"] == "client" and trace["service"] == "client-sidecar"


def test_a_continued_traces_root_is_the_span_whose_parent_was_never_sent() -> None:
    store = TraceStore()
    store.add([span(T1, "child", "mine", 2, 3), span(T1, "mine", "callers", 1, 5)])
    [trace] = recent(store)
    assert trace["spans"][0]["id"] == "mine" and trace["duration_ms"] == 4.0


def test_error_status_and_the_shown_attributes_are_carried() -> None:
    store = TraceStore()
    attributes = {"rpc.grpc.status_code": 14, "shoal.upstream": "worker-1", "shoal.retries": 1}
    store.add([span(T1, "a", status=2, attributes=attributes), span(T1, "b", "a", 1, 2, status=1)])
    [trace] = recent(store)
    assert trace["error"] is True
    assert [s["status"] for s in trace["spans"]] == ["error", "ok"]
    assert trace["spans"][0]["attributes"] == attributes


def test_spans_past_a_traces_bound_are_counted_as_dropped_not_kept() -> None:
    store = TraceStore(max_spans=3)
    store.add(one_call())
    store.add(one_call()[:1])  # a span sent again replaces itself: not a drop
    [trace] = recent(store)
    assert (trace["span_count"], trace["dropped"]) == (3, 2)
    assert store.dropped == 2 and store.received == 6


def test_past_the_bound_the_trace_heard_of_first_makes_room() -> None:
    now = [0.0]
    store = TraceStore(max_traces=3, clock=lambda: now[0])
    for i in range(5):
        now[0] += 1.0
        # Started in reverse: eviction goes by arrival, the listing by start.
        store.add([span(f"{i:032x}", "s", start=100 - i)])
    shown = [t["trace_id"] for t in recent(store)]
    assert shown == [f"{i:032x}" for i in (2, 3, 4)]
    assert (len(store), store.evicted) == (3, 2)


def test_a_snapshot_holds_the_newest_twenty_traces_and_a_bounded_number_of_spans() -> None:
    store = TraceStore(admit_per_second=None)
    for i in range(40):
        spans = [span(f"{i:032x}", "r", start=i, end=i + 1)]
        spans += [span(f"{i:032x}", f"c{j}", "r", i, i + 1) for j in range(40)]
        store.add(spans)
    found = recent(store)
    assert len(found) == MAX_SHOWN and found[0]["trace_id"] == f"{39:032x}"
    assert sum(len(t["spans"]) for t in found) == MAX_SHOWN_SPANS
    assert all(len(t["spans"]) + t["spans_cut"] == t["span_count"] == 41 for t in found)


def test_under_load_new_traces_are_taken_by_id_and_keep_their_later_spans() -> None:
    now = [0.0]
    store = TraceStore(admit_per_second=5.0, clock=lambda: now[0])
    ids = spread_ids(20_000)
    store.add(span(t, "inbound", "client", 1, 2) for t in ids)  # one process's export
    # A burst is met at once: the window's due taken, then about 5 a second of the rest.
    assert store.share < 0.001 and 50 <= len(store) <= 60
    kept = {t["trace_id"] for t in store.as_json(shown=100)["recent"]}
    # The client sidecar's spans of the same calls, a moment later: each trace taken
    # takes its span too, and the share, steady, takes none the first export passed over.
    now[0] += 1.0
    store.add(span(t, "client", "", 0, 3) for t in ids)
    after = store.as_json(shown=100)["recent"]
    assert {t["trace_id"] for t in after} == kept
    assert all(t["span_count"] == 2 and t["service"] == "svc-client" for t in after)
    assert store.passed_over == 2 * (len(ids) - len(kept))


def test_when_load_falls_every_new_trace_is_taken_again_but_not_late_parts_of_old_ones() -> None:
    now = [0.0]
    # Spans' epoch times run with the clock: a span at `start` ms began at now == start/1000.
    store = TraceStore(admit_per_second=5.0, clock=lambda: now[0], wall=lambda: 1.0 + now[0])
    ids = spread_ids(5000)
    store.add(span(t, "s") for t in ids)
    assert store.share < 1.0
    taken = len(store)
    for _ in range(10):
        now[0] += ADJUST_EVERY
        # The id's low 64 bits all ones: taken only once the share is back at 1.
        store.add([span(f"{int(now[0]):016x}" + "f" * 16, "s", start=now[0] * 1000)])
    assert store.share == 1.0
    assert recent(store)[0]["trace_id"] == f"{int(now[0]):016x}" + "f" * 16
    # A worker's export of calls made under load, come late: passed over, as the first
    # parts of those calls were then.
    passed, kept = store.passed_over, len(store)
    store.add(span(t, "late", "s") for t in ids)
    assert len(store) == kept and store.passed_over - passed == len(ids) - taken


def test_tree_order_survives_a_parent_cycle() -> None:
    spans = [span(T1, "a", "b", 1), span(T1, "b", "a", 2), span(T1, "c", "", 0)]
    assert [(d, s.span_id) for d, s in tree_order(spans)] == [(0, "c"), (0, "a"), (1, "b")]


def test_a_store_without_room_is_refused() -> None:
    with pytest.raises(ValueError):
        TraceStore(max_traces=0)
