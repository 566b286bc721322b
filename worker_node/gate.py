"""A concurrency limit with a bounded waiting line: beyond it, refuse at once."""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType

from worker_node.errors import Overloaded

__all__ = ["Gate"]


class Gate:
    """At most ``limit`` holders and ``queue`` waiters; ``async with gate:`` to hold a slot."""

    def __init__(self, limit: int, queue: int, what: str) -> None:
        self._free = limit
        self._queue = queue
        self._what = what
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.limit = limit

    @property
    def holders(self) -> int:
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self._queue:
            raise Overloaded(
                f"{self._what} is at capacity: {self.limit} running, {len(self._waiters)} waiting"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # the slot was handed over just as the caller left
            else:
                self._waiters.remove(fut)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1
