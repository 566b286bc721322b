"""The worker server's lifecycle: pools, gRPC server, metrics endpoint, tracing, shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc
from shoal_core.grpc_server import GrpcServer
from shoal_core.tracing import TraceSettings
from worker_node.cache import ResponseCache
from worker_node.config import WorkerConfig, default_config
from worker_node.execs import ExecRunner
from worker_node.metrics import WorkerCollector
from worker_node.pool import Pool
from worker_node.procs import use_pidfd_child_watcher
from worker_node.servicer import WorkerServicer
from worker_node.stats import WorkerStats

if TYPE_CHECKING:
    from worker_node.tracing import WorkerTracer

__all__ = ["SERVICE_NAME", "WorkerServer"]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name
# Tasks whose caller left during the drain may still run; they get this long, then are killed.
POOL_GRACE = 0.5


class WorkerServer(GrpcServer):
    """A worker on ``listen``: pools warm before the port opens, stopped after it closes.

    With ``trace`` it records a span per call (``worker_node.tracing``) and exports them
    until it has stopped; without, it never loads OpenTelemetry.
    """

    def __init__(
        self,
        listen: str,
        config: WorkerConfig | None = None,
        *,
        metrics_listen: str | None = None,
        trace: TraceSettings | None = None,
    ) -> None:
        self.config = config or default_config()
        self._trace = trace
        self.tracer: WorkerTracer | None = None
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
        self.metrics.register(WorkerCollector(self))

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
        if self._trace is not None:
            from worker_node.tracing import WorkerTracer

            self.tracer = self.servicer.tracer = WorkerTracer(self._trace, SERVICE_NAME)
        await super().start()  # a failed start releases pools and tracer through _after_stop

    async def _after_stop(self) -> None:
        self.runner.kill_all()
        await self.runner.close()
        await asyncio.gather(*(pool.close(POOL_GRACE) for pool in self.pools.values()))
        # Last: every call has ended by now, so its spans are in the final export.
        tracer, self.tracer = self.tracer, None
        self.servicer.tracer = None
        if tracer is not None:
            await tracer.close()
