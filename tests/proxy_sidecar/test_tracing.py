"""The sidecar's tracer: what it propagates, what it samples, what it exports.

Pure logic with OpenTelemetry's own in-memory exporter in place of a collector; the
spans of real calls through real sidecars are checked in tests/test_tracing_e2e.py.
"""

from __future__ import annotations

import random

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy_sidecar import tracing
from proxy_sidecar.tracing import CallTracer
from shoal_core.tracing import TraceSettings, parse_traceparent

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def tracer(sample: float = 1.0) -> tuple[CallTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    settings = TraceSettings(endpoint="http://127.0.0.1:1", service="sidecar", sample=sample)
    return CallTracer(settings, rng=random.Random(1), exporter=exporter), exporter


def exported(tracer: CallTracer, exporter: InMemorySpanExporter) -> list[object]:
    tracer.open("client-sidecar")
    tracer.close()
    return list(exporter.get_finished_spans())


def test_a_call_without_a_trace_starts_one_and_names_its_span_as_the_next_parent():
    t, exporter = tracer()
    span, header = t.start("/pkg.Svc/Method", False, (("x-other", "1"),))
    assert span is not None and header is not None
    sent = parse_traceparent(header)
    assert sent is not None and sent.sampled
    assert (sent.trace_id, sent.span_id) == (span.trace_id, span.span_id)
    span.end(0, 0.002, "instance-1", 1)
    [got] = exported(t, exporter)
    assert got.name == "pkg.Svc/Method" and got.kind is SpanKind.CLIENT  # type: ignore[attr-defined]
    assert got.parent is None  # type: ignore[attr-defined]
    assert got.context.trace_id == span.trace_id  # type: ignore[attr-defined]
    assert got.end_time - got.start_time == 2_000_000  # type: ignore[attr-defined]
    assert dict(got.attributes) == {  # type: ignore[attr-defined]
        "rpc.system": "grpc",
        "rpc.service": "pkg.Svc",
        "rpc.method": "Method",
        "rpc.grpc.status_code": 0,
        "shoal.direction": "outbound",
        "shoal.retries": 1,
        "shoal.upstream": "instance-1",
    }
    assert got.resource.attributes["service.name"] == "client-sidecar"  # type: ignore[attr-defined]


def test_an_inbound_call_continues_its_callers_trace_as_a_server_span():
    t, exporter = tracer(sample=0.0)  # the caller's decision wins over ours
    span, header = t.start("/pkg.Svc/M", True, (("traceparent", PARENT),))
    assert span is not None and header is not None
    caller = parse_traceparent(PARENT)
    sent = parse_traceparent(header)
    assert caller is not None and sent is not None
    assert sent.trace_id == caller.trace_id and sent.span_id == span.span_id != caller.span_id
    span.end(14, 0.001, None, 0)  # UNAVAILABLE
    [got] = exported(t, exporter)
    assert got.kind is SpanKind.SERVER  # type: ignore[attr-defined]
    assert got.parent.span_id == caller.span_id  # type: ignore[attr-defined]
    assert got.status.status_code is StatusCode.ERROR  # type: ignore[attr-defined]
    assert got.status.description == "UNAVAILABLE"  # type: ignore[attr-defined]


def test_an_unsampled_caller_is_passed_on_untouched_and_records_nothing():
    t, exporter = tracer()
    unsampled = PARENT[:-2] + "00"
    assert t.start("/pkg.Svc/M", True, (("traceparent", unsampled),)) == (None, None)
    assert exported(t, exporter) == []


def test_a_trace_started_unsampled_still_tells_the_next_hops_not_to_sample():
    t, exporter = tracer(sample=0.0)
    span, header = t.start("/pkg.Svc/M", False, ())
    assert span is None and header is not None
    sent = parse_traceparent(header)
    assert sent is not None and not sent.sampled
    assert exported(t, exporter) == []


def test_a_malformed_traceparent_starts_a_new_trace():
    t, _ = tracer()
    span, header = t.start("/pkg.Svc/M", True, (("traceparent", "00-zz-yy-01"),))
    assert span is not None and span.parent_id == 0 and header is not None


def test_spans_wait_in_a_bounded_queue_and_the_overflow_is_counted():
    t, exporter = tracer()
    for _ in range(tracing.MAX_QUEUED + 10):
        span, _ = t.start("/pkg.Svc/M", False, ())
        assert span is not None
        span.end(0, 0.001, None, 0)
    assert t.dropped == 10
    assert len(exported(t, exporter)) == tracing.MAX_QUEUED
    assert t.exported == tracing.MAX_QUEUED
