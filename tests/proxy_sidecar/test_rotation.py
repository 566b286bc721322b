"""A root rotation on a running mesh, under load: not one call may fail.

Leaves live 3 s, so every workload renews within each step's wait; the client drops its
connections every second, so the handshakes of the hop really meet each step's
certificates and bundles (open connections would otherwise never look again)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from cryptography import x509

from identity import rotation
from identity.ca import init_ca, load_ca
from identity.spiffe import SpiffeId
from identity.tokens import create_token
from identity_service.server import IdentityServer
from registry_service import RegistryServer
from shoal_cli.mesh_tls import start_keeper
from shoal_core.certifying import MeshIdentity
from shoal_core.tls import server_credentials
from tests.mesh_identity import TD
from tests.proxy_sidecar.conftest import FAST_REGISTRY
from tests.proxy_sidecar.test_mesh_tls import SecureMesh

LEAF_TTL = dt.timedelta(seconds=3)
# Two lifetimes: every workload renews (at 60-80 % of a life) at least once in it.
STEP = 6.5


def roots(bundle_pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle_pem)


async def test_a_root_rotated_in_three_steps_under_load_fails_no_call(tmp_path: Path):
    ca_dir = tmp_path / "ca"
    ca = init_ca(ca_dir, TD)
    old_root = ca.root
    async with IdentityServer("127.0.0.1:0", ca, leaf_ttl=LEAF_TTL, ca_dir=ca_dir) as certifier:
        token, _ = create_token(ca, SpiffeId(TD, "registry"), dt.timedelta(hours=1))
        keeper = await start_keeper(
            MeshIdentity(certifier.address, ca.bundle_pem, TD, token), SpiffeId(TD, "registry")
        )
        registry = RegistryServer(
            "127.0.0.1:0",
            FAST_REGISTRY,
            credentials=server_credentials(keeper.current),
            trust_domain=TD,
        )
        try:
            async with registry:
                built = SecureMesh(ca, certifier, registry)
                async with built.stack:
                    client = await built.start()
                    async with built.steady_load(client) as tally:
                        for step in (rotation.begin, rotation.switch, rotation.finish):
                            await asyncio.sleep(1.0)
                            step(ca_dir)
                            await asyncio.sleep(STEP)
                    sidecars = [client, *built.sidecars]
                    held = [s.tls.keeper.current() for s in sidecars if s.tls]
        finally:
            await keeper.close()
    assert tally.failures == []
    assert tally.calls > 100
    new_root = load_ca(ca_dir).root
    assert new_root != old_root
    # Everyone holds a leaf of the new issuer and trusts the new root alone.
    for creds in [*held, keeper.current()]:
        assert creds.leaf.issuer == load_ca(ca_dir).issuer.subject, creds.identity
        assert roots(creds.bundle_pem) == [new_root], creds.identity
