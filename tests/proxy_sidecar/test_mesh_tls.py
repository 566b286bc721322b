"""Sidecars on mutual TLS: certified by a real identity server, watching a real mTLS
registry, carrying calls between them. Nothing here is faked: the certificates come
from ``shoal identity``'s Certify over the sidecar's own data plane."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from identity.ca import CA, init_ca
from identity.spiffe import SpiffeId
from identity.tokens import create_token
from identity_service.server import IdentityServer
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from proxy_sidecar import SidecarServer
from registry_service import RegistryServer
from shoal_core.certifying import MeshIdentity
from shoal_core.errors import ServerStartError
from shoal_core.tls import channel_credentials, server_credentials, target_options
from tests.mesh_identity import TD, credentials
from tests.proxy_sidecar.conftest import FAST_REGISTRY, Echo, healthz, routable, served_by, wait_for
from tests.proxy_sidecar.test_dataplane_tls import TlsApp
from tests.proxy_sidecar.upstream import SERVICE, Upstream

REGISTRY = SpiffeId(TD, "registry")


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return init_ca(tmp_path / "ca", TD)


@contextlib.asynccontextmanager
async def identity_server(ca: CA, leaf_ttl: dt.timedelta) -> AsyncIterator[IdentityServer]:
    async with IdentityServer("127.0.0.1:0", ca, leaf_ttl=leaf_ttl) as server:
        yield server


@pytest.fixture
async def certifier(ca: CA) -> AsyncIterator[IdentityServer]:
    async with identity_server(ca, dt.timedelta(hours=1)) as server:
        yield server


@pytest.fixture
async def registry(ca: CA) -> AsyncIterator[RegistryServer]:
    own = credentials(ca, REGISTRY)
    server = RegistryServer(
        "127.0.0.1:0",
        FAST_REGISTRY,
        credentials=server_credentials(lambda: own),
        trust_domain=TD,
    )
    async with server:
        yield server


def mesh_for(ca: CA, certifier: IdentityServer, service: str) -> MeshIdentity:
    token, _ = create_token(ca, service, dt.timedelta(hours=1))
    return MeshIdentity(certifier.address, ca.bundle_pem, TD, token)


class SecureMesh:
    """Upstreams behind mTLS sidecars of service ``echo``, and a ``client`` sidecar."""

    def __init__(self, ca: CA, certifier: IdentityServer, registry: RegistryServer) -> None:
        self.ca, self.certifier, self.registry = ca, certifier, registry
        self.stack = contextlib.AsyncExitStack()
        self.sidecars: list[SidecarServer] = []
        self.upstreams: list[Upstream] = []

    def sidecar(self, service: str | None, app: Upstream | None = None) -> SidecarServer:
        return SidecarServer(
            "127.0.0.1:0",
            self.registry.address,
            service=service if app else None,
            app=None if app is None else app.address,
            inbound=None if app is None else "127.0.0.1:0",
            admin="127.0.0.1:0",
            mesh=mesh_for(self.ca, self.certifier, service or "client"),
        )

    async def start(self, upstreams: int = 2) -> SidecarServer:
        for i in range(upstreams):
            upstream = await self.stack.enter_async_context(Upstream(f"up{i}"))
            self.upstreams.append(upstream)
            self.sidecars.append(
                await self.stack.enter_async_context(self.sidecar("echo", upstream))
            )
        client = await self.stack.enter_async_context(self.sidecar("client"))
        await wait_for(lambda: routable(client) == upstreams, what="all upstreams routable")
        return client


@pytest.fixture
async def mesh(
    ca: CA, certifier: IdentityServer, registry: RegistryServer
) -> AsyncIterator[SecureMesh]:
    built = SecureMesh(ca, certifier, registry)
    async with built.stack:
        yield built


async def test_sidecars_certify_themselves_and_carry_calls_over_mtls(mesh: SecureMesh):
    client = await mesh.start()
    async with grpc.aio.insecure_channel(client.address) as channel:
        served = {await served_by(Echo(channel).unary(b"x", timeout=10)) for _ in range(20)}
    assert served == {"up0", "up1"}
    assert client.dataplane is not None and client.dataplane.handshakes() >= 3
    _, page = await healthz(client.admin_port)
    assert page["identity"] == f"spiffe://{TD}/svc/client"
    _, worker_page = await healthz(mesh.sidecars[0].admin_port)
    assert worker_page["identity"] == f"spiffe://{TD}/svc/echo"


async def test_a_token_for_another_service_cannot_start_that_services_sidecar(
    mesh: SecureMesh,
):
    async with Upstream("app") as app:
        sidecar = mesh.sidecar("echo", app)
        sidecar._mesh = mesh_for(mesh.ca, mesh.certifier, "client")
        with pytest.raises(ServerStartError, match=f"admits spiffe://{TD}/svc/client, not"):
            await sidecar.start()


async def test_a_refused_token_stops_the_start_in_one_line(mesh: SecureMesh):
    sidecar = mesh.sidecar("client")
    forged = MeshIdentity(mesh.certifier.address, mesh.ca.bundle_pem, TD, "not-a-token")
    sidecar._mesh = forged
    with pytest.raises(ServerStartError, match="^cannot certify at .*: UNAUTHENTICATED: "):
        await sidecar.start()


async def test_an_address_that_cannot_prove_the_services_identity_gets_no_call(
    mesh: SecureMesh, ca: CA, registry: RegistryServer
):
    """A registered address held by a process with another service's certificate (a
    rogue with a valid ``client`` leaf) is refused at the handshake: not one call."""
    client = await mesh.start()
    async with TlsApp(credentials(ca, "client")) as rogue:
        operator = credentials(ca, SpiffeId(TD, "operator", "ops"))
        async with grpc.aio.secure_channel(
            registry.address, channel_credentials(operator), options=target_options(REGISTRY)
        ) as channel:
            await pb_grpc.RegistryStub(channel).Register(
                pb.RegisterRequest(
                    instance=pb.Instance(
                        instance_id="rogue",
                        service="echo",
                        address=rogue.address,
                        grpc_services=[SERVICE],
                    ),
                    ttl_ms=30_000,
                ),
                timeout=5,
            )
        await wait_for(
            lambda: len(client.table.members(SERVICE) or ()) == 3, what="the rogue listed"
        )
        async with grpc.aio.insecure_channel(client.address) as app_channel:
            echo = Echo(app_channel)
            served = [await served_by(echo.unary(b"x", timeout=10)) for _ in range(30)]
        assert set(served) == {"up0", "up1"}
        assert rogue.callers == []
        assert client.dataplane is not None and client.dataplane.handshake_failures() >= 1


async def test_certificates_renewed_every_few_seconds_under_load_fail_no_call(
    ca: CA, registry: RegistryServer
):
    """Leaves of 4 s, renewed at about 70 % of their life, for 20 s of steady calls; the
    client's connections are dropped every second, so new handshakes use new leaves."""
    async with identity_server(ca, dt.timedelta(seconds=4)) as certifier:
        built = SecureMesh(ca, certifier, registry)
        async with built.stack:
            client = await built.start()
            failures: list[str] = []
            calls = 0
            async with grpc.aio.insecure_channel(client.address) as channel:
                echo = Echo(channel)
                end = time.monotonic() + 20

                async def load() -> None:
                    nonlocal calls
                    while time.monotonic() < end:
                        try:
                            await echo.unary(b"x", timeout=10)
                            calls += 1
                        except grpc.aio.AioRpcError as exc:
                            failures.append(f"{exc.code().name}: {exc.details()}")

                async def reconnect() -> None:
                    assert client.dataplane is not None
                    while time.monotonic() < end:
                        await asyncio.sleep(1.0)
                        for sidecar in built.sidecars:
                            assert sidecar.inbound_address is not None
                            client.dataplane.forget(sidecar.inbound_address)

                assert client.dataplane is not None
                before = client.dataplane.handshakes()
                await asyncio.gather(reconnect(), *(load() for _ in range(4)))
                handshakes = client.dataplane.handshakes() - before
            renewed = [s.tls.keeper.renewals for s in (client, *built.sidecars) if s.tls]
            assert failures == []
            assert calls > 100
            assert min(renewed) >= 4, renewed
            assert handshakes >= 20
