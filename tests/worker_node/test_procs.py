"""Waiting for child processes: pidfds on Python 3.11, on whichever loop starts the child."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from worker_node.procs import use_pidfd_child_watcher


@pytest.mark.skipif(
    sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"),
    reason="Python 3.12+ waits through pidfds itself; pidfds are Linux's",
)
def test_children_are_waited_for_without_a_thread_on_any_loop():
    use_pidfd_child_watcher()

    async def run() -> tuple[int, int]:
        before = set(threading.enumerate())
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)")
        started = set(threading.enumerate()) - before
        return await proc.wait(), len(started)

    got: list[tuple[int, int]] = []
    # A loop of its own in another thread: no watcher was ever attached to it.
    thread = threading.Thread(target=lambda: got.append(asyncio.run(run())))
    thread.start()
    thread.join(30)
    assert got == [(3, 0)]
    assert asyncio.run(run()) == (3, 0)
