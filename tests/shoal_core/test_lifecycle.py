"""serve(): the first signal drains with a grace period, the second forces."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from shoal_core.lifecycle import only_loopback, serve

SHOAL = [sys.executable, "-m", "shoal_cli.main"]


class SlowToClose:
    """A service whose graceful close takes the whole grace unless forced (a fake: pure logic)."""

    def __init__(self) -> None:
        self.graces: list[float | None] = []
        self._closed = asyncio.Event()
        self._forced = asyncio.Event()

    async def start(self) -> None:
        return None

    async def close(self, grace: float | None = None) -> None:
        self.graces.append(grace)
        if grace == 0:
            self._forced.set()
            return
        try:
            await asyncio.wait_for(self._forced.wait(), grace)
        except TimeoutError:
            pass
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def test_first_signal_drains_with_grace() -> None:
    service = SlowToClose()
    task = asyncio.create_task(serve(service, grace=0.2))
    await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 5)
    assert service.graces == [0.2]


async def test_second_signal_forces() -> None:
    service = SlowToClose()
    started = asyncio.Event()
    task = asyncio.create_task(serve(service, grace=30.0, on_started=started.set))
    await started.wait()
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.wait_for(task, 5)  # far sooner than the 30 s grace
    assert service.graces == [30.0, 0]


async def test_service_closing_itself_ends_serve() -> None:
    service = SlowToClose()
    task = asyncio.create_task(serve(service, grace=1.0))
    await asyncio.sleep(0.05)
    await service.close(0.01)
    await asyncio.wait_for(task, 5)
    # Signal handlers are gone again: SIGINT default handling is restored for the loop.
    assert not task.exception()


def _can_unshare_network() -> bool:
    return shutil.which("unshare") is not None and os.geteuid() == 0


@pytest.mark.skipif(not _can_unshare_network(), reason="needs root and unshare(1)")
def test_a_sidecar_with_only_loopback_drains_and_exits_isolated(tmp_path) -> None:
    # A network namespace of its own holds loopback alone, as a dead pod's does.
    started = time.monotonic()
    done = subprocess.run(
        ["unshare", "--net", *SHOAL, "sidecar", "--listen", "127.0.0.1:0",
         "--exit-when-isolated", "1", "--grace", "1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 30
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("shoal: no network but loopback for 1s")
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(only_loopback(), reason="this machine routes over loopback alone")
async def test_a_service_with_a_network_keeps_serving_when_asked_to_exit_if_isolated() -> None:
    service = SlowToClose()
    task = asyncio.create_task(serve(service, grace=0.2, exit_when_isolated=1.0))
    await asyncio.sleep(2.5)  # more than the bound and two looks at the routes
    assert not task.done()
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 5)
    assert service.graces == [0.2]
