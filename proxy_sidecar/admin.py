"""The admin HTTP endpoint: ``/healthz``, ``/endpoints`` (JSON) and ``/metrics``.

It runs the standard library's threading HTTP server on a thread of its own;
whatever it reports is read on the event loop (through
``run_coroutine_threadsafe``) so it never sees a half-applied update.
``close()`` stops the server and joins the thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from shoal_core.addresses import parse_address

__all__ = ["AdminEndpoint"]

logger = logging.getLogger(__name__)

# A page is (HTTP status, content type, body); built on the event loop.
Page = tuple[int, str, bytes]
_READ_TIMEOUT = 5.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    pages: dict[str, Callable[[], Page]]
    loop: asyncio.AbstractEventLoop


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # A client that opens a connection and sends nothing must not hold a thread for good.
    timeout = 10

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        build = self.server.pages.get(self.path.split("?", 1)[0])
        if build is None:
            self._send(404, "text/plain", b"not found: try /healthz, /endpoints, /metrics\n")
            return

        async def on_loop() -> Page:
            return build()

        try:
            page = asyncio.run_coroutine_threadsafe(on_loop(), self.server.loop).result(
                _READ_TIMEOUT
            )
        except Exception as exc:  # the loop is closing or a page failed: say so, stay up
            logger.warning("admin page %s failed: %r", self.path, exc)
            page = (503, "text/plain", b"unavailable\n")
        self._send(*page)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("admin: " + format, *args)


def json_page(data: object, status: int = 200) -> Page:
    return status, "application/json", json.dumps(data, indent=2).encode() + b"\n"


class AdminEndpoint:
    """An HTTP admin server on its own thread; started and stopped by the sidecar."""

    def __init__(self, listen: str, pages: dict[str, Callable[[], Page]]) -> None:
        self._address = parse_address(listen, allow_port_zero=True)
        self._pages = pages
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return 0 if self._server is None else int(self._server.server_port)

    def start(self) -> None:
        server = _Server((self._address.host, self._address.port), _Handler)
        server.pages = self._pages
        server.loop = asyncio.get_running_loop()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="sidecar-admin", daemon=True
        )
        self._thread.start()
        logger.info("admin on http://%s:%d/", self._address.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
