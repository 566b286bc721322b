"""The dashboard's trace receiver, sent to by OpenTelemetry's own SDK and exporter.

A real export shows in the snapshot (and its event stream) as one trace in tree order;
an export that does not decode, one over the size bound, and spans with ids of the
wrong size are refused, and the receiver goes on taking the next. Then the command:
its ready line names where traces go, and a bad or taken address is one clear error.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from shoal_cli.dashboard.otlp import MAX_EXPORT_BYTES, SERVICE
from shoal_cli.dashboard.server import DashboardServer
from shoal_core.errors import ServerStartError
from tests.shoal_cli.conftest import SHOAL, reap
from tests.shoal_cli.test_dashboard_server import next_frame

Registry = tuple[subprocess.Popen[str], str]
EXPORT = f"/{SERVICE}/Export"


@pytest.fixture
async def traced(registry_process: Registry) -> AsyncIterator[DashboardServer]:
    async with DashboardServer(
        "127.0.0.1:0", registry_process[1], otlp_listen="127.0.0.1:0"
    ) as server:
        yield server


def export_a_call(address: str) -> tuple[str, str, str]:
    """A CLIENT span and a failed child, exported as a component exports them (the child
    ends, so is sent, first); their trace id and span ids in hex."""
    exporter = OTLPSpanExporter(endpoint=f"http://{address}", insecure=True, timeout=5)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "test-app"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("dashboard-test")
    try:
        with tracer.start_as_current_span("call", kind=SpanKind.CLIENT) as parent:
            parent.set_attribute("shoal.upstream", "worker-1")
            parent.set_attribute("not.shown", "x")
            with tracer.start_as_current_span("step") as child:
                child.set_status(Status(StatusCode.ERROR))
    finally:
        provider.shutdown()
    ids = parent.get_span_context(), child.get_span_context()
    return f"{ids[0].trace_id:032x}", f"{ids[0].span_id:016x}", f"{ids[1].span_id:016x}"


async def traces_when(server: DashboardServer, ready: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The snapshot's traces, from /api/snapshot, once ``ready(traces)`` holds."""
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as client:
        async with asyncio.timeout(timeout):
            while True:
                traces: dict[str, Any] = (await client.get("/api/snapshot")).json()["traces"]
                if ready(traces):
                    return traces
                await asyncio.sleep(0.05)


async def test_an_exported_trace_is_shown_with_its_spans_in_tree_order(
    traced: DashboardServer,
) -> None:
    assert traced.otlp_address is not None
    trace_id, parent, child = await asyncio.to_thread(export_a_call, traced.otlp_address)
    traces = await traces_when(traced, lambda t: t["recent"] and t["recent"][0]["span_count"] == 2)
    assert traces["listen"] == traced.otlp_address and traces["received"] == 2
    [trace] = traces["recent"]
    assert trace["trace_id"] == trace_id and trace["error"] is True
    assert (trace["root"], trace["service"], trace["services"]) == (
        "call",
        "test-app",
        ["test-app"],
    )
    spans = trace["spans"]
    assert [(s["id"], s["depth"], s["name"], s["kind"]) for s in spans] == [
        (parent, 0, "call", "client"),
        (child, 1, "step", "internal"),
    ]
    assert spans[0]["attributes"] == {"shoal.upstream": "worker-1"}
    assert [s["status"] for s in spans] == ["unset", "error"]
    assert 0 <= spans[1]["offset_ms"] and spans[1]["duration_ms"] <= trace["duration_ms"]
    async with httpx.AsyncClient(base_url=traced.url, trust_env=False, timeout=10) as client:
        async with client.stream("GET", "/events") as stream:
            frame: Any = await next_frame(stream.aiter_lines())
    assert frame["traces"]["recent"][0]["trace_id"] == trace_id


def one_span_export(trace_id: bytes, span_id: bytes) -> bytes:
    span = trace_pb2.Span(
        trace_id=trace_id, span_id=span_id, name="raw", kind=trace_pb2.Span.SPAN_KIND_SERVER
    )
    span.start_time_unix_nano, span.end_time_unix_nano = 1_000_000_000, 1_002_000_000
    service = KeyValue(key="service.name", value=AnyValue(string_value="raw-sender"))
    resource_spans = trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=[span])])
    resource_spans.resource.attributes.append(service)
    return otlp.ExportTraceServiceRequest(resource_spans=[resource_spans]).SerializeToString()


async def test_a_bad_or_oversized_export_is_refused_and_the_next_one_is_taken(
    traced: DashboardServer,
) -> None:
    assert traced.otlp_address is not None
    async with grpc.aio.insecure_channel(traced.otlp_address) as channel:
        # Bytes in, bytes out: nothing is checked on this side.
        export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await export(b"\x0a\xff\xff\xff\xff\x0f not an export", timeout=5)
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as oversized:
            await export(b"\x00" * (MAX_EXPORT_BYTES + 1), timeout=5)
        assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        short_ids = otlp.ExportTraceServiceResponse.FromString(
            await export(one_span_export(b"\x01" * 8, b"\x02" * 8), timeout=5)
        )
        assert short_ids.partial_success.rejected_spans == 1
        reply = await export(one_span_export(b"\x01" * 16, b"\x02" * 8), timeout=5)
        assert (
            otlp.ExportTraceServiceResponse.FromString(reply) == otlp.ExportTraceServiceResponse()
        )
    traces = await traces_when(traced, lambda t: len(t["recent"]) == 1)
    assert traces["received"] == 1
    assert (traces["recent"][0]["service"], traces["recent"][0]["duration_ms"]) == (
        "raw-sender",
        2.0,
    )


async def test_without_a_receiver_the_snapshot_says_tracing_is_off(
    registry_process: Registry,
) -> None:
    async with DashboardServer("127.0.0.1:0", registry_process[1]) as server:
        assert server.otlp_address is None and server.snapshot()["traces"] is None


async def test_a_taken_port_is_one_clear_error_and_leaves_nothing_open(
    registry_process: Registry,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = DashboardServer(
            "127.0.0.1:0", registry_process[1], otlp_listen=f"127.0.0.1:{port}"
        )
        with pytest.raises(ServerStartError, match=f"traces: cannot listen on 127.0.0.1:{port}"):
            await server.start()
        # The web page's port taken: the receiver, started first, is closed again.
        server = DashboardServer(
            f"127.0.0.1:{port}", registry_process[1], otlp_listen="127.0.0.1:0"
        )
        with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{port}"):
            await server.start()
    assert server.otlp_address is not None
    with socket.socket() as again:
        again.bind(("127.0.0.1", int(server.otlp_address.rsplit(":", 1)[1])))


def test_the_ready_line_names_where_traces_go_set_from_the_environment(
    registry_process: Registry,
) -> None:
    env = {**os.environ, "SHOAL_DASHBOARD_OTLP_LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [*SHOAL, "dashboard", "--registry", registry_process[1], "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        words = line.split()
        assert words[:4] == ["shoal", "dashboard", "serving", "on"], line
        assert words[4].startswith("http://127.0.0.1:") and words[5:7] == ["(receiving", "traces"]
        host, port = words[8].rstrip(",").rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0 and line.rstrip().endswith("OTLP/gRPC)")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        reap(proc)
