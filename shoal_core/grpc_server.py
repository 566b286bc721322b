"""The common shape of a Shoal gRPC server: health, reflection, limits, lifecycle.

Subclasses add their servicers and, if they hold long-lived streams, end them
in ``_before_stop`` so a graceful stop does not wait out the whole grace period.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Self, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from shoal_core.addresses import dial_address, parse_address
from shoal_core.decoding import StrictDecodingServer

__all__ = ["GrpcServer", "ServerStartError"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class ServerStartError(RuntimeError):
    """The server could not bind its listen address."""


def _why_unbindable(listen: str) -> str:
    """gRPC only says binding failed; a plain bind tells the user why."""
    address = parse_address(listen, allow_port_zero=True)
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {address.host!r} ({exc.strerror})"
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            return (exc.strerror or str(exc)).lower()
    return "the address was refused"


class GrpcServer(abc.ABC):
    """A grpc.aio server with grpc.health.v1 and reflection; use as ``async with``."""

    def __init__(
        self,
        listen: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        extra_options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        parse_address(listen, allow_port_zero=True)
        self._listen = listen
        self._options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Two servers on one port would split traffic silently; fail to bind instead.
            ("grpc.so_reuseport", 0),
            # Find clients that vanished mid-stream, and let healthy ones keep pinging.
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            *extra_options,
        ]
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._port = 0
        self._closed = asyncio.Event()
        self._closing = False

    @abc.abstractmethod
    def _add_servicers(self, server: grpc.aio.Server) -> Sequence[str]:
        """Add this service's servicers; return their full names for health and reflection.

        ``server`` only takes handlers (the generated ``add_*_to_server`` functions):
        each request that fails to decode is answered INVALID_ARGUMENT.
        """

    async def _before_stop(self) -> None:
        """End long-lived streams before the server stops accepting calls."""
        return None

    async def _after_stop(self) -> None:
        """Release what the service owns once no call is running any more."""
        return None

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return dial_address(self._listen, self._port)

    @property
    def health(self) -> health_aio.HealthServicer:
        return self._health

    async def start(self) -> None:
        server = grpc.aio.server(options=self._options)
        # Generated add_*_to_server functions only call the two methods the proxy has.
        names = list(self._add_servicers(cast(grpc.aio.Server, StrictDecodingServer(server))))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        try:
            self._port = server.add_insecure_port(self._listen)
        except RuntimeError as exc:
            raise ServerStartError(
                f"cannot listen on {self._listen}: {_why_unbindable(self._listen)}"
            ) from exc
        if self._port == 0:
            raise ServerStartError(
                f"cannot listen on {self._listen}: {_why_unbindable(self._listen)}"
            )
        await server.start()
        self._server = server
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", *names):
            await self._health.set(name, serving)
        logger.info("%s listening on %s", type(self).__name__, self.address)

    async def close(self, grace: float | None = None) -> None:
        """Stop taking calls; let running ones finish for ``grace`` seconds, then cancel them."""
        server = self._server
        if server is None:
            self._closed.set()
            return
        if self._closing:
            # A second close (the forcing signal) cuts the grace period short.
            await server.stop(grace)
            return
        self._closing = True
        await self._health.enter_graceful_shutdown()
        await self._before_stop()
        await server.stop(grace)
        await self._after_stop()
        logger.info("%s on %s stopped", type(self).__name__, self.address)
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
