"""One load process of `bench.xds_bench`: plain grpcio, nothing of Shoal's.

    python -m bench.xds_load TARGET SECONDS CONCURRENCY [CERT_DIR SERVER_NAME]

Calls Worker/Echo on TARGET (``xds:///SERVICE``, ``ipv4:A,B,C`` or a sidecar's
address) with CONCURRENCY calls in flight for SECONDS after a warm-up, and prints one
JSON line: calls, failures, seconds. An ``ipv4:`` list is balanced round robin, as
the xDS cluster is, so that the two differ only in where the addresses come from.
A ``xds:`` target reads its bootstrap from GRPC_XDS_BOOTSTRAP, set by the parent.
With CERT_DIR (what `shoal identity-agent` keeps) the calls are on mTLS: an ``xds:``
target's through xDS credentials (the bootstrap names the files), an ``ipv4:`` one's
with that leaf, checking that the server's certificate names SERVER_NAME (the
worker's identity in its DNS form, as a sidecar checks it).
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


def channel_for(target: str, tls: tuple[str, str] | None) -> grpc.aio.Channel:
    options = [("grpc.service_config", ROUND_ROBIN)] if target.startswith("ipv4:") else []
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    cert_dir, server_name = tls
    if target.startswith("xds:"):
        creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    else:
        files = Path(cert_dir)
        creds = grpc.ssl_channel_credentials(
            (files / "svid_bundle.pem").read_bytes(),
            (files / "svid_key.pem").read_bytes(),
            (files / "svid.pem").read_bytes(),
        )
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, creds, options=options)


async def run(
    target: str, seconds: float, concurrency: int, tls: tuple[str, str] | None
) -> dict[str, float]:
    async with channel_for(target, tls) as channel:
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
    tls = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else None
    print(json.dumps(asyncio.run(run(target, seconds, concurrency, tls))), flush=True)


if __name__ == "__main__":
    main()
