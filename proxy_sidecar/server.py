"""The sidecar's lifecycle: discovery, the data plane, membership, admin.

Calls are forwarded by the native data plane (``shoal_dataplane``); it asks
``control.Control`` where each goes. It has two listeners, as Linkerd's proxy does:
the app-facing (outbound) one on ``listen``, bound to loopback by default, takes the
app's calls and routes them into the mesh; the mesh-facing (inbound) one, for a
sidecar with an app, takes other sidecars' calls and delivers them to the app only.
The registered address is the inbound one.

The registry may be several replicas over one store (``registry``: a list): the
watch, the policy watch and the heartbeats share one ``Replicas``, so the first of
them to find a replica gone moves all three to the next.

With a mesh identity (``mesh``) both the inbound listener and every call to another
sidecar or the registry (each of its replicas) are mutual TLS (``mesh_tls``); the
app-facing side stays plaintext on loopback. Without one, everything is plaintext, and
it says so once.

The data plane also serves the sidecar's own services to its app (grpc.health.v1, and
reflection answered by ``reflect``) and carries the control plane's own calls (``rpc``:
Certify, the registry's Watch, registration and heartbeats, the app's health checks), so
the sidecar's process has one HTTP/2 stack, not two: grpcio is not loaded at all.

Start-up order: certify (with mTLS), watch the registry (so the first calls find endpoints),
then serve, then register the app (it is reachable through us only once we
serve), then the admin endpoint. Draining reverses it: deregister first so
callers stop picking this instance, then let running calls finish.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence

from shoal_dataplane import DataPlane

from identity.spiffe import SpiffeId
from proxy_sidecar.admin import AdminPages
from proxy_sidecar.authz import PolicyWatch
from proxy_sidecar.balancers import balancer_class
from proxy_sidecar.config import MembershipSettings, SidecarConfig
from proxy_sidecar.control import Control
from proxy_sidecar.discovery import Discovery
from proxy_sidecar.endpoints import Endpoint, EndpointTable
from proxy_sidecar.errors import PolicyError
from proxy_sidecar.golden import caller_name
from proxy_sidecar.membership import Membership
from proxy_sidecar.mesh_tls import SidecarTls
from proxy_sidecar.routing import Router
from proxy_sidecar.rpc import Rpc
from shoal_core.addresses import HostPort, dial_address, parse_address
from shoal_core.certifying import MeshIdentity
from shoal_core.errors import ServerStartError
from shoal_core.http import HttpServer
from shoal_core.lifecycle import ServiceBase
from shoal_core.replicas import Replicas
from shoal_core.tracing import TraceSettings

__all__ = ["SidecarServer"]

logger = logging.getLogger(__name__)

# Instance metadata keys: where the app itself and this sidecar's admin page listen.
APP_KEY, ADMIN_KEY = "shoal.app", "shoal.admin"


class SidecarServer(ServiceBase):
    """A sidecar on ``listen`` forwarding its app's calls to the mesh found through
    ``registry`` (an address, or several: replicas of one registry, tried in turn).

    With ``service`` and ``app`` it also listens on ``inbound`` for other sidecars'
    calls, delivers them to the app at ``app``, and registers the app as an instance
    of ``service`` reachable at ``advertise`` (default: the inbound address).
    """

    def __init__(
        self,
        listen: str,
        registry: str | Sequence[str],
        config: SidecarConfig | None = None,
        *,
        service: str | None = None,
        app: str | None = None,
        inbound: str | None = None,
        advertise: str | None = None,
        admin: str | None = None,
        mesh: MeshIdentity | None = None,
        trace: TraceSettings | None = None,
    ) -> None:
        self.config = config = config or SidecarConfig()
        if (service is None) != (app is None):
            raise PolicyError("--service and --app go together: give both or neither")
        if (app is None) != (inbound is None):
            raise PolicyError(
                "--inbound (where other sidecars call) goes with --service/--app"
                if app is None
                else "--service/--app need --inbound: the address other sidecars call"
            )
        if inbound is not None:
            parse_address(inbound, allow_port_zero=True)
        for name in {config.lb, *(p.lb for p in config.services.values() if p.lb)}:
            balancer_class(name)
        self._replicas = Replicas(registry)
        if app is not None:
            parse_address(app)
        if advertise is not None:
            parse_address(advertise)
        parse_address(listen, allow_port_zero=True)
        self._public_listen = listen
        self._public_port = 0
        self._inbound_listen = inbound
        self._inbound_port = 0
        self.dataplane: DataPlane | None = None
        self._rpc: Rpc | None = None
        self._mesh = mesh
        self.tls: SidecarTls | None = None
        self.policy: PolicyWatch | None = None
        self.control: Control | None = None
        self._trace = trace
        self._collector: str | None = None
        if trace is not None:
            if not trace.endpoint.startswith("http://"):
                raise PolicyError(
                    "the sidecar sends spans in plaintext to a collector beside it: "
                    f"--otlp-endpoint must be http://HOST:PORT, not {trace.endpoint}"
                )
            self._collector = trace.endpoint.removeprefix("http://").rstrip("/")
            parse_address(self._collector)
        super().__init__()
        self._service = service
        self._app = app
        self._advertise = advertise
        self.table = EndpointTable(empty_hold=config.discovery.empty_set_hold)
        self.router = Router(self.table, config, app=app)
        self._tables = (self.table, self.router.local_table)
        self.discovery = Discovery(self._replicas, self.table, config.discovery)
        self.membership: Membership | None = None
        self._draining = False
        pages = AdminPages(self)
        self._admin = (
            HttpServer(
                admin,
                {
                    "/healthz": pages.healthz,
                    "/endpoints": pages.endpoints,
                    "/metrics": pages.metrics,
                },
                name="admin",
            )
            if admin
            else None
        )
        self._admin_listen = admin

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def registry_address(self) -> str:
        """The registry replica in use now."""
        return self._replicas.current

    @property
    def registry_addresses(self) -> tuple[str, ...]:
        return self._replicas.addresses

    @property
    def admin_port(self) -> int:
        return 0 if self._admin is None else self._admin.port

    @property
    def port(self) -> int:
        return self._public_port

    @property
    def address(self) -> str:
        """Where the app calls: the app-facing listener."""
        return dial_address(self._public_listen, self._public_port)

    @property
    def inbound_address(self) -> str | None:
        """Where other sidecars call: the mesh-facing listener (with an app only)."""
        if self._inbound_listen is None:
            return None
        return dial_address(self._inbound_listen, self._inbound_port)

    def handshakes(self) -> tuple[int, int]:
        dataplane = self.dataplane
        if dataplane is None:
            return (0, 0)
        return dataplane.handshakes(), dataplane.handshake_failures()

    def spans(self) -> tuple[int, int] | None:
        """Spans exported and dropped; ``None`` when the sidecar does not trace."""
        if self._trace is None:
            return None
        return (0, 0) if self.dataplane is None else self.dataplane.trace_counts()

    def connections(self) -> int:
        return 0 if self.dataplane is None else self.dataplane.connections()

    def _on_endpoints(
        self, added: Sequence[Endpoint], removed: Sequence[Endpoint], *, local: bool = False
    ) -> None:
        """Connect to endpoints as they appear (with mTLS, to whom they must prove they
        are: the local app is plaintext on loopback); let go of those that left."""
        dataplane = self.dataplane
        if dataplane is None:
            return
        live = {e.address for table in self._tables for e in table.endpoints()}
        for endpoint in removed:
            if endpoint.address not in live:
                dataplane.forget(endpoint.address)
        for endpoint in added:
            if local:
                dataplane.expect_peer(endpoint.address, None)
            elif self.tls is not None:
                self.tls.expect_service(endpoint.address, endpoint.info.service)
            dataplane.warm(endpoint.address)

    def forwarding(self) -> bool:
        return self.dataplane is not None and self.dataplane.alive()

    def _local_in_flight(self) -> int:
        local = self.router.local
        return 0 if local is None else local.breaker.in_flight

    async def start(self) -> None:
        limits = self.config.listeners
        trace = self._trace
        if self._service is not None:
            # The control plane's reference; it follows the registry once the data plane
            # can carry its watch (until then no inbound call can arrive: nothing is
            # registered, and the policy's default is to allow).
            self.policy = PolicyWatch(
                None,
                self._replicas,
                trust_domain=None if self._mesh is None else self._mesh.trust_domain,
            )
        self.control = control = Control(
            self.router,
            self._tables,
            policy=self.policy,
            service=self._service,
        )
        dataplane = DataPlane(
            self.control,
            idle_timeout=self.config.pool.idle_timeout,
            max_connections=limits.max_connections,
            max_streams=limits.max_streams,
            connection_idle_timeout=limits.idle_timeout,
            secure=self._mesh is not None,
            trace_collector=self._collector,
            trace_sample=1.0 if trace is None else trace.sample,
        )
        if self._mesh is not None:
            dataplane.set_trust_bundle(self._mesh.bundle_pem)
        try:
            outbound, inbound = dataplane.start(self._public_listen, self._inbound_listen)
        except (OSError, ValueError) as exc:
            raise ServerStartError(str(exc)) from None
        self._public_port, self._inbound_port = outbound, inbound or 0
        self.dataplane = dataplane
        self._rpc = rpc = Rpc(dataplane)
        try:
            await self._secure(dataplane, rpc)
            if self.tls is not None:
                control.identify(str(self.tls.identity))
            dataplane.set_trace_service(self._span_service())
            for table in self._tables:
                on_change = functools.partial(self._on_endpoints, local=table is not self.table)
                table.subscribe(on_change)
                on_change(table.endpoints(), ())
            await self.discovery.start(rpc)
            if self.policy is not None:
                await self.policy.start(rpc)
        except BaseException:
            await self.discovery.close()
            if self.policy is not None:
                await self.policy.close()
            if self.tls is not None:
                await self.tls.close()
            await asyncio.to_thread(dataplane.stop, 0.0)
            rpc.close()
            raise
        logger.info("sidecar listening on %s", self.address)
        if self._admin is not None:
            try:
                await self._admin.start()
            except BaseException:
                await self.close(0)
                raise
        if self._service is not None and self._app is not None:
            advertise = self._advertise or self.inbound_address
            assert advertise is not None
            self.membership = Membership(
                rpc,
                self._replicas,
                service=self._service,
                app=self._app,
                advertise=advertise,
                settings=self._membership_settings(advertise),
                load=self._local_in_flight,
                forwarding=self.forwarding,
            )
            try:
                await self.membership.start()
            except BaseException:
                await self.close(0)
                raise

    def _span_service(self) -> str:
        """The name this sidecar's spans carry: its app's service, or the one its
        certificate names (a client's sidecar), then ``-sidecar``; ``sidecar`` alone for
        an app nothing names (a plaintext client)."""
        if self._service is not None:
            return f"{self._service}-sidecar"
        if self.tls is None:
            return "sidecar"
        return f"{caller_name(str(self.tls.identity))}-sidecar"

    async def _secure(self, dataplane: DataPlane, rpc: Rpc) -> None:
        """Certify (with a mesh identity) and say who each fixed address must be."""
        if self._app is not None:
            dataplane.expect_peer(self._app, None)  # the app, on loopback
        if self._mesh is None:
            logger.warning(
                "running without mTLS: calls to and from other sidecars cross the network "
                "in the clear, and any process that reaches %s is served",
                self._inbound_listen or self.address,
            )
            return
        self.tls = tls = SidecarTls(self._mesh, dataplane, rpc)
        expected = None
        if self._service is not None:
            expected = SpiffeId.service(self._mesh.trust_domain, self._service)
        await tls.start(expected)
        for address in self._replicas.addresses:
            tls.expect_registry(address)

    def _membership_settings(self, advertise: str) -> MembershipSettings:
        """The configured settings plus where operators find the app and this admin page.

        ``shoal stats`` reads these from the registry to ask every worker and sidecar.
        """
        assert self._app is not None
        found = {APP_KEY: self._app}
        if self._admin is not None and self._admin_listen is not None:
            host = parse_address(self._admin_listen, allow_port_zero=True).host
            if host in ("0.0.0.0", "::"):
                host = parse_address(advertise).host
            found[ADMIN_KEY] = str(HostPort(host, self._admin.port))
        settings = self.config.membership
        return settings.model_copy(update={"metadata": {**found, **settings.metadata}})

    async def close(self, grace: float | None = None) -> None:
        """Drain: say NOT_SERVING, deregister, let calls finish for ``grace`` seconds.

        A second close (the forcing signal) cuts the data plane's grace short.
        """
        dataplane = self.dataplane
        if self._draining:
            if dataplane is not None:
                dataplane.stop(0.0)
            return
        self._draining = True
        if dataplane is not None:
            dataplane.set_serving(False)
        if self.membership is not None:
            # Deregistered first, while the data plane still carries the call, so callers
            # stop picking this instance before its calls are drained.
            await self.membership.drain()
        await self.discovery.close()
        if self.policy is not None:
            await self.policy.close()
        if dataplane is not None:
            await asyncio.to_thread(dataplane.stop, 1e9 if grace is None else grace)
        if self._rpc is not None:
            self._rpc.close()
        if self.membership is not None:
            await self.membership.close()
        if self.tls is not None:
            await self.tls.close()
        if self._admin is not None:
            await self._admin.close()
        logger.info("sidecar on %s stopped", self.address)
        self._closed_now()
