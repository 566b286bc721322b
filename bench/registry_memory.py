"""Registry memory under abuse: RSS through metadata churn and a flood of junk instances.

Run: .venv/bin/python -m bench.registry_memory [--cycles 6000] [--junk 5000]
     [--junk-metadata max|none] [-- REGISTRY FLAGS...]

The registry runs as its own process (`shoal registry`), with one watcher of
every service that keeps reading (as a sidecar does) and one that never reads
(a stalled client). After a warm-up, one client registers and deregisters
``--cycles`` instances, each with the largest metadata the registry accepts (64
keys of 128 characters with 1024-character values), leaving none behind; then it
registers ``--junk`` instances that stay, until the registry refuses with
RESOURCE_EXHAUSTED. The registry's RSS is printed after each phase. Flags after
``--`` go to ``shoal registry`` (e.g. ``-- --history-bytes 8388608``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import psutil

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service.validation import MAX_META_VALUE, MAX_METADATA, MAX_NAME

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub

__all__ = [
    "MAX_METADATA_MAP",
    "Registry",
    "caught_up",
    "churn",
    "flood",
    "rss_mib",
    "start_registry",
    "watchers",
]

MIB = 1024 * 1024
MAX_METADATA_MAP = {
    f"k{k:02d}".ljust(MAX_NAME, "x"): chr(ord("a") + k % 26) * MAX_META_VALUE
    for k in range(MAX_METADATA)
}
CONCURRENCY = 16


@dataclass
class Registry:
    """A ``shoal registry`` child process and the address it serves on."""

    proc: subprocess.Popen[str]
    address: str

    def rss_mib(self) -> float:
        return rss_mib(self.proc.pid)


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


@contextlib.contextmanager
def start_registry(flags: Sequence[str] = ()) -> Iterator[Registry]:
    """Start ``shoal registry`` on a free port; kill and reap it on exit."""
    env = {**os.environ, "SHOAL_LOG_LEVEL": "ERROR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal_cli.main", "registry", "--listen", "127.0.0.1:0", *flags],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("shoal registry serving on "):
            raise RuntimeError(f"registry did not start: {line!r}")
        yield Registry(proc, line.rsplit(" ", 1)[1].strip())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _instance(instance_id: str, service: str, n: int, metadata: dict[str, str]) -> pb.Instance:
    return pb.Instance(
        instance_id=instance_id,
        service=service,
        address=f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}:7000",
        grpc_services=["bench.Junk"],
        metadata=metadata,
    )


@contextlib.asynccontextmanager
async def watchers(address: str) -> AsyncIterator[list[int]]:
    """A watcher of every service that keeps reading, and one that never reads.

    Yields a one-item list holding the newest revision the reading watcher has seen.
    """
    seen = [0]

    async def follow(stub: RegistryAsyncStub) -> None:
        while True:
            call = stub.Watch(pb.WatchRequest(since_revision=seen[0]))
            try:
                async for event in call:
                    seen[0] = max(seen[0], event.revision)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)  # resume from where it got to

    async with (
        grpc.aio.insecure_channel(address) as reading,
        grpc.aio.insecure_channel(address) as stalled,
    ):
        task = asyncio.create_task(follow(pb_grpc.RegistryStub(reading)))
        stuck = pb_grpc.RegistryStub(stalled).Watch(pb.WatchRequest())
        try:
            yield seen
        finally:
            stuck.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def caught_up(seen: list[int], stub: RegistryAsyncStub, timeout: float = 30.0) -> None:
    """Wait until the reading watcher has seen the registry's current revision."""
    target = (await stub.Discover(pb.DiscoverRequest(service="none"))).revision
    deadline = time.monotonic() + timeout
    while seen[0] < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"watcher stuck at {seen[0]}, registry at {target}")
        await asyncio.sleep(0.02)


async def churn(stub: RegistryAsyncStub, cycles: int, prefix: str = "churn") -> None:
    """``cycles`` register+deregister pairs, each instance with the largest metadata."""
    counter = iter(range(cycles))

    async def worker() -> None:
        for n in counter:
            inst = _instance(f"{prefix}-{n}", "churn", n, MAX_METADATA_MAP)
            reply = await stub.Register(pb.RegisterRequest(instance=inst, ttl_ms=60_000))
            await stub.Deregister(pb.DeregisterRequest(lease_id=reply.lease_id))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def flood(
    stub: RegistryAsyncStub, count: int, metadata: dict[str, str], per_service: int = 100
) -> tuple[int, grpc.StatusCode | None]:
    """Register up to ``count`` instances that stay; stop at the first refusal.

    Returns how many were accepted and the status code of the refusal, if any.
    """
    counter = iter(range(count))
    accepted = 0
    refused: list[grpc.StatusCode] = []

    async def worker() -> None:
        nonlocal accepted
        for n in counter:
            if refused:
                return
            inst = _instance(f"junk-{n}", f"junk{n // per_service}", n, metadata)
            try:
                await stub.Register(pb.RegisterRequest(instance=inst, ttl_ms=300_000))
            except grpc.aio.AioRpcError as exc:
                refused.append(exc.code())
                return
            accepted += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return accepted, (refused[0] if refused else None)


async def run(args: argparse.Namespace) -> None:
    with start_registry(args.flags) as registry:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            stub: RegistryAsyncStub = pb_grpc.RegistryStub(channel)
            async with watchers(registry.address) as seen:
                await churn(stub, 200, prefix="warm")
                await caught_up(seen, stub)
                base = registry.rss_mib()
                print(f"after warm-up:            RSS {base:7.1f} MiB")
                started = time.monotonic()
                await churn(stub, args.cycles)
                await caught_up(seen, stub)
                after_churn = registry.rss_mib()
                print(
                    f"after {args.cycles} cycles:  RSS {after_churn:7.1f} MiB "
                    f"(+{after_churn - base:.1f}; {time.monotonic() - started:.1f} s)"
                )
                metadata = MAX_METADATA_MAP if args.junk_metadata == "max" else {}
                accepted, refusal = await flood(stub, args.junk, metadata)
                await caught_up(seen, stub)
                after_junk = registry.rss_mib()
                why = f", then {refusal.name}" if refusal else ""
                print(
                    f"after {accepted} junk ({args.junk_metadata} metadata{why}): "
                    f"RSS {after_junk:7.1f} MiB (+{after_junk - after_churn:.1f})"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=6000)
    parser.add_argument("--junk", type=int, default=5000)
    parser.add_argument("--junk-metadata", choices=["max", "none"], default="none")
    parser.add_argument("flags", nargs="*", help="flags for shoal registry, after --")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
