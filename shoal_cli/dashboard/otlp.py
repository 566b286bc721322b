"""The dashboard's trace receiver: what components' ``--otlp-endpoint`` can send spans to.

``TraceReceiver`` serves OpenTelemetry's own collector service (``TraceService.Export``
from ``opentelemetry.proto``) over gRPC, as a collector does, and puts each export's
spans in a ``TraceStore``. It is a Shoal gRPC server (``shoal_core.grpc_server``): the
connection limits of every Shoal server, at most ``MAX_STREAMS`` exports at once on a
connection, grpc.health.v1, and a request that does not decode answered
INVALID_ARGUMENT. An export over ``MAX_EXPORT_BYTES`` is refused by grpc before it is
read (RESOURCE_EXHAUSTED). Either way the export is lost alone.

Plaintext, as exporters given an ``http://`` endpoint speak: spans tell which calls were
made and how long they took, never what they carried. ``tests/otlp_receiver.py`` reads
exports too, keeping every field for the tests' checks; this one keeps what the page shows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from shoal_cli.dashboard.traces import ATTRIBUTES, MAX_TEXT, Attribute, Span, TraceStore
from shoal_core.grpc_server import GrpcServer

__all__ = ["MAX_EXPORT_BYTES", "MAX_STREAMS", "SERVICE", "TraceReceiver", "spans_of"]

logger = logging.getLogger(__name__)

SERVICE = otlp.DESCRIPTOR.services_by_name["TraceService"].full_name
MAX_EXPORT_BYTES = 4 * 1024 * 1024
# An exporter sends one export at a time; a few processes' worth share a connection at most.
MAX_STREAMS = 16
_WANTED = frozenset(ATTRIBUTES)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _scalar(value: AnyValue) -> Attribute | None:
    """A plain value (text, number, bool); None for lists, maps, bytes, nothing."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return _cut(value.string_value)
    if kind in ("int_value", "double_value", "bool_value"):
        found: Attribute = getattr(value, kind)
        return found
    return None


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Attribute]:
    found = {}
    for pair in pairs:
        if pair.key in _WANTED and (value := _scalar(pair.value)) is not None:
            found[pair.key] = value
    return found


def spans_of(request: otlp.ExportTraceServiceRequest) -> Iterator[Span | None]:
    """Each span of an export, as the store keeps it; None for one with ids of the wrong
    size (OTLP's are 16 and 8 bytes), which nothing could put in a trace."""
    for resource_spans in request.resource_spans:
        service = ""
        for pair in resource_spans.resource.attributes:
            if pair.key == "service.name":
                service = _cut(pair.value.string_value)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                parent = span.parent_span_id
                if len(span.trace_id) != 16 or len(span.span_id) != 8 or len(parent) not in (0, 8):
                    yield None
                    continue
                yield Span(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_id=parent.hex(),
                    name=_cut(span.name),
                    service=service,
                    kind=span.kind,
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    status=span.status.code,
                    attributes=_attributes(span.attributes),
                )


class _TraceService(otlp_grpc.TraceServiceServicer):
    """``TraceService.Export``: every well-formed span into the store."""

    def __init__(self, store: TraceStore) -> None:
        self._store = store

    async def Export(
        self, request: otlp.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> otlp.ExportTraceServiceResponse:
        spans = list(spans_of(request))
        self._store.add(s for s in spans if s is not None)
        rejected = sum(1 for s in spans if s is None)
        if not rejected:
            return otlp.ExportTraceServiceResponse()
        # OTLP's way to say part of an export was not taken: the exporter does not resend.
        return otlp.ExportTraceServiceResponse(
            partial_success=otlp.ExportTracePartialSuccess(
                rejected_spans=rejected,
                error_message="trace and span ids are 16 and 8 bytes",
            )
        )


class TraceReceiver(GrpcServer):
    """An OTLP/gRPC collector on ``listen`` that fills ``store``; ``address`` once started."""

    def __init__(self, listen: str, store: TraceStore) -> None:
        super().__init__(listen, max_message_bytes=MAX_EXPORT_BYTES)
        self.limits = dataclasses.replace(self.limits, max_concurrent_streams=MAX_STREAMS)
        self.store = store

    def _add_servicers(self, server: grpc.aio.Server) -> Sequence[str]:
        # opentelemetry-proto ships its grpc module without type hints.
        otlp_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self.store), server
        )
        return [SERVICE]
