"""The forwarding handler: any gRPC call in, raw bytes to an upstream, everything back.

Messages are never decoded. Each call's method path picks one of two paths: a
method known to be unary-unary (published by its instances, or read from the
local app's reflection; see ``shapes``) takes the ``unary`` fast path, every
other call the general ``streaming`` path, which carries all four shapes. Both
forward request and response metadata, the status code, details and trailing
metadata, and the remaining deadline; a client that cancels gets its upstream
call cancelled, an upstream that cancels gives the client CANCELLED; both retry
through ``tries``. On the caller's side of the mesh each response also names the
instance that served it (trailing ``shoal-upstream``). A shape belongs to the
method path, so a call whose target service is overridden keeps its path's shape.

This is the one place route errors become status codes (``tries.route_code``).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from proxy_sidecar.errors import RouteError
from proxy_sidecar.pool import ChannelPool
from proxy_sidecar.routing import HOP_KEY, TARGET_KEY, Route, Router, parse_method
from proxy_sidecar.streaming import relay_stream
from proxy_sidecar.tries import Context, Tries, fail, route_code
from proxy_sidecar.unary import relay_unary

__all__ = ["Forwarder"]

# Headers the transport sets itself on the upstream call.
_TRANSPORT_KEYS = frozenset({"user-agent", TARGET_KEY, HOP_KEY})
_HOP_ITEM = (HOP_KEY, "1")
_MAX_CACHED_HANDLERS = 4096


class Forwarder(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Serves every method not served by the sidecar itself by forwarding it."""

    def __init__(self, router: Router, pool: ChannelPool, *, rng: random.Random | None = None):
        self._router = router
        self._pool = pool
        self._rng = rng or random.Random()
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        self._shapes_version = router.shapes_version
        self._malformed = grpc.stream_stream_rpc_method_handler(self._reject_malformed)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        path: Any = handler_call_details.method
        if self._router.shapes_version != self._shapes_version:
            # Which methods are unary changed: handlers chosen before may be on the wrong path.
            self._shapes_version = self._router.shapes_version
            self._handlers.clear()
        handler = self._handlers.get(path)
        if handler is None:
            route = parse_method(path) if isinstance(path, str) else None
            if route is None:
                return self._malformed
            if self._router.is_unary(route):
                handler = grpc.unary_unary_rpc_method_handler(self._unary(route))
            else:
                handler = grpc.stream_stream_rpc_method_handler(self._stream(route))
            if len(self._handlers) < _MAX_CACHED_HANDLERS:
                self._handlers[path] = handler
        return handler

    async def _reject_malformed(self, requests: object, context: Context) -> None:
        fail(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "shoal: the method path is not /package.Service/Method",
        )

    async def _admit(
        self, route: Route, context: Context
    ) -> tuple[Tries, tuple[tuple[str, str | bytes], ...]]:
        """Route the call, take a circuit breaker slot, and strip our own headers.

        Raises ``RouteError`` when the call cannot go anywhere; otherwise the caller
        must release the slot (``tries.cluster.breaker.release()``).
        """
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
        if inbound and self._router.local is not None:
            cluster = self._router.local
            outbound = False
        else:
            cluster = self._router.cluster(service)
            outgoing.append(_HOP_ITEM)
            outbound = True
        key: str | None = None
        if cluster.hash_key is not None:
            for item in outgoing:
                if item[0] == cluster.hash_key and isinstance(item[1], str):
                    key = item[1]
                    break
        remaining = context.time_remaining()
        if not cluster.breaker.try_acquire():
            await cluster.breaker.acquire(remaining)
        tries = Tries(cluster, route.method, key, remaining, outbound=outbound, rng=self._rng)
        return tries, tuple(outgoing)

    # The handlers are plain closures, not partials of methods: grpc checks on every call
    # whether the handler is a coroutine function, which is quick only for a plain function.
    def _unary(self, route: Route) -> Callable[[bytes, Context], Awaitable[bytes]]:
        admit, pool, path = self._admit, self._pool, route.path

        async def forward_unary(request: bytes, context: Context) -> bytes:
            try:
                tries, metadata = await admit(route, context)
            except RouteError as exc:
                fail(context, route_code(exc), str(exc))
                return b""
            tries.cluster.fast_calls += 1
            try:
                return await relay_unary(pool, tries, path, request, metadata, context)
            except RouteError as exc:
                _route_failed(context, tries, exc)
                return b""
            finally:
                tries.cluster.breaker.release()

        return forward_unary

    def _stream(self, route: Route) -> Callable[[object, Context], Awaitable[None]]:
        admit, pool, path = self._admit, self._pool, route.path

        async def forward_stream(requests: object, context: Context) -> None:
            try:
                tries, metadata = await admit(route, context)
            except RouteError as exc:
                fail(context, route_code(exc), str(exc))
                return
            try:
                await relay_stream(pool, tries, path, metadata, context)
            except RouteError as exc:
                _route_failed(context, tries, exc)
            finally:
                tries.cluster.breaker.release()

        return forward_stream


def _route_failed(context: Context, tries: Tries, exc: RouteError) -> None:
    """No endpoint left for a (re)try: the caller gets the route error's code."""
    code = route_code(exc)
    fail(context, code, str(exc))
    tries.done(code)
