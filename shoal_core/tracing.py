"""Distributed tracing: W3C trace context, head sampling, and export over OTLP.

Every hop speaks W3C Trace Context: a call carries ``traceparent`` (and, passed through
untouched, ``tracestate``). A hop that records a span sends its own span id on as the
parent of the next; a call that arrives without one starts a trace. Spans go to an
OpenTelemetry collector (or Jaeger, Tempo: anything that takes OTLP/gRPC) through
OpenTelemetry's own SDK and exporter, in batches, off the call path.

Tracing is off until a collector is named (``--otlp-endpoint``, ``SHOAL_OTLP_ENDPOINT``):
then nothing is recorded and ``traceparent`` passes through as the caller sent it, so a
mesh that does not trace pays nothing for it. With a collector, sampling is head-based
and parent-based, OpenTelemetry's default: a call that arrives with a trace keeps its
caller's decision; a trace started here is kept with probability ``sample``
(``--trace-sample``, ``SHOAL_TRACE_SAMPLE``; 1 % by default, all of them in
``shoal up --demo``). The decision is a function of the trace id (OpenTelemetry's
``TraceIdRatioBased``), so every hop that starts from one id decides alike.

The OpenTelemetry packages are imported only by a process that traces.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal_core.errors import ShoalUserError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "DEFAULT_SAMPLE",
    "TRACEPARENT",
    "TRACESTATE",
    "TraceContext",
    "TraceSettings",
    "new_span_id",
    "new_trace_id",
    "otlp_exporter",
    "parse_traceparent",
    "tracer_provider",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
DEFAULT_SAMPLE = 0.01
EXPORT_TIMEOUT = 2.0  # seconds an export may take, retries included
# version 00: 2 hex, 32 hex trace id, 16 hex parent id, 2 hex flags (W3C Trace Context §3.2).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SAMPLED = 0x01
_TRACE_ID_MAX = (1 << 64) - 1  # TraceIdRatioBased compares the id's low 64 bits


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSettings:
    """Where spans go (``endpoint``: ``http://host:port`` of an OTLP/gRPC collector, or
    ``https://`` to reach it over TLS), how many new traces are kept, and the name this
    process gives itself in them."""

    endpoint: str
    service: str
    sample: float = DEFAULT_SAMPLE

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample <= 1.0:
            raise ValueError(f"the trace sample must be between 0 and 1, got {self.sample}")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"the OTLP endpoint must be http://HOST:PORT or https://HOST:PORT, "
                f"got {self.endpoint!r}"
            )
        if not self.service:
            raise ValueError("a traced process needs a service name")

    def keeps(self, trace_id: int) -> bool:
        """Whether a trace started here with this id is sampled (``TraceIdRatioBased``)."""
        return (trace_id & _TRACE_ID_MAX) < round(self.sample * (_TRACE_ID_MAX + 1))


@dataclass(frozen=True, slots=True)
class TraceContext:
    """What a ``traceparent`` says: the trace, the caller's span, whether it is sampled."""

    trace_id: int
    span_id: int
    sampled: bool

    def traceparent(self) -> str:
        """This context as a ``traceparent`` value (version 00)."""
        flags = _SAMPLED if self.sampled else 0
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{flags:02x}"

    def child(self, span_id: int) -> TraceContext:
        """The context the next hop gets when span ``span_id`` is recorded here."""
        return TraceContext(self.trace_id, span_id, self.sampled)


def parse_traceparent(value: str) -> TraceContext | None:
    """A ``traceparent`` header's context; ``None`` when it is not one we can continue.

    As the W3C spec says: all-zero ids, the reserved version ff and malformed values
    are ignored (a new trace starts); a later version is read by its first four fields.
    """
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace, parent, flags = match.groups()
    if version == "ff" or (version == "00" and match.end() != len(value.strip())):
        return None
    trace_id, span_id = int(trace, 16), int(parent, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceContext(trace_id, span_id, bool(int(flags, 16) & _SAMPLED))


def new_trace_id(rng: random.Random) -> int:
    """A random, non-zero 128-bit trace id (W3C: random in at least the right 7 bytes)."""
    return rng.getrandbits(128) or 1


def new_span_id(rng: random.Random) -> int:
    """A random, non-zero 64-bit span id."""
    return rng.getrandbits(64) or 1


def otlp_exporter(endpoint: str) -> SpanExporter:
    """OpenTelemetry's OTLP/gRPC span exporter for ``endpoint``."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        # What it looks like when xds-protos was installed after opentelemetry-proto: its
        # stale copies of the OTLP modules replaced the real ones (grpc/grpc#42926).
        raise ShoalUserError(
            f"OpenTelemetry's OTLP modules are broken ({exc}); reinstall them with "
            "'pip install --force-reinstall --no-deps opentelemetry-proto'"
        ) from None

    # The exporter retries within its timeout; a process stopping flushes through it, so
    # a collector that is gone must not hold the stop much longer than this.
    return OTLPSpanExporter(
        endpoint=endpoint, insecure=endpoint.startswith("http://"), timeout=EXPORT_TIMEOUT
    )


def tracer_provider(settings: TraceSettings) -> TracerProvider:
    """An OpenTelemetry SDK provider sampling and exporting as ``settings`` say, for a
    Python service that records its spans through the OpenTelemetry API (the worker).

    Its owner calls ``shutdown()`` when it stops: that flushes the last batch.
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: settings.service}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample)),
    )
    provider.add_span_processor(BatchSpanProcessor(otlp_exporter(settings.endpoint)))
    return provider
