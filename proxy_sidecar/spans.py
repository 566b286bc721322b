"""The sidecar's call records as OpenTelemetry spans, on the exporter thread.

This module loads OpenTelemetry's SDK: only a sidecar that traces imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from shoal_core.codes import OK, code_name

if TYPE_CHECKING:
    from proxy_sidecar.tracing import TracedCall

__all__ = ["SpanFactory"]

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("shoal.sidecar")


class SpanFactory:
    """Makes the finished spans of one sidecar, named for ``service`` in the traces."""

    def __init__(self, service: str) -> None:
        self._resource = Resource.create({SERVICE_NAME: service, "shoal.component": "sidecar"})

    def span(
        self,
        call: TracedCall,
        code: int,
        end_ns: int,
        upstream: str | None,
        retries: int,
    ) -> ReadableSpan:
        """One call's span: RPC attributes as OpenTelemetry's conventions name them."""
        inbound = call.inbound
        name = call.path.lstrip("/")
        service, _, method = name.partition("/")
        attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "rpc.grpc.status_code": code,
            "shoal.direction": "inbound" if inbound else "outbound",
            "shoal.retries": retries,
        }
        if upstream is not None:
            attributes["shoal.upstream"] = upstream
        parent = None
        if call.parent_id:
            parent = SpanContext(
                call.trace_id, call.parent_id, is_remote=True, trace_flags=_SAMPLED
            )
        status = (
            Status(StatusCode.UNSET) if code == OK else Status(StatusCode.ERROR, code_name(code))
        )
        return ReadableSpan(
            name=name,
            context=SpanContext(call.trace_id, call.span_id, is_remote=False, trace_flags=_SAMPLED),
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            kind=SpanKind.SERVER if inbound else SpanKind.CLIENT,
            start_time=call.start_ns,
            end_time=max(end_ns, call.start_ns),
            status=status,
            instrumentation_scope=_SCOPE,
        )
