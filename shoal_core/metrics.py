"""Prometheus metrics primitives shared by the services.

Each service keeps its metrics in its own ``CollectorRegistry`` so that tests
can run several servers in one process without name clashes, and exposes them
as a ``/metrics`` page of its ``shoal_core.http.HttpServer``.

Hot paths never touch a prometheus_client metric: they bump plain numbers (a
``Histogram`` here, counters of their own), and a collector turns those into metric
families when the page is scraped. prometheus_client itself (+1.5 MiB with what it
imports) is loaded only when something here needs it, so a process can count into a
``Histogram`` from its first call and load it at its first scrape.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shoal_core.http import Page, PageBuilder

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import HistogramMetricFamily

__all__ = [
    "LATENCY_BUCKETS",
    "Histogram",
    "histogram_family",
    "metrics_page",
    "render",
]

# Seconds: calls from 100 us to 10 s, about three buckets a decade.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    """Observations counted in fixed buckets, for a Prometheus histogram read at scrape time.

    ``observe`` is a bisect on a tuple and two additions, cheap enough for every call;
    it takes no lock, so each histogram belongs to one thread (the event loop's, say).
    ``bounds`` are the buckets' upper bounds (``le``), finite and increasing; one more
    bucket counts what is above the last (``+Inf``).
    """

    __slots__ = ("_les", "bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or not all(math.isfinite(b) for b in bounds):
            raise ValueError("histogram bounds must be finite, and at least one")
        if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"histogram bounds must increase: {bounds}")
        self.bounds = bounds
        self._les = (*map(repr, bounds), "+Inf")
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is at least ``value``."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far (the ``_count`` sample)."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' cumulative buckets, ``le`` as Prometheus writes it, ending at ``+Inf``."""
        out: list[tuple[str, float]] = []
        total = 0
        for le, hits in zip(self._les, self.counts, strict=True):
            total += hits
            out.append((le, total))
        return out

    def add_to(self, family: HistogramMetricFamily, labels: Sequence[str]) -> None:
        """Add this histogram to ``family`` as the series of ``labels``."""
        family.add_metric(list(labels), self.cumulative(), self.sum)


def histogram_family(name: str, documentation: str, labels: Sequence[str]) -> HistogramMetricFamily:
    """An empty histogram family, for ``Histogram.add_to``; ``name`` without ``_bucket``."""
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, documentation, labels=list(labels))


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format."""
    from prometheus_client import generate_latest

    return generate_latest(registry)


def metrics_page(registry: CollectorRegistry) -> PageBuilder:
    """A page builder for ``/metrics``: the registry as Prometheus scrapes it."""

    from prometheus_client import CONTENT_TYPE_LATEST

    def page() -> Page:
        return 200, CONTENT_TYPE_LATEST, render(registry)

    return page
