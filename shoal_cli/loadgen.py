"""Small helpers for the CLI's load: a rolling window of results and percentiles."""

from __future__ import annotations

import time

__all__ = ["LoadWindow", "percentile"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class LoadWindow:
    """Latencies and errors since the last ``take()``."""

    def __init__(self) -> None:
        self._latencies: list[float] = []
        self._errors = 0
        self._since = time.monotonic()

    def ok(self, seconds: float) -> None:
        self._latencies.append(seconds)

    def failed(self) -> None:
        self._errors += 1

    def take(self) -> tuple[float, list[float], int]:
        """(requests per second, latencies, errors) since the last call, then start anew."""
        now = time.monotonic()
        latencies, errors = self._latencies, self._errors
        rate = len(latencies) / max(now - self._since, 1e-9)
        self._latencies, self._errors, self._since = [], 0, now
        return rate, latencies, errors
