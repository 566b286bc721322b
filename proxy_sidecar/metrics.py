"""The sidecar's Prometheus metrics, read from its counters at scrape time.

The forwarding path only bumps plain integers; this collector turns them into
metric families when ``/metrics`` is scraped, so a call pays nothing for metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy_sidecar.authz import PolicyWatch
from proxy_sidecar.cluster import Cluster
from proxy_sidecar.discovery import Discovery

__all__ = ["SidecarCollector"]


class SidecarCollector(Collector):
    """Per-service calls, retries, rejections and ejections; per-endpoint in-flight."""

    def __init__(
        self,
        clusters: Callable[[], dict[str, Cluster]],
        discovery: Discovery,
        channels: Callable[[], int],
        policy: PolicyWatch | None = None,
    ) -> None:
        self._policy = policy
        self._clusters = clusters
        self._discovery = discovery
        self._channels = channels

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "shoal_sidecar_calls",
            "Calls forwarded, by gRPC service and status",
            labels=["service", "code"],
        )
        retries = CounterMetricFamily("shoal_sidecar_retries", "Retries sent", labels=["service"])
        denied = CounterMetricFamily(
            "shoal_sidecar_retries_denied",
            "Retries refused by the retry budget",
            labels=["service"],
        )
        rejected = CounterMetricFamily(
            "shoal_sidecar_breaker_rejected",
            "Calls refused by the circuit breaker",
            labels=["service"],
        )
        ejected = GaugeMetricFamily(
            "shoal_sidecar_ejected", "Endpoints ejected by outlier detection", labels=["service"]
        )
        panic = GaugeMetricFamily(
            "shoal_sidecar_panic", "1 while routing to all endpoints (panic)", labels=["service"]
        )
        in_flight = GaugeMetricFamily(
            "shoal_sidecar_in_flight",
            "Calls in flight, by endpoint",
            labels=["service", "endpoint"],
        )
        for name, cluster in self._clusters().items():
            for code, count in cluster.code_counts().items():
                calls.add_metric([name, code], count)
            retries.add_metric([name], cluster.retries)
            denied.add_metric([name], cluster.budget.denied)
            rejected.add_metric([name], cluster.breaker.rejected)
            ejected.add_metric([name], cluster.outlier.ejected_count)
            panic.add_metric([name], int(cluster.panic))
            for endpoint in cluster.members():
                in_flight.add_metric([name, endpoint.instance_id], endpoint.in_flight)
        yield from (calls, retries, denied, rejected, ejected, panic, in_flight)
        yield GaugeMetricFamily(
            "shoal_sidecar_registry_connected",
            "1 while the registry watch is up",
            int(self._discovery.connected),
        )
        yield CounterMetricFamily(
            "shoal_sidecar_registry_reconnects",
            "Times the registry watch was re-established",
            value=self._discovery.reconnects,
        )
        yield GaugeMetricFamily(
            "shoal_sidecar_channels", "Open upstream connections", self._channels()
        )
        if self._policy is not None:
            yield from self._authorization(self._policy)

    @staticmethod
    def _authorization(policy: PolicyWatch) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "shoal_sidecar_inbound_denied",
            "Inbound calls the authorization policy refused, by caller and called service "
            '(source "" is a caller without a mesh identity)',
            labels=["source", "destination"],
        )
        for (source, destination), count in sorted(policy.denied_counts().items()):
            refused.add_metric([source, destination], count)
        yield refused
        yield GaugeMetricFamily(
            "shoal_sidecar_policy_version",
            "Version of the authorization policy in force (0: none received yet)",
            policy.version,
        )
