"""Request counters and latency histograms, cheap enough for every call.

Each call is counted twice, both O(1) with no samples kept: in a Prometheus histogram
of its method and outcome (``shoal_core.metrics.Histogram``, buckets from 100 us to
10 s, which sum across workers), and in ``LatencyHistogram``, whose fine log-spaced
buckets, each 2^(1/4) (about 19 %) wider than the last from 10 µs to about two
minutes, give the Stats RPC its percentiles within a bucket's width (the Prometheus
buckets, up to 2.5 times wide, would blur them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from shoal_core.metrics import Histogram

__all__ = ["LatencyHistogram", "MethodStats", "WorkerStats"]

_BASE = 1e-5
_STEP = 2**0.25
_LOG_STEP = math.log(_STEP)
BUCKETS = 96


class LatencyHistogram:
    """Counts of durations in log-spaced buckets; ``quantile`` reads percentiles."""

    __slots__ = ("counts", "total", "sum")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.total = 0
        self.sum = 0.0

    def record(self, seconds: float) -> None:
        if seconds <= _BASE:
            index = 0
        else:
            index = min(BUCKETS - 1, math.ceil(math.log(seconds / _BASE) / _LOG_STEP))
        self.counts[index] += 1
        self.total += 1
        self.sum += seconds

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) in seconds, as the upper bound of its bucket; 0 if empty."""
        if not self.total:
            return 0.0
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return _BASE * _STEP ** min(index, BUCKETS - 2)
        return _BASE * _STEP ** (BUCKETS - 2)


@dataclass(slots=True)
class MethodStats:
    """Requests of one method: their durations by outcome, and for percentiles."""

    ok_seconds: Histogram = field(default_factory=Histogram)
    failed_seconds: Histogram = field(default_factory=Histogram)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def ok(self) -> int:
        return self.ok_seconds.count

    @property
    def failed(self) -> int:
        return self.failed_seconds.count

    @property
    def total(self) -> int:
        return self.latency.total


class WorkerStats:
    """Every method's counters and latencies, and the start time."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.methods: dict[str, MethodStats] = {}
        # Echo is only counted: timing it would be the extra work it must not do.
        self.echo_total = 0

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    def record(self, method: str, seconds: float, ok: bool) -> None:
        stats = self.methods.get(method)
        if stats is None:
            stats = self.methods[method] = MethodStats()
        (stats.ok_seconds if ok else stats.failed_seconds).observe(seconds)
        stats.latency.record(seconds)
