"""A workload's Certify call through grpcio (the registry's and the CLI's way)."""

from __future__ import annotations

import grpc

from identity.spiffe import SpiffeId
from identity.workload import Credentials
from protos import identity_pb2_grpc as pb_grpc
from shoal_core.certifying import MeshIdentity, credentials_from, request_for
from shoal_core.tls import bootstrap_credentials, target_options

__all__ = ["certify", "certify_as"]


async def certify(
    address: str,
    *,
    bundle_pem: bytes,
    trust_domain: str,
    token: str = "",
    current: Credentials | None = None,
    hosts: tuple[str, ...] = (),
    timeout: float = 5.0,
) -> Credentials:
    """Certify at the identity server at ``address`` (verified as the mesh's identity
    server against ``bundle_pem``), by ``token`` or, renewing, by ``current``; the
    certificate names ``hosts`` too (the registry's only)."""
    key, request = request_for(token, current, hosts)
    options = target_options(SpiffeId(trust_domain, "identity"))
    async with grpc.aio.secure_channel(
        address, bootstrap_credentials(bundle_pem), options=options
    ) as channel:
        answer = await pb_grpc.IdentityStub(channel).Certify(request, timeout=timeout)
    return credentials_from(key, answer)


async def certify_as(mesh: MeshIdentity, held: Credentials | None = None) -> Credentials:
    """Certify as ``mesh`` says: by its token, or, renewing, by ``held``, trusting the
    newest bundle held (after a root rotation the identity server's own leaf chains to a
    root the bundle given at start-up may not have). ``CertifyFailed``, in one line."""
    try:
        return await certify(
            mesh.server,
            bundle_pem=mesh.bundle_pem if held is None else held.bundle_pem,
            trust_domain=mesh.trust_domain,
            token=mesh.token,
            current=held,
            hosts=mesh.hosts,
        )
    except grpc.aio.AioRpcError as exc:
        raise mesh.refused(exc.code().name, exc.details() or "") from None
