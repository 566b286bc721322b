"""The worker's spans: one per call, with the queue wait and the execution inside it.

Each call gets a SERVER span named as OpenTelemetry's RPC conventions say
(``shoal.worker.v1.Worker/Exec``; ``rpc.system``, ``rpc.service``, ``rpc.method``,
and at the end ``rpc.grpc.status_code``, status ERROR unless OK). It continues the
caller's W3C ``traceparent`` and ``tracestate`` from the call's metadata or starts a
trace; the provider's ``ParentBased`` sampler keeps a caller's decision and samples
new traces by the ratio (``shoal_core.tracing``).

Work a call waits for gets two children: ``worker.queue`` from when the call asks for
a pool process or an exec slot until one takes the work, then ``worker.execute`` until
the worker sees it end (a pool task's result arriving, a command's exit). The execute
span's context goes on to what runs the work: a command gets it as ``TRACEPARENT``
(and ``TRACESTATE``) in its environment, a pool function through
``worker_node.tracecontext``. A task pipelined behind another in its process (only
tiny functions are) counts its short wait there as execution: the worker cannot see
it start. A task whose process died before starting it keeps its execute span while
it is sent to another.

Every child lies inside its parent in time: a call that ends while its work is still
open (its caller left, or the work was refused) ends those spans with it, marked
``shoal.call_ended`` and, if the call failed, with its status.

Imported only by a worker that traces (it loads OpenTelemetry); it never imports grpc:
the servicer hands it the call's metadata and, at the end, its status code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shoal_core.codes import code_name
from shoal_core.tracing import TraceSettings, tracer_provider
from worker_node.poolproc import TaskOutcome
from worker_node.protocol import Status as TaskStatus

__all__ = ["EXECUTE", "QUEUE", "CallTrace", "Metadata", "WorkSpans", "WorkerTracer"]

QUEUE = "worker.queue"
EXECUTE = "worker.execute"
# A call's metadata as grpc gives it: (key, value) pairs, keys in lower case.
Metadata = Iterable[tuple[str, str | bytes]]
_Pairs = Sequence[tuple[str, str | bytes]]
Attributes = Mapping[str, str | int | bool]
_PROPAGATOR = TraceContextTextMapPropagator()
_DESCRIPTION = 200  # characters of an error kept as a span's status description


class _MetadataGetter(Getter[_Pairs]):
    """Reads W3C headers out of gRPC metadata for OpenTelemetry's propagator."""

    def get(self, carrier: _Pairs, key: str) -> list[str] | None:
        found = [value for name, value in carrier if name == key and isinstance(value, str)]
        return found or None

    def keys(self, carrier: _Pairs) -> list[str]:
        return [name for name, _ in carrier]


_GETTER = _MetadataGetter()


class WorkerTracer:
    """The worker's OpenTelemetry provider (sampling, OTLP export) and its calls' spans."""

    def __init__(self, settings: TraceSettings, service: str) -> None:
        self._provider = tracer_provider(settings)
        self._tracer = self._provider.get_tracer("shoal.worker")
        self._service = service

    def call(self, method: str, metadata: Metadata | None) -> CallTrace:
        """Start the span of a call to ``method`` that arrived with ``metadata``."""
        pairs = tuple(metadata) if metadata else ()
        parent = _PROPAGATOR.extract(pairs, context=Context(), getter=_GETTER)
        span = self._tracer.start_span(
            f"{self._service}/{method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": self._service, "rpc.method": method},
        )
        return CallTrace(self._tracer, span)

    async def close(self) -> None:
        """Export what is left and stop; off the event loop, as export blocks."""
        await asyncio.to_thread(self._provider.shutdown)


class CallTrace:
    """One call's SERVER span; ``task`` and ``command`` start the spans of its work."""

    __slots__ = ("_context", "_open", "_span", "_tracer")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer = tracer
        self._span = span
        self._context = trace.set_span_in_context(span, Context())
        self._open: set[WorkSpans] = set()

    def cached(self, lookup: str) -> None:
        """The response cache answered the call: ``hit``, ``miss`` or ``coalesced``."""
        self._span.set_attribute("shoal.cache", lookup)

    def task(self, pool: str, function: str) -> WorkSpans:
        """Spans for a pool task of this call, waiting from now."""
        return self._work({"shoal.pool": pool, "shoal.function": function})

    def command(self, name: str) -> WorkSpans:
        """Spans for an allowlisted command of this call, waiting from now."""
        return self._work({"shoal.command": name})

    def end(self, code: int) -> None:
        """The call ended with status ``code``: end its span and whatever work is open."""
        now = time.time_ns()
        error = code_name(code) if code else None
        for work in list(self._open):
            work.end(now, error, {"shoal.call_ended": True})
        self._span.set_attribute("rpc.grpc.status_code", code)
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end(end_time=now)

    def _work(self, attributes: Attributes) -> WorkSpans:
        work = WorkSpans(self._tracer, self._context, attributes, self._open)
        self._open.add(work)
        return work


class WorkSpans:
    """The queue wait, then the execution, of one piece of a call's work.

    ``taken`` when a pool process or an exec slot takes it; ``done`` (``settle``, for
    a pool task's future) when the worker sees it end.
    """

    __slots__ = ("_attributes", "_carrier", "_execute", "_open", "_parent", "_queue", "_tracer")

    def __init__(
        self, tracer: Tracer, parent: Context, attributes: Attributes, open_: set[WorkSpans]
    ) -> None:
        self._tracer = tracer
        self._parent = parent
        self._attributes = attributes
        self._open = open_
        self._queue: Span | None = tracer.start_span(QUEUE, context=parent, attributes=attributes)
        self._execute: Span | None = None
        self._carrier: dict[str, str] = {}

    def taken(self, pid: int = 0) -> Mapping[str, str]:
        """The wait is over and the execution starts (in process ``pid``, if known).

        Returns the W3C context (``traceparent``, and ``tracestate`` if any) to hand to
        what runs it; the same one if it is taken again; none if its call has ended.
        """
        queue = self._queue
        if queue is None:
            return self._carrier
        now = time.time_ns()
        queue.end(end_time=now)
        self._queue = None
        attributes = {**self._attributes, "process.pid": pid} if pid else self._attributes
        span = self._tracer.start_span(
            EXECUTE, context=self._parent, attributes=attributes, start_time=now
        )
        self._execute = span
        _PROPAGATOR.inject(self._carrier, context=trace.set_span_in_context(span, Context()))
        return self._carrier

    def done(self, error: str | None = None, attributes: Attributes | None = None) -> None:
        """The work ended, failing with ``error`` if given; later calls change nothing."""
        self.end(time.time_ns(), error, attributes)

    def exited(self, code: int) -> None:
        """``done`` for a command that exited with ``code``."""
        self.done(attributes={"process.exit.code": code})

    def settle(self, future: asyncio.Future[TaskOutcome]) -> None:
        """``done`` as a pool task's future says (a done callback)."""
        if future.cancelled():
            self.done("cancelled")
            return
        exc = future.exception()
        if exc is not None:
            self.done(str(exc) or type(exc).__name__)
            return
        outcome = future.result()
        if outcome.status is TaskStatus.OK:
            self.done()
        else:
            self.done(outcome.body[:_DESCRIPTION].decode(errors="replace"))

    def end(self, now: int, error: str | None, attributes: Attributes | None) -> None:
        """End whichever span is open at ``now`` (time.time_ns)."""
        self._open.discard(self)
        span = self._execute or self._queue
        if span is None:
            return
        self._queue = self._execute = None
        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error[:_DESCRIPTION]))
        span.end(end_time=now)
