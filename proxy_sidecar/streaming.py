"""The general path: any call shape forwarded as a stream of raw messages.

On the wire every call is a stream, so one ``stream_stream`` handler carries all
four shapes unchanged. A try may be retried only before the first response
message (after that the response is committed to the caller) and only while the
request messages sent so far are still buffered (see ``replay``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from proxy_sidecar.pool import ChannelPool
from proxy_sidecar.replay import RequestStream
from proxy_sidecar.tries import Context, Metadata, Tries, code_of, pairs, relay_failure

__all__ = ["relay_stream"]

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
_OK = grpc.StatusCode.OK


async def relay_stream(
    pool: ChannelPool, tries: Tries, path: str, metadata: Metadata, context: Context
) -> None:
    """Forward the call in ``context`` to ``path`` upstream, retrying as ``tries`` allows."""
    requests = RequestStream(context)
    pause: float | None = None
    try:
        while True:
            if pause is not None:
                await asyncio.sleep(pause)
            endpoint = tries.pick()
            call = pool.stream(endpoint, path)(
                requests.replay(), timeout=tries.timeout(), metadata=metadata
            )
            endpoint.in_flight += 1
            started = tries.now()
            try:
                try:
                    first = await call.read()
                except grpc.aio.AioRpcError as exc:
                    code = code_of(exc)
                    pause = tries.retry_pause(
                        endpoint, code, started, replayable=not requests.committed
                    )
                    if pause is not None:
                        continue
                    await relay_failure(context, exc, code, tries.mark(endpoint))
                    tries.done(code)
                    return
                tries.succeeded(endpoint, started)
                requests.commit()
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(pairs(initial))
                message: Any = first
                while message is not _EOF:
                    await context.write(message)
                    message = await call.read()
                trailing = pairs(await call.trailing_metadata()) + tries.mark(endpoint)
                if trailing:
                    context.set_trailing_metadata(trailing)
                tries.done(_OK)
                return
            except grpc.aio.AioRpcError as exc:
                # Failed after the response had begun: nothing can be retried now.
                code = code_of(exc)
                await relay_failure(context, exc, code, tries.mark(endpoint), headers_sent=True)
                tries.done(code)
                return
            finally:
                endpoint.in_flight -= 1
                if not call.done():
                    call.cancel()
    finally:
        requests.close()
