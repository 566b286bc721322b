"""Sidecars on mutual TLS: certified by a real identity server, watching a real mTLS
registry, carrying calls between them. Nothing here is faked: the certificates come
from ``shoal identity``'s Certify over the sidecar's own data plane."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from identity.authz import policy_from_data
from identity.ca import CA, init_ca
from identity.spiffe import SpiffeId
from identity.tokens import create_token
from identity.workload import Credentials
from identity_service.server import IdentityServer
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from proxy_sidecar import SidecarServer
from registry_service import RegistryServer
from shoal_core.certifying import MeshIdentity
from shoal_core.errors import ServerStartError
from shoal_core.policy_wire import policy_to_pb
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
        self.client: SidecarServer | None = None

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
        client = self.client = await self.stack.enter_async_context(self.sidecar("client"))
        await wait_for(lambda: routable(client) == upstreams, what="all upstreams routable")
        return client

    @contextlib.asynccontextmanager
    async def steady_load(self, client: SidecarServer) -> AsyncIterator[Tally]:
        """Four callers through ``client`` while the body runs; its connections to every
        instance are dropped each second, so handshakes keep meeting the certificates
        of the moment (open connections would never look at them again)."""
        dataplane = client.dataplane
        assert dataplane is not None
        tally, stop = Tally(), asyncio.Event()
        before = dataplane.handshakes()
        async with grpc.aio.insecure_channel(client.address) as channel:
            echo = Echo(channel)

            async def load() -> None:
                while not stop.is_set():
                    try:
                        await echo.unary(b"x", timeout=10)
                        tally.calls += 1
                    except grpc.aio.AioRpcError as exc:
                        tally.failures.append(
                            f"{time.monotonic():.1f} {exc.code().name}: {exc.details()}"
                        )

            async def reconnect() -> None:
                while not stop.is_set():
                    await asyncio.sleep(1.0)
                    for sidecar in self.sidecars:
                        assert sidecar.inbound_address is not None
                        dataplane.forget(sidecar.inbound_address)

            tasks = [
                asyncio.create_task(reconnect()),
                *(asyncio.create_task(load()) for _ in range(4)),
            ]
            try:
                yield tally
            finally:
                stop.set()
                await asyncio.gather(*tasks)
        tally.handshakes = dataplane.handshakes() - before


@dataclass
class Tally:
    """What a steady load saw: failures (when, code, details), calls that ended OK, and
    the client's new handshakes."""

    failures: list[str] = field(default_factory=list)
    calls: int = 0
    handshakes: int = 0


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


def rogue_credentials(kind: str, ca: CA, tmp_path: Path) -> Credentials:
    if kind == "client's leaf":
        return credentials(ca, "client")
    if kind == "another CA's echo leaf":
        return credentials(init_ca(tmp_path / "other", TD), "echo")
    expired = credentials(ca, "echo", dt.timedelta(milliseconds=1))
    time.sleep(1.1)  # X.509 times are whole seconds, and the last one is still valid
    return expired


@pytest.mark.parametrize("kind", ["client's leaf", "another CA's echo leaf", "expired echo leaf"])
async def test_an_address_that_cannot_prove_the_services_identity_gets_no_call(
    kind: str, mesh: SecureMesh, ca: CA, registry: RegistryServer, tmp_path: Path
):
    """A registered address held by a process that cannot prove it is an ``echo``
    instance (a valid leaf of another service, one from another CA, an expired one) is
    refused at the handshake: not one call."""
    client = await mesh.start()
    async with TlsApp(rogue_credentials(kind, ca, tmp_path)) as rogue:
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
    """Leaves of 4 s, renewed at about 70 % of their life, for a minute of steady calls; the
    client's connections are dropped every second, so new handshakes use new leaves."""
    async with identity_server(ca, dt.timedelta(seconds=4)) as certifier:
        built = SecureMesh(ca, certifier, registry)
        async with built.stack:
            client = await built.start()
            async with built.steady_load(client) as tally:
                await asyncio.sleep(60)
            renewed = [s.tls.keeper.renewals for s in (client, *built.sidecars) if s.tls]
            assert tally.failures == []
            assert tally.calls > 100
            assert min(renewed) >= 15, renewed
            assert tally.handshakes >= 100


# --- authorization ---------------------------------------------------------------------

DENY_CLIENT: dict[str, object] = {
    "default": "allow",
    "rules": [{"name": "no-client", "from": ["client"], "to": "echo", "action": "deny"}],
}
ALLOW_ALL: dict[str, object] = {"default": "allow", "rules": []}


async def set_policy(ca: CA, registry: RegistryServer, data: dict[str, object]) -> None:
    operator = credentials(ca, SpiffeId(TD, "operator", "ops"))
    async with grpc.aio.secure_channel(
        registry.address, channel_credentials(operator), options=target_options(REGISTRY)
    ) as channel:
        await pb_grpc.RegistryStub(channel).SetPolicy(
            pb.SetPolicyRequest(policy=policy_to_pb(policy_from_data(data))), timeout=5
        )


async def test_a_denied_call_is_refused_by_the_inbound_sidecar_naming_caller_and_rule(
    mesh: SecureMesh, ca: CA, registry: RegistryServer
):
    client = await mesh.start()
    await set_policy(ca, registry, DENY_CLIENT)
    async with grpc.aio.insecure_channel(client.address) as channel:
        echo = Echo(channel)

        async def refused() -> bool:
            try:
                await echo.unary(b"x", timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                assert exc.details() == (
                    f"shoal: spiffe://{TD}/svc/client may not call /{SERVICE}/Unary "
                    "on service 'echo': rule 'no-client' (deny)"
                )
                return True
            return False

        await wait_for(refused, timeout=5, what="the deny rule in force")
        served_before = sum(u.total for u in mesh.upstreams)
        for _ in range(5):
            assert await refused()
        assert sum(u.total for u in mesh.upstreams) == served_before  # no app saw them
        denied = 0
        for sidecar in mesh.sidecars:
            assert sidecar.policy is not None
            denied += sidecar.policy.denied_counts().get((f"spiffe://{TD}/svc/client", "echo"), 0)
            text = await metrics_text(sidecar.admin_port)
            assert "shoal_sidecar_inbound_denied_total{" in text
            # ... and among its requests, with their status.
            assert 'code="PERMISSION_DENIED",direction="inbound"' in text
        assert denied >= 6
        await set_policy(ca, registry, ALLOW_ALL)
        await wait_for(lambda: not_refused(echo), timeout=5, what="the allow in force")


async def not_refused(echo: Echo) -> bool:
    try:
        await echo.unary(b"x", timeout=10)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc
        return False
    return True


async def metrics_text(port: int) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    return await asyncio.to_thread(fetch)


async def test_policy_changes_under_load_take_effect_within_a_second(
    mesh: SecureMesh, ca: CA, registry: RegistryServer
):
    """Deny, allow, deny while four callers run: every call started more than 1 s after
    a change has the outcome the change asked for, and nothing fails otherwise."""
    client = await mesh.start()
    outcomes: list[tuple[float, str]] = []
    changes: list[tuple[float, str]] = []
    async with grpc.aio.insecure_channel(client.address) as channel:
        echo = Echo(channel)
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await echo.unary(b"x", timeout=10)
                    outcomes.append((started, "OK"))
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((started, exc.code().name))

        callers = [asyncio.create_task(load()) for _ in range(4)]
        try:
            flips: list[tuple[dict[str, object], str]] = [
                (DENY_CLIENT, "PERMISSION_DENIED"),
                (ALLOW_ALL, "OK"),
            ]
            for data, expect in flips * 2:
                await asyncio.sleep(2.5)
                changes.append((time.monotonic(), expect))
                await set_policy(ca, registry, data)
            await asyncio.sleep(2.5)
        finally:
            stop.set()
            await asyncio.gather(*callers)
    assert {code for _, code in outcomes} <= {"OK", "PERMISSION_DENIED"}
    bounds = [*(at for at, _ in changes[1:]), float("inf")]
    for (at, expect), until in zip(changes, bounds, strict=True):
        settled = [code for started, code in outcomes if at + 1.0 < started < until]
        assert settled and set(settled) == {expect}, (expect, len(settled))


# --- on the wire -------------------------------------------------------------------------


class RecordingRelay:
    """A TCP relay between two sidecars that keeps every byte it carries."""

    def __init__(self) -> None:
        self.seen = bytearray()
        self.target = asyncio.get_running_loop().create_future()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = ""

    async def __aenter__(self) -> RecordingRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = (await self.target).rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:  # the worker sidecar has stopped: so does this connection
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    self.seen += data
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        pumps = [
            asyncio.create_task(pump(reader, up_writer)),
            asyncio.create_task(pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        self._tasks.difference_update(pumps)


@pytest.mark.parametrize("secure", [True, False], ids=["mtls", "plaintext"])
async def test_no_payload_crosses_the_mesh_hop_in_the_clear(
    secure: bool, ca: CA, certifier: IdentityServer, tmp_path: Path
):
    """The app's marker goes client sidecar -> relay -> worker sidecar and back: the relay
    sees it only when the sidecars run plaintext (which shows the relay would catch it)."""
    marker = b"MARKER-7d1f0c-the-app-payload"
    own = credentials(ca, REGISTRY)
    registry = RegistryServer(
        "127.0.0.1:0",
        FAST_REGISTRY,
        credentials=server_credentials(lambda: own) if secure else None,
        trust_domain=TD if secure else None,
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(registry)
        relay = await stack.enter_async_context(RecordingRelay())
        app = await stack.enter_async_context(Upstream("app"))

        def mesh(service: str) -> MeshIdentity | None:
            return mesh_for(ca, certifier, service) if secure else None

        worker = SidecarServer(
            "127.0.0.1:0",
            registry.address,
            service="echo",
            app=app.address,
            inbound="127.0.0.1:0",
            advertise=relay.address,
            mesh=mesh("echo"),
        )
        client = SidecarServer("127.0.0.1:0", registry.address, mesh=mesh("client"))
        await stack.enter_async_context(worker)
        assert worker.inbound_address is not None
        relay.target.set_result(worker.inbound_address)
        await stack.enter_async_context(client)
        await wait_for(lambda: routable(client) == 1, what="the worker routable")
        async with grpc.aio.insecure_channel(client.address) as channel:
            reply = await Echo(channel).unary(marker, timeout=10)
        assert marker in reply
        assert app.total == 1
        assert len(relay.seen) > 200  # the call went through the relay
        assert (marker in relay.seen) is not secure
