"""Unary Echo (64 bytes) by h2load: under load, one call at a time, memory, two hops."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from .h2load import h2load, rounds
from .measure import MIB, Meter
from .report import (
    Verdict,
    added,
    by_round,
    failures,
    fmt,
    median,
    per_round,
    ratios,
    relative_line,
    round_ratios,
    table,
    thread_shares,
    to_cheaper,
)
from .stacks import FLOOR, Target

__all__ = ["UnaryPlan", "memory", "two_hops", "unary"]

PROXIES = ("sidecar", "nginx", "haproxy")
RSS_TARGET_MIB = 40
ADDED_P50_TARGET_MS = 0.3


@dataclass
class UnaryPlan:
    """How much load each round puts on each target."""

    rounds: int
    calls: int
    conns: int
    streams: int
    latency_rounds: int
    latency_calls: int


async def unary(
    exe: str, targets: dict[str, Target], frame: Path, plan: UnaryPlan
) -> tuple[list[Verdict], dict[str, int], list[str]]:
    """The unary part: (verdicts, each proxy's peak RSS under the load, failures)."""
    for t in targets.values():
        # Warm up (connections, caches, the interpreter's dicts); not counted.
        await h2load(
            exe,
            t.address,
            frame,
            calls=min(2000, plan.calls),
            conns=plan.conns,
            streams=plan.streams,
        )
    meters = {name: t.meter for name, t in targets.items() if t.meter is not None}
    for meter in meters.values():
        meter.reset_peak()
    load = await rounds(exe, targets, frame, plan.rounds, plan.calls, plan.conns, plan.streams)
    peaks = {name: meter.peak_rss() for name, meter in meters.items()}
    serial = await rounds(exe, targets, frame, plan.latency_rounds, plan.latency_calls, 1, 1)
    ratio = ratios(load)
    print(
        f"\n== unary: h2load Echo (64-byte payload); load: {plan.conns} conns x {plan.streams} "
        f"streams, {plan.calls} calls a run, median of {plan.rounds} rounds; c=1: "
        f"{plan.latency_calls} calls a run, median of {plan.latency_rounds} rounds"
    )
    rows = []
    for name in targets:
        a, b = load[name], serial[name]
        rows.append([
            name, fmt(median(a, lambda r: r.rate), ".0f"), fmt(ratio[name], ".2f"),
            fmt(median(a, lambda r: r.cpu_us), ".1f"), fmt(median(a, lambda r: r.switches), ".2f"),
            fmt(median(a, lambda r: r.p50_ms), ".3f"), fmt(median(a, lambda r: r.p99_ms), ".3f"),
            fmt(median(b, lambda r: r.p50_ms), ".3f"), fmt(median(b, lambda r: r.p99_ms), ".3f"),
            fmt(median(b, lambda r: r.cpu_us), ".1f"),
        ])  # fmt: skip
    table(
        ["target", "req/s", "ratio", "CPU us/call", "cs/call", "p50 ms", "p99 ms",
         "c=1 p50", "c=1 p99", "c=1 CPU us"],
        rows,
    )  # fmt: skip
    proxies = {n: v for n, v in round_ratios(load).items() if n != "direct"}
    print(by_round("ratio to direct", proxies, ".2f"))
    print(by_round("CPU us/call", per_round(load, lambda r: r.cpu_us)))
    print(f"  sidecar CPU by thread under load: {thread_shares(load['sidecar'])}")
    cpu = {n: median(load[n], lambda r: r.cpu_us) or 0.0 for n in PROXIES}
    # Like the throughput ratio: each round's sidecar over the cheaper one of that round.
    relative = to_cheaper(load, lambda r: r.cpu_us)
    print(relative_line(relative, "call"))
    relative_cpu = statistics.median(relative) if relative else float("inf")
    extra = {n: added(serial, n) for n in PROXIES}
    print(
        "  added p50 at c=1 (median of per-round differences to direct): "
        + ", ".join(f"{n} {extra[n]:.3f} ms" for n in PROXIES)
    )
    verdicts = [
        Verdict(
            f"unary CPU/call: sidecar / the cheaper of nginx and HAProxy {relative_cpu:.2f} "
            f"<= 1 (median of per-round ratios; medians: sidecar {cpu['sidecar']:.1f}, nginx "
            f"{cpu['nginx']:.1f}, HAProxy {cpu['haproxy']:.1f} us)",
            relative_cpu <= 1.0,
        ),
        Verdict(
            f"unary throughput ratio to direct: sidecar {ratio['sidecar']:.2f} >= nginx "
            f"{ratio['nginx']:.2f} (HAProxy {ratio['haproxy']:.2f})",
            ratio["sidecar"] >= ratio["nginx"],
        ),
        Verdict(
            f"added p50 at c=1: sidecar {extra['sidecar']:.3f} ms <= {ADDED_P50_TARGET_MS} ms",
            extra["sidecar"] <= ADDED_P50_TARGET_MS,
        ),
    ]
    return verdicts, peaks, failures(load) + failures(serial)


def memory(idle: dict[str, int], loaded: dict[str, int], mesh_idle: dict[str, int]) -> Verdict:
    """Print idle and loaded RSS; the verdict on the sidecar's idle RSS."""
    print(
        "\n== memory: RSS in MiB; idle = after start-up and a few calls; loaded = peak during "
        "the unary load (nginx: master + worker summed)"
    )
    rows = [
        [name, f"{rss / MIB:.1f}", fmt(loaded[name] / MIB if name in loaded else None, ".1f")]
        for name, rss in idle.items()
    ]
    table(["target", "idle", "loaded"], rows)
    if mesh_idle:
        print("  idle in the two-hop mesh: " + ", ".join(
            f"{name} {rss / MIB:.1f}" for name, rss in mesh_idle.items()))  # fmt: skip
    sidecar = idle["sidecar"] / MIB
    return Verdict(
        f"sidecar idle RSS {sidecar:.1f} MiB <= {RSS_TARGET_MIB} MiB", sidecar <= RSS_TARGET_MIB
    )


async def two_hops(
    exe: str, targets: dict[str, Target], sidecars: dict[str, Meter], frame: Path,
    count: int, calls: int,
) -> list[str]:  # fmt: skip
    """Two proxies in a row, one call at a time: the p50 they add together; the failures."""
    for t in targets.values():
        await h2load(exe, t.address, frame, calls=500, conns=1, streams=1)
    before = {name: meter.usage() for name, meter in sidecars.items()}
    runs = await rounds(exe, targets, frame, count, calls, 1, 1)
    each = {name: meter.usage() - before[name] for name, meter in sidecars.items()}
    print(
        f"\n== two hops: h2load Echo (64 bytes), one call at a time, {calls} calls a run, "
        f"median of {count} rounds; CPU is both proxies' together"
    )
    extra = {n: added(runs, n) for n in targets if n != "direct"}
    rows = [
        [name, fmt(median(rs, lambda r: r.p50_ms), ".3f"),
         fmt(median(rs, lambda r: r.p99_ms), ".3f"), fmt(extra.get(name), ".3f"),
         fmt(median(rs, lambda r: r.cpu_us), ".1f")]
        for name, rs in runs.items()
    ]  # fmt: skip
    table(["target", "p50 ms", "p99 ms", "added p50", "CPU us/call"], rows)
    print(by_round("p50 ms", {n: [r.p50_ms for r in rs] for n, rs in runs.items()}, ".3f"))
    total = count * calls
    print("  each sidecar: " + ", ".join(
        f"{name} {u.cpu / total * 1e6:.1f} us/call" for name, u in each.items()))  # fmt: skip
    cheaper = min(extra["nginx x2"], extra["haproxy x2"])
    if cheaper > 0:
        print(
            f"  two sidecars add {extra['sidecar x2']:.3f} ms at p50, the cheaper pair "
            f"{cheaper:.3f} ms ({extra['sidecar x2'] / cheaper:.2f}x); "
            f"{FLOOR} (the data plane, a control plane deciding nothing) "
            f"{extra[FLOOR]:.3f} ms ({extra[FLOOR] / cheaper:.2f}x)"
        )
    return failures(runs)
