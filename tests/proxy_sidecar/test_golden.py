"""The sidecar's golden metrics: real calls through a real mesh, read back from /metrics
with prometheus_client's own parser; and the label bounds, as pure logic."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from proxy_sidecar.golden import BUCKETS, MAX_CALLERS, MAX_METHODS, OTHER, GoldenStats, caller_name
from tests.proxy_sidecar.upstream import SERVICE


async def scrape(port: int) -> dict[str, list[Any]]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    families = text_string_to_metric_families(await asyncio.to_thread(fetch))
    return {family.name: family.samples for family in families}


def value(samples: list[Any], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return float(sum(found))


async def test_requests_durations_and_in_flight_by_direction_service_method(make_mesh):
    mesh = await make_mesh(admin=True)
    for _ in range(7):
        await mesh.echo.unary(b"x", timeout=10)
    stream = mesh.echo.server_stream(b"3", timeout=10)
    async for _ in stream:
        pass
    with_error = mesh.echo.unary(b"x", timeout=10, metadata=(("x-fail", "NOT_FOUND"),))
    try:
        await with_error
    except grpc.aio.AioRpcError:
        pass
    assert mesh.client is not None

    got = await scrape(mesh.client.admin_port)
    requests = got["shoal_sidecar_requests"]
    out = {"direction": "outbound", "service": SERVICE}
    unary = value(requests, "shoal_sidecar_requests_total", **out, method="Unary")
    assert unary >= 7
    assert value(requests, "shoal_sidecar_requests_total", **out, method="ServerStream") == 1
    durations = got["shoal_sidecar_request_duration_seconds"]
    count = value(durations, "shoal_sidecar_request_duration_seconds_count", **out, method="Unary")
    assert count == unary
    buckets = [
        s for s in durations if s.name.endswith("_bucket") and s.labels.get("method") == "Unary"
    ]
    assert [s.labels["le"] for s in buckets] == [*(str(b) for b in BUCKETS), "+Inf"]
    cumulative = [s.value for s in buckets]
    assert cumulative == sorted(cumulative) and cumulative[-1] == count
    assert 0 < value(durations, "shoal_sidecar_request_duration_seconds_sum", method="Unary")
    flying = got["shoal_sidecar_requests_in_flight"]
    assert value(flying, "shoal_sidecar_requests_in_flight", **out) == 0

    failed = value(requests, "shoal_sidecar_requests_total", **out, code="NOT_FOUND")
    assert failed == 1

    # Each worker's sidecar counted what it delivered to its app, as inbound (read from
    # the stats its page is made from: these sidecars run no admin page).
    inbound = 0
    for sidecar in mesh.sidecars:
        assert sidecar.control is not None
        for (direction, service, method, _caller), series in sidecar.control.golden.items():
            if (direction, service, method) == ("inbound", SERVICE, "Unary"):
                inbound += sum(series.codes.values())
    assert inbound == unary


def test_labels_stay_bounded_whatever_methods_callers_invent():
    golden = GoldenStats()
    for i in range(MAX_METHODS * 3):
        golden.series(True, "pkg.Svc", f"M{i}", "client").started()
    methods = {key[2] for key, _ in golden.items()}
    assert len(methods) == MAX_METHODS + 1 and OTHER in methods
    other = next(series for key, series in golden.items() if key[2] == OTHER)
    assert other.in_flight == MAX_METHODS * 2  # counted, under one label
    for i in range(1000):
        golden.series(False, f"svc{i}.S", "M", "client")
    assert len({key[1] for key, _ in golden.items() if key[0] == "outbound"}) <= 65


def test_a_duration_lands_in_the_first_bucket_it_fits():
    golden = GoldenStats()
    series = golden.series(False, "pkg.Svc", "M", "client")
    for seconds in (0.00005, 0.0001, 0.003, 20.0):
        series.started()
        series.finished(0, seconds)
    cumulative = dict(series.duration.cumulative())
    assert cumulative["0.0001"] == 2  # le is inclusive
    assert cumulative["0.005"] == 3
    assert cumulative["10.0"] == 3 and cumulative["+Inf"] == 4
    assert series.in_flight == 0 and series.codes == {0: 4}


async def test_message_bytes_each_way_are_counted_at_both_hops(make_mesh):
    mesh = await make_mesh(admin=True)
    assert mesh.client is not None
    payload = b"b" * 1000
    answered = 0
    for _ in range(4):
        answer = await mesh.echo.unary(payload, timeout=10)
        answered += len(answer) + 5  # each message has gRPC's 5-byte prefix
    sent = 4 * (len(payload) + 5)
    out = {"direction": "outbound", "service": SERVICE, "method": "Unary"}
    got = await scrape(mesh.client.admin_port)
    assert value(
        got["shoal_sidecar_request_bytes"], "shoal_sidecar_request_bytes_total", **out
    ) == (sent)
    assert value(
        got["shoal_sidecar_response_bytes"], "shoal_sidecar_response_bytes_total", **out
    ) == (answered)
    # The worker sidecars delivered the same bytes inbound, whoever served each call.
    inbound_sent = inbound_answered = 0
    for sidecar in mesh.sidecars:
        assert sidecar.control is not None
        for (direction, service, method, caller), series in sidecar.control.golden.items():
            if (direction, service, method) == ("inbound", SERVICE, "Unary"):
                assert caller == "unknown"  # a plaintext mesh: no certificate names it
                inbound_sent += series.request_bytes
                inbound_answered += series.response_bytes
    assert (inbound_sent, inbound_answered) == (sent, answered)


def test_callers_are_named_by_their_certificate_and_stay_bounded():
    assert caller_name("spiffe://shoal.local/svc/client") == "client"
    assert caller_name("spiffe://shoal.local/operator/alice") == (
        "spiffe://shoal.local/operator/alice"
    )
    assert caller_name(None) == "unknown"
    golden = GoldenStats()
    for i in range(MAX_CALLERS * 2):
        golden.series(True, "pkg.Svc", "M", f"svc{i}")
    callers = {key[3] for key, _ in golden.items()}
    assert len(callers) == MAX_CALLERS + 1 and OTHER in callers
