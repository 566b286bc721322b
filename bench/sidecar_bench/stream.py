"""CallStream bidi through each target: messages/s and the proxy's CPU per message."""

from __future__ import annotations

import contextlib

from .measure import Run
from .report import (
    by_round,
    failures,
    fmt,
    median,
    per_round,
    ratios,
    relative_line,
    round_ratios,
    table,
    to_cheaper,
)
from .stacks import Target
from .streamload import StreamLoad

__all__ = ["stream"]


async def _one(load: StreamLoad, target: Target, messages: int) -> Run:
    before = target.meter.usage() if target.meter is not None else None
    result = await load.run(messages)
    run = Run(
        result["messages"] / result["seconds"] if result["seconds"] else 0.0,
        ok=result["failed"] == 0 and not result["note"],
        note=f"{result['failed']} of {messages} failed: {result['note']}",
    )
    if target.meter is not None and before is not None:
        spent = target.meter.usage() - before
        run.cpu_us = spent.cpu / messages * 1e6
        run.switches = spent.switches / messages
    return run


async def stream(
    targets: dict[str, Target], count: int, messages: int, streams: int, outstanding: int
) -> list[str]:
    """The streaming part, printed; the failures."""
    runs: dict[str, list[Run]] = {name: [] for name in targets}
    async with contextlib.AsyncExitStack() as stack:
        loads = {
            name: await stack.enter_async_context(StreamLoad.start(t.address, streams, outstanding))
            for name, t in targets.items()
        }
        for _ in range(count):
            for name, t in targets.items():
                runs[name].append(await _one(loads[name], t, messages))
    ratio = ratios(runs)
    print(
        f"\n== stream: CallStream bidi, {streams} streams x {outstanding} outstanding on one "
        f"connection, {messages} messages a run (one 64-byte echo item each), median of "
        f"{count} rounds; load from a grpc.aio client in its own process (not counted)"
    )
    rows = [
        [name, fmt(median(rs, lambda r: r.rate), ".0f"), fmt(ratio[name], ".2f"),
         fmt(median(rs, lambda r: r.cpu_us), ".1f"), fmt(median(rs, lambda r: r.switches), ".2f")]
        for name, rs in runs.items()
    ]  # fmt: skip
    table(["target", "msgs/s", "ratio", "CPU us/msg", "cs/msg"], rows)
    proxies = {n: v for n, v in round_ratios(runs).items() if n != "direct"}
    print(by_round("ratio to direct", proxies, ".2f"))
    print(by_round("CPU us/msg", per_round(runs, lambda r: r.cpu_us)))
    print(relative_line(to_cheaper(runs, lambda r: r.cpu_us), "msg"))
    return failures(runs)
