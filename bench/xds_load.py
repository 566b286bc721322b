"""One load process of `bench.xds_bench`: plain grpcio, nothing of Shoal's.

    python -m bench.xds_load TARGET SECONDS CONCURRENCY

Calls Worker/Echo on TARGET (``xds:///SERVICE``, ``ipv4:A,B,C`` or a sidecar's
address) with CONCURRENCY calls in flight for SECONDS after a warm-up, and prints one
JSON line: calls, failures, seconds. An ``ipv4:`` list is balanced round robin, as
the xDS cluster is, so that the two differ only in where the addresses come from.
A ``xds:`` target reads its bootstrap from GRPC_XDS_BOOTSTRAP, set by the parent.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

ECHO = "/shoal.worker.v1.Worker/Echo"
# EchoRequest{payload: 16 bytes}, serialized by hand: this client imports no Shoal code.
REQUEST = b"\x0a\x10" + b"x" * 16
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


async def run(target: str, seconds: float, concurrency: int) -> dict[str, float]:
    options = [("grpc.service_config", ROUND_ROBIN)] if target.startswith("ipv4:") else []
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        echo = channel.unary_unary(ECHO, None, None)  # bytes in, bytes out
        await echo(REQUEST, timeout=10, wait_for_ready=True)  # resolved, connected
        calls = failures = 0
        counting = False

        async def caller(stop_at: float) -> None:
            nonlocal calls, failures
            while time.monotonic() < stop_at:
                try:
                    await echo(REQUEST, timeout=5)
                    calls += counting
                except grpc.aio.AioRpcError:
                    failures += 1

        warm = time.monotonic() + 1.0
        await asyncio.gather(*(caller(warm) for _ in range(concurrency)))
        counting = True
        started = time.monotonic()
        await asyncio.gather(*(caller(started + seconds) for _ in range(concurrency)))
        return {"calls": calls, "failures": failures, "seconds": time.monotonic() - started}


def main() -> None:
    target, seconds, concurrency = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(run(target, seconds, concurrency))), flush=True)


if __name__ == "__main__":
    main()
