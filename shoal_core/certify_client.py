"""A workload's Certify call: a fresh key and CSR, a proof, and the credentials back."""

from __future__ import annotations

import grpc

from identity.spiffe import SpiffeId
from identity.workload import Credentials, new_request
from protos import identity_pb2 as pb
from protos import identity_pb2_grpc as pb_grpc
from shoal_core.tls import bootstrap_credentials, target_options

__all__ = ["certify"]


async def certify(
    address: str,
    *,
    bundle_pem: bytes,
    trust_domain: str,
    token: str = "",
    current: Credentials | None = None,
    timeout: float = 5.0,
) -> Credentials:
    """Certify at the identity server at ``address`` (verified as the mesh's identity
    server against ``bundle_pem``), by ``token`` or, renewing, by ``current``."""
    key, csr = new_request()
    request = pb.CertifyRequest(csr_pem=csr)
    if current is not None:
        proof = current.renewal(csr)
        request.renewal.certificate_pem = proof.certificate_pem
        request.renewal.signature = proof.signature
    else:
        request.token = token
    options = target_options(SpiffeId(trust_domain, "identity"))
    async with grpc.aio.secure_channel(
        address, bootstrap_credentials(bundle_pem), options=options
    ) as channel:
        answer = await pb_grpc.IdentityStub(channel).Certify(request, timeout=timeout)
    return Credentials(key, answer.certificate_chain_pem, answer.trust_bundle_pem)
