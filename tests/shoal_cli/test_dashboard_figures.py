"""The dashboard's arithmetic: rates, error shares, quantiles, edges, denials, bounds.

Pure logic on plain pages and messages: sidecar pages are written here as the
sidecar writes them (Prometheus text), registry events are plain protobuf.
"""

from __future__ import annotations

import math

import pytest

from protos import registry_pb2 as pb
from shoal_cli.dashboard.figures import (
    UNKNOWN,
    Bucket,
    Calls,
    Denied,
    History,
    Tally,
    histogram_quantile,
    parse_page,
)
from shoal_cli.dashboard.model import MAX_EVENTS, MAX_TARGETS, MeshView
from shoal_cli.dashboard.summary import NO_IDENTITY, snapshot

WORKER = "shoal.worker.v1.Worker"
ADMIN = "shoal.admin"
LES = ("0.001", "0.0025", "0.005", "+Inf")


def page(
    *,
    ok: int = 0,
    failed: int = 0,
    buckets: tuple[int, ...] = (0, 0, 0, 0),
    direction: str = "inbound",
    caller: str | None = "client",
    service: str = WORKER,
    denied: dict[tuple[str, str], int] | None = None,
) -> str:
    """A sidecar's /metrics text with these cumulative counts (one method)."""
    who = f',caller="{caller}"' if caller is not None else ""
    labels = f'direction="{direction}",service="{service}",method="Echo"{who}'
    lines = ["# TYPE shoal_sidecar_requests counter"]
    lines.append(f'shoal_sidecar_requests_total{{{labels},code="OK"}} {ok}')
    lines.append(f'shoal_sidecar_requests_total{{{labels},code="UNAVAILABLE"}} {failed}')
    lines.append("# TYPE shoal_sidecar_request_duration_seconds histogram")
    for le, count in zip(LES, buckets, strict=True):
        lines.append(f'shoal_sidecar_request_duration_seconds_bucket{{{labels},le="{le}"}} {count}')
    lines.append(f"shoal_sidecar_request_duration_seconds_count{{{labels}}} {buckets[-1]}")
    lines.append(f"shoal_sidecar_request_duration_seconds_sum{{{labels}}} 0.1")
    lines.append("# TYPE shoal_sidecar_inbound_denied counter")
    for (source, destination), count in (denied or {}).items():
        lines.append(
            f'shoal_sidecar_inbound_denied_total{{source="{source}",destination="{destination}"}}'
            f" {count}"
        )
    return "\n".join(lines) + "\n"


def test_a_page_becomes_counters_summed_over_methods_with_unknown_for_a_missing_caller() -> None:
    text = page(ok=3, failed=1, caller=None)
    text += page(ok=2, caller=None).replace('method="Echo"', 'method="Call"').split("\n", 1)[1]
    reading = parse_page(text)
    assert reading[Calls("inbound", UNKNOWN, WORKER, "OK")] == 5
    assert reading[Calls("inbound", UNKNOWN, WORKER, "UNAVAILABLE")] == 1
    assert reading[Bucket("inbound", UNKNOWN, WORKER, math.inf)] == 0


def test_a_page_that_is_no_prometheus_text_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_page('shoal_sidecar_requests_total{code="OK" 3\n')


def test_rate_and_error_share_over_the_window() -> None:
    history = History(window=10)
    history.add(100.0, parse_page(page(ok=10, failed=0)))
    history.add(110.0, parse_page(page(ok=105, failed=5)))
    tally = Tally()
    growth = history.growth()
    for key, grew in growth.grown.items():
        assert not isinstance(key, Denied)
        tally.add(key, grew, growth.seconds)
    figures = tally.figures()
    assert growth.seconds == 10
    assert figures.rps == pytest.approx(10.0)  # 100 calls in 10 s
    assert figures.error_rate == pytest.approx(0.05)
    assert figures.calls == 100


def test_a_counter_that_goes_down_was_reset_and_counts_from_zero() -> None:
    history = History(window=60)
    for at, ok in ((0.0, 100), (1.0, 150), (2.0, 30), (3.0, 60)):
        history.add(at, parse_page(page(ok=ok)))
    grown = history.growth().grown[Calls("inbound", "client", WORKER, "OK")]
    assert grown == 50 + 30 + 30


def test_a_series_new_between_two_scrapes_counts_from_zero_but_the_first_scrape_does_not() -> None:
    history = History(window=60)
    history.add(0.0, parse_page(page(ok=1000)))  # calls before we looked: not in the window
    assert history.growth().grown == {}
    history.add(1.0, parse_page(page(ok=1000, failed=0) + page(ok=7, caller="batch")))
    grown = history.growth().grown
    assert grown[Calls("inbound", "client", WORKER, "OK")] == 0
    assert grown[Calls("inbound", "batch", WORKER, "OK")] == 7


def test_the_history_keeps_just_the_window_and_forgets_a_silent_target() -> None:
    history = History(window=10, max_readings=64)
    for second in range(100):
        history.add(float(second), parse_page(page(ok=second * 10)))
    assert len(history) == 11  # the window, and the reading just before it
    growth = history.growth()
    assert growth.seconds == 10
    assert growth.grown[Calls("inbound", "client", WORKER, "OK")] == 100
    assert history.growth(now=99.0 + 10.5).grown == {}  # no answer for longer than the window
    capped = History(window=1000, max_readings=5)
    for second in range(50):
        capped.add(float(second), {})
    assert len(capped) == 5


def test_quantiles_interpolate_as_prometheus_does() -> None:
    # 20 calls <= 1 ms, 50 more <= 2.5 ms, 25 more <= 5 ms, 5 above.
    buckets = {0.001: 20.0, 0.0025: 70.0, 0.005: 95.0, math.inf: 100.0}
    # p50: rank 50 is the 30th of 50 calls in (1 ms, 2.5 ms]: 1 + 1.5 * 30/50 = 1.9 ms.
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.0019)
    # p90: rank 90 is the 20th of 25 in (2.5 ms, 5 ms]: 2.5 + 2.5 * 20/25 = 4.5 ms.
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.0045)
    # p10: in the first bucket, from 0: 1 ms * 10/20.
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.0005)
    # p99 lands in +Inf: the highest finite bound.
    assert histogram_quantile(0.99, buckets) == 0.005


def test_quantiles_of_nothing_or_of_broken_buckets() -> None:
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {0.001: 3.0}) is None  # no +Inf bucket
    assert histogram_quantile(0.5, {0.001: 0.0, math.inf: 0.0}) is None
    # Buckets reset apart are made cumulative again: 10 calls, all <= 1 ms.
    assert histogram_quantile(0.5, {0.001: 10.0, 0.0025: 4.0, math.inf: 10.0}) == 0.0005
    with pytest.raises(ValueError):
        histogram_quantile(1.5, {math.inf: 1.0})


def instance(
    name: str, admin: str, *, status: pb.ServingStatus.ValueType = pb.SERVING, healthy: bool = True
) -> pb.Instance:
    return pb.Instance(
        instance_id=name,
        service="worker",
        address=f"{name}:1",
        grpc_services=[WORKER],
        metadata={ADMIN: admin},
        status=status,
        healthy=healthy,
    )


def mesh_view() -> tuple[MeshView, list[float]]:
    now = [1000.0]
    view = MeshView("reg:1", ["client-admin:9"], admin_key=ADMIN, clock=lambda: now[0])
    snap = pb.WatchEvent(
        type=pb.WatchEvent.SNAPSHOT,
        revision=1,
        instances=[instance("w1", "a1:1"), instance("w2", "a2:1")],
    )
    view.apply(snap)
    return view, now


def scrape_all(view: MeshView, now: list[float], pages: dict[str, str]) -> None:
    for target in view.targets():
        view.scraped(target, now[0], parse_page(pages.get(target.address, "")))


def ten_seconds_of(pages: dict[str, str]) -> tuple[MeshView, list[float]]:
    """The mesh of ``mesh_view``, its targets read empty, then 10 s later as ``pages``."""
    view, now = mesh_view()
    scrape_all(view, now, {})
    now[0] += 10
    scrape_all(view, now, pages)
    return view, now


def test_a_service_adds_up_its_instances_and_edges_are_seen_at_both_ends() -> None:
    view, _ = ten_seconds_of(
        {
            "a1:1": page(ok=60, buckets=(60, 60, 60, 60)),
            "a2:1": page(ok=30, failed=10, buckets=(0, 40, 40, 40)),
            "client-admin:9": page(ok=90, failed=10, direction="outbound", caller=None),
        }
    )
    snap = snapshot(view)
    [service] = snap["services"]
    assert service["figures"]["rps"] == 10.0 and service["figures"]["error_rate"] == 0.1
    # 100 calls, 60 of them <= 1 ms: the median (rank 50) is in the first bucket.
    assert service["figures"]["p50_ms"] == pytest.approx(1.0 * 50 / 60, abs=1e-3)
    rows = {r["id"]: r for r in service["rows"]}
    assert rows["w1"]["figures"]["rps"] == 6.0 and rows["w2"]["figures"]["error_rate"] == 0.25
    edges = {(e["caller"], e["service"], e["seen"]): e["figures"] for e in snap["edges"]}
    assert edges[("client", "worker", "inbound")]["rps"] == 10.0
    # The client sidecar's page names no caller: it is no registered instance either.
    assert edges[(UNKNOWN, "worker", "outbound")]["calls"] == 100


def test_the_p50_of_a_service_is_the_hand_computed_one() -> None:
    view, _ = ten_seconds_of(
        {
            "a1:1": page(ok=50, buckets=(20, 50, 50, 50)),
            "a2:1": page(ok=50, buckets=(0, 20, 45, 50)),
        }
    )
    figures = snapshot(view)["services"][0]["figures"]
    # Added up: 20 <= 1 ms, 70 <= 2.5 ms, 95 <= 5 ms, 100: as in the quantile test above.
    assert (figures["p50_ms"], figures["p99_ms"]) == (pytest.approx(1.9), 5.0)


def test_denied_calls_by_pair_in_the_window_and_in_all() -> None:
    view, now = mesh_view()
    scrape_all(view, now, {"a1:1": page(denied={("", "worker"): 4})})
    now[0] += 5
    pages = {
        "a1:1": page(denied={("", "worker"): 6, ("spiffe://d/svc/batch", "worker"): 1}),
        "a2:1": page(denied={("", "worker"): 2}),
    }
    scrape_all(view, now, pages)
    denied = snapshot(view)["denied"]
    pairs = {(p["source"], p["destination"]): (p["recent"], p["total"]) for p in denied["pairs"]}
    # a1 grew by 2; a2's series is new since its page before (empty): all 2 are recent.
    assert pairs == {(NO_IDENTITY, "worker"): (4, 8), ("spiffe://d/svc/batch", "worker"): (1, 1)}
    assert (denied["recent"], denied["total"]) == (5, 9)


def test_a_target_that_fails_shows_the_error_and_no_stale_figures() -> None:
    view, _ = ten_seconds_of({"a1:1": page(ok=100), "a2:1": page(ok=100)})
    w1 = next(t for t in view.targets() if t.instance_id == "w1")
    view.scrape_failed(w1, "unreachable (connection refused or failed)")
    rows = {r["id"]: r for r in snapshot(view)["services"][0]["rows"]}
    assert rows["w1"]["scrape"].startswith("unreachable") and rows["w1"]["figures"]["rps"] == 0
    assert rows["w2"]["scrape"] is None and rows["w2"]["figures"]["rps"] == 10.0


def test_events_name_real_changes_and_the_ring_is_bounded() -> None:
    view, _ = mesh_view()
    busy = instance("w1", "a1:1")
    busy.load.in_flight = 7
    view.apply(pb.WatchEvent(type=pb.WatchEvent.UPSERT, revision=2, instances=[busy]))
    down = instance("w1", "a1:1", status=pb.NOT_SERVING, healthy=False)
    view.apply(pb.WatchEvent(type=pb.WatchEvent.UPSERT, revision=3, instances=[down]))
    view.apply(pb.WatchEvent(type=pb.WatchEvent.REMOVE, revision=4, instances=[down]))
    snap = snapshot(view)
    assert [(e["kind"], e["detail"]) for e in snap["events"]] == [
        ("left", "removed"),
        ("changed", "health healthy -> lapsed; status SERVING -> NOT_SERVING"),
        ("snapshot", "2 instances"),
    ]
    assert snap["load_updates"] == 1 and snap["instances_total"] == 1
    for revision in range(5, 5 + 3 * MAX_EVENTS):
        joined = instance(f"n{revision}", "")
        view.apply(pb.WatchEvent(type=pb.WatchEvent.UPSERT, revision=revision, instances=[joined]))
    assert len(view.events) == MAX_EVENTS and view.events[-1]["instance"] == f"n{revision}"


def test_scrape_targets_are_bounded_and_skip_what_is_no_address() -> None:
    view = MeshView("reg:1", ["extra:1"], admin_key=ADMIN)
    many = [instance(f"w{i:04}", f"127.0.0.1:{2000 + i}") for i in range(MAX_TARGETS + 10)]
    many.append(instance("bad", "not an address"))
    view.apply(pb.WatchEvent(type=pb.WatchEvent.SNAPSHOT, revision=1, instances=many))
    targets = view.targets()
    assert len(targets) == MAX_TARGETS
    assert all(t.instance_id is not None and t.instance_id != "bad" for t in targets)
    rows = {r["id"]: r for r in snapshot(view)["services"][0]["rows"]}
    assert rows["bad"]["scrape"].startswith("not scraped")
