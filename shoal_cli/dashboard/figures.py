"""Live figures from sidecars' Prometheus pages: requests/s, error share, p50 and p99.

Pure: no grpc, no web framework. One scrape of a sidecar's ``/metrics`` becomes a
``Reading`` (counter values keyed by what they count, summed over methods); a
``History`` keeps one target's readings over a sliding window and says how much each
counter grew in it (``Growth``), taking a counter that went down as reset (its sidecar
restarted), as Prometheus' ``increase`` does; a ``Tally`` adds growths up over the
instances of a service or the calls of an edge and gives ``Figures``, the quantiles
interpolated in the histogram's buckets as Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "UNKNOWN",
    "Bucket",
    "Calls",
    "Denied",
    "Figures",
    "Growth",
    "History",
    "Reading",
    "Tally",
    "histogram_quantile",
    "parse_page",
]

REQUESTS = "shoal_sidecar_requests_total"
BUCKETS = "shoal_sidecar_request_duration_seconds_bucket"
DENIED = "shoal_sidecar_inbound_denied_total"
# A caller the sidecar could not name (no mTLS, or a page from before the label).
UNKNOWN = "unknown"
OK = "OK"
# A sidecar bounds its own labels; this bounds what a page that is no sidecar's costs us.
MAX_KEYS = 20_000
WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class Calls:
    """Calls that ended with ``code``, of one direction, caller and gRPC service."""

    direction: str
    caller: str
    service: str
    code: str


@dataclass(frozen=True, slots=True)
class Bucket:
    """Calls of one direction, caller and gRPC service that took at most ``le`` seconds."""

    direction: str
    caller: str
    service: str
    le: float


@dataclass(frozen=True, slots=True)
class Denied:
    """Inbound calls refused by policy: ``source`` is the caller's SPIFFE ID or ""."""

    source: str
    destination: str


Key = Calls | Bucket | Denied
Reading = dict[Key, float]


def parse_page(text: str) -> Reading:
    """The counters of one sidecar page that the dashboard shows; ``ValueError`` if it
    is no Prometheus text."""
    reading: Reading = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, float(sample.value)
            if not math.isfinite(value):
                continue
            key: Key
            if sample.name == REQUESTS:
                key = Calls(*_call_labels(labels), labels.get("code", ""))
            elif sample.name == BUCKETS:
                le = float(labels.get("le", "nan"))
                if math.isnan(le):
                    continue  # no bound: no bucket (and no NaN in the page's JSON)
                key = Bucket(*_call_labels(labels), le)
            elif sample.name == DENIED:
                key = Denied(labels.get("source", ""), labels.get("destination", ""))
            else:
                continue
            if key in reading or len(reading) < MAX_KEYS:
                reading[key] = reading.get(key, 0.0) + value
    return reading


def _call_labels(labels: Mapping[str, str]) -> tuple[str, str, str]:
    return labels.get("direction", ""), labels.get("caller") or UNKNOWN, labels.get("service", "")


@dataclass(frozen=True, slots=True)
class Growth:
    """How much each counter of one target grew over ``seconds``."""

    grown: Mapping[Key, float] = field(default_factory=dict)
    seconds: float = 0.0


class History:
    """One target's readings over the last ``window`` seconds, at most ``max_readings``."""

    def __init__(self, window: float = WINDOW, max_readings: int = 64) -> None:
        if window <= 0 or max_readings < 2:
            raise ValueError("a history needs a window > 0 and room for two readings")
        self.window = window
        self._readings: deque[tuple[float, Reading]] = deque(maxlen=max_readings)

    def __len__(self) -> int:
        return len(self._readings)

    @property
    def latest(self) -> Reading:
        return self._readings[-1][1] if self._readings else {}

    def add(self, at: float, reading: Reading) -> None:
        """Keep ``reading`` taken at ``at`` (monotonic seconds); an older one is ignored."""
        if self._readings and at <= self._readings[-1][0]:
            return
        self._readings.append((at, reading))
        # Keep the newest reading from before the window too: the span then covers it all.
        while len(self._readings) > 2 and self._readings[1][0] <= at - self.window:
            self._readings.popleft()

    def growth(self, now: float | None = None) -> Growth:
        """The growth over the window; nothing before a second reading, nor when the
        newest is older than the window at ``now`` (the target stopped answering)."""
        if len(self._readings) < 2:
            return Growth()
        if now is not None and self._readings[-1][0] < now - self.window:
            return Growth()
        grown: dict[Key, float] = {}
        for (_, before), (_, after) in pairwise(self._readings):
            for key, value in after.items():
                # A series new since the reading before started from zero in between.
                old = before.get(key, 0.0)
                grown[key] = grown.get(key, 0.0) + (value - old if value >= old else value)
        return Growth(grown, self._readings[-1][0] - self._readings[0][0])


@dataclass(frozen=True, slots=True)
class Figures:
    """Calls over a window: ``rps`` per second, ``error_rate`` the share that did not end
    OK, quantiles in seconds; None where there were no calls to measure."""

    rps: float = 0.0
    error_rate: float | None = None
    p50: float | None = None
    p99: float | None = None
    calls: float = 0.0

    def as_json(self) -> dict[str, Any]:
        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000, 3)

        rate = None if self.error_rate is None else round(self.error_rate, 4)
        return {
            "rps": round(self.rps, 2),
            "error_rate": rate,
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
            "calls": round(self.calls),
        }


class Tally:
    """Calls added up over targets (a service's instances, an edge's callees)."""

    def __init__(self) -> None:
        self.rps = 0.0
        self.calls = 0.0
        self.errors = 0.0
        self.buckets: dict[float, float] = {}

    def add(self, key: Calls | Bucket, grew: float, seconds: float) -> None:
        """Count ``grew`` of ``key``'s counter, grown over ``seconds``."""
        if seconds <= 0:
            return
        if isinstance(key, Calls):
            self.calls += grew
            self.rps += grew / seconds
            if key.code != OK:
                self.errors += grew
        else:
            self.buckets[key.le] = self.buckets.get(key.le, 0.0) + grew

    def figures(self) -> Figures:
        if self.calls <= 0:
            return Figures(rps=self.rps)
        return Figures(
            rps=self.rps,
            error_rate=self.errors / self.calls,
            p50=histogram_quantile(0.5, self.buckets),
            p99=histogram_quantile(0.99, self.buckets),
            calls=self.calls,
        )


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a histogram, as Prometheus' ``histogram_quantile`` gives it.

    ``buckets`` maps upper bounds (``le``, ``+Inf`` included) to cumulative counts.
    Linear interpolation within the bucket the rank falls in, from 0 for the first
    bucket; in the ``+Inf`` bucket, the highest finite bound. None without calls or
    without the ``+Inf`` bucket (Prometheus' NaN).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile is within [0, 1], got {q}")
    if math.inf not in buckets or len(buckets) < 2:
        return None
    bounds = sorted(buckets)
    counts = [buckets[b] for b in bounds]
    # Buckets reset one by one may break the cumulative order: mend it as Prometheus does.
    for i in range(1, len(counts)):
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    b = bisect.bisect_left(counts, rank, 0, len(counts) - 1)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, below = (0.0, 0.0) if b == 0 else (bounds[b - 1], counts[b - 1])
    inside = counts[b] - below
    if inside <= 0:
        return start
    return start + (bounds[b] - start) * (rank - below) / inside
