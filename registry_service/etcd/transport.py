"""HTTP to etcd's gateway: one connection pool, failover between endpoints, capped reads.

A request goes to the endpoint that last answered; on a connection error, a timeout or
a 5xx (etcd maps "no leader", "leader changed" and "request timed out" to 503) it goes
to the next, each endpoint once per call, and the one that answers becomes the one to
use. A 4xx is etcd's own answer and is raised as it is: another member would say the
same. Retrying means a write whose reply was lost may have been applied: a caller that
must know (create-if-absent) reads back rather than trusting the second reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx

from registry_service.etcd.model import Json

__all__ = ["Compacted", "EtcdError", "EtcdUnavailable", "LeaseNotFound", "Stream", "Transport"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A range of every instance of a large mesh is megabytes; this only stops a runaway reply.
MAX_REPLY = 64 << 20
# Unary calls return their connection at once; each open watch holds one for its life.
LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=16)
# etcd's require-leader option, as gRPC metadata through the gateway: a member cut off
# from its cluster refuses calls at once (503, so they move to another member) and
# ends the watches it serves, rather than leaving them open and silent.
HEADERS = {"Grpc-Metadata-hasleader": "true"}


class EtcdError(Exception):
    """etcd refused a request; ``code`` is its gRPC status code (None: the client's own)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


class LeaseNotFound(EtcdError):
    """The lease has expired, was revoked, or never existed."""


class Compacted(EtcdError):
    """A watch asked for history etcd has compacted away: list again, then watch from
    the listed revision + 1. ``revision`` is the oldest etcd still has."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        super().__init__(f"etcd compacted its history up to revision {revision}", 11)


class EtcdUnavailable(EtcdError):
    """No endpoint answered; the message names them and the last error, on one line."""


class _Retry(Exception):
    """An endpoint failed in a way another may not: try the next."""


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text and isinstance(exc, httpx.ReadError):
        # What a TLS 1.3 server's refusal of our certificate looks like from here.
        return "the connection closed before a reply (a refused client certificate?)"
    return text or type(exc).__name__


def check_reply(status: int, obj: Any) -> Json:
    """``obj`` when it is a good reply, else the error it stands for."""
    if not isinstance(obj, dict):
        raise _Retry(f"HTTP {status}, not a JSON object")
    error = obj.get("error")
    if isinstance(error, dict):  # an error in a stream, after a 200 status line
        status = int(error.get("http_code", 500))
        message, code = str(error.get("message", "")), error.get("grpc_code")
    elif error or status != 200:
        message, code = str(obj.get("message") or error or f"HTTP {status}"), obj.get("code")
    else:
        return obj
    if status >= 500:
        raise _Retry(f"HTTP {status}: {message}")
    if "lease not found" in message:
        raise LeaseNotFound(message, 5)
    raise EtcdError(message, int(code) if code is not None else None)


class JsonLines:
    """The newline-delimited JSON objects of a streamed reply, each at most ``cap`` bytes."""

    def __init__(self, response: httpx.Response, cap: int = MAX_REPLY) -> None:
        self._chunks = response.aiter_bytes()
        self._buffer = bytearray()
        self._cap = cap

    async def next(self) -> Any:
        """The next object, or None at the end of the stream."""
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > self._cap:
                raise EtcdError(f"an etcd reply passed {self._cap} bytes")
            chunk = await anext(self._chunks, None)
            if chunk is None:
                end = len(self._buffer)
                break
            self._buffer += chunk
        line = bytes(self._buffer[:end]).strip()
        del self._buffer[: end + 1]
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            raise _Retry("a reply that is not JSON") from None


class Stream:
    """A streamed reply being read; a break in it, or a 5xx in it, is ``EtcdUnavailable``."""

    def __init__(self, where: str, response: httpx.Response, lines: JsonLines, first: Json) -> None:
        self.where = where
        self.first = first
        self._response = response
        self._lines = lines

    async def next(self) -> Json:
        try:
            obj = await self._lines.next()
            if obj is None:
                raise _Retry("the stream ended")
            return check_reply(200, obj)
        except (httpx.TransportError, _Retry) as exc:
            raise EtcdUnavailable(f"etcd stream from {self.where} broke: {_describe(exc)}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class Transport:
    """The endpoints and one HTTP pool over them; ``call`` and ``stream`` fail over."""

    def __init__(
        self, endpoints: Sequence[str], timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._scheme = "https" if tls is not None else "http"
        self._current = 0
        # trust_env=False: an HTTP(S)_PROXY in the environment must not reroute etcd.
        self._http = httpx.AsyncClient(
            timeout=timeout, limits=LIMITS, headers=HEADERS, verify=tls or True, trust_env=False
        )

    @property
    def current(self) -> str:
        return self.endpoints[self._current]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, path: str, body: Json, *, endpoint: str | None = None) -> Json:
        """POST ``body`` and return etcd's reply; ``endpoint`` pins one, with no failover."""

        async def once(where: str) -> Json:
            response, lines, reply = await self._open(where, path, body, self.timeout)
            try:
                # Read to the end so that the connection goes back to the pool.
                await lines.next()
            finally:
                await response.aclose()
            return reply

        return await self._failover(once, endpoint)

    async def stream(self, path: str, body: Json, read_timeout: float | None) -> Stream:
        """Open a streamed reply, its first object read within the timeout; then each
        next object may take up to ``read_timeout`` (None: no limit)."""

        async def once(where: str) -> Stream:
            return Stream(where, *await self._open(where, path, body, read_timeout))

        return await self._failover(once, None)

    async def _open(
        self, where: str, path: str, body: Json, read_timeout: float | None
    ) -> tuple[httpx.Response, JsonLines, Json]:
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        url = f"{self._scheme}://{where}{path}"
        request = self._http.build_request("POST", url, json=body, timeout=timeout)
        response = await self._http.send(request, stream=True)
        try:
            lines = JsonLines(response)
            return response, lines, check_reply(response.status_code, await lines.next())
        except BaseException:
            await response.aclose()
            raise

    async def _failover(self, once: Callable[[str], Awaitable[T]], pinned: str | None) -> T:
        n = len(self.endpoints)
        order = [pinned] if pinned else [self.endpoints[(self._current + i) % n] for i in range(n)]
        failures: list[str] = []
        for where in order:
            try:
                # The whole attempt is bounded, not only each read: a reply that trickles
                # in must not hold the caller past its timeout.
                async with asyncio.timeout(self.timeout):
                    result = await once(where)
            except (httpx.TransportError, TimeoutError, _Retry) as exc:
                failures.append(f"{where}: {_describe(exc)}")
                continue
            if pinned is None and where != self.current:
                logger.warning("etcd: moved to %s (%s)", where, "; ".join(failures))
                self._current = self.endpoints.index(where)
            return result
        raise EtcdUnavailable(
            f"no etcd endpoint answered ({', '.join(order)}); last: {failures[-1]}"
        )
