"""The dashboard's web side: the page, its script and style, the snapshot, the event stream.

- ``/``, ``/app.js`` (and the modules it imports), ``/style.css``: the page, from
  package data, read once;
- ``/api/snapshot``: the mesh as JSON, as of now (what ``summary.snapshot`` gives);
- ``/events``: server-sent events, the snapshot at once and then each time the server
  publishes one (about a second), a comment every ``KEEPALIVE`` seconds when idle.
  At most ``max_streams`` at once; one more is answered 503.

Read-only: every route is GET. Pages carry a Content-Security-Policy that allows only
their own script and style, and, bound to loopback, only loopback Host headers are
served, so a web page elsewhere cannot read the mesh through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

__all__ = ["KEEPALIVE", "MAX_STREAMS", "Hub", "build_app"]

MAX_STREAMS = 32
KEEPALIVE = 15.0
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dom.js": ("dom.js", "text/javascript; charset=utf-8"),
    "/traces.js": ("traces.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Snapshot = Callable[[], dict[str, Any]]


class Hub:
    """The latest published snapshot, for every open event stream; counts the streams."""

    def __init__(self, max_streams: int = MAX_STREAMS) -> None:
        self.max_streams = max_streams
        self.streams = 0
        self.version = 0
        self.latest = b""
        self.closed = False
        self._changed = asyncio.Event()

    def publish(self, data: bytes) -> None:
        self.latest, self.version = data, self.version + 1
        self._wake()

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self, seen: int, timeout: float) -> bool:
        """Wait until a version after ``seen`` (True) or ``timeout`` passes (False)."""
        if self.version != seen or self.closed:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True


def _frame(data: bytes) -> bytes:
    # JSON as json.dumps writes it has no newline, so it is one `data:` line.
    return b"data: " + data + b"\n\n"


class EventStream:
    """``/events``, as a plain ASGI app: a stream's slot is taken and given back in one
    frame, however the stream ends (the client left, the server stopped, an error)."""

    def __init__(self, hub: Hub, snapshot: Snapshot) -> None:
        self._hub = hub
        self._snapshot = snapshot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self._hub
        if hub.streams >= hub.max_streams or hub.closed:
            refused = PlainTextResponse(
                f"at most {hub.max_streams} event streams at once\n", 503, headers=_HEADERS
            )
            await refused(scope, receive, send)
            return
        hub.streams += 1
        try:
            stream = StreamingResponse(
                self._events(), media_type="text/event-stream", headers=_HEADERS
            )
            await stream(scope, receive, send)
        finally:
            hub.streams -= 1

    async def _events(self) -> AsyncIterator[bytes]:
        hub = self._hub
        seen = hub.version
        yield b"retry: 2000\n\n" + _frame(json.dumps(self._snapshot()).encode())
        while not hub.closed:
            if not await hub.changed(seen, KEEPALIVE):
                yield b": keepalive\n\n"
                continue
            if hub.closed:
                return
            seen = hub.version
            yield _frame(hub.latest)


class _SecurityHeaders:
    """Adds ``_HEADERS`` to every answer (those of the host check too)."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.lower().encode(), v.encode())
                    for k, v in _HEADERS.items()
                    if k.lower().encode() not in have
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self._app(scope, receive, with_headers)


def _static(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    body = resources.files("shoal_cli.dashboard").joinpath("static", name).read_bytes()

    async def page(request: Request) -> Response:
        return Response(body, media_type=media_type)

    return page


def build_app(hub: Hub, snapshot: Snapshot, *, loopback: bool) -> Starlette:
    """The dashboard's ASGI app; ``loopback``: it listens on loopback alone."""

    # Handlers are coroutines: Starlette runs plain functions in threads, and the
    # snapshot must be read on the loop that changes it.
    async def api_snapshot(request: Request) -> Response:
        return JSONResponse(snapshot())

    routes = [Route(path, _static(*what)) for path, what in _STATIC.items()]

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)  # browsers ask; a missing one is a logged 404

    routes += [
        Route("/favicon.ico", no_icon),
        Route("/api/snapshot", api_snapshot),
        Route("/events", EventStream(hub, snapshot), methods=["GET"]),
    ]
    hosts = LOOPBACK_HOSTS if loopback else ["*"]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(_SecurityHeaders),
            Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
        ],
    )
