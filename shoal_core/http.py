"""A small HTTP/1.1 server for admin and metrics pages, on the owning service's event loop.

Every Shoal service that serves pages (the registry's and the worker's ``/metrics``, the
sidecar's admin) uses this one server. It runs on the service's asyncio loop, so pages are
built where the service's state lives, and it has no thread at all: a connection is a
protocol object with one timer. HTTP parsing is h11's (sans-IO, strict, well kept); what
is ours is the policy an outsider meets:

- a request head must arrive whole within ``head_timeout``; an idle keep-alive
  connection is closed after ``idle_timeout``; a reply the client does not read is
  given up after ``write_timeout``;
- at most ``max_connections`` at once: one past it is closed at once, before a byte;
- the request head is at most ``max_head_bytes`` (431 past it) and a request has no
  body (413); only GET and HEAD (405 for the rest);
- a client that resets or vanishes is one debug line, never a traceback.

``close()`` stops listening and closes every connection; nothing is left behind.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import cast

import h11

from shoal_core.addresses import HostPort, parse_address
from shoal_core.errors import ServerStartError

__all__ = ["HttpServer", "Page", "PageBuilder", "json_page"]

logger = logging.getLogger(__name__)

# A page is (HTTP status, content type, body), built on the event loop when asked for.
Page = tuple[int, str, bytes]
PageBuilder = Callable[[], Page]


def json_page(data: object, status: int = 200) -> Page:
    """``data`` as an indented JSON page."""
    return status, "application/json", json.dumps(data, indent=2).encode() + b"\n"


_ALLOWED = "GET, HEAD"
# How long close() lets replies already written drain before it cuts connections.
_CLOSE_GRACE = 1.0


class _Connection(asyncio.Protocol):
    """One client connection: h11 does the parsing, this decides what the client gets."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_head_bytes)
        self._timer: asyncio.TimerHandle | None = None
        self._idle = False
        self._paused = False
        self._closing = False
        self._peer = "?"
        self.lost = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self._server._admit(self):
            # Past the cap: no parser work, no timer, no reply; the kernel sends a RST.
            self._closing = True
            self._transport.abort()
            return
        self._wait_for_request()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._idle:
            # A new request began on a kept-alive connection: its head gets the head timeout.
            self._idle = False
            self._wait_for_request()
        self._h11.receive_data(data)
        self._drive()

    def eof_received(self) -> bool:
        if not self._closing:
            self._h11.receive_data(b"")
            self._drive()
        return False

    def pause_writing(self) -> None:
        # The client is not reading what we wrote: answer nothing more, give it a while.
        assert self._transport is not None
        self._paused = True
        if not self._closing:
            self._transport.pause_reading()
        self._arm(self._server.write_timeout, "read of the reply")

    def resume_writing(self) -> None:
        assert self._transport is not None
        self._paused = False
        if not self._closing:
            self._transport.resume_reading()
            self._wait_for_request()
            self._drive()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._server._forget(self)
        if exc is not None:
            logger.debug(
                "%s: client %s went away: %s", self._server.name, self._peer, _describe(exc)
            )
        if not self.lost.done():
            self.lost.set_result(None)

    # -- requests ---------------------------------------------------------------------

    def _drive(self) -> None:
        """Handle every event h11 has parsed so far, answering requests in order."""
        while not self._closing and not self._paused:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, f"bad request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._cancel_timer()
                self._answer(event)
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return
            # Data and EndOfMessage carry nothing for us: bodies were refused up front.
            if self._h11.our_state is h11.MUST_CLOSE:
                self.close()
            elif self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
                self._h11.start_next_cycle()
                self._idle = True
                self._wait_for_request()

    def _answer(self, request: h11.Request) -> None:
        method = request.method.decode("ascii", "replace")
        if method not in ("GET", "HEAD"):
            self._refuse(405, f"{method} is not served here: use GET or HEAD", allow=True)
            return
        # h11 bounds a head still arriving; one that came whole in a single read is
        # measured here, so the bound holds however the bytes were split.
        size = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if size > self._server.max_head_bytes:
            self._refuse(431, f"the request head is over {self._server.max_head_bytes} bytes")
            return
        headers = dict(request.headers)
        if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
            self._refuse(413, "requests here have no body")
            return
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        build = self._server.pages.get(path)
        if build is None:
            known = ", ".join(sorted(self._server.pages))
            page: Page = (404, "text/plain; charset=utf-8", f"not found: try {known}\n".encode())
        else:
            try:
                page = build()
            except Exception as exc:  # a page's bug must not take the server down
                logger.warning("%s: page %s failed: %r", self._server.name, path, exc)
                page = (500, "text/plain; charset=utf-8", b"internal error\n")
        self._send(*page, head_only=method == "HEAD")

    def _refuse(self, status: int, message: str, *, allow: bool = False) -> None:
        """Answer an error (when h11 still lets us) and close the connection."""
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            extra = [("Allow", _ALLOWED)] if allow else []
            body = f"{message}\n".encode()
            self._send(status, "text/plain; charset=utf-8", body, close=True, extra=extra)
        self.close()

    def _send(
        self,
        status: int,
        content_type: str,
        body: bytes,
        *,
        head_only: bool = False,
        close: bool = False,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        assert self._transport is not None
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *(extra or []),
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        out = [self._h11.send(h11.Response(status_code=status, headers=headers, reason=reason))]
        if body and not head_only:
            out.append(self._h11.send(h11.Data(data=body)))
        out.append(self._h11.send(h11.EndOfMessage()))
        self._transport.write(b"".join(chunk for chunk in out if chunk))

    # -- closing and timers -----------------------------------------------------------

    def close(self) -> None:
        """Close once what was written is sent; cut it if the client will not take it."""
        if self._closing or self._transport is None:
            return
        self._closing = True
        self._transport.close()
        self._arm(self._server.write_timeout, "read of the reply")

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _wait_for_request(self) -> None:
        """Time the client's next move, unless a stalled reply is being timed already."""
        if self._paused or self._closing:
            return
        if self._idle:
            self._arm(self._server.idle_timeout, "next request")
        else:
            self._arm(self._server.head_timeout, "request head")

    def _arm(self, seconds: float, waiting_for: str) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._expired, seconds, waiting_for)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, seconds: float, waiting_for: str) -> None:
        self._timer = None
        logger.debug(
            "%s: closing %s: no %s within %gs", self._server.name, self._peer, waiting_for, seconds
        )
        self.abort()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


class HttpServer:
    """Serves ``pages`` (path -> builder) over HTTP/1.1 on the running loop; ``port`` after start.

    The keyword settings bound what a client may make us hold; the defaults suit
    operators' scrapers and browsers, tests shorten them.
    """

    def __init__(
        self,
        listen: str,
        pages: Mapping[str, PageBuilder],
        *,
        name: str = "http",
        head_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        write_timeout: float = 10.0,
        max_connections: int = 64,
        max_head_bytes: int = 16 * 1024,
        backlog: int = 1024,
    ) -> None:
        self._address = parse_address(listen, allow_port_zero=True)
        self.pages = dict(pages)
        self.name = name
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.max_head_bytes = max_head_bytes
        self.backlog = backlog
        self.rejected = 0
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def connections(self) -> int:
        """Connections open now (those refused past the cap are not counted)."""
        return len(self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self._address.host, self._address.port
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self), host, port, backlog=self.backlog
            )
        except OSError as exc:
            why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ServerStartError(f"cannot listen on {host}:{port}: {why}") from None
        self._port = int(self._server.sockets[0].getsockname()[1])
        paths = ", ".join(sorted(self.pages))
        logger.info("%s on http://%s (%s)", self.name, HostPort(host, self._port), paths)

    async def close(self) -> None:
        """Stop listening, then close every connection (cut those that will not drain)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        lost = [c.lost for c in connections]
        if lost:
            _, pending = await asyncio.wait(lost, timeout=_CLOSE_GRACE)
            for connection in connections:
                if not connection.lost.done():
                    connection.abort()
            if pending:
                await asyncio.wait(pending)
        await server.wait_closed()

    def _admit(self, connection: _Connection) -> bool:
        if self._server is None or len(self._connections) >= self.max_connections:
            self.rejected += 1
            logger.debug("%s: refusing a connection: %d open", self.name, len(self._connections))
            return False
        self._connections.add(connection)
        return True

    def _forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)
