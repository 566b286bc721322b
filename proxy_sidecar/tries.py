"""One forwarded call's tries, shared by the unary and the stream path.

``Tries`` decides what both paths must decide alike: the endpoint for the next
try, how long a try may take (the per-try timeout inside what is left of the
caller's deadline), what a failed try tells outlier detection, and whether to
retry: UNAVAILABLE always, configured codes and per-try timeouts only for
idempotent methods, each retry on another instance after a jittered backoff,
paid for from the retry budget, and only while the request can still be sent
again. The helpers below hand an upstream's failure back to the caller.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import grpc

from proxy_sidecar.cluster import Cluster
from proxy_sidecar.endpoints import Endpoint
from proxy_sidecar.errors import NoHealthyEndpoint, Overloaded, RouteError, UnknownService
from proxy_sidecar.resilience import backoff_delay
from proxy_sidecar.routing import UPSTREAM_KEY

__all__ = [
    "Context",
    "Metadata",
    "Tries",
    "code_of",
    "fail",
    "pairs",
    "relay_failure",
    "route_code",
]

Context = grpc.aio.ServicerContext[bytes, bytes]
Metadata = tuple[tuple[str, str | bytes], ...]

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
_ROUTE_CODES: dict[type[RouteError], grpc.StatusCode] = {
    UnknownService: grpc.StatusCode.UNIMPLEMENTED,
    NoHealthyEndpoint: _UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Below this much time left, a retry could not finish: give the caller the failure.
_MIN_RETRY_TIME = 0.005
_LOCAL_WRITE_FAILURE = "Internal error from Core"


class Tries:
    """Retry state and decisions for one call to ``cluster``; counts the call's outcome."""

    __slots__ = ("cluster", "_method", "_key", "_outbound", "_rng", "_loop", "_deadline", "_tried")

    def __init__(
        self,
        cluster: Cluster,
        method: str,
        key: str | None,
        remaining: float | None,
        *,
        outbound: bool,
        rng: random.Random,
    ) -> None:
        self.cluster = cluster
        self._method = method
        self._key = key
        self._outbound = outbound
        self._rng = rng
        self._loop = loop = asyncio.get_running_loop()
        self._deadline = None if remaining is None else loop.time() + remaining
        # Allocated on the first retry only: most calls never retry.
        self._tried: Sequence[Endpoint] = ()
        cluster.requests += 1
        cluster.budget.record_request()

    def pick(self) -> Endpoint:
        """The endpoint for the next try, another one than those tried when possible."""
        return self.cluster.pick(self._key, self._tried)

    def now(self) -> float:
        return self._loop.time()

    def timeout(self) -> float | None:
        """Seconds the next try may take: the per-try timeout within the remaining deadline."""
        per_try = self.cluster.per_try_timeout
        if self._deadline is None:
            return per_try
        left = self._deadline - self._loop.time()
        return per_try if per_try is not None and per_try < left else left

    def mark(self, endpoint: Endpoint) -> Metadata:
        """Trailing metadata naming the instance, added on the caller's side of the mesh."""
        return ((UPSTREAM_KEY, endpoint.instance_id),) if self._outbound else ()

    def succeeded(self, endpoint: Endpoint, started: float) -> None:
        self.cluster.record(endpoint, True, self._loop.time() - started)

    def retry_pause(
        self, endpoint: Endpoint, code: grpc.StatusCode, started: float, *, replayable: bool
    ) -> float | None:
        """Record a failed try; the backoff before retrying, or ``None`` to give up."""
        cluster = self.cluster
        now = self._loop.time()
        left = None if self._deadline is None else self._deadline - now
        # DEADLINE_EXCEEDED with time left is the per-try timeout, not the caller's.
        try_timed_out = code is _DEADLINE and (left is None or left > 0.0)
        cluster.record(endpoint, code is not _UNAVAILABLE and not try_timed_out, now - started)
        retry = cluster.retry
        if not replayable or len(self._tried) + 1 >= retry.max_attempts:
            return None
        if code is not _UNAVAILABLE and not (
            retry.is_idempotent(self._method) and (try_timed_out or code.name in retry.retry_on)
        ):
            return None
        pause = backoff_delay(len(self._tried), retry.backoff_base, retry.backoff_max, self._rng)
        if left is not None and left <= pause + _MIN_RETRY_TIME:
            return None
        if not cluster.budget.try_retry():
            return None
        self._tried = [*self._tried, endpoint]
        cluster.retries += 1
        return pause

    def done(self, code: grpc.StatusCode) -> None:
        self.cluster.codes[code.name] += 1


def route_code(exc: RouteError) -> grpc.StatusCode:
    return _ROUTE_CODES.get(type(exc), _UNAVAILABLE)


def code_of(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The call's status, with a local send failure on a broken connection as UNAVAILABLE.

    grpc reports a request write that fails because the connection died (the
    upstream was killed mid-call) as INTERNAL with this fixed text; it is a
    transport failure, so it must be retried and count against the endpoint.
    """
    code = exc.code()
    if code is grpc.StatusCode.INTERNAL and exc.details() == _LOCAL_WRITE_FAILURE:
        return _UNAVAILABLE
    return code


def pairs(metadata: Any) -> Metadata:
    """grpc.aio metadata as the tuple of pairs a servicer context takes."""
    if not metadata:
        return ()
    return tuple((key, value) for key, value in metadata)


def fail(context: Context, code: grpc.StatusCode, details: str) -> None:
    context.set_code(code)
    context.set_details(details)


async def relay_failure(
    context: Context,
    exc: grpc.aio.AioRpcError,
    code: grpc.StatusCode,
    mark: Metadata,
    *,
    headers_sent: bool = False,
) -> None:
    """Give the caller an upstream's failure: its code, details and metadata."""
    if not headers_sent:
        initial = exc.initial_metadata()
        if initial:
            await context.send_initial_metadata(pairs(initial))
    trailing = pairs(exc.trailing_metadata() or ()) + mark
    if trailing:
        context.set_trailing_metadata(trailing)
    fail(context, code, exc.details() or "")
