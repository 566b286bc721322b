"""Shoal's worker node: a warm process pool, allowlisted commands, a response cache.

Domain modules (``pool``, ``policy``, ``poollimits``, ``poolproc``, ``execs``,
``cmdproc``, ``spawn``, ``cache``, ``stats``, ``limits``, ``procs``, ``config``,
``tracing``) never import grpc; ``servicer`` maps the wire onto them and ``server``
owns the lifecycle. The package namespace is lazy because pool processes import
``worker_node.child``, which must not pull in grpc; ``tracing`` (OpenTelemetry) is
loaded only by a worker that traces, and functions read their call's trace context
from ``worker_node.tracecontext``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker_node.config import WorkerConfig, load_config
    from worker_node.server import WorkerServer

__all__ = ["WorkerConfig", "WorkerServer", "load_config"]


def __getattr__(name: str) -> Any:
    if name in ("WorkerConfig", "load_config"):
        from worker_node import config

        return getattr(config, name)
    if name == "WorkerServer":
        from worker_node import server

        return server.WorkerServer
    raise AttributeError(f"module 'worker_node' has no attribute {name!r}")
