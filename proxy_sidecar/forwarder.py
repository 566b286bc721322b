"""The forwarding handler: any gRPC call in, raw bytes to an upstream, everything back.

Every method is served by one ``stream_stream`` handler with identity
serializers, which carries all four call shapes unchanged (on the wire they are
all streams) and never decodes a message. The handler forwards request and
response metadata, the status code, details and trailing metadata, and the
remaining deadline. A client that cancels gets its upstream call cancelled; an
upstream that cancels gives the client CANCELLED.

Retries go to another instance, only before the first response message (after
that the response is committed), and only while the request messages sent so
far are still buffered (see ``replay``). This is the one place route errors
become status codes.
"""

from __future__ import annotations

import asyncio
import functools
import random
from typing import Any

import grpc

from proxy_sidecar.cluster import Cluster
from proxy_sidecar.endpoints import Endpoint
from proxy_sidecar.errors import NoHealthyEndpoint, Overloaded, RouteError, UnknownService
from proxy_sidecar.pool import ChannelPool
from proxy_sidecar.replay import RequestStream
from proxy_sidecar.resilience import backoff_delay
from proxy_sidecar.routing import HOP_KEY, TARGET_KEY, Route, Router, parse_method

__all__ = ["Forwarder"]

Context = grpc.aio.ServicerContext[bytes, bytes]

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
_CODES: dict[type[RouteError], grpc.StatusCode] = {
    UnknownService: grpc.StatusCode.UNIMPLEMENTED,
    NoHealthyEndpoint: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Headers the transport sets itself on the upstream call.
_TRANSPORT_KEYS = frozenset({"user-agent", TARGET_KEY, HOP_KEY})
_HOP_ITEM = (HOP_KEY, "1")
# Below this much time left, a retry could not finish: give the caller the failure.
_MIN_RETRY_TIME = 0.005
_MAX_CACHED_HANDLERS = 4096
_LOCAL_WRITE_FAILURE = "Internal error from Core"


class Forwarder(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Serves every method not served by the sidecar itself by forwarding it."""

    def __init__(self, router: Router, pool: ChannelPool, *, rng: random.Random | None = None):
        self._router = router
        self._pool = pool
        self._rng = rng or random.Random()
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        self._malformed = grpc.stream_stream_rpc_method_handler(self._reject_malformed)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        path: Any = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is None:
            route = parse_method(path) if isinstance(path, str) else None
            if route is None:
                return self._malformed
            handler = grpc.stream_stream_rpc_method_handler(functools.partial(self._forward, route))
            if len(self._handlers) < _MAX_CACHED_HANDLERS:
                self._handlers[path] = handler
        return handler

    async def _reject_malformed(self, requests: object, context: Context) -> None:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("shoal: the method path is not /package.Service/Method")

    async def _forward(self, route: Route, requests: object, context: Context) -> None:
        service = route.service
        inbound = False
        outgoing: list[tuple[str, str | bytes]] = []
        received: Any = context.invocation_metadata() or ()
        for item in received:
            name = item[0]
            if name in _TRANSPORT_KEYS:
                if name == TARGET_KEY and isinstance(item[1], str):
                    service = item[1]
                elif name == HOP_KEY:
                    inbound = True
                continue
            outgoing.append(item)
        try:
            if inbound and self._router.local is not None:
                cluster = self._router.local
            else:
                cluster = self._router.cluster(service)
                outgoing.append(_HOP_ITEM)
            key: str | None = None
            if cluster.hash_key is not None:
                for item in outgoing:
                    if item[0] == cluster.hash_key and isinstance(item[1], str):
                        key = item[1]
                        break
            remaining = context.time_remaining()
            await cluster.breaker.acquire(remaining)
        except RouteError as exc:
            _fail(context, _CODES.get(type(exc), _UNAVAILABLE), str(exc))
            return
        try:
            await self._relay(cluster, route, outgoing, key, remaining, context)
        finally:
            cluster.breaker.release()

    async def _relay(
        self,
        cluster: Cluster,
        route: Route,
        metadata: list[tuple[str, str | bytes]],
        key: str | None,
        remaining: float | None,
        context: Context,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if remaining is None else loop.time() + remaining
        per_try = cluster.per_try_timeout
        retry = cluster.retry
        cluster.requests += 1
        cluster.budget.record_request()
        requests = RequestStream(context)
        tried: list[Endpoint] = []
        try:
            while True:
                try:
                    endpoint = cluster.pick(key, tried)
                except RouteError as exc:
                    _fail(context, _CODES.get(type(exc), _UNAVAILABLE), str(exc))
                    cluster.codes[_CODES.get(type(exc), _UNAVAILABLE).name] += 1
                    return
                timeout = None if deadline is None else deadline - loop.time()
                if per_try is not None and (timeout is None or per_try < timeout):
                    timeout = per_try
                call = self._pool.callable(endpoint, route.path)(
                    requests.replay(), timeout=timeout, metadata=metadata
                )
                endpoint.in_flight += 1
                started = loop.time()
                try:
                    try:
                        first = await call.read()
                    except grpc.aio.AioRpcError as exc:
                        code = _code_of(exc)
                        left = None if deadline is None else deadline - loop.time()
                        try_timed_out = code is _DEADLINE and (left is None or left > 0.0)
                        cluster.record(
                            endpoint,
                            code is not _UNAVAILABLE and not try_timed_out,
                            loop.time() - started,
                        )
                        if (
                            not requests.committed
                            and len(tried) + 1 < retry.max_attempts
                            and (
                                code is _UNAVAILABLE
                                or (
                                    retry.is_idempotent(route.method)
                                    and (try_timed_out or code.name in retry.retry_on)
                                )
                            )
                        ):
                            pause = backoff_delay(
                                len(tried), retry.backoff_base, retry.backoff_max, self._rng
                            )
                            if (
                                left is None or left > pause + _MIN_RETRY_TIME
                            ) and cluster.budget.try_retry():
                                tried.append(endpoint)
                                cluster.retries += 1
                                await asyncio.sleep(pause)
                                continue
                        await _relay_failure(context, exc, code)
                        cluster.codes[code.name] += 1
                        return
                    cluster.record(endpoint, True, loop.time() - started)
                    requests.commit()
                    initial = await call.initial_metadata()
                    if initial:
                        await context.send_initial_metadata(_pairs(initial))
                    message: Any = first
                    while message is not _EOF:
                        await context.write(message)
                        message = await call.read()
                    trailing = await call.trailing_metadata()
                    if trailing:
                        context.set_trailing_metadata(_pairs(trailing))
                    cluster.codes["OK"] += 1
                    return
                except grpc.aio.AioRpcError as exc:
                    # Failed after the response had begun: nothing can be retried now.
                    code = _code_of(exc)
                    await _relay_failure(context, exc, code, headers_sent=True)
                    cluster.codes[code.name] += 1
                    return
                finally:
                    endpoint.in_flight -= 1
                    if not call.done():
                        call.cancel()
        finally:
            requests.close()


def _code_of(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The call's status, with a local send failure on a broken connection as UNAVAILABLE.

    grpc reports a request write that fails because the connection died (the
    upstream was killed mid-call) as INTERNAL with this fixed text; it is a
    transport failure, so it must be retried and count against the endpoint.
    """
    code = exc.code()
    if code is grpc.StatusCode.INTERNAL and exc.details() == _LOCAL_WRITE_FAILURE:
        return _UNAVAILABLE
    return code


def _pairs(metadata: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((key, value) for key, value in metadata)


def _fail(context: Context, code: grpc.StatusCode, details: str) -> None:
    context.set_code(code)
    context.set_details(details)


async def _relay_failure(
    context: Context,
    exc: grpc.aio.AioRpcError,
    code: grpc.StatusCode,
    *,
    headers_sent: bool = False,
) -> None:
    if not headers_sent:
        initial = exc.initial_metadata()
        if initial:
            await context.send_initial_metadata(_pairs(initial))
    trailing = exc.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(_pairs(trailing))
    _fail(context, code, exc.details() or "")
