"""Proxyless clients in an mTLS mesh: plain grpcio with ``xds:///echo`` and
``grpc.xds_channel_credentials``, its certificate kept in files by a real ``shoal
identity-agent`` process and read by gRPC's own ``file_watcher`` provider, talking mTLS
to the registry (checked by its host name) and to each upstream's sidecar (checked by
its SPIFFE ID, authorized by the mesh's policy like any sidecar's calls)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from identity.ca import CA, init_ca
from identity.cert_files import CertFiles
from identity.spiffe import SpiffeId
from identity.tokens import create_token
from identity_service.server import IdentityServer
from registry_service import RegistryServer
from shoal_cli.xds_cmd import bootstrap_document
from shoal_core.tls import server_credentials
from tests.mesh_identity import TD, credentials
from tests.proxy_sidecar.conftest import FAST_REGISTRY, Echo, served_by
from tests.proxy_sidecar.test_mesh_tls import SecureMesh, set_policy
from tests.proxy_sidecar.upstream import SERVICE

# Plain grpcio, nothing of Shoal's: for SECONDS, a new channel (with connections of its
# own, so every round has new handshakes with the certificate of the moment) and
# CALLS calls on it; a JSON line per call, who served it or how it failed.
CLIENT = f"""
import grpc, grpc.experimental, json, sys, time
seconds, calls, secure = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "xds"
creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
end = time.monotonic() + seconds
while True:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (grpc.secure_channel("xds:///echo", creds, options=options) if secure
               else grpc.insecure_channel("xds:///echo", options=options))
    with channel:
        unary = channel.unary_unary("/{SERVICE}/Unary", None, None)
        for _ in range(calls):
            try:
                _, call = unary.with_call(b"hi", timeout=5, wait_for_ready=True)
                print(json.dumps({{"served_by": dict(call.initial_metadata())["x-served-by"]}}))
            except grpc.RpcError as exc:
                print(json.dumps({{"code": exc.code().name, "details": exc.details()}}))
            sys.stdout.flush()
    if time.monotonic() >= end:
        break
    time.sleep(0.5)
"""

REGISTRY = SpiffeId(TD, "registry")


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return init_ca(tmp_path / "ca", TD)


@pytest.fixture
async def registry(ca: CA) -> AsyncIterator[RegistryServer]:
    # Named 127.0.0.1 too: a proxyless client checks the registry by the host it dials.
    own = credentials(ca, REGISTRY, hosts=("127.0.0.1",))
    server = RegistryServer(
        "127.0.0.1:0", FAST_REGISTRY, credentials=server_credentials(lambda: own), trust_domain=TD
    )
    async with server:
        yield server


@contextlib.asynccontextmanager
async def secure_mesh(
    ca: CA, registry: RegistryServer, leaf_ttl: dt.timedelta = dt.timedelta(hours=1)
) -> AsyncIterator[SecureMesh]:
    async with IdentityServer("127.0.0.1:0", ca, leaf_ttl=leaf_ttl) as certifier:
        mesh = SecureMesh(ca, certifier, registry)
        async with mesh.stack:
            await mesh.start()
            yield mesh


@contextlib.asynccontextmanager
async def identity_agent(
    mesh: SecureMesh, service: str, out: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``shoal identity-agent`` for ``service``, until it has written its files."""
    token, _ = create_token(mesh.ca, service, dt.timedelta(hours=1))
    bundle = out.parent / "bundle.crt"
    bundle.write_bytes(mesh.ca.bundle_pem)
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal_cli.main", "identity-agent",
        "--identity-server", mesh.certifier.address, "--trust-bundle", str(bundle),
        "--service", service, "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SHOAL_TOKEN": token},
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        line = await asyncio.wait_for(agent.stdout.readline(), 20)
        assert line.decode().startswith(f"shoal identity-agent keeping spiffe://{TD}/svc/"), line
        yield agent
    finally:
        if agent.returncode is None:
            agent.terminate()
            await asyncio.wait_for(agent.wait(), 10)
    assert agent.returncode == 0, (await agent.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]


async def run_client(
    registry: RegistryServer,
    tmp_path: Path,
    certs: CertFiles | None,
    *,
    seconds: float = 0,
    calls: int = 20,
    secure: bool = True,
) -> list[dict[str, str]]:
    """What each call of ``CLIENT`` saw, with a bootstrap for ``certs`` (None: plaintext)."""
    bootstrap = tmp_path / f"xds-{os.urandom(4).hex()}.json"
    document = bootstrap_document([registry.address], "app-1", "", "", certs, refresh=1.0)
    bootstrap.write_text(json.dumps(document))
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(seconds), str(calls), "xds" if secure else "plain",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(client.communicate(), seconds + 60)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode == 0, err.decode()[-2000:]
    return [json.loads(line) for line in out.decode().splitlines()]


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def test_a_proxyless_client_calls_every_upstream_on_mtls_beside_a_sidecar_user(
    ca: CA, registry: RegistryServer, tmp_path: Path
):
    async with (
        secure_mesh(ca, registry) as mesh,
        identity_agent(mesh, "client", tmp_path / "certs"),
    ):
        certs = CertFiles(tmp_path / "certs")
        assert certs.key.stat().st_mode & 0o777 == 0o600

        async def through_the_client_sidecar() -> set[str]:
            assert mesh.client is not None
            async with grpc.aio.insecure_channel(mesh.client.address) as channel:
                echo = Echo(channel)
                return {await served_by(echo.unary(b"x", timeout=10)) for _ in range(20)}

        seen, by_sidecar = await asyncio.gather(
            run_client(registry, tmp_path, certs), through_the_client_sidecar()
        )
    upstreams = {u.name for u in mesh.upstreams}
    assert all("served_by" in call for call in seen), seen
    assert {call["served_by"] for call in seen} == upstreams
    assert by_sidecar == upstreams


async def test_the_upstream_sidecar_authorizes_a_proxyless_caller_by_its_certificate(
    ca: CA, registry: RegistryServer, tmp_path: Path
):
    async with (
        secure_mesh(ca, registry) as mesh,
        identity_agent(mesh, "client", tmp_path / "client"),
        identity_agent(mesh, "intruder", tmp_path / "intruder"),
    ):
        await set_policy(
            ca,
            registry,
            {
                "default": "deny",
                "rules": [{"name": "client-may", "from": ["client"], "to": "echo"}],
            },
        )
        await asyncio.sleep(1.0)  # the sidecars' policy watch takes it up
        allowed = await run_client(registry, tmp_path, CertFiles(tmp_path / "client"), calls=5)
        denied = await run_client(registry, tmp_path, CertFiles(tmp_path / "intruder"), calls=5)
    assert all("served_by" in call for call in allowed), allowed
    assert {call.get("code") for call in denied} == {"PERMISSION_DENIED"}, denied
    assert f"spiffe://{TD}/svc/intruder may not call /{SERVICE}/Unary" in denied[0]["details"]


async def test_a_proxyless_client_without_a_certificate_reaches_no_upstream(
    ca: CA, registry: RegistryServer, tmp_path: Path
):
    async with (
        secure_mesh(ca, registry) as mesh,
        identity_agent(mesh, "client", tmp_path / "certs"),
    ):
        # It reads the registry on mTLS, but calls with plaintext credentials: the
        # sidecars refuse it at the handshake.
        seen = await run_client(
            registry, tmp_path, CertFiles(tmp_path / "certs"), calls=3, secure=False
        )
        served = sum(u.total for u in mesh.upstreams)
    assert {call.get("code") for call in seen} <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, seen
    assert served == 0


async def test_a_proxyless_client_keeps_calling_as_its_certificate_is_renewed_in_its_files(
    ca: CA, registry: RegistryServer, tmp_path: Path
):
    # Leaves of 8 s, renewed by the agent at about 5.6 s: over 20 s of new handshakes
    # every half second, the client presents at least three leaves, and would fail
    # with the first once it expired if gRPC did not take up the renewed files.
    async with (
        secure_mesh(ca, registry, leaf_ttl=dt.timedelta(seconds=8)) as mesh,
        identity_agent(mesh, "client", tmp_path / "certs"),
    ):
        certs = CertFiles(tmp_path / "certs")
        first = serial(certs.chain)
        seen = await run_client(registry, tmp_path, certs, seconds=20, calls=2)
        last = serial(certs.chain)
    failed = [call for call in seen if "served_by" not in call]
    assert failed == [], failed
    assert len(seen) >= 40
    assert first != last
