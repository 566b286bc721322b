"""``shoal bench``: Echo load through a sidecar and straight to a worker, side by side.

The load comes from this one Python process, so absolute rates say as much about
the client as about the mesh; the comparison between the two targets, measured
the same way in one run, is the point.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import click
import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from shoal_cli.errors import UserError
from shoal_cli.loadgen import percentile
from shoal_cli.options import ADDRESS
from shoal_cli.output import emit_json, is_terminal
from shoal_cli.registry_ops import registry_option
from shoal_cli.render import emit_table
from shoal_cli.worker_ops import via_option

if TYPE_CHECKING:
    from protos.worker_pb2_grpc import WorkerAsyncStub

__all__ = ["bench"]

CHANNELS = 4


async def _load(
    address: str, seconds: float, concurrency: int, payload: bytes, tick: Any
) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    latencies: list[float] = []
    errors = 0
    try:
        stubs: list[WorkerAsyncStub] = [wpb_grpc.WorkerStub(ch) for ch in channels]
        request = wpb.EchoRequest(payload=payload)
        try:
            await stubs[0].Echo(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise UserError(
                f"{address} does not answer Echo ({exc.code().name}: {exc.details()})"
            ) from None
        started = time.monotonic()
        stop = started + seconds

        async def sender(stub: WorkerAsyncStub) -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    await stub.Echo(request, timeout=5)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    errors += 1

        async def progress() -> None:
            while time.monotonic() < stop:
                await asyncio.sleep(0.1)
                tick(min(time.monotonic() - started, seconds))

        await asyncio.gather(progress(), *(sender(stubs[i % CHANNELS]) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    finally:
        for ch in channels:
            await ch.close(None)
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        **{f"p{q}_ms": percentile(latencies, q / 100) * 1000 for q in (50, 90, 99)},
    }


def _first_worker(registry: tuple[str, ...]) -> str:
    from shoal_cli.stats_cmd import find_targets

    workers, _ = asyncio.run(find_targets(registry))
    if not workers:
        listed = ", ".join(registry)
        raise UserError(f"registry {listed} lists no worker to call directly; use --direct")
    return sorted(workers.values())[0]


@click.command()
@via_option()
@registry_option()
@click.option(
    "--direct",
    type=ADDRESS,
    default=None,
    help="Worker to call directly (default: the first one the registry lists).",
)
@click.option("--seconds", type=click.FloatRange(0.5, 600), default=5.0, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--payload-bytes", type=click.IntRange(0, 1 << 20), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench(
    via: str,
    registry: tuple[str, ...],
    direct: str | None,
    seconds: float,
    concurrency: int,
    payload_bytes: int,
    as_json: bool,
) -> None:
    """Echo load through the sidecar and direct; req/s, p50/p90/p99 and errors."""
    targets = {"through sidecar": via, "direct to worker": direct or _first_worker(registry)}
    payload = b"x" * payload_bytes
    results: dict[str, dict[str, Any]] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not is_terminal() or as_json,
    ) as bar:
        for name, address in targets.items():
            task = bar.add_task(f"{name} ({address})", total=seconds)
            results[name] = {
                "address": address,
                **asyncio.run(
                    _load(
                        address,
                        seconds,
                        concurrency,
                        payload,
                        lambda done, task=task: bar.update(task, completed=done),
                    )
                ),
            }
            bar.update(task, completed=seconds)
    if as_json:
        emit_json(results)
        return
    rows = [
        {
            "target": name,
            "address": r["address"],
            "rps": f"{r['rps']:.0f}",
            **{k: f"{r[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")},
            "errors": r["errors"],
        }
        for name, r in results.items()
    ]
    emit_table(
        f"Echo, {payload_bytes}-byte payload, {concurrency} concurrent, {seconds:g}s each",
        [
            ("target", "TARGET"),
            ("address", "ADDRESS"),
            ("rps", "REQ/S"),
            ("p50_ms", "p50 ms"),
            ("p90_ms", "p90 ms"),
            ("p99_ms", "p99 ms"),
            ("errors", "ERRORS"),
        ],
        rows,
    )
