"""The worker server's lifecycle: pools, gRPC server, metrics endpoint, shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc
from shoal_core.grpc_server import GrpcServer
from worker_node.cache import ResponseCache
from worker_node.config import WorkerConfig, default_config
from worker_node.execs import ExecRunner
from worker_node.pool import Pool
from worker_node.procs import use_pidfd_child_watcher
from worker_node.servicer import WorkerServicer
from worker_node.stats import LatencyHistogram, WorkerStats

__all__ = ["SERVICE_NAME", "WorkerServer"]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name
# Tasks whose caller left during the drain may still run; they get this long, then are killed.
POOL_GRACE = 0.5


class _WorkerCollector(Collector):
    """Reads the worker's counters at scrape time instead of on every call."""

    def __init__(self, server: WorkerServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        stats = server.stats
        requests = CounterMetricFamily(
            "shoal_worker_requests", "Requests by method and outcome", labels=["method", "outcome"]
        )
        latency = HistogramMetricFamily(
            "shoal_worker_latency_seconds", "Request latency by method", labels=["method"]
        )
        quantiles = GaugeMetricFamily(
            "shoal_worker_latency_quantile_seconds",
            "Latency percentiles by method",
            labels=["method", "quantile"],
        )
        bounds = LatencyHistogram.upper_bounds()
        for method, m in sorted(stats.methods.items()):
            requests.add_metric([method, "ok"], m.ok)
            requests.add_metric([method, "failed"], m.failed)
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, m.latency.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:.6g}", cumulative))
            latency.add_metric([method], buckets, m.latency.sum)
            for q in (0.5, 0.9, 0.99):
                quantiles.add_metric([method, str(q)], m.latency.quantile(q))
        requests.add_metric(["Echo", "ok"], stats.echo_total)
        yield from (requests, latency, quantiles)
        for name, attr, doc in (
            ("pool_size", "size", "Warm pool processes"),
            ("pool_busy", "busy", "Pool processes running a task"),
            ("tasks_running", "running", "Tasks running"),
            ("tasks_queued", "queued", "Tasks waiting for a process"),
        ):
            gauge = GaugeMetricFamily(f"shoal_worker_{name}", doc, labels=["pool"])
            for pool in server.pools.values():
                gauge.add_metric([pool.name], getattr(pool, attr))
            yield gauge
        for name, doc in (
            ("tasks_failed", "Tasks that failed"),
            ("processes_died", "Pool processes that ended unasked"),
            ("processes_restarted", "Pool processes replaced by the restart policy"),
            ("rejected", "Tasks refused because the queue was full"),
        ):
            counter = CounterMetricFamily(f"shoal_worker_{name}", doc, labels=["pool"])
            for pool in server.pools.values():
                key = name.removeprefix("processes_")
                counter.add_metric([pool.name], getattr(pool.counters, key))
            yield counter
        cache = server.cache
        for name in ("hits", "misses", "coalesced", "evictions", "expirations"):
            yield CounterMetricFamily(
                f"shoal_worker_cache_{name}", f"Cache {name}", value=getattr(cache.counters, name)
            )
        yield GaugeMetricFamily("shoal_worker_cache_entries", "Cached replies", len(cache))
        yield GaugeMetricFamily("shoal_worker_cache_bytes", "Bytes cached", cache.size_bytes)
        yield GaugeMetricFamily(
            "shoal_worker_exec_running", "Commands running", server.servicer.exec_running
        )
        yield GaugeMetricFamily("shoal_worker_uptime_seconds", "Seconds since start", stats.uptime)


class WorkerServer(GrpcServer):
    """A worker on ``listen``: pools warm before the port opens, stopped after it closes."""

    def __init__(
        self,
        listen: str,
        config: WorkerConfig | None = None,
        *,
        metrics_listen: str | None = None,
    ) -> None:
        self.config = config or default_config()
        super().__init__(
            listen, max_message_bytes=self.config.max_message_bytes, metrics_listen=metrics_listen
        )
        functions = self.config.functions
        self.pools = {
            name: Pool(
                name,
                pool_cfg,
                {fn: f for fn, f in functions.items() if f.pool == name},
                max_result_bytes=self.config.max_result_bytes,
            )
            for name, pool_cfg in self.config.pools.items()
            if any(f.pool == name for f in functions.values())
        }
        cache_cfg = self.config.cache
        self.cache: ResponseCache[Any] = ResponseCache(
            ttl=cache_cfg.ttl, max_entries=cache_cfg.max_entries, max_bytes=cache_cfg.max_bytes
        )
        self.stats = WorkerStats()
        self.runner = ExecRunner(self.config.commands)
        self.servicer = WorkerServicer(self.config, self.pools, self.runner, self.cache, self.stats)
        self.metrics.register(_WorkerCollector(self))

    def _add_servicers(self, server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_WorkerServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    async def start(self) -> None:
        use_pidfd_child_watcher()
        # Pools first: the port opens only once every process is warm.
        try:
            await asyncio.gather(*(pool.start() for pool in self.pools.values()))
        except BaseException:
            await asyncio.gather(*(pool.close(0) for pool in self.pools.values()))
            raise
        await super().start()  # a failed start releases the pools through _after_stop

    async def _after_stop(self) -> None:
        self.runner.kill_all()
        await self.runner.close()
        await asyncio.gather(*(pool.close(POOL_GRACE) for pool in self.pools.values()))
