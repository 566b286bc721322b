"""The worker's Prometheus metrics, read from its counters at scrape time.

Calls only bump plain numbers (``stats``, the pools' and the cache's counters); this
collector turns them into metric families when ``/metrics`` is scraped. Labels are
bounded: ``method`` is one of the Worker service's methods, ``pool`` one of the
configured pools.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal_core.metrics import histogram_family

if TYPE_CHECKING:
    from worker_node.server import WorkerServer

__all__ = ["WorkerCollector"]

_POOL_GAUGES = (
    ("pool_size", "size", "Warm pool processes"),
    ("pool_busy", "busy", "Pool processes running a task"),
    ("tasks_running", "running", "Tasks running"),
    ("tasks_queued", "queued", "Tasks waiting for a process"),
)
# (metric name, attribute of the pool's counters, help)
_POOL_COUNTERS = (
    ("tasks_failed", "tasks_failed", "Tasks that failed"),
    ("processes_died", "died", "Pool processes that ended unasked"),
    ("processes_restarted", "restarted", "Pool processes replaced by the restart policy"),
    ("tasks_rejected", "rejected", "Tasks refused because the pool's queue was full"),
)
_CACHE_COUNTERS = (
    ("hits", "Calls answered from the response cache"),
    ("misses", "Cacheable calls not found in the response cache"),
    ("coalesced", "Calls that waited for an identical call under way instead of running"),
    ("evictions", "Cached replies evicted to stay within the cache's limits"),
    ("expirations", "Cached replies dropped at the end of their TTL"),
)


class WorkerCollector(Collector):
    """Requests and their durations by method and outcome; pools, cache, commands."""

    def __init__(self, server: WorkerServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        stats = server.stats
        requests = CounterMetricFamily(
            "shoal_worker_requests",
            "Worker calls that ended, by method and outcome (ok or failed)",
            labels=["method", "outcome"],
        )
        duration = histogram_family(
            "shoal_worker_request_duration_seconds",
            "Time to serve a worker call, by method and outcome (Echo is not timed)",
            ["method", "outcome"],
        )
        for method, m in sorted(stats.methods.items()):
            for outcome, hist in (("ok", m.ok_seconds), ("failed", m.failed_seconds)):
                requests.add_metric([method, outcome], hist.count)
                hist.add_to(duration, [method, outcome])
        requests.add_metric(["Echo", "ok"], stats.echo_total)
        yield from (requests, duration)
        pools = list(server.pools.values())
        for name, attr, doc in _POOL_GAUGES:
            gauge = GaugeMetricFamily(f"shoal_worker_{name}", doc, labels=["pool"])
            for pool in pools:
                gauge.add_metric([pool.name], getattr(pool, attr))
            yield gauge
        for name, key, doc in _POOL_COUNTERS:
            counter = CounterMetricFamily(f"shoal_worker_{name}", doc, labels=["pool"])
            for pool in pools:
                counter.add_metric([pool.name], getattr(pool.counters, key))
            yield counter
        cache = server.cache
        for name, doc in _CACHE_COUNTERS:
            yield CounterMetricFamily(
                f"shoal_worker_cache_{name}", doc, value=getattr(cache.counters, name)
            )
        yield GaugeMetricFamily("shoal_worker_cache_entries", "Cached replies", len(cache))
        yield GaugeMetricFamily(
            "shoal_worker_cache_bytes", "Bytes of the cached replies", cache.size_bytes
        )
        yield GaugeMetricFamily(
            "shoal_worker_exec_running", "Commands running", server.servicer.exec_running
        )
        yield GaugeMetricFamily(
            "shoal_worker_uptime_seconds", "Seconds since the worker started", stats.uptime
        )
