"""Large Echo messages (1 MiB, 4 MiB) through each target: throughput and RSS growth."""

from __future__ import annotations

from pathlib import Path

from .h2load import h2load, rounds
from .measure import MIB
from .report import by_round, failures, fmt, median, per_round, ratios, round_ratios, table
from .stacks import Target

__all__ = ["large"]

CONNS = 2


async def large(
    exe: str, targets: dict[str, Target], frames: dict[int, Path], count: int, calls: dict[int, int]
) -> list[str]:
    """One table per size, printed; the failures."""
    failed: list[str] = []
    meters = {name: t.meter for name, t in targets.items() if t.meter is not None}
    # Growth is against the RSS before the first large message, warm-up calls included.
    before = {name: meter.rss() for name, meter in meters.items()}
    for size, frame in frames.items():
        for meter in meters.values():
            meter.reset_peak()
        for t in targets.values():
            await h2load(exe, t.address, frame, calls=4, conns=CONNS, streams=1)
        runs = await rounds(exe, targets, frame, count, calls[size], CONNS, 1)
        growth = {name: meter.peak_rss() - before[name] for name, meter in meters.items()}
        mib = size / MIB
        ratio = ratios(runs)
        print(
            f"\n== large: Echo of {mib:.0f} MiB, {CONNS} connections x 1 stream, {calls[size]} "
            f"calls a run, median of {count} rounds; RSS growth = peak over this size's calls "
            "minus RSS before the first large message"
        )
        rows = []
        for name, rs in runs.items():
            rate = median(rs, lambda r: r.rate)
            cpu = median(rs, lambda r: r.cpu_us)
            rows.append([
                name, fmt(rate, ".1f"), fmt(rate * mib if rate is not None else None, ".0f"),
                fmt(ratio[name], ".2f"), fmt(median(rs, lambda r: r.p50_ms), ".1f"),
                fmt(cpu / mib if cpu is not None else None, ".0f"),
                fmt(growth[name] / MIB if name in growth else None, ".1f"),
                fmt((before[name] + growth[name]) / MIB if name in growth else None, ".1f"),
            ])  # fmt: skip
        table(
            ["target", "calls/s", "MiB/s", "ratio", "p50 ms", "CPU us/MiB", "RSS growth MiB",
             "peak MiB"],
            rows,
        )  # fmt: skip
        proxies = {n: v for n, v in round_ratios(runs).items() if n != "direct"}
        print(by_round("ratio to direct", proxies, ".2f"))
        print(by_round("CPU us/MiB", {
            n: [v / mib if v is not None else None for v in vs]
            for n, vs in per_round(runs, lambda r: r.cpu_us).items()
        }, ".0f"))  # fmt: skip
        failed += failures(runs)
    return failed
