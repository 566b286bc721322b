"""The sidecar's Prometheus metrics, read from its counters at scrape time.

The forwarding path only bumps plain integers; this collector turns them into
metric families when ``/metrics`` is scraped, so a call pays nothing for metrics.
The golden ones (requests, their duration, in flight; ``golden``) are per direction,
gRPC service and method; the rest are per cluster (the gRPC service called out to).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy_sidecar.authz import PolicyWatch
from proxy_sidecar.cluster import Cluster
from proxy_sidecar.discovery import Discovery
from proxy_sidecar.golden import GoldenStats
from shoal_core.codes import code_name
from shoal_core.metrics import histogram_family

__all__ = ["SidecarCollector"]


class SidecarCollector(Collector):
    """Per-service calls, retries, rejections and ejections; per-endpoint in-flight."""

    def __init__(
        self,
        clusters: Callable[[], dict[str, Cluster]],
        discovery: Discovery,
        channels: Callable[[], int],
        policy: PolicyWatch | None = None,
        golden: GoldenStats | None = None,
        handshakes: Callable[[], tuple[int, int]] | None = None,
        spans: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        """``handshakes``: TLS handshakes completed and failed, both directions;
        ``spans``: spans exported and dropped (``None`` when not tracing)."""
        self._spans = spans
        self._golden = golden
        self._handshakes = handshakes
        self._policy = policy
        self._clusters = clusters
        self._discovery = discovery
        self._channels = channels

    def collect(self) -> Iterator[Metric]:
        if self._golden is not None:
            yield from _golden(self._golden)
        if self._handshakes is not None:
            done, failed = self._handshakes()
            handshakes = CounterMetricFamily(
                "shoal_sidecar_tls_handshakes",
                "mTLS handshakes of the mesh hop, both directions, by result",
                labels=["result"],
            )
            handshakes.add_metric(["ok"], done)
            handshakes.add_metric(["failed"], failed)
            yield handshakes
        counts = None if self._spans is None else self._spans()
        if counts is not None:
            spans = CounterMetricFamily(
                "shoal_sidecar_spans",
                "Spans of traced calls, by what became of them (exported to the collector, "
                "or dropped: the queue was full or the collector refused them)",
                labels=["result"],
            )
            spans.add_metric(["exported"], counts[0])
            spans.add_metric(["dropped"], counts[1])
            yield spans
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
            retries.add_metric([name], cluster.retries)
            denied.add_metric([name], cluster.budget.denied)
            rejected.add_metric([name], cluster.breaker.rejected)
            ejected.add_metric([name], cluster.outlier.ejected_count)
            panic.add_metric([name], int(cluster.panic))
            for endpoint in cluster.members():
                in_flight.add_metric([name, endpoint.instance_id], endpoint.in_flight)
        yield from (retries, denied, rejected, ejected, panic, in_flight)
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
        restarts = CounterMetricFamily(
            "shoal_sidecar_registry_watch_restarts",
            "Registry watches re-established, by how they went on: resumed after the last "
            "revision seen, or started again from a snapshot (the first snapshot is none)",
            labels=["outcome"],
        )
        for outcome, count in self._discovery.restarts.items():
            restarts.add_metric([outcome], count)
        yield restarts
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


def _golden(golden: GoldenStats) -> Iterator[Metric]:
    labels = ["direction", "service", "method", "caller"]
    requests = CounterMetricFamily(
        "shoal_sidecar_requests",
        "Calls that ended, by direction (inbound: to our app; outbound: into the mesh), "
        "gRPC service, method, calling mesh service and status",
        labels=[*labels, "code"],
    )
    duration = histogram_family(
        "shoal_sidecar_request_duration_seconds",
        "Time from a call's admission to its end, by direction, gRPC service, method and caller",
        labels,
    )
    sent = CounterMetricFamily(
        "shoal_sidecar_request_bytes",
        "Message bytes of the requests of calls that ended, as read from their callers",
        labels=labels,
    )
    answered = CounterMetricFamily(
        "shoal_sidecar_response_bytes",
        "Message bytes of the responses of calls that ended, as sent to their callers",
        labels=labels,
    )
    in_flight: dict[tuple[str, str], int] = {}
    for key, series in golden.items():
        for code, count in sorted(series.codes.items()):
            requests.add_metric([*key, code_name(code)], count)
        series.duration.add_to(duration, key)
        sent.add_metric(list(key), series.request_bytes)
        answered.add_metric(list(key), series.response_bytes)
        pair = (key[0], key[1])
        in_flight[pair] = in_flight.get(pair, 0) + series.in_flight
    yield from (requests, duration, sent, answered)
    flying = GaugeMetricFamily(
        "shoal_sidecar_requests_in_flight",
        "Calls under way, by direction and gRPC service",
        labels=["direction", "service"],
    )
    for pair, count in sorted(in_flight.items()):
        flying.add_metric(list(pair), count)
    yield flying
