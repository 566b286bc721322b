"""Turning a servicer method's domain errors into gRPC statuses, in one place.

``maps_errors`` wraps a servicer method, unary or streaming (an async generator),
so that an error of the service's own tree ends the call with the status its
``ErrorCodes`` give and the error's text as the details. Nothing else is caught:
a bug is still a bug (UNKNOWN, with grpc's traceback in the log).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn, TypeVar, cast

import grpc

from shoal_core.codes import ErrorCodes

__all__ = ["abort_with", "maps_errors"]

Context = grpc.aio.ServicerContext[Any, Any]
Trailers = Callable[[BaseException], Sequence[tuple[str, str | bytes]]]
H = TypeVar("H", bound=Callable[..., Any])


def _no_trailers(exc: BaseException) -> Sequence[tuple[str, str | bytes]]:
    return ()


async def abort_with(
    context: Context,
    codes: ErrorCodes[grpc.StatusCode],
    exc: BaseException,
    trailers: Trailers = _no_trailers,
) -> NoReturn:
    """End the call with ``exc``'s status and text (and what ``trailers`` adds)."""
    await context.abort(codes(exc), str(exc), tuple(trailers(exc)))
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


def maps_errors(
    errors: type[BaseException] | tuple[type[BaseException], ...],
    codes: ErrorCodes[grpc.StatusCode],
    *,
    trailers: Trailers = _no_trailers,
) -> Callable[[H], H]:
    """Decorate a servicer method ``(self, request, context)``: ``errors`` become statuses."""

    def wrap(handler: H) -> H:
        if inspect.isasyncgenfunction(handler):

            @functools.wraps(handler)
            async def stream(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
                try:
                    async for item in handler(self, request, context):
                        yield item
                except errors as exc:
                    await abort_with(context, codes, exc, trailers)

            return cast(H, stream)

        @functools.wraps(handler)
        async def unary(self: Any, request: Any, context: Context) -> Any:
            try:
                return await handler(self, request, context)
            except errors as exc:
                await abort_with(context, codes, exc, trailers)

        return cast(H, unary)

    return wrap
