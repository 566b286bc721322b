"""The stores `bench.registry_bench` runs against, their counters, and the watch probe.

- `deploy("memory")`: one `shoal registry` process (replica A and B are the same).
- `deploy("etcd")`: a 3-member etcd on 127.0.0.1 (`tests.etcd_cluster.EtcdCluster`, the
  cluster the tests use, imported from the repo root) and 2 `shoal registry --store
  etcd://...` replicas over it. Every process is reaped when the context ends, however
  it ends (an exception, Ctrl-C, the bench's time limit).
- `sample`: the registries' Prometheus counters (`--metrics`) and etcd's own (each
  member serves /metrics on its client URL).
- `probe`: run in a process of its own so that the load generator's event loop does not
  delay it: a watcher on replica B timestamps the changes of status it makes through
  replica A.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from tests.etcd_cluster import ETCD, MISSING, EtcdCluster, free_ports

PROBE_SERVICE = "bench-probe"


@dataclass
class Deployment:
    store: str
    registries: list[str]  # gRPC addresses; [A] for memory, [A, B] for etcd
    registry_metrics: list[str]  # their /metrics URLs
    etcd_metrics: list[str] = field(default_factory=list)  # one per member
    etcd_leader: int = 0


@dataclass
class Sample:
    at: float
    registry: dict[str, float]  # summed over the replicas
    etcd: list[dict[str, float]]  # per member


def start_registry(metrics_port: int, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "SHOAL_LOG_LEVEL": "WARNING"}
    argv = [sys.executable, "-m", "shoal_cli.main", "registry", "--listen", "127.0.0.1:0"]
    argv += ["--metrics", f"127.0.0.1:{metrics_port}", "--max-instances", "20000", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("shoal registry serving on "):
        reap(proc)
        raise SystemExit(f"registry did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


def reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def deploy(store: str, replicas: int = 2) -> AsyncIterator[Deployment]:
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="shoal-registry-bench-") as tmp:
        try:
            if store == "memory":
                (port,) = free_ports(1)
                proc, address = start_registry(port, [])
                procs.append(proc)
                yield Deployment(store, [address], [f"http://127.0.0.1:{port}/metrics"])
                return
            if ETCD is None:
                raise SystemExit(MISSING)
            async with EtcdCluster(Path(tmp), members=3) as cluster:
                leader = await cluster.leader()
                url = "etcd://" + ",".join(cluster.endpoints)
                addresses, metrics = [], []
                try:
                    for port in free_ports(replicas):
                        proc, address = start_registry(port, ["--store", url, "--ttl-min", "1"])
                        procs.append(proc)
                        addresses.append(address)
                        metrics.append(f"http://127.0.0.1:{port}/metrics")
                    yield Deployment(
                        store,
                        addresses,
                        metrics,
                        [f"http://{e}/metrics" for e in cluster.endpoints],
                        leader,
                    )
                finally:  # the replicas before etcd, which they would keep calling
                    for proc in procs:
                        reap(proc)
        finally:
            for proc in procs:
                reap(proc)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each metric's value summed over its labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def sample(client: httpx.AsyncClient, dep: Deployment) -> Sample:
    async def one(url: str) -> dict[str, float]:
        return parse_metrics((await client.get(url, timeout=10)).text)

    registry: dict[str, float] = {}
    for scraped in await asyncio.gather(*(one(u) for u in dep.registry_metrics)):
        for name, value in scraped.items():
            registry[name] = registry.get(name, 0.0) + value
    etcd = list(await asyncio.gather(*(one(u) for u in dep.etcd_metrics)))
    return Sample(time.monotonic(), registry, etcd)


@dataclass
class EtcdRates:
    writes_s: float  # etcd_mvcc_put_total + etcd_mvcc_delete_total on the leader
    txns_s: float  # etcd_mvcc_txn_total on the leader (transactions of 2+ operations)
    proposals_s: float  # etcd_server_proposals_committed_total on the leader
    keepalives_s: float  # etcd_debugging_lease_renewed_total, summed over members


def etcd_rates(a: Sample, b: Sample, leader: int) -> EtcdRates | None:
    if not a.etcd:
        return None
    seconds = b.at - a.at

    def rate(names: tuple[str, ...], members: list[int]) -> float:
        total = sum(b.etcd[m].get(n, 0.0) - a.etcd[m].get(n, 0.0) for m in members for n in names)
        return total / seconds

    lead = [leader]
    return EtcdRates(
        writes_s=rate(("etcd_mvcc_put_total", "etcd_mvcc_delete_total"), lead),
        txns_s=rate(("etcd_mvcc_txn_total",), lead),
        proposals_s=rate(("etcd_server_proposals_committed_total",), lead),
        keepalives_s=rate(("etcd_debugging_lease_renewed_total",), list(range(len(a.etcd)))),
    )


@dataclass
class Propagation:
    latencies_ms: list[float]
    sent: int
    missed: int  # changes the watcher did not see within 2 s


def probe(source: str, watched: str, changes: int, spacing: float, budget: float) -> Propagation:
    """In its own process: `changes` changes of status through `source`, each timed
    from the Heartbeat's start to its UPSERT on a watcher of `watched`."""
    return asyncio.run(_probe(source, watched, changes, spacing, budget))


async def _probe(
    source: str, watched: str, changes: int, spacing: float, budget: float
) -> Propagation:
    stop = time.monotonic() + budget
    async with (
        grpc.aio.insecure_channel(source) as ch_a,
        grpc.aio.insecure_channel(watched) as ch_b,
    ):
        a, b = pb_grpc.RegistryStub(ch_a), pb_grpc.RegistryStub(ch_b)
        reply = await a.Register(
            pb.RegisterRequest(
                instance=pb.Instance(
                    instance_id="probe-0",
                    service=PROBE_SERVICE,
                    address="10.255.255.1:7000",
                    grpc_services=["bench.Echo"],
                ),
                ttl_ms=10_000,
            )
        )
        lease = reply.lease_id
        seen: asyncio.Queue[tuple[float, int]] = asyncio.Queue()
        ready = asyncio.Event()
        call = b.Watch(pb.WatchRequest(service=PROBE_SERVICE))

        async def read() -> None:
            async for event in call:
                now = time.perf_counter()
                if event.type == pb.WatchEvent.SNAPSHOT:
                    ready.set()
                elif event.type == pb.WatchEvent.UPSERT:
                    for inst in event.instances:
                        if inst.instance_id == "probe-0":
                            seen.put_nowait((now, inst.status))

        reader = asyncio.create_task(read())
        latencies: list[float] = []
        sent = missed = 0
        try:
            async with asyncio.timeout(10):
                await ready.wait()
            status = pb.SERVING
            while sent < changes and time.monotonic() < stop:
                status = pb.NOT_SERVING if status == pb.SERVING else pb.SERVING
                while not seen.empty():
                    seen.get_nowait()
                t0 = time.perf_counter()
                await a.Heartbeat(pb.HeartbeatRequest(lease_id=lease, status=status))
                sent += 1
                try:
                    async with asyncio.timeout(2):
                        while True:
                            at, got = await seen.get()
                            if got == status:
                                latencies.append((at - t0) * 1000)
                                break
                except TimeoutError:
                    missed += 1
                await asyncio.sleep(spacing)
        finally:
            call.cancel()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(grpc.aio.AioRpcError):
                await a.Deregister(pb.DeregisterRequest(lease_id=lease))
    return Propagation(latencies, sent, missed)
