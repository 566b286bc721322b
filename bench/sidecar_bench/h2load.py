"""h2load runs of unary Echo calls, each checked byte for byte and costed at the proxy.

h2load counts HTTP 200 as success even when grpc-status is an error, so the response
DATA bytes are checked too: every call must return the whole echoed frame.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from .measure import Meter, Run

if TYPE_CHECKING:
    from .stacks import Target
from .wire import ECHO

__all__ = ["h2load", "rounds"]


def _run_h2load(exe: str, address: str, frame: Path, args: list[str], log: Path) -> Run:
    log.unlink(missing_ok=True)
    cmd = [
        exe, f"http://{address}{ECHO}", "-d", str(frame),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "--log-file", str(log), "-t", "1", *args,
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    except subprocess.TimeoutExpired:
        return Run(0.0, ok=False, note="h2load ran past 180 s")
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    data = re.search(r"traffic: .*?, .*?, [\d.]+\w* \((\d+)\) data", out)
    if not (done and rps and data):
        return Run(0.0, ok=False, note="h2load output not understood: " + out[-300:])
    succeeded = int(done.group(2))
    data_bytes = int(data.group(1))
    size = frame.stat().st_size
    # Each successful call returns exactly one echoed frame: anything else is a gRPC error.
    ok = succeeded > 0 and data_bytes == succeeded * size and done.group(1) == done.group(2)
    times = sorted(int(line.split()[2]) for line in log.read_text().splitlines() if line.strip())
    p50 = statistics.median(times) / 1000 if times else 0.0
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] / 1000 if times else 0.0
    note = "" if ok else f"{succeeded} succeeded but {data_bytes} data bytes"
    return Run(float(rps.group(1)), p50, p99, ok=ok, note=note)


async def h2load(
    exe: str,
    address: str,
    frame: Path,
    *,
    calls: int,
    conns: int,
    streams: int,
    meter: Meter | None = None,
) -> Run:
    """One h2load run of ``calls`` calls over ``conns`` connections of ``streams`` streams.

    With a meter, the proxy's CPU and switches per call (and the whole ``Usage`` in
    ``spent``).
    """
    args = ["-n", str(calls), "-c", str(conns), "-m", str(streams)]
    log = frame.with_suffix(".log")
    if meter is None:
        return await asyncio.to_thread(_run_h2load, exe, address, frame, args, log)
    before = meter.usage()
    run = await asyncio.to_thread(_run_h2load, exe, address, frame, args, log)
    run.spent = meter.usage() - before
    run.cpu_us = run.spent.cpu / calls * 1e6
    run.switches = run.spent.switches / calls
    return run


async def rounds(
    exe: str, targets: dict[str, Target], frame: Path, count: int, calls: int, c: int, m: int
) -> dict[str, list[Run]]:
    """``count`` rounds that take the targets in turn, so the machine's drift hits each alike."""
    runs: dict[str, list[Run]] = {name: [] for name in targets}
    for _ in range(count):
        for name, t in targets.items():
            runs[name].append(
                await h2load(exe, t.address, frame, calls=calls, conns=c, streams=m, meter=t.meter)
            )
    return runs
