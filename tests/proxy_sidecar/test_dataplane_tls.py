"""Mutual TLS in the data plane: real certificates from ``identity.ca``, real handshakes.

Data planes run with small control planes of their own (``Forward``): these tests are
about what the data plane lets through, not about routing. Rogue clients are grpcio
channels and Python's ``ssl``; the apps behind are real grpc.aio servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from shoal_dataplane import Admission, Breaker, DataPlane, Refusal, Target

from identity.ca import CA, init_ca
from identity.spiffe import SpiffeId
from identity.workload import Credentials
from tests.mesh_identity import credentials
from tests.proxy_sidecar.conftest import wait_for
from tests.proxy_sidecar.upstream import SERVICE, Upstream

UNARY = f"/{SERVICE}/Unary"
CLIENT_ID = "spiffe://shoal.local/svc/client"
WORKER_ID = "spiffe://shoal.local/svc/worker"
# grpcio checks a server's DNS name only: the leaf carries the ID as one (see SpiffeId).
WORKER_DNS = "worker.svc.shoal.local"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _OneTry:
    """A call's state for the data plane: one try, no retries."""

    def pick(self) -> Target | Refusal:
        return Refusal(14, "shoal: no second try")

    def failed(self, code: int, replayable: bool, elapsed: float) -> float | None:
        return None

    def finish(
        self,
        code: int,
        latency: float | None,
        elapsed: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        return None


class Forward:
    """A control plane that sends every call to ``address`` and notes who called."""

    def __init__(self, address: str = "127.0.0.1:1", *, outbound: bool) -> None:
        self.target = Target(address, "next")
        self.outbound = outbound
        self.callers: list[tuple[bool, str | None]] = []
        self._breaker = Breaker(max_in_flight=1000, max_pending=1000)

    def begin(
        self,
        path: str,
        target: str | None,
        inbound: bool,
        metadata: Any,
        remaining: float | None,
        peer: str | None,
    ) -> Admission | Refusal:
        self.callers.append((inbound, peer))
        return Admission(_OneTry(), self._breaker, self.outbound, None, self.target)

    def connection_state(self, address: str, state: str) -> None:
        return None

    def reflect(self, request: bytes) -> bytes:
        return b""


@dataclass
class Plane:
    dataplane: DataPlane
    control: Forward
    address: str
    inbound: str | None


@contextlib.asynccontextmanager
async def plane(
    control: Forward,
    creds: Credentials,
    *,
    inbound: bool = False,
    expect: dict[str, str | None] | None = None,
    **options: Any,
) -> AsyncIterator[Plane]:
    """A secure data plane holding ``creds``, with ``expect``'s ``expect_peer`` rules."""
    dataplane = DataPlane(control, secure=True, **options)
    dataplane.set_identity(creds.chain_pem, creds.key_pem, creds.bundle_pem)
    for address, peer in (expect or {}).items():
        dataplane.expect_peer(address, peer)
    out, mesh = dataplane.start("127.0.0.1:0", "127.0.0.1:0" if inbound else None)
    listening = None if mesh is None else f"127.0.0.1:{mesh}"
    try:
        yield Plane(dataplane, control, f"127.0.0.1:{out}", listening)
    finally:
        await asyncio.to_thread(dataplane.stop, 0.0)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return init_ca(tmp_path / "ca", "shoal.local")


@pytest.fixture
async def app() -> AsyncIterator[Upstream]:
    async with Upstream("app") as upstream:
        yield upstream


@pytest.fixture
async def worker(ca: CA, app: Upstream) -> AsyncIterator[Plane]:
    """A worker's sidecar: mTLS on its inbound listener, plaintext to its app on loopback."""
    control = Forward(app.address, outbound=False)
    async with plane(
        control, credentials(ca, "worker"), inbound=True, expect={app.address: None}
    ) as started:
        yield started


async def unary(address: str, data: bytes = b"hi", **channel: Any) -> bytes:
    """One Echo call at ``address``: plaintext, or on ``credentials`` if given."""
    creds = channel.pop("credentials", None)
    open_channel: Any = (
        grpc.aio.insecure_channel(address)
        if creds is None
        else grpc.aio.secure_channel(address, creds, **channel)
    )
    async with open_channel as ch:
        reply: bytes = await ch.unary_unary(UNARY)(data, timeout=10)
        return reply


def grpc_client(bundle: bytes, creds: Credentials | None) -> dict[str, Any]:
    """Arguments for ``unary`` that make it a TLS client naming the worker."""
    ssl_creds = grpc.ssl_channel_credentials(
        root_certificates=bundle,
        private_key=creds.key_pem if creds else None,
        certificate_chain=creds.chain_pem if creds else None,
    )
    return {
        "credentials": ssl_creds,
        "options": [("grpc.ssl_target_name_override", WORKER_DNS)],
    }


@contextlib.contextmanager
def tls_socket(
    address: str, bundle: bytes, creds: Credentials, tmp: Path
) -> Iterator[ssl.SSLSocket]:
    """A TLS 1.3 connection made with Python's ``ssl``, presenting ``creds``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cadata=bundle.decode())
    chain, key = tmp / f"chain-{id(creds)}.pem", tmp / f"key-{id(creds)}.pem"
    chain.write_bytes(creds.chain_pem)
    key.write_bytes(creds.key_pem)
    context.load_cert_chain(chain, key)
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            yield tls


def server_serial(tls: ssl.SSLSocket) -> int:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class TlsApp:
    """A grpc.aio Echo on mutual TLS with ``creds``, noting each caller's certificate."""

    def __init__(self, creds: Credentials, *, require_client_auth: bool = True) -> None:
        self.creds = creds
        self.require_client_auth = require_client_auth
        self.callers: list[x509.Certificate] = []
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> TlsApp:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._unary)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"Unary": handler})]
        )
        tls = grpc.ssl_server_credentials(
            [(self.creds.key_pem, self.creds.chain_pem)],
            root_certificates=self.creds.bundle_pem,
            require_client_auth=self.require_client_auth,
        )
        self.address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', tls)}"
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(None)

    async def _unary(self, request: bytes, context: Any) -> bytes:
        for pem in context.auth_context().get("x509_pem_cert", []):
            self.callers.append(x509.load_pem_x509_certificate(pem))
        return b"tls:" + request


# --- the mesh hop ------------------------------------------------------------------------


async def test_two_secure_sidecars_carry_a_call_and_the_worker_learns_who_called(
    ca: CA, app: Upstream, worker: Plane
):
    assert worker.inbound is not None
    async with plane(
        Forward(worker.inbound, outbound=True),
        credentials(ca, "client"),
        expect={worker.inbound: WORKER_ID},
    ) as client:
        assert await unary(client.address) == b"app:hi"
        assert await unary(client.address, b"again") == b"app:again"
        # The app's own call into its sidecar is plaintext and names nobody; the hop does.
        assert client.control.callers == [(False, None), (False, None)]
        assert worker.control.callers == [(True, CLIENT_ID), (True, CLIENT_ID)]
        assert app.total == 2
        # One pooled connection, one handshake on each side.
        assert client.dataplane.handshakes() == 1
        assert worker.dataplane.handshakes() == 1
        assert client.dataplane.handshake_failures() == 0


async def test_a_grpc_client_with_a_mesh_certificate_is_served_and_named(ca: CA, worker: Plane):
    assert worker.inbound is not None
    client = grpc_client(ca.bundle_pem, credentials(ca, "client"))
    assert await unary(worker.inbound, **client) == b"app:hi"
    assert worker.control.callers == [(True, CLIENT_ID)]


# --- the inbound listener refuses ----------------------------------------------------------


async def test_a_plaintext_client_on_the_secure_inbound_listener_fails_and_is_logged_at_debug(
    app: Upstream, worker: Plane, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG, logger="shoal_dataplane")
    assert worker.inbound is not None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(worker.inbound)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert app.total == 0 and worker.control.callers == []
    await wait_for(lambda: worker.dataplane.handshake_failures() >= 1, what="a failed handshake")
    assert worker.dataplane.handshakes() == 0

    def ours() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.startswith("shoal_dataplane")]

    # The failure is counted first and logged just after, from the data plane's thread.
    await wait_for(
        lambda: any("TLS handshake failed" in r.getMessage() for r in ours()),
        what="the failed handshake logged",
    )
    assert all(r.levelno <= logging.DEBUG for r in ours()), [r.getMessage() for r in ours()]


@pytest.mark.parametrize("presented", ["foreign", "expired", "none"])
async def test_a_client_without_a_valid_mesh_certificate_is_refused_at_the_handshake(
    presented: str, ca: CA, app: Upstream, worker: Plane, tmp_path: Path
):
    assert worker.inbound is not None
    creds: Credentials | None
    if presented == "foreign":
        creds = credentials(init_ca(tmp_path / "foreign", "shoal.local"), "client")
    elif presented == "expired":
        # Leaves start a minute back (clock skew); this one ends a second from now.
        creds = credentials(ca, "client", dt.timedelta(seconds=1))
        await asyncio.sleep(2.0)
    else:
        creds = None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(worker.inbound, **grpc_client(ca.bundle_pem, creds))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert app.total == 0 and worker.control.callers == []
    assert worker.dataplane.handshakes() == 0
    assert worker.dataplane.handshake_failures() >= 1


async def test_failed_handshakes_give_back_their_connection_slots(ca: CA, app: Upstream):
    control = Forward(app.address, outbound=False)
    async with plane(
        control,
        credentials(ca, "worker"),
        inbound=True,
        expect={app.address: None},
        max_connections=2,
    ) as worker:
        assert worker.inbound is not None
        host, port = worker.inbound.rsplit(":", 1)

        def plaintext_attempt() -> bytes:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(H2_PREFACE + bytes.fromhex("000000040000000000"))
                try:
                    return sock.recv(65536)
                except ConnectionResetError:
                    return b""

        for _ in range(10):
            await asyncio.to_thread(plaintext_attempt)
        await wait_for(lambda: worker.dataplane.handshake_failures() == 10, what="ten failures")
        # Had a failure kept its place, a cap of two would turn this client away.
        client = grpc_client(ca.bundle_pem, credentials(ca, "client"))
        assert await unary(worker.inbound, **client) == b"app:hi"


# --- the outbound side refuses -------------------------------------------------------------


async def test_a_server_proving_another_identity_than_expected_gets_nothing(ca: CA, app: Upstream):
    # The server at this address holds svc/client's certificate; it is expected as svc/worker.
    impostor = Forward(app.address, outbound=False)
    async with plane(
        impostor, credentials(ca, "client"), inbound=True, expect={app.address: None}
    ) as server:
        assert server.inbound is not None
        async with plane(
            Forward(server.inbound, outbound=True),
            credentials(ca, "client"),
            expect={server.inbound: WORKER_ID},
        ) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(client.address)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            details = str(info.value.details())
            assert f"the server is {CLIENT_ID}, not {WORKER_ID}" in details, details
            assert client.dataplane.handshake_failures() >= 1
            assert client.dataplane.handshakes() == 0
    assert app.total == 0 and impostor.callers == []


async def test_a_changed_expectation_applies_from_the_next_connection(
    ca: CA, app: Upstream, worker: Plane
):
    assert worker.inbound is not None
    address = worker.inbound
    async with plane(
        Forward(address, outbound=True), credentials(ca, "client"), expect={address: WORKER_ID}
    ) as client:
        assert await unary(client.address) == b"app:hi"
        # The same rule again is no change: the connection stays.
        client.dataplane.expect_peer(address, WORKER_ID)
        assert await unary(client.address) == b"app:hi"
        assert client.dataplane.handshakes() == 1
        client.dataplane.expect_peer(address, CLIENT_ID)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(client.address)
        assert f"the server is {WORKER_ID}, not {CLIENT_ID}" in str(info.value.details())
        client.dataplane.expect_peer(address, WORKER_ID)
        assert await unary(client.address) == b"app:hi"
        # None is plaintext, which a secure inbound listener does not speak.
        client.dataplane.expect_peer(address, None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(client.address)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert app.total == 3


async def test_without_secure_everything_stays_plaintext_whatever_is_expected(app: Upstream):
    dataplane = DataPlane(Forward(app.address, outbound=False))
    dataplane.expect_peer(app.address, WORKER_ID)
    port, _ = dataplane.start("127.0.0.1:0")
    try:
        assert await unary(f"127.0.0.1:{port}") == b"app:hi"
        assert dataplane.handshakes() == dataplane.handshake_failures() == 0
    finally:
        await asyncio.to_thread(dataplane.stop, 0.0)


async def test_in_secure_mode_an_address_with_no_expected_peer_is_refused(ca: CA, app: Upstream):
    control = Forward(app.address, outbound=True)
    async with plane(control, credentials(ca, "client")) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(client.address)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == f"shoal: no mesh identity is known for {app.address}"
        # The control plane's own calls follow the same rule.
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, str]] = loop.create_future()
        client.dataplane.call(
            app.address,
            UNARY,
            b"own",
            5.0,
            lambda message: None,
            lambda code, message: loop.call_soon_threadsafe(done.set_result, (code, message)),
        )
        assert await done == (14, f"shoal: no mesh identity is known for {app.address}")
        assert client.dataplane.connections() == 0
    assert app.total == 0


async def test_the_control_planes_own_calls_go_over_mtls_to_the_expected_peer(ca: CA):
    registry = credentials(ca, SpiffeId(ca.trust_domain, "registry"))
    sidecar = credentials(ca, "client")
    async with TlsApp(registry) as server:
        async with plane(
            Forward(outbound=True),
            sidecar,
            expect={server.address: f"spiffe://{ca.trust_domain}/registry"},
        ) as client:
            loop = asyncio.get_running_loop()
            got: list[bytes] = []
            done: asyncio.Future[tuple[int, str]] = loop.create_future()
            client.dataplane.call(
                server.address,
                UNARY,
                b"own",
                5.0,
                got.append,
                lambda code, message: loop.call_soon_threadsafe(done.set_result, (code, message)),
            )
            assert (await done)[0] == 0
            assert got == [b"tls:own"]
            assert [c.serial_number for c in server.callers] == [sidecar.leaf.serial_number]
            assert client.dataplane.handshakes() == 1


async def test_before_its_identity_a_data_plane_calls_by_its_trust_bundle_alone(ca: CA):
    """How a sidecar asks for its first certificate: over its own data plane, checking
    the identity server against the bundle and showing no certificate of its own."""
    identity_id = f"spiffe://{ca.trust_domain}/identity"
    server_creds = credentials(ca, SpiffeId(ca.trust_domain, "identity"))
    async with TlsApp(server_creds, require_client_auth=False) as server:
        dataplane = DataPlane(Forward(outbound=True), secure=True)
        with pytest.raises(ValueError, match="bad trust bundle"):
            dataplane.set_trust_bundle(b"not pem")
        dataplane.set_trust_bundle(ca.bundle_pem)
        dataplane.expect_peer(server.address, identity_id)
        _, mesh = dataplane.start("127.0.0.1:0", "127.0.0.1:0")
        try:
            loop = asyncio.get_running_loop()
            got: list[bytes] = []
            done: asyncio.Future[tuple[int, str]] = loop.create_future()
            dataplane.call(
                server.address,
                UNARY,
                b"first",
                5.0,
                got.append,
                lambda code, message: loop.call_soon_threadsafe(done.set_result, (code, message)),
            )
            assert (await done)[0] == 0
            assert got == [b"tls:first"]
            assert server.callers == []  # no certificate shown
            # With no identity it has nothing to prove itself with to its callers.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await unary(
                    f"127.0.0.1:{mesh}", **grpc_client(ca.bundle_pem, credentials(ca, "client"))
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await asyncio.to_thread(dataplane.stop, 0.0)


# --- set_identity --------------------------------------------------------------------------


async def test_a_new_client_identity_is_presented_on_new_connections_only(ca: CA):
    async with TlsApp(credentials(ca, "worker")) as server:
        old, new = credentials(ca, "client"), credentials(ca, "client")
        async with plane(
            Forward(server.address, outbound=True), old, expect={server.address: WORKER_ID}
        ) as client:
            assert await unary(client.address) == b"tls:hi"
            client.dataplane.set_identity(new.chain_pem, new.key_pem, new.bundle_pem)
            # The connection opened before goes on, with the certificate it was made with.
            assert await unary(client.address) == b"tls:hi"
            assert client.dataplane.handshakes() == 1
            client.dataplane.forget(server.address)
            assert await unary(client.address) == b"tls:hi"
            assert client.dataplane.handshakes() == 2
    serials = [c.serial_number for c in server.callers]
    assert serials == [old.leaf.serial_number, old.leaf.serial_number, new.leaf.serial_number]


async def test_a_new_server_identity_is_shown_to_new_connections_only(
    ca: CA, worker: Plane, tmp_path: Path
):
    assert worker.inbound is not None
    address = worker.inbound
    client = credentials(ca, "client")
    # A grpcio channel keeps its one connection across both calls.
    channel: Any = grpc.aio.secure_channel(address, **grpc_client(ca.bundle_pem, client))
    async with channel:
        echo = channel.unary_unary(UNARY)
        assert await echo(b"before", timeout=10) == b"app:before"
        first = await asyncio.to_thread(probe_serial, address, ca.bundle_pem, client, tmp_path)
        renewed = credentials(ca, "worker")
        worker.dataplane.set_identity(renewed.chain_pem, renewed.key_pem, renewed.bundle_pem)
        assert await echo(b"after", timeout=10) == b"app:after"
        second = await asyncio.to_thread(probe_serial, address, ca.bundle_pem, client, tmp_path)
    assert first != second
    assert second == renewed.leaf.serial_number
    # The channel's connection, the two probes: three handshakes, no reconnect. The data
    # plane counts a handshake on its own thread, a moment after the client has finished.
    await wait_for(lambda: worker.dataplane.handshakes() >= 3, what="three handshakes")
    assert worker.dataplane.handshakes() == 3


def probe_serial(address: str, bundle: bytes, creds: Credentials, tmp: Path) -> int:
    """The serial of the certificate the server at ``address`` shows a new connection."""
    with tls_socket(address, bundle, creds, tmp) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        return server_serial(tls)


async def test_bad_identities_are_refused_in_one_line(ca: CA, tmp_path: Path):
    good, other = credentials(ca, "worker"), credentials(ca, "client")
    dataplane = DataPlane(Forward(outbound=True), secure=True)
    with pytest.raises(RuntimeError, match="set_identity"):
        dataplane.start("127.0.0.1:0")
    cases = [
        ((b"not a certificate", good.key_pem, good.bundle_pem), "holds no certificate"),
        ((good.chain_pem[:200], good.key_pem, good.bundle_pem), "not valid PEM"),
        ((good.chain_pem, b"-----BEGIN PRIVATE KEY-----\nxx\n", good.bundle_pem), "key"),
        ((good.chain_pem, other.key_pem, good.bundle_pem), "does not match"),
        ((good.chain_pem, good.key_pem, b""), "trust bundle holds no certificate"),
        ((ca.bundle_pem, good.key_pem, good.bundle_pem), "SPIFFE ID"),
    ]
    for args, why in cases:
        with pytest.raises(ValueError) as info:
            dataplane.set_identity(*args)
        message = str(info.value)
        assert why in message, (why, message)
        assert "\n" not in message and message.startswith("bad mesh identity: "), message
    with pytest.raises(ValueError, match="not a SPIFFE ID"):
        dataplane.expect_peer("127.0.0.1:1", "worker")
    # Still no identity: a failed set_identity installs nothing.
    with pytest.raises(RuntimeError):
        dataplane.start("127.0.0.1:0")
