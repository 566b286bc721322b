"""Running a service until it is told to stop, the same way in every Shoal process.

The first SIGTERM or SIGINT starts a graceful close bounded by a grace period;
a second one forces the close at once. Whatever was still running when the
grace ran out is logged by the service's own ``close``.

In a container that joins another's network namespace (a pod's), the namespace
can die under a running process, leaving it with loopback alone and nothing to
tell it. ``exit_when_isolated`` makes such a process drain and exit (``Isolated``)
so that its restart policy starts it again in the live namespace.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, Self

from shoal_core.errors import Isolated

__all__ = ["Service", "ServiceBase", "only_loopback", "serve", "stop_task"]

logger = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PARENT_ENV = "SHOAL_PARENT_PID"
_PARENT_POLL = 1.0
_ISOLATION_POLL = 1.0


async def _parent_gone(parent: int, drain: asyncio.Event, grace: float) -> None:
    """Drain once the process that started us is gone (we were re-parented)."""
    while os.getppid() == parent:
        await asyncio.sleep(_PARENT_POLL)
    logger.warning("supervisor (pid %d) is gone: draining for up to %.1fs", parent, grace)
    drain.set()


def only_loopback() -> bool:
    """True when this network namespace routes nothing but over loopback.

    Routes, not interfaces: a namespace whose veth is gone may still hold idle tunnel
    devices, but with no route through them nothing can be reached.
    """
    for table, iface_column in (("/proc/self/net/route", 0), ("/proc/self/net/ipv6_route", -1)):
        try:
            with open(table) as rows:
                lines = rows.read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields and fields[0] != "Iface" and fields[iface_column] != "lo":
                return False
    return True


async def _isolated(after: float, drain: asyncio.Event, why: list[str]) -> None:
    """Drain once nothing but loopback has been routable for ``after`` seconds."""
    since: float | None = None
    while True:
        await asyncio.sleep(_ISOLATION_POLL)
        if not only_loopback():
            since = None
            continue
        now = time.monotonic()
        if since is None:
            since = now
            logger.warning("no network but loopback; exiting if it lasts %.0fs", after)
        if now - since >= after:
            why.append(
                f"no network but loopback for {after:g}s: stopped so that a restart "
                "can join a live network"
            )
            logger.error("%s", why[0])
            drain.set()
            return


class Service(Protocol):
    """What ``serve`` drives: every Shoal server has this shape."""

    async def start(self) -> None: ...

    async def close(self, grace: float | None = None) -> None: ...

    async def wait_closed(self) -> None: ...


class ServiceBase(abc.ABC):
    """The shape every Shoal server shares: ``start``, ``close(grace)``, ``wait_closed``
    and ``async with`` (which closes with a one-second grace). A subclass calls
    ``_closed_now()`` once its ``close`` has finished."""

    def __init__(self) -> None:
        self._closed = asyncio.Event()

    @abc.abstractmethod
    async def start(self) -> None:
        """Start serving."""

    @abc.abstractmethod
    async def close(self, grace: float | None = None) -> None:
        """Stop: let what runs finish for ``grace`` seconds; a second call forces."""

    def _closed_now(self) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(grace=1.0)


async def serve(
    service: Service,
    *,
    grace: float,
    on_started: Callable[[], None] | None = None,
    exit_when_isolated: float | None = None,
) -> None:
    """Start ``service`` and run it until a signal asks it to stop or it closes itself.

    With ``exit_when_isolated``, also drain and raise ``Isolated`` once only loopback
    has been routable for that many seconds.
    """
    loop = asyncio.get_running_loop()
    drain = asyncio.Event()
    force = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not drain.is_set():
            logger.info("%s: draining for up to %.1fs (send again to force)", sig.name, grace)
            drain.set()
        else:
            logger.warning("%s again: forcing shutdown now", sig.name)
            force.set()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    tasks: list[asyncio.Task[object]] = []
    isolated: list[str] = []
    # Whether a supervisor started us is read before we say we serve: it may act on that
    # line and die at once, and a check made after would find us re-parented already and
    # never drain (the process would outlive its supervisor for good).
    parent = os.environ.get(PARENT_ENV, "")
    supervised = parent.isdigit() and int(parent) == os.getppid()
    try:
        await service.start()
        if on_started is not None:
            on_started()
        closed = asyncio.ensure_future(service.wait_closed())
        drained = asyncio.ensure_future(drain.wait())
        tasks += [closed, drained]
        # A supervisor (`shoal up`) names itself; if it dies without stopping us, drain.
        if supervised:
            tasks.append(asyncio.ensure_future(_parent_gone(int(parent), drain, grace)))
        if exit_when_isolated is not None:
            watch = _isolated(exit_when_isolated, drain, isolated)
            tasks.append(asyncio.ensure_future(watch))
        await asyncio.wait({closed, drained}, return_when=asyncio.FIRST_COMPLETED)
        if closed.done():
            return
        closing = asyncio.ensure_future(service.close(grace))
        forced = asyncio.ensure_future(force.wait())
        tasks += [closing, forced]
        await asyncio.wait({closing, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not closing.done():
            await service.close(0)
            await closing
        if isolated:
            raise Isolated(isolated[0])
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        for task in tasks:
            await stop_task(task)


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
