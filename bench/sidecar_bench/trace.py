"""The trace part: what tracing costs the sidecar per call.

Three pairs of sidecars in a row, as the mesh runs (a client sidecar, the worker's
sidecar, the worker), each pair with a registry of its own: one without tracing, one
tracing to a collector with sampling at 0 (every call still gets a ``traceparent``,
none is recorded), one tracing every call (each sidecar records and exports a span).
The collector is ``otlpsink``, a separate process, so only the sidecars' own work is
measured: CPU per call of both sidecars together, h2load rounds taking the pairs in
turn, the ratios medians of each round's ratio as in the other parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .h2load import h2load, rounds
from .measure import Run
from .procs import Child, process, shoal
from .report import Verdict, by_round, failures, fmt, median, per_round, table
from .stacks import Target, ready
from .wire import SERVICE

__all__ = ["TracePlan", "trace_part", "trace_stacks"]

UNTRACED, SAMPLED_OFF, TRACED = "untraced", "tracing, sample 0", "tracing, sample 1"
# The targets: all calls traced costs at most 10 % more CPU per call; sampling
# off, nothing measurable. One stack's CPU per call moves by 10-20 % from round to round
# on a shared 2-core machine; 5 % is within what the medians of 7 rounds still show.
TRACED_OVER_UNTRACED = 1.10
OFF_OVER_UNTRACED = 1.05


@dataclass
class TracePlan:
    rounds: int
    calls: int
    conns: int
    streams: int


@dataclass
class TraceStacks:
    targets: dict[str, Target]
    sink: Child


async def _pair(
    stack: contextlib.AsyncExitStack, tmp: Path, worker: Child, name: str, trace: list[str]
) -> tuple[Child, ...]:
    tag = name.replace(" ", "").replace(",", "-")
    registry = await stack.enter_async_context(
        shoal(tmp / f"registry-{tag}.log", "registry", "--listen", "127.0.0.1:0")
    )
    worker_side = await stack.enter_async_context(
        shoal(tmp / f"worker-sidecar-{tag}.log", "sidecar", "--listen", "127.0.0.1:0",
              "--inbound", "127.0.0.1:0", "--registry", registry.address, "--service", "bench",
              "--app", worker.address, "--grpc-service", SERVICE, "--grace", "1", *trace)
    )  # fmt: skip
    client_side = await stack.enter_async_context(
        shoal(tmp / f"client-sidecar-{tag}.log", "sidecar", "--listen", "127.0.0.1:0",
              "--registry", registry.address, "--grace", "1", *trace)
    )  # fmt: skip
    return client_side, worker_side


async def trace_stacks(stack: contextlib.AsyncExitStack, tmp: Path, worker: Child) -> TraceStacks:
    sink = await stack.enter_async_context(
        process(sys.executable, "-m", "bench.sidecar_bench.otlpsink",
                log=tmp / "otlpsink.log", ready=r"serving on (\S+)")
    )  # fmt: skip
    endpoint = ["--otlp-endpoint", f"http://{sink.address}"]
    pairs = {
        UNTRACED: await _pair(stack, tmp, worker, UNTRACED, []),
        SAMPLED_OFF: await _pair(
            stack, tmp, worker, SAMPLED_OFF, [*endpoint, "--trace-sample", "0"]
        ),
        TRACED: await _pair(stack, tmp, worker, TRACED, [*endpoint, "--trace-sample", "1"]),
    }
    return TraceStacks(await ready(pairs), sink)


def _ratios(load: dict[str, list[Run]], name: str) -> list[float]:
    return [
        a.cpu_us / b.cpu_us
        for a, b in zip(load[name], load[UNTRACED], strict=True)
        if a.cpu_us is not None and b.cpu_us
    ]


def _pooled(runs: list[Run], calls: int) -> float:
    """CPU per call over every round of ``calls`` calls: a second estimate beside the
    median."""
    spent = [r.spent.cpu for r in runs if r.spent is not None]
    return sum(spent) / (len(spent) * calls) * 1e6 if spent else 0.0


async def _received(sink: Child) -> int:
    """What the collector has counted (its last ``received N spans`` line)."""
    assert sink.proc.stdout is not None
    count = 0
    while True:
        try:
            line = await asyncio.wait_for(sink.proc.stdout.readline(), 1.5)
        except TimeoutError:
            return count
        if not line:
            return count
        count = int(line.split()[1])


async def trace_part(
    exe: str, stacks: TraceStacks, frame: Path, plan: TracePlan
) -> tuple[list[Verdict], list[str]]:
    """The trace part: (verdicts, failures)."""
    targets = stacks.targets
    for t in targets.values():  # connections, caches, the exporter's channel; not counted
        await h2load(exe, t.address, frame, calls=min(2000, plan.calls), conns=plan.conns,
                     streams=plan.streams)  # fmt: skip
    load = await rounds(exe, targets, frame, plan.rounds, plan.calls, plan.conns, plan.streams)
    spans = await _received(stacks.sink)
    print(
        f"\n== tracing, per call: h2load Echo (64 bytes) through two sidecars in a row "
        f"(plaintext), {plan.conns} conns x {plan.streams} streams, {plan.calls} calls a run, "
        f"median of {plan.rounds} rounds; CPU is both sidecars' together; spans go over "
        "OTLP/gRPC to a collector in another process"
    )
    rows = []
    for name, runs in load.items():
        over = _ratios(load, name)
        rows.append([
            name, fmt(median(runs, lambda r: r.rate), ".0f"),
            fmt(median(runs, lambda r: r.cpu_us), ".1f"),
            fmt(statistics.median(over) if over else None, ".3f"),
            fmt(median(runs, lambda r: r.p50_ms), ".3f"),
            fmt(median(runs, lambda r: r.p99_ms), ".3f"),
        ])  # fmt: skip
    table(["sidecars", "req/s", "CPU us/call", "x untraced", "p50 ms", "p99 ms"], rows)
    print(by_round("CPU us/call", per_round(load, lambda r: r.cpu_us)))
    pooled = {n: _pooled(runs, plan.calls) for n, runs in load.items()}
    print(
        "  all rounds at once (total CPU over total calls), x untraced: "
        + ", ".join(f"{n} {pooled[n] / (pooled[UNTRACED] or 1):.3f}" for n in load)
    )
    traced_calls = (plan.rounds * plan.calls + min(2000, plan.calls)) * 2
    print(
        f"  the collector received {spans} spans; two per traced call would be "
        f"{traced_calls} (plus the readiness probes)"
    )
    traced, off = (
        statistics.median(_ratios(load, TRACED)),
        statistics.median(_ratios(load, SAMPLED_OFF)),
    )
    cpu = {n: median(load[n], lambda r: r.cpu_us) or 0.0 for n in load}
    verdicts = [
        Verdict(
            f"tracing every call: CPU/call x untraced {traced:.3f} <= {TRACED_OVER_UNTRACED} "
            f"(medians {cpu[TRACED]:.1f} vs {cpu[UNTRACED]:.1f} us; {spans} spans received)",
            traced <= TRACED_OVER_UNTRACED and spans >= traced_calls,
        ),
        Verdict(
            f"tracing with sampling off: CPU/call x untraced {off:.3f} <= {OFF_OVER_UNTRACED} "
            f"(medians {cpu[SAMPLED_OFF]:.1f} vs {cpu[UNTRACED]:.1f} us)",
            off <= OFF_OVER_UNTRACED,
        ),
    ]
    return verdicts, failures(load)
