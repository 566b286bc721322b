"""The common shape of a Shoal gRPC server: health, reflection, limits, lifecycle.

Subclasses add their servicers and, if they hold long-lived streams, end them
in ``_before_stop`` so a graceful stop does not wait out the whole grace period.
With ``metrics_listen`` the server also serves ``/metrics`` (its ``metrics``
registry) and ``/healthz``, a JSON page that says what grpc.health.v1 says, for
probes that should not have to speak gRPC (a container health check, say).

Every Shoal gRPC server (registry, worker, the sidecar's own services) takes the
connection limits below: what one client connection may hold or do is chosen, and
explained, here and nowhere else.
"""

from __future__ import annotations

import abc
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from shoal_core.addresses import dial_address, parse_address
from shoal_core.decoding import StrictDecodingServer
from shoal_core.errors import ServerStartError
from shoal_core.http import HttpServer, Page, json_page
from shoal_core.lifecycle import ServiceBase
from shoal_core.logs import quiet_vanished_clients
from shoal_core.metrics import metrics_page

__all__ = ["ConnectionLimits", "GrpcServer", "ServerStartError"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# grpc core reads INT_MAX milliseconds as "never".
_NEVER_MS = 2**31 - 1


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold or do; times in seconds.

    grpcio 1.85 has no "too many resets" GOAWAY: against a rapid-reset client (HEADERS,
    then RST_STREAM at once, CVE-2023-44487) its defences are the stream cap counting
    streams until the server has let go of them (past it, new streams get
    REFUSED_STREAM and cost nearly nothing), a PING sent on received resets that must be
    answered within ``ping_timeout``, a pause in reading while the client does not read
    our replies to it, and the connection age. ``_options`` turns these into grpc
    channel arguments and says what each does.
    """

    # The streams (calls) one connection may have open. grpc counts a stream until our
    # handler has let go of it, so a client resetting streams as fast as it opens them
    # cannot run more than this many handlers at once: the rest are refused. It also
    # caps what a client that stops reading can make us hold: this many calls, each up
    # to max_message_bytes in and out. 100 is what HTTP/2 suggests as the least a server
    # should allow, what our data plane's client assumes before SETTINGS, and near
    # nginx's 128; well-behaved clients (grpc's, h2's) queue their calls past it.
    max_concurrent_streams: int = 100
    # Streams a connection may still have allocated on top of that cap once they are
    # closed but not yet freed (our event loop has yet to let go of the finished call).
    # Without it, grpc refuses a well-behaved client that keeps 100 calls going the
    # moment our loop lags (200 calls on one channel saw REFUSED_STREAM); a
    # rapid-reset client still has at most cap + this allocated at any time.
    max_deallocating_streams: int = 100
    # A connection without calls is sent a GOAWAY after this long; the client opens a
    # new one when it next calls. The data plane idles its pooled connections out at
    # 300 s too, so neither side holds a socket nobody uses.
    max_connection_idle: float = 300.0
    # Every connection is sent a GOAWAY after this long (grpc adds +-10 % jitter): new
    # calls go to a fresh connection, so no connection and no per-connection state (or
    # abuse) lasts for ever, and clients rebalance when servers come and go.
    max_connection_age: float = 1800.0
    # How long calls still running at max_connection_age may go on; past it grpc cuts
    # every stream left, with UNAVAILABLE. A registry Watch lives as long as its
    # sidecar, so any finite grace would cut every sidecar's Watch once per age: calls
    # running at the GOAWAY finish in their own time instead.
    max_connection_age_grace: float | None = None
    # We PING every connection this often and close it when no answer comes within
    # keepalive_timeout: that is how a client that vanished without a FIN is found.
    keepalive_time: float = 20.0
    keepalive_timeout: float = 10.0
    # Any other PING of ours (those sent on received resets, see the class doc) left
    # unanswered this long ends the connection with GOAWAY ENHANCE_YOUR_CALM
    # "ping_timeout". grpc's default is a minute; a client that sends frames but
    # reads none has no business holding a connection that long.
    ping_timeout: float = 10.0
    # Client PINGs closer together than this, with no data in between, are strikes;
    # past max_ping_strikes the client gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
    # 5 s lets any sane keepalive through and stops ping floods (grpc's default
    # interval is 5 min; 2 strikes is its default).
    min_ping_interval: float = 5.0
    max_ping_strikes: int = 2
    # Percent of received RST_STREAMs that make us PING the client (grpc's default,
    # pinned because the rapid-reset defence above relies on it): a client resetting
    # streams in bulk meets a PING within a few hundred resets and must answer it.
    ping_on_reset_percent: int = 1


DEFAULT_LIMITS = ConnectionLimits()


def _options(limits: ConnectionLimits, max_message_bytes: int) -> list[tuple[str, int | str]]:
    """grpc channel arguments for ``limits``; the values' reasons are on ConnectionLimits."""

    def ms(seconds: float | None) -> int:
        return _NEVER_MS if seconds is None else max(1, round(seconds * 1000))

    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Two servers on one port would split traffic silently; fail to bind instead.
        ("grpc.so_reuseport", 0),
        # Advertised in SETTINGS; streams past it get RST_STREAM(REFUSED_STREAM).
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        # Count streams until they are freed, not until they are closed (grpc's default,
        # pinned): without it reset streams stop counting while their handlers still run.
        ("grpc.http.overload_protection", 1),
        ("grpc.http2.max_deallocating_streams", limits.max_deallocating_streams),
        ("grpc.http2.ping_on_rst_stream_percent", limits.ping_on_reset_percent),
        ("grpc.http2.ping_timeout_ms", ms(limits.ping_timeout)),
        ("grpc.max_connection_idle_ms", ms(limits.max_connection_idle)),
        ("grpc.max_connection_age_ms", ms(limits.max_connection_age)),
        ("grpc.max_connection_age_grace_ms", ms(limits.max_connection_age_grace)),
        ("grpc.keepalive_time_ms", ms(limits.keepalive_time)),
        ("grpc.keepalive_timeout_ms", ms(limits.keepalive_timeout)),
        # Keepalive PINGs from us and from clients are fine on a connection without calls.
        ("grpc.keepalive_permit_without_calls", 1),
        # The receiving side's ping policy (grpc's name for it lacks "recv").
        ("grpc.http2.min_ping_interval_without_data_ms", ms(limits.min_ping_interval)),
        ("grpc.http2.max_ping_strikes", limits.max_ping_strikes),
    ]


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


class GrpcServer(ServiceBase):
    """A grpc.aio server with grpc.health.v1 and reflection; use as ``async with``."""

    def __init__(
        self,
        listen: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        metrics_listen: str | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        parse_address(listen, allow_port_zero=True)
        self._listen = listen
        # None: plaintext, which the caller chose (``--insecure``); see ``shoal_core.tls``.
        self._credentials = credentials
        self._max_message_bytes = max_message_bytes
        # What each client connection may hold; replace it before start() to change it.
        self.limits = DEFAULT_LIMITS
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._port = 0
        super().__init__()
        self._closing = False
        self.metrics = CollectorRegistry()
        self._pages = (
            HttpServer(
                metrics_listen,
                {"/metrics": metrics_page(self.metrics), "/healthz": self.healthz},
                name="metrics",
            )
            if metrics_listen
            else None
        )

    @abc.abstractmethod
    def _add_servicers(self, server: grpc.aio.Server) -> Sequence[str]:
        """Add this service's servicers; return their full names for health and reflection.

        ``server`` only takes handlers (the generated ``add_*_to_server`` functions):
        each request that fails to decode is answered INVALID_ARGUMENT.
        """

    def _interceptors(self) -> Sequence[grpc.aio.ServerInterceptor[Any, Any]]:
        """What every call goes through before its handler, outermost first (none)."""
        return ()

    async def _before_stop(self) -> None:
        """End long-lived streams before the server stops accepting calls."""
        return None

    async def _after_stop(self) -> None:
        """Release what the service owns: once no call is running any more, or when the
        server failed to start listening."""
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

    @property
    def metrics_port(self) -> int:
        """The bound ``--metrics`` port once started; 0 without ``metrics_listen``."""
        return 0 if self._pages is None else self._pages.port

    def healthz(self) -> Page:
        """What grpc.health.v1 answers for the server as a whole: 200 only while SERVING."""
        serving = self._server is not None and not self._closing
        status = "serving" if serving else "draining" if self._closing else "starting"
        return json_page({"status": status}, 200 if serving else 503)

    async def start(self) -> None:
        quiet_vanished_clients()
        server = grpc.aio.server(
            interceptors=self._interceptors(),
            options=_options(self.limits, self._max_message_bytes),
        )
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
            await self._listen_on(server)
        except BaseException:
            # Never started, so close() has nothing to stop: release what the subclass owns.
            await self._after_stop()
            raise
        self._server = server
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", *names):
            await self._health.set(name, serving)
        logger.info("%s listening on %s", type(self).__name__, self.address)
        if self._pages is not None:
            try:
                await self._pages.start()
            except BaseException:
                await self.close(0)
                raise

    async def _listen_on(self, server: grpc.aio.Server) -> None:
        try:
            self._port = (
                server.add_secure_port(self._listen, self._credentials)
                if self._credentials is not None
                else server.add_insecure_port(self._listen)
            )
        except RuntimeError as exc:
            raise ServerStartError(
                f"cannot listen on {self._listen}: {_why_unbindable(self._listen)}"
            ) from exc
        if self._port == 0:
            raise ServerStartError(
                f"cannot listen on {self._listen}: {_why_unbindable(self._listen)}"
            )
        await server.start()

    async def close(self, grace: float | None = None) -> None:
        """Stop taking calls; let running ones finish for ``grace`` seconds, then cancel them."""
        server = self._server
        if server is None:
            self._closed_now()
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
        if self._pages is not None:
            await self._pages.close()
        logger.info("%s on %s stopped", type(self).__name__, self.address)
        self._closed_now()
