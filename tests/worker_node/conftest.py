"""Real worker servers on 127.0.0.1:0, driven through the generated stubs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import psutil
import pytest

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc
from shoal_core.config import parse_yaml
from shoal_core.tracing import TraceSettings
from worker_node.config import WorkerConfig
from worker_node.server import WorkerServer

BASE = """
pools:
  default: {min: 1, max: 2, idle_timeout: 30}
functions:
  noop: {target: "worker_node.demo_tasks:noop", warmup: ""}
  upper: {target: "worker_node.demo_tasks:upper"}
  sleep: {target: "worker_node.demo_tasks:sleep"}
  crash: {target: "worker_node.demo_tasks:crash"}
  hash: {target: "worker_node.demo_tasks:sha256", cacheable: true}
  pid: {target: "tests.worker_node.tasks:pid"}
  hang: {target: "tests.worker_node.tasks:spawn_and_hang"}
  exit_clean: {target: "tests.worker_node.tasks:exit_clean"}
  terminate_self: {target: "tests.worker_node.tasks:terminate_self"}
  wrong_type: {target: "tests.worker_node.tasks:wrong_type"}
  big: {target: "tests.worker_node.tasks:big"}
  slow_upper: {target: "tests.worker_node.tasks:slow_upper", cacheable: true}
  trace_context: {target: "tests.worker_node.tasks:trace_context"}
"""


def config(text: str = BASE) -> WorkerConfig:
    return parse_yaml(text, WorkerConfig)


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


async def await_until(check: Callable[[], Any], timeout: float = 15.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def no_children_left() -> bool:
    return not [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]


@contextlib.asynccontextmanager
async def running(
    cfg: WorkerConfig, trace: TraceSettings | None = None
) -> AsyncIterator[tuple[WorkerServer, pb_grpc.WorkerAsyncStub]]:
    server = WorkerServer("127.0.0.1:0", cfg, trace=trace)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, pb_grpc.WorkerStub(channel)
    finally:
        await server.close(grace=1.0)
    # Every pool process, command and helper they started is gone.
    wait_until(no_children_left)


@pytest.fixture
async def worker() -> AsyncIterator[tuple[WorkerServer, pb_grpc.WorkerAsyncStub]]:
    async with running(config()) as pair:
        yield pair


async def stats(stub: pb_grpc.WorkerAsyncStub) -> pb.StatsReply:
    return await stub.Stats(pb.StatsRequest())


async def pool_stats(stub: pb_grpc.WorkerAsyncStub) -> pb.PoolStats:
    return (await stats(stub)).pools[0]
