"""Registry benchmark: N instances heartbeating at TTL/3, Discover latency under that load.

Run: .venv/bin/python -m bench.registry_bench [--sizes 1000 10000] [--seconds 15]

The registry runs as its own process (`shoal registry`), as in production; this
process plays every instance. For each size it reports the heartbeat rate the
instances asked for and the rate sustained, whether any lease lapsed, Discover
p50/p99 while that load runs, and the registry's heartbeat capacity when driven
flat out. All traffic stays on 127.0.0.1 and every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from shoal_cli.loadgen import percentile

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub

PER_SERVICE = 50
TTL_MS = 10_000


@dataclass
class Result:
    size: int
    wanted_hb_s: float
    sustained_hb_s: float
    lapsed: int
    discover_p50_ms: float
    discover_p99_ms: float
    discover_calls: int
    capacity_hb_s: float


def start_registry() -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "SHOAL_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal_cli.main", "registry", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("shoal registry serving on "):
        proc.kill()
        raise SystemExit(f"registry did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


async def register_all(stubs: list[RegistryAsyncStub], size: int, offset: int) -> list[str]:
    leases: list[str] = [""] * size
    sem = asyncio.Semaphore(128)

    async def one(i: int) -> None:
        async with sem:
            n = offset + i
            reply = await stubs[i % len(stubs)].Register(
                pb.RegisterRequest(
                    instance=pb.Instance(
                        instance_id=f"inst-{n}",
                        service=f"svc-{n // PER_SERVICE}",
                        address=f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}:7000",
                        grpc_services=["bench.Echo"],
                        zone=f"z{n % 3}",
                    ),
                    ttl_ms=TTL_MS,
                )
            )
            leases[i] = reply.lease_id

    await asyncio.gather(*(one(i) for i in range(size)))
    return leases


async def heartbeat_load(
    stubs: list[RegistryAsyncStub], leases: list[str], seconds: float
) -> tuple[float, int]:
    """Each instance heartbeats every TTL/3, staggered; returns (steady rate, not_found).

    The first interval is ramp-up (instances start at random offsets within it), so
    the rate is counted over the rest of the phase only.
    """
    interval = TTL_MS / 3000
    steady_from = time.monotonic() + interval
    stop = time.monotonic() + max(seconds, 2 * interval)
    sent = not_found = 0

    async def instance(i: int, lease: str) -> None:
        nonlocal sent, not_found
        stub = stubs[i % len(stubs)]
        next_at = time.monotonic() + random.uniform(0, interval)
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() >= stop:
                return
            try:
                await stub.Heartbeat(
                    pb.HeartbeatRequest(
                        lease_id=lease,
                        status=pb.SERVING,
                        load=pb.LoadReport(in_flight=random.randint(0, 8), cpu_percent=20.0),
                    )
                )
                if time.monotonic() >= steady_from:
                    sent += 1
            except grpc.aio.AioRpcError:
                not_found += 1
            next_at += interval

    await asyncio.gather(*(instance(i, lease) for i, lease in enumerate(leases)))
    return sent / (stop - steady_from), not_found


async def discover_probe(stub: RegistryAsyncStub, services: int, seconds: float) -> list[float]:
    latencies = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        svc = f"svc-{random.randrange(services)}"
        t0 = time.perf_counter()
        reply = await stub.Discover(pb.DiscoverRequest(service=svc))
        latencies.append((time.perf_counter() - t0) * 1000)
        assert reply.instances, f"no instances for {svc}"
        await asyncio.sleep(0.01)
    return latencies


async def capacity(stubs: list[RegistryAsyncStub], leases: list[str], seconds: float) -> float:
    """Heartbeats per second with 64 callers sending back to back.

    Leases not renewed since the load phase ended may lapse meanwhile; a NOT_FOUND
    answer is still a heartbeat the registry handled, so it counts.
    """
    stop = time.monotonic() + seconds
    count = 0

    async def caller(k: int) -> None:
        nonlocal count
        stub = stubs[k % len(stubs)]
        while time.monotonic() < stop:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Heartbeat(
                    pb.HeartbeatRequest(
                        lease_id=leases[random.randrange(len(leases))], status=pb.SERVING
                    )
                )
            count += 1

    started = time.monotonic()
    await asyncio.gather(*(caller(k) for k in range(64)))
    return count / (time.monotonic() - started)


async def run_size(address: str, size: int, seconds: float) -> Result:
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    try:
        stubs: list[RegistryAsyncStub] = [pb_grpc.RegistryStub(ch) for ch in channels]
        leases = await register_all(stubs, size, offset=0)
        services = (size + PER_SERVICE - 1) // PER_SERVICE
        (rate, not_found), latencies = await asyncio.gather(
            heartbeat_load(stubs, leases, seconds),
            discover_probe(stubs[0], services, seconds),
        )
        listing = await stubs[0].ListServices(pb.ListServicesRequest())
        lapsed = size - listing.state.instances_healthy
        cap = await capacity(stubs, leases, min(5.0, seconds))
        for lease in leases:  # leave the registry empty for the next size
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stubs[0].Deregister(pb.DeregisterRequest(lease_id=lease))
        return Result(
            size=size,
            wanted_hb_s=size / (TTL_MS / 3000),
            sustained_hb_s=rate,
            lapsed=lapsed + not_found,
            discover_p50_ms=statistics.median(latencies),
            discover_p99_ms=percentile(latencies, 0.99),
            discover_calls=len(latencies),
            capacity_hb_s=cap,
        )
    finally:
        for ch in channels:
            await ch.close(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--seconds", type=float, default=15.0, help="heartbeat phase per size")
    args = parser.parse_args()
    proc, address = start_registry()
    try:
        results = [asyncio.run(run_size(address, size, args.seconds)) for size in args.sizes]
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(
        f"registry benchmark: TTL {TTL_MS / 1000:g}s, heartbeat every TTL/3, "
        f"{PER_SERVICE} instances per service, {args.seconds:g}s per size, "
        f"{os.cpu_count()} cores shared by registry and load generator"
    )
    header = (
        f"{'instances':>9} {'hb/s wanted':>11} {'hb/s sustained':>14} {'lapsed':>6} "
        f"{'discover p50':>12} {'p99':>8} {'calls':>6} {'hb/s capacity':>13}"
    )
    print(header)
    for r in results:
        print(
            f"{r.size:>9} {r.wanted_hb_s:>11.0f} {r.sustained_hb_s:>14.0f} {r.lapsed:>6} "
            f"{r.discover_p50_ms:>10.2f}ms {r.discover_p99_ms:>6.2f}ms {r.discover_calls:>6} "
            f"{r.capacity_hb_s:>13.0f}"
        )


if __name__ == "__main__":
    main()
