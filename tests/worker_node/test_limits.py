"""The psutil watchdog that enforces limits where rlimits do not exist."""

from __future__ import annotations

import asyncio
import sys

from worker_node.limits import MIB, LimitSpec, Watchdog
from worker_node.procs import kill_tree


async def test_the_watchdog_kills_a_tree_over_its_memory_limit():
    hog = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; b = bytearray(200 * 1024 * 1024); time.sleep(30)"
    )
    reasons: list[str] = []

    def exceeded(why: str) -> None:
        reasons.append(why)
        kill_tree(hog.pid)

    watchdog = Watchdog(hog.pid, LimitSpec(memory_bytes=64 * MIB), exceeded, interval=0.05)
    watchdog.start()
    try:
        code = await asyncio.wait_for(hog.wait(), 20)
    finally:
        watchdog.stop()
        if hog.returncode is None:
            hog.kill()
            await hog.wait()
    assert code == -9
    assert reasons and "over its limit of 64 MiB" in reasons[0]
