"""The built-in load balancers, registered under ``shoal.balancers`` in pyproject.toml.

Each is small and keeps only what it can rebuild from the endpoint list. The
two-choice policies (least_request, peak_ewma, least_loaded) sample two distinct
endpoints and take the better one: nearly as good as scanning all, at constant
cost, and without every sidecar piling onto the same "best" instance.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import time
from collections.abc import Collection, Sequence

from proxy_sidecar.balancers import Balancer
from proxy_sidecar.endpoints import Endpoint

__all__ = [
    "BUILTIN",
    "ConsistentHash",
    "LeastLoaded",
    "LeastRequest",
    "PeakEwma",
    "RandomChoice",
    "RoundRobin",
    "Weighted",
]

# How fast a latency sample is forgotten (seconds), for peak_ewma.
EWMA_DECAY = 10.0


def _first_allowed(
    endpoints: Sequence[Endpoint], start: int, exclude: Collection[Endpoint]
) -> Endpoint | None:
    n = len(endpoints)
    for i in range(n):
        endpoint = endpoints[(start + i) % n]
        if endpoint not in exclude:
            return endpoint
    return None


class RoundRobin(Balancer):
    """Each endpoint in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = itertools.count()

    def pick(
        self, endpoints: Sequence[Endpoint], key: str | None, exclude: Collection[Endpoint]
    ) -> Endpoint | None:
        endpoint = endpoints[next(self._next) % len(endpoints)]
        if endpoint in exclude:
            return _first_allowed(endpoints, next(self._next), exclude)
        return endpoint


class RandomChoice(Balancer):
    """A uniformly random endpoint."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, endpoints: Sequence[Endpoint], key: str | None, exclude: Collection[Endpoint]
    ) -> Endpoint | None:
        start = self._rng.randrange(len(endpoints))
        return _first_allowed(endpoints, start, exclude)


class _TwoChoices(Balancer):
    """Power of two choices over a cost; lower cost wins, ties go to the first sample."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def _cost(self, endpoint: Endpoint, now: float) -> float:
        raise NotImplementedError

    def pick(
        self, endpoints: Sequence[Endpoint], key: str | None, exclude: Collection[Endpoint]
    ) -> Endpoint | None:
        if exclude:
            endpoints = [e for e in endpoints if e not in exclude]
        n = len(endpoints)
        if n <= 1:
            return endpoints[0] if n else None
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = endpoints[i], endpoints[j]
        now = time.monotonic()
        return b if self._cost(b, now) < self._cost(a, now) else a


class LeastRequest(_TwoChoices):
    """Fewer calls in flight from this sidecar wins."""

    name = "least_request"

    def _cost(self, endpoint: Endpoint, now: float) -> float:
        return endpoint.in_flight


class PeakEwma(_TwoChoices):
    """Latency (peak EWMA) times the calls in flight plus one: slow or busy loses."""

    name = "peak_ewma"

    def _cost(self, endpoint: Endpoint, now: float) -> float:
        return endpoint.latency_estimate(now, EWMA_DECAY) * (endpoint.in_flight + 1)


class LeastLoaded(_TwoChoices):
    """The load the instance reports in its heartbeats, plus this sidecar's own calls."""

    name = "least_loaded"

    def _cost(self, endpoint: Endpoint, now: float) -> float:
        info = endpoint.info
        return (
            info.load_in_flight
            + info.load_queue_depth
            + endpoint.in_flight
            + info.load_cpu_percent / 100.0
        )


class Weighted(Balancer):
    """Random in proportion to each instance's registered weight."""

    name = "weighted"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._for: Sequence[Endpoint] | None = None
        self._cumulative: list[int] = []

    def pick(
        self, endpoints: Sequence[Endpoint], key: str | None, exclude: Collection[Endpoint]
    ) -> Endpoint | None:
        if self._for is not endpoints:
            self._cumulative = list(itertools.accumulate(max(1, e.weight) for e in endpoints))
            self._for = endpoints
        point = self._rng.randrange(self._cumulative[-1])
        index = bisect.bisect_right(self._cumulative, point)
        endpoint = endpoints[index]
        if endpoint in exclude:
            return _first_allowed(endpoints, index + 1, exclude)
        return endpoint


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class ConsistentHash(Balancer):
    """A hash ring keyed by a metadata value: one key sticks to one instance.

    Each endpoint has ``VNODES`` points on the ring (by instance id, so a restart
    at a new address keeps its keys); when an endpoint leaves, only its keys
    move. Calls without a key are spread at random.
    """

    name = "consistent_hash"
    uses_key = True
    VNODES = 100

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._for: Sequence[Endpoint] | None = None
        self._points: list[int] = []
        self._owners: list[Endpoint] = []

    def _build(self, endpoints: Sequence[Endpoint]) -> None:
        ring = sorted(
            ((_hash(f"{e.instance_id}#{v}"), e) for e in endpoints for v in range(self.VNODES)),
            key=lambda point: point[0],
        )
        self._points = [p for p, _ in ring]
        self._owners = [e for _, e in ring]
        self._for = endpoints

    def pick(
        self, endpoints: Sequence[Endpoint], key: str | None, exclude: Collection[Endpoint]
    ) -> Endpoint | None:
        if key is None:
            return _first_allowed(endpoints, self._rng.randrange(len(endpoints)), exclude)
        if self._for is not endpoints:
            self._build(endpoints)
        start = bisect.bisect_left(self._points, _hash(key)) % len(self._points)
        return _first_allowed(self._owners, start, exclude)


# The built-in policies by name; others come through the entry points (see balancers).
BUILTIN: dict[str, type[Balancer]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        RandomChoice,
        LeastRequest,
        Weighted,
        ConsistentHash,
        PeakEwma,
        LeastLoaded,
    )
}
