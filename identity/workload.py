"""A workload's side of identity: its key, its requests, and when to renew.

Keys are made in memory and never written: a restarted workload asks again with its
token. Renewal comes at about 70 % of the leaf's life, with jitter so that the
workloads certified together do not all come back together.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity.certify import Renewal, spiffe_id_of
from identity.spiffe import SpiffeId

__all__ = ["Credentials", "new_request", "renew_after"]

RENEW_AT = 0.7
JITTER = 0.1


@dataclass(frozen=True)
class Credentials:
    """What a workload holds: its key, its leaf and chain, and the roots it trusts."""

    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes
    bundle_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.chain_pem)

    @property
    def identity(self) -> SpiffeId:
        return spiffe_id_of(self.leaf)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def renewal(self, csr_pem: bytes) -> Renewal:
        """Proof, for a new CSR, that this leaf's holder sends it."""
        leaf_pem = self.leaf.public_bytes(serialization.Encoding.PEM)
        return Renewal(leaf_pem, self.key.sign(csr_pem, ec.ECDSA(hashes.SHA256())))


def new_request(hosts: Sequence[str] = ()) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh key and a PEM CSR for it. The CA sets the identity, so the CSR names none;
    ``hosts`` are DNS names or IP addresses to be named too (``identity.ca``: only the
    registry may)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False
        )
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def renew_after(leaf: x509.Certificate, *, rng: random.Random | None = None) -> float:
    """Seconds from now until a leaf just received should be renewed: at 70 % (+- 10 %)
    of the life it has left.

    Measured from now, not from ``not_valid_before``: the CA backdates leaves a minute
    for clock skew, which would put a leaf of a few seconds past its renewal at once.
    """
    left = (leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
    return max(0.0, left * (RENEW_AT + (rng or random).uniform(-JITTER, JITTER)))
