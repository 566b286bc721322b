"""A real OTLP/gRPC trace receiver for tests, and checks that spans form one tree per call.

Point a component's ``--otlp-endpoint`` (or ``TraceSettings.endpoint``) at
``receiver.endpoint``; what it exports arrives in ``receiver.spans``::

    async with OtlpReceiver() as receiver:
        async with WorkerServer(..., trace=TraceSettings(endpoint=receiver.endpoint, ...)):
            ...  # calls
        spans = await receiver.wait_for(lambda got: len(got) >= 3, timeout=10)
        for trace_id, roots in span_trees(spans).items():
            check_tree([s for s in spans if s.trace_id == trace_id])

It speaks the collector's own service (``opentelemetry.proto``'s TraceService.Export)
over a plain grpc.aio server on 127.0.0.1, as an OpenTelemetry collector would, so
exporters are tested against the real wire format and nothing is faked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = [
    "KIND_CLIENT",
    "KIND_INTERNAL",
    "KIND_SERVER",
    "STATUS_ERROR",
    "STATUS_OK",
    "STATUS_UNSET",
    "OtlpReceiver",
    "ReceivedSpan",
    "check_tree",
    "children_of",
    "span_trees",
]

# OTLP's numbers (trace.proto), which ReceivedSpan carries; not the Python API's enums.
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 1, 2, 3
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One exported span: ids in lower-case hex (``parent_span_id`` is "" for a root),
    ``kind`` and ``status_code`` as OTLP numbers them (``KIND_*``, ``STATUS_*``), times in
    ns since the epoch, and ``service`` the exporting process's ``service.name``."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(hash=False)
    service: str
    status_code: int


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _received(request: otlp.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        service=service,
                        status_code=span.status.code,
                    )
                )
    return out


class _TraceService(otlp_grpc.TraceServiceServicer):
    def __init__(self, spans: list[ReceivedSpan]) -> None:
        self._spans = spans

    async def Export(
        self, request: otlp.ExportTraceServiceRequest, context: Any
    ) -> otlp.ExportTraceServiceResponse:
        self._spans.extend(_received(request))
        return otlp.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC collector on 127.0.0.1 that keeps every span it is sent.

    ``async with OtlpReceiver() as receiver:`` starts it; ``receiver.endpoint`` is the
    ``http://127.0.0.1:PORT`` to export to; ``receiver.spans`` grows as exports arrive.
    """

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.endpoint = ""
        self._server: grpc.aio.Server | None = None

    async def __aenter__(self) -> OtlpReceiver:
        server = grpc.aio.server()
        otlp_grpc.add_TraceServiceServicer_to_server(_TraceService(self.spans), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    async def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float
    ) -> list[ReceivedSpan]:
        """The spans so far, once ``predicate`` holds for them; AssertionError, saying
        what arrived, if it does not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"spans not as expected after {timeout:g}s; got {len(spans)}:\n"
                    + describe(spans)
                )
            await asyncio.sleep(0.02)


def describe(spans: Iterable[ReceivedSpan]) -> str:
    """One line per span, for assertion messages."""
    return "\n".join(
        f"  {s.service} {s.name} trace={s.trace_id} span={s.span_id} "
        f"parent={s.parent_span_id or '-'} [{s.start_ns}, {s.end_ns}] status={s.status_code}"
        for s in spans
    )


def span_trees(spans: Iterable[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    """Each trace id's roots: its spans whose parent is not among its spans (a parent
    id of "", or one no exporter sent), earliest first."""
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    trees = {}
    for trace_id, members in by_trace.items():
        ids = {s.span_id for s in members}
        roots = [s for s in members if s.parent_span_id not in ids]
        trees[trace_id] = sorted(roots, key=lambda s: s.start_ns)
    return trees


def children_of(spans: Iterable[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    """The spans whose parent is ``parent``, earliest first."""
    found = [
        s for s in spans if s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id
    ]
    return sorted(found, key=lambda s: s.start_ns)


def check_tree(spans: list[ReceivedSpan], parent: str = "") -> ReceivedSpan:
    """Assert ``spans`` (one trace's) form one tree and return its root.

    One trace id; no span id twice; exactly one root, whose parent id is ``parent`` ("":
    the trace started there; else the span id of a caller that exported nothing);
    every other span's parent among them; and each span inside its parent in time
    (start >= the parent's start, end <= its end), ending no earlier than it starts.
    """
    assert spans, "no spans"
    listing = describe(spans)
    assert len({s.trace_id for s in spans}) == 1, f"more than one trace:\n{listing}"
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), f"a span id occurs twice:\n{listing}"
    roots = [s for s in spans if s.parent_span_id not in by_id]
    assert len(roots) == 1, f"{len(roots)} roots (parents missing?), not one:\n{listing}"
    root = roots[0]
    assert root.parent_span_id == parent, (
        f"the root's parent is {root.parent_span_id or '-'}, not {parent or '-'}:\n{listing}"
    )
    for span in spans:
        assert span.start_ns <= span.end_ns, f"{span.name} ends before it starts:\n{listing}"
        up = by_id.get(span.parent_span_id)
        if up is not None:
            assert up.start_ns <= span.start_ns and span.end_ns <= up.end_ns, (
                f"{span.name} ({span.span_id}) is not inside its parent {up.name}:\n{listing}"
            )
    return root
