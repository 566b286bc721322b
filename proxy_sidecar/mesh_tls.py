"""The sidecar's mesh identity: certified over its own data plane, renewed, installed.

The sidecar's process carries no grpcio, so it asks for its certificate the way it makes
every control-plane call, through the data plane: the first time with only the trust
bundle (it has no certificate to show yet, and the identity server asks for none), after
that over mTLS. Each new leaf goes to the data plane at once; new connections use it,
open ones keep theirs (``shoal_core.renewal`` says when and how renewal retries).

It also says whom each address must prove to be: the identity server and the registry
by their roles, an instance by its service's SPIFFE ID. A rogue process that registered
a stolen address therefore gets no call: it cannot prove the service's identity.
"""

from __future__ import annotations

import logging

from shoal_dataplane import DataPlane

from identity.spiffe import SpiffeId
from identity.workload import Credentials
from protos import identity_pb2 as pb
from proxy_sidecar.rpc import Rpc, RpcError
from shoal_core.certifying import (
    CERTIFY,
    CertifyFailed,
    MeshIdentity,
    check_admitted,
    credentials_from,
    request_for,
)
from shoal_core.errors import ServerStartError
from shoal_core.renewal import CertificateKeeper

__all__ = ["SidecarTls"]

logger = logging.getLogger(__name__)

CERTIFY_TIMEOUT = 5.0


class SidecarTls:
    """Keeps ``dataplane``'s identity from ``mesh``'s identity server until ``close()``."""

    def __init__(self, mesh: MeshIdentity, dataplane: DataPlane, rpc: Rpc) -> None:
        self.mesh = mesh
        self._dataplane = dataplane
        self._rpc = rpc
        self.keeper = CertificateKeeper(self._certify, on_change=self._install)

    @property
    def identity(self) -> SpiffeId:
        return self.keeper.current().identity

    async def start(self, expected: SpiffeId | None) -> None:
        """The first certificate, installed; ``expected`` is the identity the token must
        admit (the registered service's). Refusals stop the start, in one line. (The
        data plane trusts the bundle already: it had to, to start secure.)"""
        mesh = self.mesh
        self._dataplane.expect_peer(mesh.server, str(mesh.server_id))
        try:
            held = await self.keeper.start()
            check_admitted(held, expected)
        except CertifyFailed as exc:
            await self.keeper.close()
            raise ServerStartError(str(exc)) from None
        logger.info("mTLS as %s", held.identity)

    async def _certify(self, held: Credentials | None) -> Credentials:
        key, request = request_for(self.mesh.token, held)
        try:
            answer = await self._rpc.unary(
                self.mesh.server, CERTIFY, request, pb.CertifyResponse, timeout=CERTIFY_TIMEOUT
            )
        except RpcError as exc:
            raise self.mesh.refused(exc.name, exc.details) from None
        return credentials_from(key, answer)

    def _install(self, fresh: Credentials) -> None:
        self._dataplane.set_identity(fresh.chain_pem, fresh.key_pem, fresh.bundle_pem)

    def expect_registry(self, address: str) -> None:
        """Calls to ``address`` go to the registry (one of its replicas: each address
        is said): it must prove the registry's identity."""
        self._dataplane.expect_peer(address, str(SpiffeId(self.mesh.trust_domain, "registry")))

    def expect_service(self, address: str, service: str) -> None:
        """Calls to ``address`` go to an instance of ``service``: it must prove that."""
        self._dataplane.expect_peer(address, str(SpiffeId.service(self.mesh.trust_domain, service)))

    async def close(self) -> None:
        await self.keeper.close()
