"""A call's request messages, kept so a retry can send them again.

Until the call commits (its first response message arrived, or the request
outgrew ``REPLAY_LIMIT``), every message read from the client is kept, and each
try gets an iterator that replays them and then goes on with new ones. Reads
from the client are shared by all tries, so a try that ends in the middle of a
read loses nothing; after the commit, messages go straight through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

__all__ = ["REPLAY_LIMIT", "RequestStream"]

Context = grpc.aio.ServicerContext[bytes, bytes]

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
# Request bytes kept for replaying on a retry; a bigger request is not retried.
REPLAY_LIMIT = 1024 * 1024


class RequestStream:
    """The client's request stream, replayable for retries until the call commits."""

    __slots__ = ("_context", "_buffer", "_size", "_eof", "_reading", "_generation", "committed")

    def __init__(self, context: Context) -> None:
        self._context = context
        self._buffer: list[bytes] = []
        self._size = 0
        self._eof = False
        # One read from the client at a time, shared by the iterators of every try, so a
        # try that ends mid-read loses nothing.
        self._reading: asyncio.Task[None] | None = None
        self._generation = 0
        self.committed = False

    def replay(self) -> AsyncIterator[bytes]:
        """A fresh iterator: the messages so far, then new ones; stale iterators stop."""
        self._generation += 1
        return self._iterate(self._generation)

    async def _iterate(self, generation: int) -> AsyncIterator[bytes]:
        i = 0
        while generation == self._generation:
            if i < len(self._buffer):
                i += 1
                yield self._buffer[i - 1]
            elif self._eof:
                return
            elif self.committed and self._reading is None:
                message = await self._context.read()
                if message is _EOF:
                    self._eof = True
                    return
                yield message
            else:
                if self._reading is None:
                    self._reading = asyncio.ensure_future(self._read_one())
                await asyncio.shield(self._reading)

    async def _read_one(self) -> None:
        message = await self._context.read()
        self._reading = None
        if message is _EOF:
            self._eof = True
            return
        self._buffer.append(message)
        self._size += len(message)
        if self._size > REPLAY_LIMIT:
            self.committed = True

    def commit(self) -> None:
        """No more retries: stop keeping messages once the iterator has sent them."""
        self.committed = True

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None
