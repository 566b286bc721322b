"""Where the dashboard's data comes from: the registry's Watch, and every sidecar's page.

``RegistryFeed`` follows Watch (a snapshot, then deltas) over the operator channel,
resuming from the last revision after a break, at the next replica when
``view.registry`` names several (``a,b,c``), paced by the one backoff, and refreshes
lease ages with a Discover every few seconds (Watch is silent while nothing changes).
``Scraper`` reads each target's ``/metrics`` about once a second, bounded in targets
(``MAX_TARGETS``), bytes per page, time per page and connections at once. Each owns
one task, started by ``start()`` and ended by ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import grpc
import httpx

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from shoal_cli.dashboard.figures import parse_page
from shoal_cli.dashboard.model import MeshView, Target
from shoal_cli.errors import UserError
from shoal_cli.operator import registry_channel
from shoal_core.backoff import Attempts, Backoff
from shoal_core.certifying import MeshIdentity
from shoal_core.errors import ShoalUserError
from shoal_core.replicas import Replicas

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub

__all__ = ["RegistryFeed", "Scraper", "stop_task"]

logger = logging.getLogger(__name__)

WATCH_BACKOFF = Backoff(initial=0.2, maximum=5.0)
LEASE_REFRESH = 2.0
MAX_PAGE_BYTES = 4 * 1024 * 1024
SCRAPE_TIMEOUT = 2.0
SCRAPE_INTERVAL = 1.0
MAX_CONNECTIONS = 16


class _WatchEnded(Exception):
    """The registry closed the stream (it is shutting down)."""


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Owned:
    """One background task, made by ``start()`` and cancelled and awaited by ``close()``."""

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=type(self).__name__)

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)


class RegistryFeed(_Owned):
    """Keeps ``view`` in step with the registry at ``view.registry`` (an address, or
    its replicas' comma-separated)."""

    def __init__(
        self, view: MeshView, mesh: MeshIdentity | None = None, backoff: Backoff = WATCH_BACKOFF
    ) -> None:
        self._view = view
        self._mesh = mesh
        self._attempts = Attempts(backoff)
        self._replicas = Replicas(view.registry)

    async def _run(self) -> None:
        while True:
            registry = self._replicas.current
            try:
                await self._follow(registry)
                why = "the registry ended the watch"
            except _WatchEnded:
                why = "the registry ended the watch"
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
            except (UserError, ShoalUserError) as exc:
                why = str(exc)
            except Exception:
                # A dashboard that silently stops following is worse than a logged bug.
                logger.exception("following registry %s failed", registry)
                why = "internal error (see the dashboard's log)"
            move = self._replicas.failed(registry)
            outage = self._view.connected or self._attempts.failures == 0
            self._view.registry_down(why)
            pause = self._attempts.failed()
            where = "again" if move is None else f"at the replica {move.to}"
            # Said once an outage, not once a retry: the page shows it all along.
            log = logger.warning if outage or (move is not None and move.first) else logger.debug
            log("registry %s: %s; watching %s in %.1fs", registry, why, where, pause)
            await asyncio.sleep(pause)

    async def _follow(self, registry: str) -> None:
        addresses = self._replicas.addresses
        async with registry_channel(registry, self._mesh, among=addresses) as channel:
            stub: RegistryAsyncStub = pb_grpc.RegistryStub(channel)
            call = stub.Watch(pb.WatchRequest(since_revision=self._view.revision))
            leases = asyncio.create_task(self._refresh_leases(stub), name="lease-ages")
            try:
                while True:
                    event = await call.read()
                    if not isinstance(event, pb.WatchEvent):
                        raise _WatchEnded()
                    if not self._view.connected:
                        logger.info("registry %s: watching", registry)
                        self._replicas.answered(registry)
                    self._view.apply(event)
                    self._attempts.succeeded()
            finally:
                call.cancel()
                await stop_task(leases)

    async def _refresh_leases(self, stub: RegistryAsyncStub) -> None:
        request = pb.DiscoverRequest(include_unhealthy=True)
        while True:
            await asyncio.sleep(LEASE_REFRESH)
            try:
                found = await stub.Discover(request, timeout=LEASE_REFRESH)
            except grpc.aio.AioRpcError as exc:
                logger.debug("lease ages not refreshed: %s", exc.code().name)
                continue
            self._view.refresh_leases(found.instances)


class _TooBig(Exception):
    pass


def _describe(exc: Exception) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"no answer within {SCRAPE_TIMEOUT:g}s"
    if isinstance(exc, httpx.ConnectError):
        return "unreachable (connection refused or failed)"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"/metrics answered HTTP {exc.response.status_code}"
    if isinstance(exc, _TooBig):
        return f"/metrics is over {MAX_PAGE_BYTES // 2**20} MiB"
    if isinstance(exc, ValueError | UnicodeDecodeError):
        return "/metrics is not Prometheus text"
    return f"failed ({type(exc).__name__})"


class Scraper(_Owned):
    """Scrapes every target ``view`` names, each ``interval`` seconds, into its history."""

    def __init__(self, view: MeshView, interval: float = SCRAPE_INTERVAL) -> None:
        self._view = view
        self._interval = interval
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=16)
        # trust_env off: a proxy set for the user's browsing must not carry mesh pages.
        async with httpx.AsyncClient(
            timeout=SCRAPE_TIMEOUT, limits=limits, trust_env=False, follow_redirects=False
        ) as client:
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                targets = self._view.targets()
                await asyncio.gather(*(self._scrape(client, t) for t in targets))
                await asyncio.sleep(max(0.0, started + self._interval - loop.time()))

    async def _scrape(self, client: httpx.AsyncClient, target: Target) -> None:
        async with self._slots:
            try:
                async with asyncio.timeout(SCRAPE_TIMEOUT):
                    body = await _fetch(client, f"http://{target.address}/metrics")
                at = self._view.clock()
                reading = await asyncio.to_thread(parse_page, body.decode())
            except (httpx.HTTPError, OSError, TimeoutError, _TooBig, ValueError) as exc:
                if target.error is None:
                    logger.info("scrape of %s: %s", target.address, _describe(exc))
                self._view.scrape_failed(target, _describe(exc))
                return
        self._view.scraped(target, at, reading)


async def _fetch(client: httpx.AsyncClient, url: str) -> bytes:
    # Identity encoding: the bound on bytes read is then a bound on bytes parsed too.
    async with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as reply:
        reply.raise_for_status()
        chunks, size = [], 0
        async for chunk in reply.aiter_raw():
            size += len(chunk)
            if size > MAX_PAGE_BYTES:
                raise _TooBig()
            chunks.append(chunk)
    return b"".join(chunks)
