"""The registry's golden metrics: every Registry call by method and status, and how
long the unary ones took.

``CallCounter`` is a grpc.aio server interceptor, so one place sees every call of the
Registry service as the client does: the domain errors the servicer maps to statuses,
requests that fail to decode (answered before the servicer runs), denials and bugs.
It wraps each method's handler once; a call then costs two clock reads, a list
increment and a ``Histogram.observe``, on the event loop's thread. ``CallCollector``
turns those plain numbers into metric families when ``/metrics`` is scraped.

The ``method`` label takes its values from the service definition only; a path the
definition lacks (grpc answers unknown ones UNIMPLEMENTED before any handler runs, so
only a stale definition would see one) is counted under ``"other"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeAlias

import grpc
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from protos import registry_pb2 as pb
from shoal_core.codes import CODE_NAMES, OK
from shoal_core.metrics import LATENCY_BUCKETS, Histogram, histogram_family

__all__ = ["CallCollector", "CallCounter", "CallStats", "MethodCalls"]

SERVICE = pb.DESCRIPTOR.services_by_name["Registry"]
OTHER = "other"

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only
_CANCELLED = int(grpc.StatusCode.CANCELLED.value[0])
_DEADLINE_EXCEEDED = int(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
_UNKNOWN = int(grpc.StatusCode.UNKNOWN.value[0])


class MethodCalls:
    """One method's calls: how many ended with each status (by number), and how long
    each took if the method is unary."""

    __slots__ = ("codes", "duration", "unary")

    def __init__(self, unary: bool) -> None:
        self.unary = unary
        self.codes = [0] * len(CODE_NAMES)
        # A stream is not timed: a Watch lasts as long as its watcher wants, which says
        # nothing about how fast the registry answers.
        self.duration = Histogram(LATENCY_BUCKETS)


class CallStats:
    """The ``MethodCalls`` of every Registry method, made up front from its definition."""

    def __init__(self) -> None:
        self.methods = {m.name: MethodCalls(unary=not m.server_streaming) for m in SERVICE.methods}
        self.other = MethodCalls(unary=True)

    def of(self, method: str) -> MethodCalls:
        return self.methods.get(method, self.other)

    def items(self) -> Iterator[tuple[str, MethodCalls]]:
        """Every method by name, ``other`` too once something was counted there."""
        yield from sorted(self.methods.items())
        if any(self.other.codes):
            yield OTHER, self.other


def _code(exc: BaseException, context: Context) -> int:
    """The number of the status a call that raised ``exc`` ends with."""
    if isinstance(exc, grpc.aio.AbortError):
        return int(context.code().value[0])
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # grpc cancels a handler when its client goes away and when its deadline passes.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return _DEADLINE_EXCEEDED if expired else _CANCELLED
    return _UNKNOWN  # what grpc answers for any other exception


def _timed(behavior: Callable[..., Any], calls: MethodCalls) -> Any:
    codes, duration, clock = calls.codes, calls.duration, time.perf_counter

    async def unary(request: Any, context: Context) -> Any:
        started = clock()
        code = _UNKNOWN
        try:
            reply = await behavior(request, context)
            code = OK
            return reply
        except BaseException as exc:
            code = _code(exc, context)
            raise
        finally:
            codes[code] += 1
            duration.observe(clock() - started)

    return unary


def _counted(behavior: Callable[..., Any], calls: MethodCalls) -> Any:
    codes = calls.codes

    async def stream(request: Any, context: Context) -> Any:
        code = _UNKNOWN
        try:
            # aclosing: a stream closed while it waits at a yield still runs the
            # handler's own clean-up (a Watch gives back its subscription) right away.
            async with contextlib.aclosing(behavior(request, context)) as items:
                async for item in items:
                    yield item
            code = OK
        except BaseException as exc:
            code = _code(exc, context)
            raise
        finally:
            codes[code] += 1

    return stream


def _counting(handler: Handler, calls: MethodCalls) -> Handler:
    """``handler`` with its behavior counted into ``calls``."""
    decode, encode = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _timed(handler.unary_unary, calls), decode, encode
        )
    if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
        return grpc.unary_stream_rpc_method_handler(
            _counted(handler.unary_stream, calls), decode, encode
        )
    # The Registry has no client-streaming method, nor one that writes with context.write.
    return handler


class CallCounter(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every call of the Registry service into ``stats`` as it ends; calls of
    the server's other services (health, reflection) pass untouched."""

    def __init__(self, stats: CallStats) -> None:
        self._stats = stats
        self._prefix = f"/{SERVICE.full_name}/"
        # Path -> (grpc's handler, ours): grpc hands out the same handler every call.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        path = handler_call_details.method
        entry = self._wrapped.get(path)
        if entry is not None and entry[0] is handler:
            return entry[1]
        if handler is None or not path.startswith(self._prefix):
            return handler
        calls = self._stats.of(path.removeprefix(self._prefix))
        entry = self._wrapped[path] = (handler, _counting(handler, calls))
        return entry[1]


class CallCollector(Collector):
    """``shoal_registry_requests_total`` and ``shoal_registry_request_duration_seconds``."""

    def __init__(self, stats: CallStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "shoal_registry_requests",
            "Registry calls that ended, by method and status (a Watch or WatchPolicy "
            "stream counts when it ends)",
            labels=["method", "code"],
        )
        duration = histogram_family(
            "shoal_registry_request_duration_seconds",
            "Time to serve a unary Registry call, by method (streams are not timed: "
            "they last as long as their watchers)",
            ["method"],
        )
        for method, calls in self._stats.items():
            for number, count in enumerate(calls.codes):
                # OK always, so that a rate is defined from the first scrape on.
                if count or number == OK:
                    requests.add_metric([method, CODE_NAMES[number]], count)
            if calls.unary:
                calls.duration.add_to(duration, [method])
        yield from (requests, duration)
