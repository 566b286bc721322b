"""serve(): the first signal drains with a grace period, the second forces."""

from __future__ import annotations

import asyncio
import os
import signal

from shoal_core.lifecycle import serve


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
