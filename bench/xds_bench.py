"""xDS benchmark: proxyless throughput, and the registry's fan-out to 100 clients.

Run: .venv/bin/python -m bench.xds_bench [--rounds 5] [--seconds 5] [--concurrency 32]
     [--clients 100] [--changes 40] [--mtls]

- Throughput: 3 `shoal worker`s registered in a `shoal registry` (plaintext, memory);
  a plain grpcio load process (`bench.xds_load`, its own process per run) calls
  Worker/Echo through `xds:///echo-bench` (proxyless), through `ipv4:` the same three
  addresses (direct, round robin: no xDS), and through a client `shoal sidecar`.
  Rounds alternate the three so that drift hits each alike; each figure is the median
  over rounds, and the ratios are to direct: of the medians, and paired (the median of
  each round's ratio, which the goal for proxyless, at least 0.95, is judged on).
- Fan-out: `--clients` ADS streams, each on its own channel, subscribe to one
  service's endpoints; `--changes` times an instance registers, and each change is
  timed from the Register call to the moment the last stream has it (p50/p99/max of
  that, goal p99 under 1 s), with the registry's CPU for the phase (its process's
  user+system time) per change.
- ``--mtls``: the throughput part in the mesh `shoal up` runs (identity server, the
  registry on mTLS, each worker behind its own sidecar). The direct path and the
  proxyless one present a ``client`` leaf that `shoal identity-agent` keeps in files
  (xDS credentials from the bootstrap's file_watcher provider for proxyless; the same
  files as plain TLS credentials for direct) to the worker sidecars' inbound ports; the
  client sidecar path takes its own mTLS hop to them.
Every process is reaped when the run ends, on Ctrl-C too; all traffic is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psutil
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc.aio import EOF  # type: ignore[attr-defined]

from bench.sidecar_bench.procs import process, shoal
from bench.sidecar_bench.tlsstacks import inbound_address
from identity.cert_files import CertFiles
from identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service.xds.resources import ENDPOINTS
from shoal_cli.loadgen import percentile
from shoal_cli.mesh.trust import make_trust
from shoal_cli.xds_cmd import bootstrap_document

SERVICE = "echo-bench"
# Under --mtls the worker sidecars register the service their join token names.
MTLS_SERVICE = "worker"
WORKER = "shoal.worker.v1.Worker"
FAN = "fan-bench"


async def register(stub: Any, instance_id: str, service: str, address: str) -> None:
    await stub.Register(
        pb.RegisterRequest(
            instance=pb.Instance(
                instance_id=instance_id, service=service, address=address, grpc_services=[WORKER]
            ),
            ttl_ms=300_000,
        )
    )


async def load(
    target: str, seconds: float, concurrency: int, env: dict[str, str], certs: Path | None
) -> float:
    """Calls/s of one `bench.xds_load` process; any failed call fails the run."""
    # The worker sidecars' leaves name their service's identity in its DNS form.
    server_name = SpiffeId.service(DEFAULT_TRUST_DOMAIN, MTLS_SERVICE).dns_name
    tls = [] if certs is None else [str(certs), server_name]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.xds_load", target, str(seconds), str(concurrency), *tls,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, **env},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"the load process for {target} failed ({proc.returncode})")
    result = json.loads(out)
    if result["failures"]:
        raise RuntimeError(f"{result['failures']} calls failed through {target}")
    return float(result["calls"] / result["seconds"])


async def throughput(
    registry: str,
    workers: list[str],
    sidecar: str,
    args: argparse.Namespace,
    tmp: Path,
    certs: Path | None = None,
) -> dict[str, list[float]]:
    """Rounds of the three paths; with ``certs`` (``--mtls``) the two without a client
    sidecar present that leaf, and ``workers`` are the worker sidecars' inbound ports."""
    bootstrap = tmp / "xds.json"
    files = None if certs is None else CertFiles(certs)
    document = bootstrap_document([registry], "bench", "", "", files)
    bootstrap.write_text(json.dumps(document))
    service = SERVICE if certs is None else MTLS_SERVICE
    targets = {
        "direct": ("ipv4:" + ",".join(workers), {}, certs),
        "proxyless": (f"xds:///{service}", {"GRPC_XDS_BOOTSTRAP": str(bootstrap)}, certs),
        "client sidecar": (sidecar, {}, None),
    }
    rates: dict[str, list[float]] = {name: [] for name in targets}
    for n in range(args.rounds):
        for name, (target, env, tls) in targets.items():
            rates[name].append(await load(target, args.seconds, args.concurrency, env, tls))
        print(f"  round {n + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()))
    return rates


class Subscriber:
    """One ADS stream subscribed to ``FAN``'s endpoints, ACKing what it gets and
    noting when each address first appears."""

    def __init__(self, registry: str, n: int) -> None:
        # A connection of its own, as a client process has: grpc would otherwise put
        # every stream on one, up to the registry's 100 streams per connection.
        self._channel = grpc.aio.insecure_channel(
            registry, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self._node = base_pb2.Node(id=f"fan-{n}")
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            self._channel
        ).StreamAggregatedResources()
        self.seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._call.write(self._request())
        self._task = asyncio.create_task(self._read())

    def _request(self, version: str = "", nonce: str = "") -> discovery_pb2.DiscoveryRequest:
        return discovery_pb2.DiscoveryRequest(
            node=self._node, type_url=ENDPOINTS, resource_names=[FAN],
            version_info=version, response_nonce=nonce,
        )  # fmt: skip

    async def _read(self) -> None:
        while True:
            reply = await self._call.read()
            if reply is EOF:
                return
            now = time.perf_counter()
            for packed in reply.resources:
                cla = endpoint_pb2.ClusterLoadAssignment()
                packed.Unpack(cla)
                for locality in cla.endpoints:
                    for lb in locality.lb_endpoints:
                        sock = lb.endpoint.address.socket_address
                        self.seen.setdefault(f"{sock.address}:{sock.port_value}", now)
            await self._call.write(self._request(reply.version_info, reply.nonce))

    async def close(self) -> None:
        self._call.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._task
        await self._channel.close(None)


async def fan_out(registry: str, pid: int, stub: Any, args: argparse.Namespace) -> dict[str, Any]:
    subs = [Subscriber(registry, n) for n in range(args.clients)]
    try:
        await asyncio.gather(*(sub.start() for sub in subs))
        await asyncio.sleep(1.0)  # every stream has its first (empty) answer
        proc = psutil.Process(pid)
        cpu0 = sum(proc.cpu_times()[:2])
        last: list[float] = []  # per change: until the last stream had it
        each: list[float] = []  # per change and stream
        for k in range(args.changes):
            address = f"10.9.{k // 250}.{k % 250 + 1}:7000"
            t0 = time.perf_counter()
            await register(stub, f"fan-{k}", FAN, address)
            deadline = t0 + 5.0
            while not all(address in s.seen for s in subs) and time.perf_counter() < deadline:
                await asyncio.sleep(0.002)
            times = [s.seen[address] - t0 for s in subs if address in s.seen]
            missed = len(subs) - len(times)
            each += times
            last.append(max(times) if not missed else float("inf"))
            await asyncio.sleep(0.1)
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        return {"last": last, "each": each, "cpu_per_change": cpu / args.changes}
    finally:
        for sub in subs:
            await sub.close()


@contextlib.asynccontextmanager
async def mesh(tmp: Path) -> AsyncIterator[tuple[str, int, list[str], str]]:
    async with contextlib.AsyncExitStack() as stack:
        reg = await stack.enter_async_context(
            shoal(tmp / "registry.log", "registry", "--listen", "127.0.0.1:0")
        )
        workers = [
            (await stack.enter_async_context(
                shoal(tmp / f"worker{n}.log", "worker", "--listen", "127.0.0.1:0")
            )).address
            for n in range(3)
        ]  # fmt: skip
        side = await stack.enter_async_context(
            shoal(tmp / "sidecar.log", "sidecar", "--listen", "127.0.0.1:0",
                  "--registry", reg.address)
        )  # fmt: skip
        yield reg.address, reg.proc.pid, workers, side.address


@contextlib.asynccontextmanager
async def mtls_mesh(tmp: Path) -> AsyncIterator[tuple[str, list[str], str, Path]]:
    """The mesh as `shoal up` runs it: an identity server, the registry on mTLS, three
    workers each behind its own sidecar (service ``worker``), a client sidecar, and
    `shoal identity-agent` keeping a ``client`` leaf in files; yields the registry, the
    worker sidecars' inbound ports, the client sidecar and the agent's directory."""
    trust = make_trust(tmp / "trust")
    async with contextlib.AsyncExitStack() as stack:
        identity = await stack.enter_async_context(
            shoal(tmp / "identity.log", "identity", "--ca", str(trust.ca_dir),
                  "--listen", "127.0.0.1:0")
        )  # fmt: skip
        trust = dataclasses.replace(trust, identity_address=identity.address)
        reg = await stack.enter_async_context(
            shoal(tmp / "registry.log", "registry", "--listen", "127.0.0.1:0",
                  env=trust.env("registry"))
        )  # fmt: skip
        inbound = []
        for n in range(3):
            worker = await stack.enter_async_context(
                shoal(tmp / f"worker{n}.log", "worker", "--listen", "127.0.0.1:0")
            )
            side = await stack.enter_async_context(
                shoal(tmp / f"worker-sidecar{n}.log", "sidecar", "--listen", "127.0.0.1:0",
                      "--inbound", "127.0.0.1:0", "--registry", reg.address,
                      "--service", MTLS_SERVICE, "--app", worker.address,
                      "--grpc-service", WORKER, env=trust.env("worker"))
            )  # fmt: skip
            inbound.append(inbound_address(side))
        client = await stack.enter_async_context(
            shoal(tmp / "client-sidecar.log", "sidecar", "--listen", "127.0.0.1:0",
                  "--registry", reg.address, env=trust.env("client"))
        )  # fmt: skip
        certs = tmp / "certs"
        await stack.enter_async_context(
            process(sys.executable, "-m", "shoal_cli.main", "identity-agent",
                    "--service", "client", "--out", str(certs), log=tmp / "agent.log",
                    ready="(keeping)", env=trust.env("client"))
        )  # fmt: skip
        yield reg.address, inbound, client.address, certs


def ms(values: list[float], q: float) -> str:
    return f"{1000 * percentile(values, q):.1f} ms"


async def run_mtls(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    async with mtls_mesh(tmp) as (registry, inbound, sidecar, certs):
        print(f"throughput on mTLS: {args.rounds} rounds of {args.seconds:g}s, "
              f"{args.concurrency} calls in flight, Worker/Echo of 16 bytes, to each "
              "worker's sidecar")  # fmt: skip
        return await throughput(registry, inbound, sidecar, args, tmp, certs)


def paired(rates: dict[str, list[float]], path: str) -> float:
    """The median over rounds of ``path``'s rate over direct's in the same round: the
    rounds alternate the paths, so this cancels the machine's drift between rounds,
    which on two shared cores is larger than the difference measured."""
    return statistics.median(a / d for a, d in zip(rates[path], rates["direct"], strict=True))


def report(rates: dict[str, list[float]]) -> None:
    direct = statistics.median(rates["direct"])
    print()
    print(f"{'path':>16} {'calls/s (median)':>16} {'x direct':>9} {'x direct, paired':>17}")
    for path, values in rates.items():
        median = statistics.median(values)
        print(f"{path:>16} {median:>16.0f} {median / direct:>9.3f} {paired(rates, path):>17.3f}")
    ratio = paired(rates, "proxyless")
    print(
        f"goal: proxyless >= 0.95 x direct (paired): {'MET' if ratio >= 0.95 else 'NOT MET'} "
        f"({ratio:.3f})"
    )


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-xds-bench-") as name:
        tmp = Path(name)
        if args.mtls:
            report(await run_mtls(args, tmp))
            return
        async with mesh(tmp) as (registry, pid, workers, sidecar):
            async with grpc.aio.insecure_channel(registry) as channel:
                stub = pb_grpc.RegistryStub(channel)
                for n, address in enumerate(workers):
                    await register(stub, f"echo-{n}", SERVICE, address)
                print(f"throughput: {args.rounds} rounds of {args.seconds:g}s, "
                      f"{args.concurrency} calls in flight, Worker/Echo of 16 bytes")  # fmt: skip
                rates = await throughput(registry, workers, sidecar, args, tmp)
                print(f"fan-out: {args.clients} ADS streams, {args.changes} registrations")
                fan = await fan_out(registry, pid, stub, args)
    report(rates)
    last = fan["last"]
    print(
        f"fan-out, Register until all {args.clients} streams have it: p50 {ms(last, 0.5)}, "
        f"p99 {ms(last, 0.99)}, max {ms(last, 1.0)}; per stream p50 {ms(fan['each'], 0.5)}, "
        f"p99 {ms(fan['each'], 0.99)}; registry CPU {1000 * fan['cpu_per_change']:.1f} ms "
        f"per change"
    )
    print(f"goal: p99 < 1 s: {'MET' if percentile(last, 0.99) < 1.0 else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument(
        "--mtls",
        action="store_true",
        help="throughput only, in an mTLS mesh: worker sidecars, the client's leaf from "
        "shoal identity-agent",
    )
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(args.time_limit):
            await run(args)

    try:
        asyncio.run(bounded())
    except TimeoutError:
        raise SystemExit(f"time limit ({args.time_limit:g}s) reached") from None


if __name__ == "__main__":
    main()
