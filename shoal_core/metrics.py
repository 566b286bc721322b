"""Prometheus metrics primitives shared by the services.

Each service keeps its metrics in its own ``CollectorRegistry`` so that tests
can run several servers in one process without name clashes, and exposes them
on an optional HTTP endpoint owned (started and stopped) by its server.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from shoal_core.addresses import parse_address

__all__ = ["CollectorRegistry", "MetricsEndpoint", "render"]

logger = logging.getLogger(__name__)


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format, for tests and admin endpoints."""
    return generate_latest(registry)


class MetricsEndpoint:
    """An HTTP ``/metrics`` endpoint on its own thread, with an owner that stops it."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        self._address = parse_address(listen, allow_port_zero=True)
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return 0 if self._server is None else int(self._server.server_port)

    def start(self) -> None:
        server, thread = start_http_server(
            self._address.port, addr=self._address.host, registry=self._registry
        )
        self._server, self._thread = server, thread
        logger.info("metrics on http://%s:%d/metrics", self._address.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
