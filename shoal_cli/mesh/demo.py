"""``shoal up --demo``: steady traffic through the client sidecar, shown live.

Requests go to Echo through the client sidecar; the spread across workers comes
from each worker's own Stats (its Echo count), so it shows where calls really
landed, not where the client thought they went.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING

import grpc
from rich.console import Group
from rich.live import Live
from rich.table import Table

from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from shoal_cli.loadgen import LoadWindow, percentile
from shoal_cli.mesh.up import RunningMesh
from shoal_cli.output import quiet_if_gone, say
from shoal_cli.render import console

if TYPE_CHECKING:
    from protos.worker_pb2_grpc import WorkerAsyncStub

__all__ = ["start_demo"]

CONCURRENCY = 8


def start_demo(mesh: RunningMesh) -> asyncio.Future[None]:
    return asyncio.ensure_future(_demo(mesh))


async def _send(stub: WorkerAsyncStub, window: LoadWindow) -> None:
    payload = wpb.EchoRequest(payload=b"shoal demo")
    while True:
        started = time.perf_counter()
        try:
            await stub.Echo(payload, timeout=5)
            window.ok(time.perf_counter() - started)
        except grpc.aio.AioRpcError:
            window.failed()
            await asyncio.sleep(0.05)


async def _echo_counts(stubs: dict[str, WorkerAsyncStub]) -> dict[str, int]:
    counts = {}
    for name, stub in stubs.items():
        try:
            counts[name] = (await stub.Stats(wpb.StatsRequest(), timeout=1)).echo_total
        except grpc.aio.AioRpcError:
            counts[name] = -1  # restarting: shown as down
    return counts


def _render(rate: float, lat: list[float], errors: int, spread: dict[str, int]) -> Group:
    calls = Table(
        title="Echo via the client sidecar (Ctrl-C stops)",
        title_justify="left",
    )
    for heading in ("req/s", "p50 ms", "p90 ms", "p99 ms", "errors"):
        calls.add_column(heading, justify="right")
    calls.add_row(
        f"{rate:.0f}", *(f"{percentile(lat, q) * 1000:.2f}" for q in (0.5, 0.9, 0.99)), str(errors)
    )
    workers = Table(title="calls per worker (own count)", title_justify="left")
    for heading, justify in (("worker", "left"), ("calls", "right"), ("share", "left")):
        workers.add_column(heading, justify=justify)  # type: ignore[arg-type]
    total = sum(n for n in spread.values() if n > 0) or 1
    for name, n in spread.items():
        if n < 0:
            workers.add_row(name, "-", "down (restarting?)")
        else:
            workers.add_row(name, str(n), "#" * round(30 * n / total) + f" {100 * n / total:.0f}%")
    return Group(calls, workers)


async def _demo(mesh: RunningMesh) -> None:
    plan = mesh.plan
    window = LoadWindow()
    channels = [grpc.aio.insecure_channel(plan.client_address)]
    channels += [grpc.aio.insecure_channel(addr) for addr in plan.worker_addresses]
    senders: list[asyncio.Task[None]] = []
    try:
        client: WorkerAsyncStub = wpb_grpc.WorkerStub(channels[0])
        workers: dict[str, WorkerAsyncStub] = {
            spec.name: wpb_grpc.WorkerStub(ch)
            for spec, ch in zip(plan.workers, channels[1:], strict=True)
        }
        senders = [asyncio.create_task(_send(client, window)) for _ in range(CONCURRENCY)]
        before = await _echo_counts(workers)
        out = console(stderr=True)
        live = Live(console=out, auto_refresh=False) if sys.stderr.isatty() else None
        try:
            if live is not None:
                with quiet_if_gone(sys.stderr):
                    live.start()
            while True:
                await asyncio.sleep(1.0)
                rate, latencies, errors = window.take()
                after = await _echo_counts(workers)
                spread = {
                    n: (after[n] - before[n]) if after[n] >= 0 and before[n] >= 0 else -1
                    for n in after
                }
                before = after
                if live is not None:
                    with quiet_if_gone(sys.stderr):
                        live.update(_render(rate, latencies, errors, spread), refresh=True)
                else:
                    shares = " ".join(f"{n}={c}" for n, c in spread.items())
                    say(
                        f"demo: {rate:.0f} req/s p50 {percentile(latencies, 0.5) * 1000:.2f}"
                        f" ms p99 {percentile(latencies, 0.99) * 1000:.2f} ms errors "
                        f"{errors} spread {shares}",
                        err=True,
                    )
        finally:
            if live is not None:
                with quiet_if_gone(sys.stderr):
                    live.stop()
    finally:
        for task in senders:
            task.cancel()
        for task in senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for ch in channels:
            await ch.close(None)
