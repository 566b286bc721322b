"""Registry benchmark: N instances heartbeating at TTL/3, Discover latency under that load.

Run: .venv/bin/python -m bench.registry_bench [--store memory,etcd] [--sizes 1000,10000]
     [--seconds 15] [--time-limit 900]

The registry runs as its own process (`shoal registry`), as in production; this
process plays every instance. Stores (see `bench.registry_etcd`): `memory`, one
registry; `etcd`, a 3-member etcd on 127.0.0.1 with 2 registry replicas over it, the
instances split half and half between them. For each store and size it reports the
heartbeat rate the instances asked for and the rate sustained, the instances that
lapsed (not healthy at the end, or a heartbeat refused) and the lapses the registries
counted (shoal_registry_lapses_total), Discover p50/p99 while that load runs, and the
registry's heartbeat capacity when driven flat out; for etcd also etcd's writes/s
(etcd_mvcc_put_total + etcd_mvcc_delete_total on the leader), txns/s, raft proposals/s
and lease keepalives/s (etcd_debugging_lease_renewed_total) over the steady part of the
heartbeat phase. Meanwhile a probe in a process of its own changes an instance's status
through replica A and times its arrival at a Watch on replica B (`--changes`).
All traffic stays on 127.0.0.1; every phase is bounded in time and the whole run by
`--time-limit`; every process started is reaped, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import grpc
import httpx

from bench import registry_etcd as stores
from bench.registry_report import PER_SERVICE, TTL_MS, Result, report
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from shoal_cli.loadgen import percentile

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub

T = TypeVar("T")


async def register_all(
    stubs: list[RegistryAsyncStub],
    size: int,
    offset: int,
    granted: list[asyncio.Future[str]] | None = None,
) -> list[str]:
    """Register `size` instances; each lease also goes to `granted[i]` as it comes, so
    that the instance may start heartbeating while the others register."""
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
            if granted is not None:
                granted[i].set_result(reply.lease_id)

    await asyncio.gather(*(one(i) for i in range(size)))
    return leases


async def heartbeat_load(
    stubs: list[RegistryAsyncStub],
    leases: list[asyncio.Future[str]],
    seconds: float,
    registered: asyncio.Event,
    changing: bool,
) -> tuple[float, int]:
    """Each instance heartbeats every TTL/3 from its Register on, staggered (its first
    beat at a random offset within the interval); returns (steady rate, not_found).

    The phase runs `seconds` from the moment every instance is registered
    (`registered`); its first interval is ramp-up, so the rate is counted over the
    rest of the phase only.
    """
    interval = TTL_MS / 3000
    window: list[float] = []  # [steady_from, stop], once every instance is registered
    sent = not_found = 0

    async def instance(i: int) -> None:
        nonlocal sent, not_found
        stub = stubs[i % len(stubs)]
        lease = await leases[i]
        next_at = time.monotonic() + random.uniform(0, interval)
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if window and time.monotonic() >= window[1]:
                return
            try:
                await stub.Heartbeat(
                    pb.HeartbeatRequest(
                        lease_id=lease,
                        status=pb.SERVING,
                        load=pb.LoadReport(
                            in_flight=random.randint(0, 8) if changing else 1, cpu_percent=20.0
                        ),
                    )
                )
                if window and time.monotonic() >= window[0]:
                    sent += 1
            except grpc.aio.AioRpcError:
                not_found += 1
            next_at += interval

    async def clock() -> None:
        await registered.wait()
        now = time.monotonic()
        window[:] = [now + interval, now + max(seconds, 2 * interval)]

    await asyncio.gather(clock(), *(instance(i) for i in range(len(leases))))
    return sent / (window[1] - window[0]), not_found


async def discover_probe(
    stub: RegistryAsyncStub, services: int, seconds: float
) -> tuple[list[float], int]:
    """Discover latencies, and how many answers held no instance (all lapsed)."""
    latencies = []
    empty = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        svc = f"svc-{random.randrange(services)}"
        t0 = time.perf_counter()
        reply = await stub.Discover(pb.DiscoverRequest(service=svc))
        latencies.append((time.perf_counter() - t0) * 1000)
        empty += not reply.instances
        await asyncio.sleep(0.01)
    return latencies, empty


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


async def deregister_all(stubs: list[RegistryAsyncStub], leases: list[str]) -> None:
    sem = asyncio.Semaphore(128)

    async def one(i: int, lease: str) -> None:
        async with sem:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stubs[i % len(stubs)].Deregister(pb.DeregisterRequest(lease_id=lease))

    await asyncio.gather(*(one(i, lease) for i, lease in enumerate(leases)))


async def sample_steady(
    client: httpx.AsyncClient, dep: stores.Deployment, seconds: float
) -> tuple[stores.Sample, stores.Sample]:
    """Counters at the start and the end of the heartbeat phase's steady part."""
    interval = TTL_MS / 3000
    end = time.monotonic() + max(seconds, 2 * interval)
    await asyncio.sleep(interval)
    first = await stores.sample(client, dep)
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    return first, await stores.sample(client, dep)


class SizeFailed(Exception):
    """A size that could not be measured (its instances did not all register)."""


async def run_size(
    dep: stores.Deployment,
    pool: ProcessPoolExecutor,
    size: int,
    seconds: float,
    changes: int,
    register_limit: float,
    changing: bool,
) -> Result:
    # Replicas take turns: with two, instance i talks to replica i % 2.
    addresses = [dep.registries[k % len(dep.registries)] for k in range(4)]
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    try:
        stubs: list[RegistryAsyncStub] = [pb_grpc.RegistryStub(ch) for ch in channels]
        loop = asyncio.get_running_loop()
        granted: list[asyncio.Future[str]] = [loop.create_future() for _ in range(size)]
        registered = asyncio.Event()
        async with httpx.AsyncClient() as client:
            before = await stores.sample(client, dep)
            load = asyncio.ensure_future(
                heartbeat_load(stubs, granted, seconds, registered, changing)
            )
            try:
                started = time.monotonic()
                leases = ["" for _ in range(size)]
                try:
                    async with asyncio.timeout(register_limit):
                        leases = await register_all(stubs, size, 0, granted)
                except (TimeoutError, grpc.aio.AioRpcError) as exc:
                    done = sum(f.done() for f in granted)
                    why = (
                        f"not within {register_limit:g}s"
                        if isinstance(exc, TimeoutError)
                        else f"then {exc.code().name}: {exc.details()}"
                    )
                    raise SizeFailed(
                        f"{dep.store} {size}: registered {done} of {size} in "
                        f"{time.monotonic() - started:.0f}s, {why}"
                    ) from exc
                register_s = size / (time.monotonic() - started)
                registered.set()
                services = (size + PER_SERVICE - 1) // PER_SERVICE
                spacing = max(0.01, 0.8 * seconds / changes)
                probing = loop.run_in_executor(
                    pool,
                    stores.probe,
                    dep.registries[0],
                    dep.registries[-1],
                    changes,
                    spacing,
                    seconds,
                )
                (latencies, empty), (first, last) = await asyncio.gather(
                    discover_probe(stubs[0], services, seconds),
                    sample_steady(client, dep, seconds),
                )
                rate, not_found = await load
            finally:
                load.cancel()
            propagation = await probing
            after = await stores.sample(client, dep)
        listing = await stubs[0].ListServices(pb.ListServicesRequest())
        healthy = sum(s.healthy for s in listing.services if s.name.startswith("svc-"))
        lapses = after.registry.get("shoal_registry_lapses_total", 0.0) - before.registry.get(
            "shoal_registry_lapses_total", 0.0
        )
        cap = await capacity(stubs, leases, min(5.0, seconds))
        await deregister_all(stubs, leases)  # leave the registry empty for the next size
        return Result(
            store=dep.store,
            size=size,
            register_s=register_s,
            wanted_hb_s=size / (TTL_MS / 3000),
            sustained_hb_s=rate,
            lapsed=size - healthy + not_found,
            discover_p50_ms=statistics.median(latencies),
            discover_p99_ms=percentile(latencies, 0.99),
            discover_calls=len(latencies),
            discover_empty=empty,
            capacity_hb_s=cap,
            lapses_counted=round(lapses),
            etcd=stores.etcd_rates(first, last, dep.etcd_leader),
            propagation=propagation,
        )
    finally:
        for ch in channels:
            await ch.close(None)


async def run_all(args: argparse.Namespace, results: list[Result], failed: list[str]) -> None:
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        for store in args.store:
            async with stores.deploy(store) as dep:
                for size in args.sizes:
                    started = time.monotonic()
                    try:
                        results.append(
                            await run_size(
                                dep,
                                pool,
                                size,
                                args.seconds,
                                args.changes,
                                args.register_limit,
                                args.load == "changing",
                            )
                        )
                    except SizeFailed as exc:
                        failed.append(str(exc))
                        print(f"  {exc}", flush=True)
                        break  # a larger size would fail too; the store is left as it is
                    print(
                        f"  {store} {size}: done in {time.monotonic() - started:.0f}s",
                        flush=True,
                    )


def csv(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    return lambda text: [kind(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=csv(str), default=["memory", "etcd"])
    parser.add_argument("--sizes", type=csv(int), nargs="+", default=[[1000, 10_000]])
    parser.add_argument("--seconds", type=float, default=15.0, help="heartbeat phase per size")
    parser.add_argument("--changes", type=int, default=200, help="status changes the probe times")
    parser.add_argument(
        "--load",
        choices=["changing", "steady"],
        default="changing",
        help="the load each heartbeat reports: new every time (the worst case), or the same",
    )
    parser.add_argument(
        "--register-limit", type=float, default=120.0, help="seconds to register one size"
    )
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")
    args = parser.parse_args()
    args.sizes = [size for group in args.sizes for size in group]
    unknown = set(args.store) - {"memory", "etcd"}
    if unknown:
        parser.error(f"unknown store: {', '.join(sorted(unknown))}")
    results: list[Result] = []
    failed: list[str] = []

    async def bounded() -> None:
        async with asyncio.timeout(args.time_limit):
            await run_all(args, results, failed)

    try:
        asyncio.run(bounded())
    except TimeoutError:
        print(f"time limit ({args.time_limit:g}s) reached: the results so far")
    except KeyboardInterrupt:
        print("interrupted: the results so far")
    report(args, results, failed)


if __name__ == "__main__":
    main()
