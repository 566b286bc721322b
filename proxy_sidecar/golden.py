"""The sidecar's golden metrics, kept per call at the cost of a few integer increments.

For every call, inbound (from other sidecars, to our app) and outbound (from our app,
into the mesh): how many, by gRPC service, method and status, how long (a histogram
whose buckets fit calls from 100 us to 10 s), and how many are in flight. ``Control``
hands each call its ``Series`` when it admits it; the call counts itself in when it
starts and out when it ends, on the data plane's thread. ``/metrics`` reads the plain
numbers when it is scraped (``metrics.SidecarCollector``), so a call never pays for a
metric object.

Labels stay bounded whatever callers send: past ``MAX_SERVICES`` gRPC services, or
``MAX_METHODS`` methods of one service, a call is counted under ``"other"``. A call whose
path is no gRPC path is never admitted, so it is not counted here.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator

__all__ = ["BUCKETS", "GoldenStats", "Series"]

# Seconds: 100 us to 10 s, about three buckets a decade.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
MAX_SERVICES = 64
MAX_METHODS = 64
OTHER = "other"


class Series:
    """One (direction, service, method): calls by status code, their durations."""

    __slots__ = ("buckets", "codes", "count", "in_flight", "sum")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        # One more than BUCKETS: the last counts what is over 10 s (+Inf).
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.in_flight = 0

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, code: int, seconds: float) -> None:
        self.in_flight -= 1
        self.codes[code] = self.codes.get(code, 0) + 1
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus' cumulative buckets, ``le`` as text, ending with ``+Inf``."""
        out, total = [], 0
        for bound, hits in zip((*map(str, BUCKETS), "+Inf"), self.buckets, strict=True):
            total += hits
            out.append((bound, total))
        return out


class GoldenStats:
    """Every ``Series`` of one sidecar, made on first use, bounded."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], Series] = {}
        self._methods: dict[tuple[str, str], set[str]] = {}
        # Series are made on the data plane's thread and listed on the event loop's.
        self._lock = threading.Lock()

    def series(self, inbound: bool, service: str, method: str) -> Series:
        """The series of a call; ``Control`` caches it per path, so this is rare."""
        direction = "inbound" if inbound else "outbound"
        with self._lock:
            known = self._methods.get((direction, service))
            if known is None:
                services = sum(1 for d, _ in self._methods if d == direction)
                if services >= MAX_SERVICES:
                    service, method = OTHER, OTHER
                known = self._methods.setdefault((direction, service), set())
            if method not in known and len(known) >= MAX_METHODS:
                method = OTHER
            known.add(method)
            key = (direction, service, method)
            found = self._series.get(key)
            if found is None:
                found = self._series[key] = Series()
            return found

    def items(self) -> Iterator[tuple[tuple[str, str, str], Series]]:
        """(direction, service, method) and its series, for a scrape."""
        with self._lock:
            listed = sorted(self._series.items())
        yield from listed
