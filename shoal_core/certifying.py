"""What a workload needs to certify, and the Certify messages, without grpcio.

The sidecar certifies over its own data plane and never loads grpcio; the registry and
the CLI certify through grpcio (``shoal_core.certify_client``). Both build the request
and read the answer here, so there is one way to ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from identity.ca import trust_domain_of
from identity.spiffe import SpiffeId
from identity.workload import Credentials, new_request
from protos import identity_pb2 as pb
from shoal_core.errors import CertifyFailed

__all__ = [
    "CERTIFY",
    "CertifyFailed",
    "MeshIdentity",
    "check_admitted",
    "credentials_from",
    "request_for",
]

CERTIFY = "/shoal.identity.v1.Identity/Certify"


@dataclass(frozen=True)
class MeshIdentity:
    """Where and how a process certifies: the identity server, the mesh's roots (and
    the trust domain read from them), and the join token for the first certificate."""

    server: str
    bundle_pem: bytes
    trust_domain: str
    token: str
    # Host names the certificate should also carry (the registry's, see identity.ca).
    hosts: tuple[str, ...] = ()

    @classmethod
    def load(cls, server: str, bundle: Path, token: str) -> MeshIdentity:
        """With the roots of the ``bundle`` file, whose trust domain is the mesh's;
        ``OSError`` if it cannot be read, ``ValueError`` if it names no one domain."""
        pem = bundle.read_bytes()
        return cls(server, pem, trust_domain_of(pem), token.strip())

    @property
    def server_id(self) -> SpiffeId:
        """Who the identity server must prove it is."""
        return SpiffeId(self.trust_domain, "identity")

    def refused(self, code: str, details: str) -> CertifyFailed:
        """The one line for a Certify call that ended with ``code`` (its name)."""
        return CertifyFailed(f"cannot certify at {self.server}: {code}: {details}")


def check_admitted(held: Credentials, expected: SpiffeId | None) -> None:
    """``held`` is the identity the process must have (``expected``), or this raises."""
    if expected is not None and held.identity != expected:
        raise CertifyFailed(f"the token admits {held.identity}, not {expected}")


def request_for(
    token: str, current: Credentials | None, hosts: tuple[str, ...] = ()
) -> tuple[ec.EllipticCurvePrivateKey, pb.CertifyRequest]:
    """A fresh key and its CSR (naming ``hosts``), proven by ``token`` or, renewing, by
    ``current``."""
    key, csr = new_request(hosts)
    request = pb.CertifyRequest(csr_pem=csr)
    if current is not None:
        proof = current.renewal(csr)
        request.renewal.certificate_pem = proof.certificate_pem
        request.renewal.signature = proof.signature
    else:
        request.token = token
    return key, request


def credentials_from(key: ec.EllipticCurvePrivateKey, answer: pb.CertifyResponse) -> Credentials:
    return Credentials(key, answer.certificate_chain_pem, answer.trust_bundle_pem)
