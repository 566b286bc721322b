"""Sidecar overhead: h2load against a worker's Echo direct, through the sidecar, through nginx.

``python -m bench.sidecar_bench`` starts a registry, a ``shoal worker`` (registered
directly, so the sidecar path is one hop like nginx's), a ``shoal sidecar`` and an
nginx with ``grpc_pass`` (one worker, upstream keepalive), all on 127.0.0.1. For
each target it runs h2load for throughput (fixed time, several connections and
streams) and for latency at concurrency 1, and reports req/s, p50 and p99 (from
h2load's per-request log). Both measures run in rounds that take the targets in
turn, and each target keeps its median round, so drift in what else the machine
does hits every target alike; the throughput ratios are the medians of each
round's ratio to that round's direct run. h2load counts HTTP 200 as success even when
grpc-status is an error, so the response DATA bytes are checked too: every call
must return the whole echoed frame.

Targets: the sidecar's throughput ratio to direct at least nginx's, and at most
0.3 ms added p50 at concurrency 1. Needs ``h2load`` and ``nginx``
(Debian: ``apt-get install -y nghttp2-client nginx``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from protos import worker_pb2

SERVICE = "shoal.worker.v1.Worker"
METHOD = f"/{SERVICE}/Echo"
PAYLOAD = b"x" * 64
# EchoReply has the same field as EchoRequest, so the reply's bytes equal the request's.
MESSAGE = worker_pb2.EchoRequest(payload=PAYLOAD).SerializeToString()
# A gRPC message frame: no compression, 4-byte length, then the message.
FRAME = b"\x00" + len(MESSAGE).to_bytes(4, "big") + MESSAGE
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # nginx ends a connection after 1000 requests by default; h2load does not reconnect.
    keepalive_requests 100000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream echo {{ server {upstream}; keepalive 64; keepalive_requests 100000000; }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ grpc_pass grpc://echo; }}
    }}
}}
"""


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    ok: bool
    note: str


LOAD_ROUNDS = 5
LATENCY_ROUNDS = 5


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def _free_port() -> int:
    # Only nginx needs a port chosen ahead; the gRPC servers bind port 0 themselves.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _process(*args: str, ready: str | None = None) -> AsyncIterator[str]:
    """Run a child process; yield the address from its ready line; always reap it."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        address = ""
        if ready is not None:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            match = re.search(ready, line)
            if match is None:
                raise RuntimeError(f"{args[0]} did not start: {line!r}")
            address = match.group(1)
        yield address
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _h2load(h2load: str, address: str, args: list[str], tmp: Path) -> Result:
    log = tmp / "h2load.log"
    log.unlink(missing_ok=True)
    cmd = [
        h2load, f"http://{address}{METHOD}", "-d", str(tmp / "frame.bin"),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "--log-file", str(log), *args,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    data = re.search(r"traffic: .*?, .*?, [\d.]+\w* \((\d+)\) data", out)
    if not (done and rps and data):
        return Result(0.0, 0.0, 0.0, False, "h2load output not understood: " + out[-300:])
    succeeded = int(done.group(2))
    data_bytes = int(data.group(1))
    # Each successful call returns exactly one echoed frame: anything else is a gRPC error.
    ok = succeeded > 0 and data_bytes == succeeded * len(FRAME) and done.group(1) == done.group(2)
    times = sorted(int(line.split()[2]) for line in log.read_text().splitlines() if line.strip())
    p50 = statistics.median(times) / 1000 if times else 0.0
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] / 1000 if times else 0.0
    note = "" if ok else f"{succeeded} succeeded but {data_bytes} data bytes"
    return Result(float(rps.group(1)), p50, p99, ok, note)


async def _register(registry: str, upstream: str) -> None:
    async with grpc.aio.insecure_channel(registry) as channel:
        await pb_grpc.RegistryStub(channel).Register(
            pb.RegisterRequest(
                instance=pb.Instance(
                    instance_id="bench-worker", service="bench", address=upstream,
                    grpc_services=[SERVICE],
                ),
                ttl_ms=300_000,
            )
        )  # fmt: skip


async def _wait_serving(address: str) -> None:
    channel: Any
    async with grpc.aio.insecure_channel(address) as channel:
        echo = channel.unary_unary(METHOD)
        for _ in range(200):
            try:
                if await echo(MESSAGE, timeout=2) == MESSAGE:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no echo through {address}")


async def run(duration: int, connections: int, streams: int, latency_calls: int) -> int:
    h2load, nginx = _tool("h2load"), _tool("nginx")
    if h2load is None or nginx is None:
        missing = " and ".join(n for n, p in (("h2load", h2load), ("nginx", nginx)) if not p)
        print(f"sidecar_bench: {missing} not found. Install them (Debian/Ubuntu):")
        print("    sudo apt-get update && sudo apt-get install -y nghttp2-client nginx")
        return 2
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "frame.bin").write_bytes(FRAME)
        async with contextlib.AsyncExitStack() as stack:
            registry = await stack.enter_async_context(
                _process(py, "-m", "shoal_cli.main", "registry", "--listen", "127.0.0.1:0",
                         "--log-level", "WARNING", ready=r"serving on (\S+)")
            )  # fmt: skip
            upstream = await stack.enter_async_context(
                _process(py, "-m", "shoal_cli.main", "worker", "--listen", "127.0.0.1:0",
                         "--log-level", "WARNING", ready=r"serving on (\S+)")
            )  # fmt: skip
            await _register(registry, upstream)
            sidecar = await stack.enter_async_context(
                _process(py, "-m", "shoal_cli.main", "sidecar", "--listen", "127.0.0.1:0",
                         "--registry", registry, "--log-level", "WARNING",
                         ready=r"serving on (\S+)")
            )  # fmt: skip
            port = _free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, port=port))
            await stack.enter_async_context(_process(nginx, "-p", str(tmp), "-c", str(conf)))
            proxied = f"127.0.0.1:{port}"
            for address in (upstream, sidecar, proxied):
                await _wait_serving(address)
            targets = {"direct": upstream, "sidecar": sidecar, "nginx": proxied}
            load = ["-D", str(duration), "-c", str(connections), "-m", str(streams), "-t", "1"]
            warm = ["-n", "2000", "-c", str(connections), "-m", str(streams), "-t", "1"]
            single = ["-n", str(latency_calls), "-c", "1", "-m", "1", "-t", "1"]
            for address in targets.values():
                # Warm up (connections, caches, the JIT-less interpreter's dicts); not counted.
                await asyncio.to_thread(_h2load, h2load, address, warm, tmp)
            rounds: dict[str, list[Result]] = {name: [] for name in targets}
            for _ in range(LOAD_ROUNDS):
                for name, address in targets.items():
                    rounds[name].append(
                        await asyncio.to_thread(_h2load, h2load, address, load, tmp)
                    )
            loaded = {name: _median(results, by_rps=True) for name, results in rounds.items()}
            # Each round's ratio compares runs made moments apart, which cancels most of
            # the machine's drift between rounds.
            per_round = {
                name: [
                    r.rps / d.rps if d.rps else 0.0
                    for r, d in zip(runs, rounds["direct"], strict=True)
                ]
                for name, runs in rounds.items()
            }
            for name in ("sidecar", "nginx"):
                print(f"{name} / direct by round: " + " ".join(f"{x:.2f}" for x in per_round[name]))
            ratios = {name: statistics.median(values) for name, values in per_round.items()}
            rounds = {name: [] for name in targets}
            for _ in range(LATENCY_ROUNDS):
                for name, address in targets.items():
                    rounds[name].append(
                        await asyncio.to_thread(_h2load, h2load, address, single, tmp)
                    )
            serial = {name: _median(results) for name, results in rounds.items()}
    return _report(loaded, ratios, serial, connections, streams)


def _median(results: list[Result], *, by_rps: bool = False) -> Result:
    """The median round (by req/s or by p50); a failed round is reported instead."""
    failed = [r for r in results if not r.ok]
    if failed:
        return failed[0]
    ordered = sorted(results, key=lambda r: r.rps if by_rps else r.p50_ms)
    return ordered[len(ordered) // 2]


def _report(
    loaded: dict[str, Result],
    ratios: dict[str, float],
    serial: dict[str, Result],
    c: int,
    m: int,
) -> int:
    print(
        f"h2load, worker Echo (64-byte payload); load: {c} conns x {m} streams, "
        f"median of {LOAD_ROUNDS} rounds; latency: 1 x 1, median of {LATENCY_ROUNDS} rounds"
    )
    print(
        f"{'target':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}   {'c=1 p50':>8} {'c=1 p99':>8}"
    )
    for name in loaded:
        a, b = loaded[name], serial[name]
        print(
            f"{name:<8} {a.rps:>10.0f} {a.p50_ms:>8.3f} {a.p99_ms:>8.3f}   "
            f"{b.p50_ms:>8.3f} {b.p99_ms:>8.3f}"
        )
    bad = [f"{n} ({r.note})" for n, r in [*loaded.items(), *serial.items()] if not r.ok]
    if bad:
        print("FAILED calls (grpc errors or missing data): " + ", ".join(bad))
        return 1
    sidecar_ratio, nginx_ratio = ratios["sidecar"], ratios["nginx"]
    added = serial["sidecar"].p50_ms - serial["direct"].p50_ms
    nginx_added = serial["nginx"].p50_ms - serial["direct"].p50_ms
    print(
        f"throughput ratio to direct (median of per-round ratios): "
        f"sidecar {sidecar_ratio:.2f}, nginx {nginx_ratio:.2f}"
    )
    print(f"added p50 at c=1: sidecar {added:.3f} ms, nginx {nginx_added:.3f} ms")
    met_ratio = sidecar_ratio >= nginx_ratio
    met_latency = added <= 0.3
    print(f"target throughput ratio >= nginx's: {'MET' if met_ratio else 'NOT MET'}")
    print(f"target added p50 <= 0.3 ms:         {'MET' if met_latency else 'NOT MET'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=int, default=4, help="seconds of load per target and round"
    )
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams each")
    parser.add_argument("--latency-calls", type=int, default=3000)
    args = parser.parse_args()
    return asyncio.run(run(args.duration, args.connections, args.streams, args.latency_calls))


if __name__ == "__main__":
    sys.exit(main())
