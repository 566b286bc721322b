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

import threading
from collections.abc import Iterator

from shoal_core.metrics import LATENCY_BUCKETS, Histogram

__all__ = ["BUCKETS", "GoldenStats", "Series"]

BUCKETS = LATENCY_BUCKETS  # 100 us to 10 s, about three buckets a decade
MAX_SERVICES = 64
MAX_METHODS = 64
OTHER = "other"


class Series:
    """One (direction, service, method): calls by status code, their durations."""

    __slots__ = ("codes", "duration", "in_flight")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.duration = Histogram(BUCKETS)  # counted from the data plane's thread only
        self.in_flight = 0

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, code: int, seconds: float) -> None:
        self.in_flight -= 1
        self.codes[code] = self.codes.get(code, 0) + 1
        self.duration.observe(seconds)


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
