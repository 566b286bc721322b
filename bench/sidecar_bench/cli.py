"""The command line: which parts, how many rounds, and the run that starts and reaps it all."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .large import large
from .measure import MIB
from .procs import PACKAGES, missing_tools, shoal, tool
from .report import Verdict
from .stacks import idle_rss, one_hop, two_hop
from .stream import stream
from .tls import TlsPlan, tls_part
from .tlsstacks import tls
from .trace import TracePlan, trace_part, trace_stacks
from .unary import UnaryPlan, memory, two_hops, unary
from .wire import echo_message, grpc_frame

__all__ = ["main"]

PARTS = ("unary", "stream", "twohop", "large", "tls", "trace")
LARGE_SIZES = (1 * MIB, 4 * MIB)


@dataclass
class Plan:
    """Everything a run does, from the flags."""

    parts: set[str]
    quick: bool
    unary: UnaryPlan
    stream_rounds: int
    stream_messages: int
    stream_streams: int
    stream_outstanding: int
    twohop_rounds: int
    twohop_calls: int
    large_rounds: int
    large_calls: dict[int, int]
    tls: TlsPlan
    trace: TracePlan


def _plan(args: argparse.Namespace, parts: set[str]) -> Plan:
    quick = args.quick
    rounds = args.rounds or (1 if quick else 5)
    few = args.rounds or (1 if quick else 3)
    return Plan(
        parts=parts,
        quick=quick,
        unary=UnaryPlan(
            rounds=rounds,
            calls=args.calls or (1500 if quick else 8000),
            conns=args.connections,
            streams=args.streams,
            latency_rounds=rounds,
            latency_calls=args.latency_calls or (300 if quick else 2000),
        ),
        stream_rounds=few,
        stream_messages=args.stream_messages or (2000 if quick else 12000),
        stream_streams=4,
        stream_outstanding=64,
        twohop_rounds=rounds,
        twohop_calls=args.latency_calls or (300 if quick else 2000),
        large_rounds=few,
        large_calls={1 * MIB: 10, 4 * MIB: 4} if quick else {1 * MIB: 150, 4 * MIB: 40},
        tls=TlsPlan(
            # More, shorter rounds than unary's: the goals are ratios of stacks run
            # seconds apart, and a busy machine drifts between them.
            rounds=args.rounds or (1 if quick else 7),
            calls=args.calls or (1500 if quick else 6000),
            conns=args.connections,
            streams=args.streams,
            handshake_rounds=few,
            handshakes=args.handshakes or (300 if quick else 1500),
            threads=args.handshake_threads,
        ),
        trace=TracePlan(
            rounds=args.rounds or (1 if quick else 7),
            calls=args.calls or (1500 if quick else 6000),
            conns=args.connections,
            streams=args.streams,
        ),
    )


def _version(exe: str, flag: str) -> str:
    out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def _step(text: str) -> None:
    print(f"sidecar_bench: {text} ...", file=sys.stderr, flush=True)


async def run(plan: Plan) -> int:
    h2load = tool("h2load") or "h2load"
    ngx, hap = tool("nginx") or "nginx", tool("haproxy") or "haproxy"
    if plan.quick:
        print("sidecar_bench: --quick is a smoke run: CPU comes in 10 ms ticks, so over so few "
              "calls its figures are too coarse to judge a target by")  # fmt: skip
    print(
        f"sidecar_bench: all on 127.0.0.1, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; {_version(ngx, '-v')} (worker_processes 1, CPU and RSS "
        f"of master + worker); {_version(hap, '-v')} (nbthread 1, h2 both sides); the "
        "sidecar's data plane runs on one thread. CPU = the proxy's user + system time "
        "over a fixed number of calls, divided by them."
    )
    verdicts: list[Verdict] = []
    failed: list[str] = []
    idle: dict[str, int] = {}
    loaded: dict[str, int] = {}
    mesh_idle: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmpdir:
        tmp = Path(tmpdir)
        small = tmp / "echo-64.bin"
        small.write_bytes(grpc_frame(echo_message(64)))
        frames = {size: tmp / f"echo-{size // MIB}MiB.bin" for size in LARGE_SIZES}
        async with contextlib.AsyncExitStack() as outer:
            _step("starting a worker")
            worker = await outer.enter_async_context(
                shoal(tmp / "worker.log", "worker", "--listen", "127.0.0.1:0")
            )
            if plan.parts & {"unary", "stream", "large"}:
                async with contextlib.AsyncExitStack() as stack:
                    _step("starting a registry, a sidecar, nginx and HAProxy")
                    targets = await one_hop(stack, tmp, worker)
                    idle = await idle_rss(
                        {n: t.meter for n, t in targets.items() if t.meter is not None}
                    )
                    if "unary" in plan.parts:
                        _step("unary")
                        found, loaded, bad = await unary(h2load, targets, small, plan.unary)
                        verdicts += found
                        failed += bad
                    if "stream" in plan.parts:
                        _step("stream")
                        failed += await stream(
                            targets, plan.stream_rounds, plan.stream_messages,
                            plan.stream_streams, plan.stream_outstanding,
                        )  # fmt: skip
                    if "large" in plan.parts:
                        _step("large")
                        for size, frame in frames.items():
                            frame.write_bytes(grpc_frame(echo_message(size)))
                        failed += await large(
                            h2load, targets, frames, plan.large_rounds, plan.large_calls
                        )
            if "twohop" in plan.parts:
                async with contextlib.AsyncExitStack() as stack:
                    _step(
                        "starting two sidecars, two bare data planes, two nginx and two "
                        "HAProxy in a row"
                    )
                    targets, sidecars = await two_hop(stack, tmp, worker)
                    mesh_idle = await idle_rss(sidecars)
                    _step("two hops")
                    failed += await two_hops(
                        h2load, targets, sidecars, small, plan.twohop_rounds, plan.twohop_calls
                    )
            if "tls" in plan.parts:
                async with contextlib.AsyncExitStack() as stack:
                    _step(
                        "starting an identity server, two sidecars in a row plaintext and on "
                        "mTLS, two nginx in a row plaintext and with TLS"
                    )
                    stacks = await tls(stack, tmp, worker)
                    _step("TLS")
                    found, bad = await tls_part(h2load, stacks, small, plan.tls)
                    verdicts += found
                    failed += bad
            if "trace" in plan.parts:
                async with contextlib.AsyncExitStack() as stack:
                    _step("starting a collector and three pairs of sidecars (untraced, "
                          "sampling 0, sampling every call)")  # fmt: skip
                    trace = await trace_stacks(stack, tmp, worker)
                    _step("tracing")
                    found, bad = await trace_part(h2load, trace, small, plan.trace)
                    verdicts += found
                    failed += bad
    if idle:
        verdicts.append(memory(idle, loaded, mesh_idle))
    if failed:
        print("\nFAILED calls (gRPC errors or missing data): " + ", ".join(failed))
        return 1
    if verdicts:
        print("\n== targets")
        for verdict in verdicts:
            print("  " + verdict.line())
    return 0


async def _bounded(plan: Plan, limit: float) -> int:
    """``run`` within ``limit`` seconds; SIGTERM stops it as Ctrl-C does, reaping it all."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await asyncio.wait_for(run(plan), limit)


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(
        prog="python -m bench.sidecar_bench",
        description="The sidecar against nginx and HAProxy, in the same run: CPU per call, "
        "throughput, latency, memory; unary, streaming, two hops, large messages.",
    )
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts (default: all of {PARTS})"
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds for every part (default: 5 for unary "
        "and two hops, 3 for stream, large and TLS handshakes, 7 for TLS calls)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="one short round of every part")
    parser.add_argument("--calls", type=int, default=0,
                        help="unary calls a run (default 8000; tls: 6000)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams each")
    parser.add_argument(
        "--latency-calls", type=int, default=0, help="calls a run at c=1 (default 2000)"
    )
    parser.add_argument(
        "--stream-messages", type=int, default=0, help="CallStream messages a run (default 12000)"
    )
    parser.add_argument(
        "--handshakes", type=int, default=0, help="new mTLS connections a run (default 1500)"
    )
    parser.add_argument("--handshake-threads", type=int, default=4,
                        help="client threads opening them")  # fmt: skip
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for it all")
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        parser.error(f"--only takes a comma-separated list of {', '.join(PARTS)}")
    if min(args.rounds, args.calls, args.latency_calls, args.stream_messages, args.handshakes) < 0:
        parser.error("counts must not be negative")
    if args.handshake_threads < 1:
        parser.error("--handshake-threads must be at least 1")
    needed = (["haproxy"] if parts - {"tls", "trace"} else []) + ["nginx"]
    needed += ["h2load"] if parts - {"stream"} else []
    missing = missing_tools(needed)
    if missing:
        packages = " ".join(PACKAGES[name] for name in missing)
        print(
            f"sidecar_bench: {', '.join(missing)} not found; install with: "
            f"apt-get install -y {packages} (Debian/Ubuntu)",
            file=sys.stderr,
        )
        return 2
    start = time.monotonic()
    try:
        code = asyncio.run(_bounded(_plan(args, parts), args.time_limit))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("sidecar_bench: interrupted; the processes it started are stopped", file=sys.stderr)
        return 130
    except TimeoutError:
        print(f"sidecar_bench: stopped after {args.time_limit:.0f} s (--time-limit)")
        return 1
    except RuntimeError as exc:
        # A part did not start or a load generator failed: one line, not a traceback.
        print(f"sidecar_bench: {exc}")
        return 1
    print(f"sidecar_bench: done in {time.monotonic() - start:.0f} s")
    return code
