"""The sidecar's spans: one per call and direction, recorded off the call path.

A traced call costs the data plane's thread a few integer operations and one string
when it begins (``CallTracer.start``: continue the caller's ``traceparent`` or start a
trace, and the header the upstream gets instead, naming this hop's span) and one
append when it ends (``TracedCall.end``). Turning those records into OpenTelemetry
spans and exporting them is the exporter thread's work, in batches, with OpenTelemetry's
SDK span type and its OTLP exporter (``shoal_core.tracing``).

An outbound call (our app's, into the mesh) is a CLIENT span and an inbound one (another
sidecar's, to our app) a SERVER span, named ``package.Service/Method`` as OpenTelemetry's
RPC conventions say, with the gRPC status, the instance that served the last try and
how many retries it took. A call that arrives unsampled passes its ``traceparent`` on
untouched; a trace started here unsampled still sends one, so the hops after this one
make the same decision instead of each starting a trace of its own.

Spans wait in a bounded queue: if the collector cannot keep up, new ones are dropped
and counted (``dropped``), never held without limit.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shoal_core.tracing import (
    TRACEPARENT,
    TraceContext,
    TraceSettings,
    new_span_id,
    new_trace_id,
    otlp_exporter,
    parse_traceparent,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["CallTracer", "TracedCall"]

logger = logging.getLogger(__name__)

MAX_QUEUED = 8192
BATCH = 512
EXPORT_EVERY = 1.0  # seconds between exports when fewer than a batch are waiting


class TracedCall:
    """One call's span while it runs: where it sits in its trace, and when it began."""

    __slots__ = ("tracer", "path", "inbound", "trace_id", "span_id", "parent_id", "start_ns")

    def __init__(
        self,
        tracer: CallTracer,
        path: str,
        inbound: bool,
        trace_id: int,
        span_id: int,
        parent_id: int,
    ) -> None:
        self.tracer = tracer
        self.path = path
        self.inbound = inbound
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # 0: the root of its trace
        self.start_ns = time.time_ns()

    def end(self, code: int, elapsed: float, upstream: str | None, retries: int) -> None:
        """The call ended with ``code`` after ``elapsed`` seconds (the data plane's
        measure, so the span's end does not wait for the batch it was reported in)."""
        end_ns = self.start_ns + int(elapsed * 1e9)
        self.tracer.finished((self, code, end_ns, upstream, retries))


_Record = tuple[TracedCall, int, int, str | None, int]


class CallTracer:
    """Samples, propagates and exports the spans of one sidecar's calls."""

    def __init__(
        self,
        settings: TraceSettings,
        *,
        rng: random.Random | None = None,
        exporter: SpanExporter | None = None,
    ) -> None:
        """``exporter``: OTLP to ``settings.endpoint`` unless given."""
        self.settings = settings
        self._rng = rng or random.Random()
        self._exporter = exporter
        self._queue: deque[_Record] = deque()
        self.dropped = 0
        self.exported = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(
        self, path: str, inbound: bool, metadata: Sequence[tuple[str, str]]
    ) -> tuple[TracedCall | None, str | None]:
        """A new call's span (``None`` when it is not sampled) and the ``traceparent``
        its upstream gets (``None``: the caller's goes on as it was)."""
        parent: TraceContext | None = None
        for name, value in metadata:
            if name == TRACEPARENT:
                parent = parse_traceparent(value)
                break
        span_id = new_span_id(self._rng)
        if parent is None:
            trace_id = new_trace_id(self._rng)
            sampled = self.settings.keeps(trace_id)
            header = TraceContext(trace_id, span_id, sampled).traceparent()
            if not sampled:
                return None, header
            return TracedCall(self, path, inbound, trace_id, span_id, 0), header
        if not parent.sampled:
            return None, None
        call = TracedCall(self, path, inbound, parent.trace_id, span_id, parent.span_id)
        return call, parent.child(span_id).traceparent()

    def finished(self, record: _Record) -> None:
        """From the data plane's thread: queue a span for the exporter thread."""
        queue = self._queue
        if len(queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        queue.append(record)
        if len(queue) == BATCH:
            self._wake.set()

    def open(self, service: str | None = None) -> None:
        """Start the exporter thread (this loads OpenTelemetry's SDK); ``service``, the
        name spans carry, when it is known only now (after certifying)."""
        if service is not None:
            self.settings = dataclasses.replace(self.settings, service=service)
        if self._exporter is None:
            self._exporter = otlp_exporter(self.settings.endpoint)
        self._thread = threading.Thread(target=self._run, name="shoal-trace-export", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Export what is queued, stop the thread and the exporter."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._exporter is not None:
            self._exporter.shutdown()

    def _run(self) -> None:
        from proxy_sidecar.spans import SpanFactory

        factory = SpanFactory(self.settings.service)
        while True:
            self._wake.wait(EXPORT_EVERY)
            self._wake.clear()
            stopping = self._stopping
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._export([factory.span(*record) for record in batch])
            if stopping:
                return

    def _export(self, spans: list[ReadableSpan]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        assert self._exporter is not None
        try:
            result = self._exporter.export(spans)
        except Exception:  # an exporter bug must not end tracing for good
            logger.exception("exporting %d spans failed", len(spans))
            return
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            logger.debug("the collector at %s took no spans", self.settings.endpoint)
