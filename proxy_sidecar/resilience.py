"""Retry pacing (no gRPC): the retry budget. The pause between tries is
``shoal_core.backoff``'s, as every retry loop's in Shoal is.

The circuit breaker is the data plane's (``shoal_dataplane.Breaker``): it holds the
slots, so a call's slot is freed however the call ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["RetryBudget"]


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
        # The bucket of the current second, and when the next second starts: recording a
        # request (every call) is then one comparison and one addition.
        self._current = 0
        self._next_second = -math.inf
        self.granted = 0
        self.denied = 0

    def _bucket(self, second: int) -> int:
        i = second % self._window
        if self._stamps[i] != second:
            self._stamps[i] = second
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def record_request(self, now: float | None = None) -> None:
        """Count one request, made at ``now`` (default: the clock's time)."""
        if now is None:
            now = self._clock()
        if now >= self._next_second:
            second = int(now)
            self._current = self._bucket(second)
            self._next_second = second + 1
        self._requests[self._current] += 1

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
