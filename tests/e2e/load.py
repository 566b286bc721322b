"""Bounded Echo load against a published port, with per-instance counts from the admin page."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from protos import registry_pb2 as rpb
from protos import registry_pb2_grpc as rpb_grpc
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryStub
    from protos.worker_pb2_grpc import WorkerAsyncStub

SERVICE = "shoal.worker.v1.Worker"


class Load:
    """Echo calls from a few concurrent callers until stopped (or a hard time limit)."""

    def __init__(self, address: str, *, callers: int = 4, limit: float = 120.0) -> None:
        self._address = address
        self._callers = callers
        self._limit = limit
        self._stop = asyncio.Event()
        self.ok = 0
        self.failed: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        deadline = time.monotonic() + self._limit
        async with grpc.aio.insecure_channel(self._address) as channel:
            stub: WorkerAsyncStub = wpb_grpc.WorkerStub(channel)

            async def caller() -> None:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    try:
                        await stub.Echo(wpb.EchoRequest(payload=b"e2e"), timeout=10)
                        self.ok += 1
                    except grpc.aio.AioRpcError as exc:
                        self.failed.append(f"{exc.code().name}: {exc.details()}")
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(caller() for _ in range(self._callers)))


def served(admin: str) -> dict[str, int]:
    """Requests the client sidecar has sent to each worker instance, by instance id."""
    with urllib.request.urlopen(f"http://{admin}/endpoints", timeout=5) as page:
        data = json.load(page)
    endpoints = data["services"].get(SERVICE, {}).get("endpoints", [])
    return {e["instance_id"]: int(e.get("requests") or 0) for e in endpoints}


def healthy_workers(registry: str) -> set[str]:
    with grpc.insecure_channel(registry) as channel:
        stub: RegistryStub = rpb_grpc.RegistryStub(channel)
        found = stub.Discover(rpb.DiscoverRequest(service="worker"), timeout=5)
    return {i.instance_id for i in found.instances}


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` (run in a thread) until true; return how long it took."""
    started = time.monotonic()
    while True:
        try:
            if await asyncio.to_thread(check):
                return time.monotonic() - started
        except (OSError, grpc.RpcError):
            pass  # not up yet
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.2)
