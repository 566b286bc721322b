"""One load process of `bench.xds_bench`: plain grpcio, nothing of Shoal's.

    python -m bench.xds_load TARGET SECONDS CONCURRENCY [CERT_DIR]

Calls Worker/Echo on TARGET (``xds:///SERVICE``, ``ipv4:A,B,C`` or a sidecar's
address) with CONCURRENCY calls in flight for SECONDS after a warm-up, and prints one
JSON line: calls, failures, seconds. An ``ipv4:`` list is balanced round robin, as
the xDS cluster is, so that the two differ only in where the addresses come from.
A ``xds:`` target reads its bootstrap from GRPC_XDS_BOOTSTRAP, set by the parent.
With CERT_DIR (what `shoal identity-agent` keeps) the calls are on mTLS: an ``xds:``
target's through xDS credentials (the bootstrap names the files), an ``ipv4:`` one's
with that leaf, checking the worker's identity as a sidecar does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import grpc.experimental

ECHO = "/shoal.worker.v1.Worker/Echo"
# EchoRequest{payload: 16 bytes}, serialized by hand: this client imports no Shoal code.
REQUEST = b"\x0a\x10" + b"x" * 16
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# The worker sidecars' leaves name this (SpiffeId.dns_name of svc/worker in shoal.local).
WORKER_NAME = "worker.svc.shoal.local"


def channel_for(target: str, cert_dir: str | None) -> grpc.aio.Channel:
    options = [("grpc.service_config", ROUND_ROBIN)] if target.startswith("ipv4:") else []
    if cert_dir is None:
        return grpc.aio.insecure_channel(target, options=options)
    if target.startswith("xds:"):
        creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    else:
        files = Path(cert_dir)
        creds = grpc.ssl_channel_credentials(
            (files / "svid_bundle.pem").read_bytes(),
            (files / "svid_key.pem").read_bytes(),
            (files / "svid.pem").read_bytes(),
        )
        options.append(("grpc.ssl_target_name_override", WORKER_NAME))
    return grpc.aio.secure_channel(target, creds, options=options)


async def run(
    target: str, seconds: float, concurrency: int, cert_dir: str | None
) -> dict[str, float]:
    async with channel_for(target, cert_dir) as channel:
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
    cert_dir = sys.argv[4] if len(sys.argv) > 4 else None
    print(json.dumps(asyncio.run(run(target, seconds, concurrency, cert_dir))), flush=True)


if __name__ == "__main__":
    main()
