"""Retry pacing and admission (no gRPC): the retry budget, backoff and circuit breaker limits."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

__all__ = ["CircuitBreaker", "RetryBudget", "backoff_delay", "no_counts"]


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
    """The limits of one upstream's circuit breaker, and its counts.

    The data plane holds the slots (``max_in_flight`` calls running, ``max_pending``
    waiting, then RESOURCE_EXHAUSTED at once); ``counts(key)`` reads them back as
    (in flight, pending, rejected).
    """

    __slots__ = ("key", "max_in_flight", "max_pending", "_counts")

    def __init__(
        self,
        key: str,
        *,
        max_in_flight: int,
        max_pending: int,
        counts: Callable[[str], tuple[int, int, int]],
    ) -> None:
        self.key = key
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self._counts = counts

    @property
    def in_flight(self) -> int:
        return self._counts(self.key)[0]

    @property
    def pending(self) -> int:
        return self._counts(self.key)[1]

    @property
    def rejected(self) -> int:
        return self._counts(self.key)[2]


def no_counts(key: str) -> tuple[int, int, int]:
    """Counts of a breaker no data plane holds yet."""
    return (0, 0, 0)
