"""Retry pacing and admission (no gRPC): the retry budget, backoff and the circuit breaker."""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from collections.abc import Callable

from proxy_sidecar.errors import Overloaded

__all__ = ["CircuitBreaker", "RetryBudget", "backoff_delay"]


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter before retry number ``retry`` (0-based)."""
    return rng.uniform(0.0, min(cap, base * (2.0**retry)))


class RetryBudget:
    """Retries allowed: ``percent`` of the requests of the last ``window`` seconds, plus
    ``min_per_second`` per second, so retries can never multiply an outage.

    Counts live in one-second buckets, so recording a request is two integer
    operations; the window is summed only when a retry asks.
    """

    def __init__(
        self,
        *,
        percent: float = 20.0,
        min_per_second: float = 10.0,
        window: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = percent / 100.0
        self._reserve = min_per_second * window
        self._window = window
        self._clock = clock
        self._stamps = [-1] * window
        self._requests = [0] * window
        self._retries = [0] * window
        self.granted = 0
        self.denied = 0

    def _bucket(self, second: int) -> int:
        i = second % self._window
        if self._stamps[i] != second:
            self._stamps[i] = second
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def record_request(self) -> None:
        self._requests[self._bucket(int(self._clock()))] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        second = int(self._clock())
        current = self._bucket(second)
        oldest = second - self._window + 1
        requests = retries = 0
        for i in range(self._window):
            if self._stamps[i] >= oldest:
                requests += self._requests[i]
                retries += self._retries[i]
        if retries + 1 > math.floor(self._ratio * requests + self._reserve):
            self.denied += 1
            return False
        self._retries[current] += 1
        self.granted += 1
        return True


class CircuitBreaker:
    """Bounds the calls to one upstream: ``max_in_flight`` running and ``max_pending``
    waiting for a slot; beyond that a call fails fast with ``Overloaded``."""

    def __init__(self, service: str, *, max_in_flight: int, max_pending: int) -> None:
        self._service = service
        self._max_in_flight = max_in_flight
        self._max_pending = max_pending
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.in_flight = 0
        self.rejected = 0

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a free slot at once if there is one (no coroutine: the common case)."""
        if self.in_flight < self._max_in_flight and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def acquire(self, timeout: float | None) -> None:
        """Take a slot, waiting at most ``timeout`` seconds as a pending call."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self._max_pending or (timeout is not None and timeout <= 0):
            self.rejected += 1
            raise Overloaded(self._service, self.in_flight, len(self._waiters))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we gave up: pass it on.
                self.release()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                self.rejected += 1
                raise Overloaded(self._service, self.in_flight, len(self._waiters)) from None
            raise

    def release(self) -> None:
        """Free a slot, handing it straight to the oldest pending call if there is one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1
