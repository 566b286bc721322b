"""``DashboardServer``: the registry feed, the scraper and the web app, in one process.

The web app is Starlette's, served by uvicorn on our own event loop: uvicorn is driven
through ``startup``/``main_loop``/``shutdown`` and never through ``serve``, which would
take over SIGINT and SIGTERM from ``shoal_core.lifecycle``. The listening socket is
bound here, so a taken port is one clear line and port 0 tells its number before start.
With ``otlp_listen`` the same process receives traces over OTLP/gRPC (``otlp``) into a
``TraceStore``, and the snapshot shows the recent ones; without, it says tracing is off.

``close(grace)`` ends the event streams first (a stream never ends by itself), stops
following the registry, scraping and receiving traces, then lets uvicorn finish what it
answers for up to ``grace`` seconds; a second ``close(0)`` cuts it short.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn

from proxy_sidecar.server import ADMIN_KEY
from shoal_cli.dashboard.app import Hub, build_app
from shoal_cli.dashboard.figures import WINDOW
from shoal_cli.dashboard.model import MeshView
from shoal_cli.dashboard.otlp import TraceReceiver
from shoal_cli.dashboard.sources import SCRAPE_INTERVAL, RegistryFeed, Scraper, stop_task
from shoal_cli.dashboard.summary import snapshot
from shoal_cli.dashboard.traces import TraceStore
from shoal_core.addresses import HostPort, parse_address
from shoal_core.certifying import MeshIdentity
from shoal_core.errors import ServerStartError
from shoal_core.lifecycle import ServiceBase

__all__ = ["DashboardServer"]

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class DashboardServer(ServiceBase):
    """A live web page of the mesh whose registry is at ``registry``; ``url`` after start.

    ``otlp_listen``: also receive traces there (``otlp_address`` after start)."""

    def __init__(
        self,
        listen: str,
        registry: str,
        *,
        scrape: Sequence[str] = (),
        mesh: MeshIdentity | None = None,
        interval: float = SCRAPE_INTERVAL,
        window: float = WINDOW,
        otlp_listen: str | None = None,
    ) -> None:
        super().__init__()
        self._listen = parse_address(listen, allow_port_zero=True)
        self.view = MeshView(registry, scrape, admin_key=ADMIN_KEY, window=window)
        self.hub = Hub()
        self._interval = interval
        self._feed = RegistryFeed(self.view, mesh)
        self._scraper = Scraper(self.view, interval)
        self.traces = TraceStore()
        self._receiver = TraceReceiver(otlp_listen, self.traces) if otlp_listen else None
        self._publisher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._closing = False
        self._port = 0

    @property
    def address(self) -> str:
        return str(HostPort(self._listen.host, self._port))

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    @property
    def otlp_address(self) -> str | None:
        """Where components send spans (``--otlp-endpoint http://...``); None: not here."""
        return None if self._receiver is None else self._receiver.address

    def snapshot(self) -> dict[str, Any]:
        """What the page shows: the mesh, and the recent traces (None: tracing is off)."""
        found = snapshot(self.view)
        found["traces"] = (
            None
            if self._receiver is None
            else {"listen": self._receiver.address, **self.traces.as_json()}
        )
        return found

    def _bind(self) -> socket.socket:
        host, port = self._listen.host.strip("[]"), self._listen.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            sock = socket.create_server(infos[0][4][:2], family=infos[0][0], backlog=128)
        except OSError as exc:
            why = exc.strerror.lower() if exc.strerror else str(exc)
            raise ServerStartError(f"cannot listen on {self._listen}: {why}") from None
        sock.setblocking(False)
        self._port = int(sock.getsockname()[1])
        return sock

    async def start(self) -> None:
        if self._receiver is not None:
            try:
                await self._receiver.start()
            except ServerStartError as exc:
                raise ServerStartError(f"traces: {exc}") from None
        try:
            self._socket = self._bind()
            try:
                await self._start_web()
            except BaseException:
                self._socket.close()
                raise
        except BaseException:
            if self._receiver is not None:
                await self._receiver.close(0)
            raise
        self._feed.start()
        self._scraper.start()
        self._publisher = asyncio.create_task(self._publish(), name="dashboard-publish")
        logger.info("dashboard on %s for registry %s", self.url, self.view.registry)

    async def _start_web(self) -> None:
        assert self._socket is not None
        app = build_app(self.hub, self.snapshot, loopback=_is_loopback(self._listen.host))
        config = uvicorn.Config(
            app,
            lifespan="off",
            http="h11",
            ws="none",
            log_config=None,
            access_log=False,
            server_header=False,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        self._uvicorn = server
        # uvicorn's tick keeps its Date header fresh and ends when should_exit is set.
        self._ticker = asyncio.create_task(server.main_loop(), name="uvicorn-tick")

    async def _publish(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self.hub.streams:
                self.hub.publish(json.dumps(self.snapshot()).encode())

    async def close(self, grace: float | None = None) -> None:
        server = self._uvicorn
        if self._closing:
            if server is not None and grace == 0:
                server.force_exit = True  # a second signal: stop waiting for connections
            return
        self._closing = True
        self.hub.close()
        publisher, self._publisher = self._publisher, None
        closing = [stop_task(publisher), self._feed.close(), self._scraper.close()]
        if self._receiver is not None:
            # An export being read as the receiver stops is the exporter's to send again.
            closing.append(self._receiver.close(0))
        await asyncio.gather(*closing)
        if server is not None:
            server.should_exit = True
            if self._ticker is not None:
                await self._ticker
            # uvicorn counts whole seconds; open pages ended with the hub, so this waits
            # only for answers being written.
            server.config.timeout_graceful_shutdown = max(
                1, math.ceil(5.0 if grace is None else grace)
            )
            server.force_exit = server.force_exit or grace == 0  # a close(0) may have come
            await server.shutdown(sockets=[self._socket] if self._socket else None)
        elif self._socket is not None:
            self._socket.close()
        logger.info("dashboard stopped")
        self._closed_now()
