"""The sidecar's golden metrics, kept per call at the cost of a few integer increments.

For every call, inbound (from other sidecars, to our app) and outbound (from our app,
into the mesh): how many, by gRPC service, method, calling mesh service and status, how
long (a histogram whose buckets fit calls from 100 us to 10 s), how many message bytes
each way, and how many are in flight. The caller is named by its certificate (the
mesh service of an inbound call's peer; this sidecar's own for an outbound call), so
the callers of a service and what each sees can be told apart: who calls whom. ``Control``
hands each call its ``Series`` when it admits it; the call counts itself in when it
starts and out when it ends, on the data plane's thread. ``/metrics`` reads the plain
numbers when it is scraped (``metrics.SidecarCollector``), so a call never pays for a
metric object.

Labels stay bounded whatever callers send: past ``MAX_SERVICES`` gRPC services,
``MAX_METHODS`` methods of one service, or ``MAX_CALLERS`` callers, a call is counted
under ``"other"``. A call whose
path is no gRPC path is never admitted, so it is not counted here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from shoal_core.metrics import LATENCY_BUCKETS, Histogram

__all__ = ["BUCKETS", "UNKNOWN_CALLER", "GoldenStats", "Series", "caller_name"]

BUCKETS = LATENCY_BUCKETS  # 100 us to 10 s, about three buckets a decade
MAX_SERVICES = 64
MAX_METHODS = 64
MAX_CALLERS = 64
OTHER = "other"
# A caller that proved no identity (a plaintext mesh).
UNKNOWN_CALLER = "unknown"


def caller_name(spiffe_id: str | None) -> str:
    """How the ``caller`` label names a peer: its mesh service for a service's
    certificate (``spiffe://TD/svc/NAME`` is ``NAME``), the whole ID for another kind
    (an operator), ``unknown`` without one."""
    if not spiffe_id:
        return UNKNOWN_CALLER
    head, _, name = spiffe_id.rpartition("/svc/")
    return name if head.startswith("spiffe://") and name and "/" not in name else spiffe_id


class Series:
    """One (direction, service, method, caller): calls by status code, their durations,
    their message bytes."""

    __slots__ = ("codes", "duration", "in_flight", "request_bytes", "response_bytes")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.duration = Histogram(BUCKETS)  # counted from the data plane's thread only
        self.in_flight = 0
        self.request_bytes = 0
        self.response_bytes = 0

    def started(self) -> None:
        self.in_flight += 1

    def finished(
        self, code: int, seconds: float, request_bytes: int = 0, response_bytes: int = 0
    ) -> None:
        self.in_flight -= 1
        self.codes[code] = self.codes.get(code, 0) + 1
        self.duration.observe(seconds)
        self.request_bytes += request_bytes
        self.response_bytes += response_bytes


class GoldenStats:
    """Every ``Series`` of one sidecar, made on first use, bounded."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str, str], Series] = {}
        self._methods: dict[tuple[str, str], set[str]] = {}
        self._callers: dict[str, set[str]] = {}
        # Series are made on the data plane's thread and listed on the event loop's.
        self._lock = threading.Lock()

    def series(self, inbound: bool, service: str, method: str, caller: str) -> Series:
        """The series of a call; ``Control`` caches it per path and peer, so this is rare."""
        direction = "inbound" if inbound else "outbound"
        with self._lock:
            callers = self._callers.setdefault(direction, set())
            if caller not in callers and len(callers) >= MAX_CALLERS:
                caller = OTHER
            callers.add(caller)
            known = self._methods.get((direction, service))
            if known is None:
                services = sum(1 for d, _ in self._methods if d == direction)
                if services >= MAX_SERVICES:
                    service, method = OTHER, OTHER
                known = self._methods.setdefault((direction, service), set())
            if method not in known and len(known) >= MAX_METHODS:
                method = OTHER
            known.add(method)
            key = (direction, service, method, caller)
            found = self._series.get(key)
            if found is None:
                found = self._series[key] = Series()
            return found

    def items(self) -> Iterator[tuple[tuple[str, str, str, str], Series]]:
        """(direction, service, method, caller) and its series, for a scrape."""
        with self._lock:
            listed = sorted(self._series.items())
        yield from listed
