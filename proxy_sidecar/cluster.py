"""One upstream service as the forwarder sees it (no gRPC): pick, record, admit.

A ``Cluster`` holds what applies to the endpoints of one gRPC service: its
balancer, outlier detector, circuit breaker and retry budget. The routable list
it hands to the balancer is rebuilt only when the endpoint table, the ejections
or an endpoint's reachability change, so a pick costs a couple of comparisons
plus the policy itself.

Threads: a cluster is used by the data plane's thread, which alone changes its
state (picks, outcomes, ejections, the routable list); it reads the endpoint table
only through the table's immutable ``view``. The event loop only reads it, for the
admin page and metrics (``snapshot``, ``code_counts`` and the counters), and never
iterates a structure the other thread changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from shoal_dataplane import Breaker

from proxy_sidecar.balancers import Balancer
from proxy_sidecar.config import OutlierSettings, ServicePolicy
from proxy_sidecar.endpoints import Endpoint, EndpointTable
from proxy_sidecar.errors import NoHealthyEndpoint, UnknownService
from proxy_sidecar.outlier import OutlierDetector
from proxy_sidecar.policies import EWMA_DECAY
from proxy_sidecar.resilience import RetryBudget
from shoal_core.backoff import Backoff
from shoal_core.codes import CODE_NAMES

__all__ = ["Cluster"]


class Cluster:
    """The endpoints serving one gRPC service, and the policies that apply to calls to it."""

    def __init__(
        self,
        service: str,
        table: EndpointTable,
        policy: ServicePolicy,
        balancer: Balancer,
        outlier: OutlierSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.policy = policy
        self.balancer = balancer
        self.retry = policy.retry
        self.backoff = Backoff(initial=policy.retry.backoff_base, maximum=policy.retry.backoff_max)
        self.per_try_timeout = policy.per_try_timeout
        self.hash_key = policy.hash_key if balancer.uses_key else None
        # The data plane holds its slots and queue places; it lives as long as this cluster.
        self.breaker = Breaker(
            max_in_flight=policy.circuit_breaker.max_in_flight,
            max_pending=policy.circuit_breaker.max_pending,
        )
        self.budget = RetryBudget(
            percent=policy.retry.budget_percent,
            min_per_second=policy.retry.budget_min_per_second,
            clock=clock,
        )
        self.outlier = OutlierDetector(
            consecutive_failures=outlier.consecutive_failures,
            base_ejection=outlier.base_ejection,
            max_ejection=outlier.max_ejection,
            max_ejected_percent=outlier.max_ejected_percent,
        )
        self._panic_share = outlier.panic_threshold / 100.0
        self._table = table
        self._clock = clock
        self._seen = (-1, -1)
        self._members: tuple[Endpoint, ...] = ()
        self._routable: list[Endpoint] = []
        self.panic = False
        self.known = False
        self.requests = 0
        self.retries = 0
        # Calls by gRPC status number (a list: counting is one index, every call).
        self.codes = [0] * len(CODE_NAMES)

    def members(self) -> tuple[Endpoint, ...]:
        return self._members

    def count(self, code: int) -> None:
        """One call ended with ``code``; numbers gRPC does not define count as UNKNOWN."""
        if not 0 <= code < len(self.codes):
            code = 2
        self.codes[code] += 1

    def code_counts(self) -> dict[str, int]:
        """Calls by status name so far: a copy, safe to read on another thread."""
        counts = list(self.codes)
        return {CODE_NAMES[code]: n for code, n in enumerate(counts) if n}

    def _refresh(self, now: float) -> None:
        self.outlier.release_due(now)
        view = self._table.view
        seen = (view.version, self.outlier.version)
        if seen == self._seen:
            return
        members = view.members_of(self.service)
        self.known = members is not None
        self._members = members or ()
        self.outlier.forget(set(self._members))
        healthy = [e for e in self._members if e.reachable and not self.outlier.is_ejected(e)]
        # Panic: with too few healthy endpoints, spreading over all of them beats
        # crushing the few that are left (and a wrong health view heals itself).
        self.panic = bool(self._members) and len(healthy) < self._panic_share * len(self._members)
        self._routable = list(self._members) if self.panic else healthy
        self._seen = seen

    def pick(
        self, key: str | None, exclude: Collection[Endpoint] = (), now: float | None = None
    ) -> Endpoint:
        """The endpoint for the next try; prefers endpoints not in ``exclude``."""
        if now is None:
            now = self._clock()
        view = self._table.view
        if now >= self.outlier.next_return or self._seen[0] != view.version:
            self._refresh(now)
        routable = self._routable
        if not routable:
            if not self.known and view.synced:
                raise UnknownService(self.service)
            if not view.synced:
                raise NoHealthyEndpoint(self.service, "the registry has not been reached yet")
            raise NoHealthyEndpoint(self.service, "every instance is down or ejected")
        endpoint = self.balancer.pick(routable, key, exclude)
        if endpoint is None:
            # Every endpoint was tried already: trying one again beats failing.
            endpoint = self.balancer.pick(routable, key, ())
            assert endpoint is not None
        return endpoint

    def record(self, endpoint: Endpoint, ok: bool, latency: float) -> None:
        """The outcome of one try on ``endpoint``: feeds the EWMA and outlier detection."""
        now = self._clock()
        endpoint.observe_latency(latency, now, EWMA_DECAY)
        endpoint.requests += 1
        if ok:
            self.outlier.success(endpoint)
            return
        endpoint.failures += 1
        if self.outlier.failure(endpoint, now, len(self._members)):
            self._refresh(now)

    def snapshot(self) -> dict[str, object]:
        """This cluster's state for the admin endpoint (JSON-ready), read on the event loop.

        It reads the table's current view and changes nothing: the cluster's own state
        belongs to the data plane's thread.
        """
        now = self._clock()
        members = self._table.view.members_of(self.service) or ()
        endpoints = []
        for e in members:
            until = self.outlier.ejected_until(e)
            endpoints.append(
                {
                    "instance_id": e.instance_id,
                    "address": e.address,
                    "state": e.state,
                    "reachable": e.reachable,
                    "routable": e.reachable and (until is None or self.panic),
                    "in_flight": e.in_flight,
                    "ewma_ms": round(e.latency_estimate(now, EWMA_DECAY) * 1000, 3),
                    "ejected": until is not None,
                    "ejected_for_s": None if until is None else round(until - now, 3),
                    "ejections": self.outlier.ejections(e),
                    "requests": e.requests,
                    "failures": e.failures,
                    "weight": e.weight,
                    "reported_load": {
                        "in_flight": e.info.load_in_flight,
                        "queue_depth": e.info.load_queue_depth,
                        "cpu_percent": e.info.load_cpu_percent,
                    },
                }
            )
        return {
            "lb": self.balancer.name,
            "panic": self.panic,
            "in_flight": self.breaker.in_flight,
            "pending": self.breaker.pending,
            "requests": self.requests,
            "retries": self.retries,
            "retry_budget_denied": self.budget.denied,
            "breaker_rejected": self.breaker.rejected,
            "codes": self.code_counts(),
            "endpoints": endpoints,
        }
