"""Turning undecodable requests into INVALID_ARGUMENT instead of UNKNOWN and a traceback.

grpc.aio decodes a request before any handler or interceptor runs, so a
malformed message surfaces as an opaque UNKNOWN error with a stack trace in the
server log. ``StrictDecodingServer`` stands in for the server while the
generated ``add_*_to_server`` functions run: it wraps each deserializer so a
failure yields a marker, and each handler so the marker becomes a clear
INVALID_ARGUMENT. Well-formed requests pay one ``isinstance`` check.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc

__all__ = ["StrictDecodingServer"]


class _Undecodable:
    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _decoder(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as exc:  # any parse failure is the caller's fault, never ours
            return _Undecodable(str(exc).split(":")[-1].strip() or type(exc).__name__)

    return tolerant


async def _reject(
    context: grpc.aio.ServicerContext[Any, Any], method: str, bad: _Undecodable
) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"request to {method} could not be decoded: {bad.problem}"
    )


def _guard_unary_request(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await _reject(context, method, request)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            await _reject(context, method, request)
        return await behavior(request, context)

    return unary


def _guard_stream_request(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                await _reject(context, method, request)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            async for item in behavior(checked(requests, context), context):
                yield item

        return stream

    async def unary(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        return await behavior(checked(requests, context), context)

    return unary


def _guard(
    method: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    decode = _decoder(handler.request_deserializer)
    encode = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary_request(method, handler.unary_unary), decode, encode
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _guard_unary_request(method, handler.unary_stream), decode, encode
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _guard_stream_request(method, handler.stream_unary), decode, encode
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        _guard_stream_request(method, handler.stream_stream), decode, encode
    )


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Guards what a generic handler returns; handlers taking raw bytes pass untouched."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any]) -> None:
        self._inner = inner
        self._guarded: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        entry = self._guarded.get(method)
        if entry is None or entry[0] is not handler:
            entry = (handler, _guard(method, handler))
            self._guarded[method] = entry
        return entry[1]


class StrictDecodingServer:
    """Takes what ``add_*_to_server`` functions register; guards it for the real server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        guarded = {name: _guard(f"/{service}/{name}", h) for name, h in handlers.items()}
        # Missing from the type stubs, present since grpcio 1.62.
        self._server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]
