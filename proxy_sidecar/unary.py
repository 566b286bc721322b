"""The fast path: a unary-unary call forwarded as one request and one response.

Used for the methods known to be unary (see ``shapes``). The request bytes are
in hand before the first try, so a retry simply sends them again, and grpc.aio
needs no request-feeding or response-reading machinery: about half the
per-call work of the stream path, with the same semantics.
"""

from __future__ import annotations

import asyncio

import grpc

from proxy_sidecar.pool import ChannelPool
from proxy_sidecar.tries import Context, Metadata, Tries, code_of, pairs, relay_failure

__all__ = ["relay_unary"]

_OK = grpc.StatusCode.OK


async def relay_unary(
    pool: ChannelPool,
    tries: Tries,
    path: str,
    request: bytes,
    metadata: Metadata,
    context: Context,
) -> bytes:
    """Forward ``request`` to ``path`` upstream; the response, or ``b""`` after a failure."""
    pause: float | None = None
    while True:
        if pause is not None:
            await asyncio.sleep(pause)
        endpoint = tries.pick()
        call = pool.unary(endpoint, path)(request, timeout=tries.timeout(), metadata=metadata)
        endpoint.in_flight += 1
        started = tries.now()
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            code = code_of(exc)
            pause = tries.retry_pause(endpoint, code, started, replayable=True)
            if pause is not None:
                continue
            await relay_failure(context, exc, code, tries.mark(endpoint))
            tries.done(code)
            # A non-OK status discards the response message.
            return b""
        finally:
            endpoint.in_flight -= 1
            if not call.done():
                # Our caller cancelled (or went past its deadline): pass it upstream.
                call.cancel()
        tries.succeeded(endpoint, started)
        initial = await call.initial_metadata()
        if initial:
            await context.send_initial_metadata(pairs(initial))
        trailing = pairs(await call.trailing_metadata()) + tries.mark(endpoint)
        if trailing:
            context.set_trailing_metadata(trailing)
        tries.done(_OK)
        return response
