"""The trace context of the call a pool function is running, for its own spans.

When the worker traces, each task it hands to a pool process comes with the W3C
context of the worker's ``worker.execute`` span for it. During the call, a function
reads it here and can continue the trace with its own OpenTelemetry setup::

    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from worker_node.tracecontext import current_traceparent, current_tracestate

    def resize(payload: bytes) -> bytes:
        carrier = {"traceparent": current_traceparent() or ""}
        carrier["tracestate"] = current_tracestate() or ""
        parent = TraceContextTextMapPropagator().extract(carrier)
        with tracer.start_as_current_span("resize", context=parent):
            ...

Both are ``None`` outside a call and during calls the worker does not trace (a
traced call that is not sampled still has a ``traceparent``, flags ``00``, so that
what the function records follows the caller's decision). Read them on the thread
that runs the call, while it runs: a pool process runs one call at a time.

Pool processes import this module, so it needs nothing beyond the standard library;
``encode`` (the worker's side) and ``enter``/``leave`` (the pool process's side) are
the framing ``worker_node.child`` uses, not an API for functions.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["current_traceparent", "current_tracestate"]

_traceparent: str | None = None
_tracestate: str | None = None


def current_traceparent() -> str | None:
    """The running call's ``traceparent`` (the worker's execute span as the parent)."""
    return _traceparent


def current_tracestate() -> str | None:
    """The running call's ``tracestate`` as the caller sent it; ``None`` if it had none."""
    return _tracestate


def encode(context: Mapping[str, str]) -> bytes:
    """``traceparent`` and ``tracestate`` (keys as W3C names them) as a TRACE frame's body."""
    return f"{context['traceparent']}\n{context.get('tracestate', '')}".encode()


def enter(body: bytes) -> None:
    """Make a TRACE frame's context the current one, for the task about to run."""
    global _traceparent, _tracestate
    traceparent, _, tracestate = body.decode(errors="replace").partition("\n")
    _traceparent, _tracestate = traceparent, tracestate or None


def leave() -> None:
    """The task is over: no context until the next traced one."""
    global _traceparent, _tracestate
    _traceparent = _tracestate = None
