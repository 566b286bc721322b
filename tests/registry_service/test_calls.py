"""The registry's golden metrics: known calls to a real registry, read back from
/metrics with prometheus_client's own parser; and the method label's bounds."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryServer
from registry_service.calls import OTHER, SERVICE, CallStats
from shoal_core.codes import CODE_NAMES, OK
from shoal_core.metrics import LATENCY_BUCKETS
from tests.registry_service.conftest import StartRegistry, instance, read

REQUESTS = "shoal_registry_requests_total"
DURATION = "shoal_registry_request_duration_seconds"
# (sample name, its labels but le) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def families(server: RegistryServer) -> dict[str, Metric]:
    """The registry's /metrics page as prometheus_client parses it, by family name."""

    def fetch() -> str:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    return {f.name: f for f in text_string_to_metric_families(await asyncio.to_thread(fetch))}


async def samples(server: RegistryServer) -> Samples:
    """Every sample of the golden families but the buckets."""
    got = await families(server)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for name in ("shoal_registry_requests", DURATION)
        for s in got[name].samples
        if "le" not in s.labels
    }


def requests(got: Samples) -> dict[tuple[str, str], float]:
    """``shoal_registry_requests_total`` by (method, code)."""
    out = {}
    for (name, labels), value in got.items():
        if name == REQUESTS:
            by = dict(labels)
            out[by["method"], by["code"]] = value
    return out


def timed(got: Samples, suffix: str) -> dict[str, float]:
    """A duration sample (``_count``, ``_sum``) by method."""
    return {dict(labels)["method"]: v for (n, labels), v in got.items() if n == DURATION + suffix}


async def until_counted(server: RegistryServer, method: str, code: str) -> Samples:
    """The samples once a ``method`` call ending ``code`` is counted (a stream's end
    reaches the server a moment after the client gives it up)."""
    deadline = time.monotonic() + 5
    while not requests(got := await samples(server)).get((method, code)):
        assert time.monotonic() < deadline, f"no {method} call ended {code}: {requests(got)}"
        await asyncio.sleep(0.02)
    return got


async def test_calls_are_counted_by_method_and_status_and_unary_ones_timed(
    start_registry: StartRegistry,
) -> None:
    server = await start_registry(metrics_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        for n in range(3):
            await stub.Register(pb.RegisterRequest(instance=instance(n)))
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Heartbeat(pb.HeartbeatRequest(lease_id="nobody"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Register(pb.RegisterRequest())  # no instance
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Answered before the servicer runs, and still the registry's to count.
        raw = channel.unary_unary(f"/{SERVICE.full_name}/Register", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as undecodable:
            await raw(b"\xff\xff")
        assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        watch = stub.Watch(pb.WatchRequest())
        assert (await read(watch)).type == pb.WatchEvent.SNAPSHOT
        watch.cancel()
        # Another service of the same server is not the registry's to count.
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest())
        got = await until_counted(server, "Watch", "CANCELLED")

    assert {k: v for k, v in requests(got).items() if v} == {
        ("Register", "OK"): 3,
        ("Register", "INVALID_ARGUMENT"): 2,
        ("Heartbeat", "NOT_FOUND"): 2,
        ("Watch", "CANCELLED"): 1,
    }
    # Every method has an OK series from the start, and there is no other.
    methods = {m.name for m in SERVICE.methods}
    assert {m for m, code in requests(got) if code == "OK"} == methods
    unary = {m.name for m in SERVICE.methods if not m.server_streaming}
    assert timed(got, "_count") == {m: 0 for m in unary} | {"Register": 5, "Heartbeat": 2}
    assert timed(got, "_sum")["Register"] > 0
    assert {"Watch", "WatchPolicy"}.isdisjoint(timed(got, "_count"))


async def test_histogram_buckets_are_the_shared_latency_buckets(
    start_registry: StartRegistry,
) -> None:
    server = await start_registry(metrics_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(server.address) as channel:
        await pb_grpc.RegistryStub(channel).Discover(pb.DiscoverRequest())
    got = await families(server)
    buckets = [
        s
        for s in got[DURATION].samples
        if s.name == DURATION + "_bucket" and s.labels["method"] == "Discover"
    ]
    assert [s.labels["le"] for s in buckets] == [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    assert buckets[-1].value == 1
    assert got[DURATION].type == "histogram"


async def test_a_watch_past_its_deadline_counts_deadline_exceeded(
    start_registry: StartRegistry,
) -> None:
    server = await start_registry(metrics_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(server.address) as channel:
        watch = pb_grpc.RegistryStub(channel).Watch(pb.WatchRequest(), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            async for _ in watch:
                pass
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        got = await until_counted(server, "Watch", "DEADLINE_EXCEEDED")
    assert requests(got)["Watch", "DEADLINE_EXCEEDED"] == 1


async def test_streams_ended_by_shutdown_count_ok(start_registry: StartRegistry) -> None:
    server = await start_registry()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        watch = stub.Watch(pb.WatchRequest())
        policy = stub.WatchPolicy(pb.WatchPolicyRequest())
        await read(watch)
        assert isinstance(await policy.read(), pb.Policy)
        await server.close(grace=5)
        assert await watch.code() == grpc.StatusCode.OK
        assert await policy.code() == grpc.StatusCode.OK
    for method in ("Watch", "WatchPolicy"):
        assert server.calls.of(method).codes[OK] == 1, method


def test_the_method_label_is_the_services_methods_or_other() -> None:
    stats = CallStats()
    assert [m for m, _ in stats.items()] == sorted(m.name for m in SERVICE.methods)
    assert stats.of("NotAMethod") is stats.of("Another") is stats.other
    stats.of("NotAMethod").codes[CODE_NAMES.index("UNIMPLEMENTED")] += 1
    assert [m for m, _ in stats.items()][-1] == OTHER
