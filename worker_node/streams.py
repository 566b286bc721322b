"""CallStream's engine: batches of calls in, batches of results out (protobuf, no gRPC).

Items are submitted straight to the pools as they arrive, each with a done
callback instead of a coroutine, and results are sent in batches of whatever
finished since the last send. At most ``window`` items are in flight per
stream: past that the stream reads no further messages, so a fast sender is
held back by HTTP/2 flow control instead of by memory. Items the pool cannot
queue fail alone, with the status a unary Call would get. When the stream is traced,
each item gets its own queue-wait and execute spans inside the stream's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

from protos import worker_pb2 as pb
from worker_node.errors import InvalidRequest, NotFound, WorkerError
from worker_node.pool import Pool
from worker_node.poolproc import TaskOutcome

if TYPE_CHECKING:
    from worker_node.tracing import CallTrace, WorkSpans

__all__ = ["Finished", "run_call_stream"]

Finished = tuple[pb.CallItem, TaskOutcome | WorkerError]


async def run_call_stream(
    requests: AsyncIterator[pb.CallBatch],
    pool_of: Mapping[str, Pool],
    max_payload: int,
    window: int,
    trace: CallTrace | None = None,
) -> AsyncIterator[list[Finished]]:
    """Run every item of every batch; yield lists of finished items until all are done."""
    finished: list[Finished] = []
    wake = asyncio.Event()
    room = asyncio.Event()
    room.set()
    pending: set[asyncio.Future[TaskOutcome]] = set()
    reading = True

    def settle(item: pb.CallItem, fut: asyncio.Future[TaskOutcome]) -> None:
        pending.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            finished.append((item, fut.result()))
        elif isinstance(exc, WorkerError):
            finished.append((item, exc))
        else:
            finished.append((item, WorkerError(f"internal error: {exc!r}")))
        wake.set()
        if len(pending) < window:
            room.set()

    def submit(item: pb.CallItem) -> None:
        pool = pool_of.get(item.function)
        work: WorkSpans | None = None
        try:
            if pool is None:
                raise NotFound(f"function {item.function!r} is not in this worker's allowlist")
            if len(item.payload) > max_payload:
                raise InvalidRequest(
                    f"payload is {len(item.payload)} bytes; the limit is {max_payload}"
                )
            if trace is not None:
                work = trace.task(pool.name, item.function)
            fut = pool.submit(item.function, item.payload, item.timeout_ms / 1000, work)
        except WorkerError as exc:
            if work is not None:
                work.done(str(exc))
            finished.append((item, exc))
            wake.set()
            return
        pending.add(fut)
        fut.add_done_callback(lambda f, item=item: settle(item, f))  # type: ignore[misc]

    async def read() -> None:
        nonlocal reading
        try:
            async for batch in requests:
                for item in batch.items:
                    while len(pending) >= window:
                        room.clear()
                        await room.wait()
                    submit(item)
        finally:
            reading = False
            wake.set()

    reader = asyncio.create_task(read(), name="call-stream-reader")
    try:
        while True:
            await wake.wait()
            wake.clear()
            if finished:
                batch, finished = finished, []
                yield batch
            if reader.done() and not pending and not finished:
                reader.result()  # a broken request stream surfaces here
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        # The caller is gone or done: queued items need not run.
        for fut in list(pending):
            fut.cancel()
