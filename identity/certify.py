"""What the identity server decides: which identity a CSR gets, on what proof.

Two proofs are taken. A join token admits the one service it names (first contact, when
the workload has no certificate). A renewal is the workload's current leaf, unexpired
and chaining to this CA's issuer, plus its current key's signature over the new CSR:
the holder of a leaf can move to a fresh key and keep its identity, and nobody else can
(a copied leaf without its key signs nothing). Whatever the CSR names, the leaf gets
the identity the proof gives.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from identity.ca import CA, LEAF_TTL, CAError, Leaf
from identity.spiffe import SpiffeError, SpiffeId
from identity.tokens import TokenError, verify_token

__all__ = ["BadRequest", "CertifyError", "Certifier", "NotProven", "Renewal", "spiffe_id_of"]


class CertifyError(Exception):
    """A request refused; the message says why."""


class NotProven(CertifyError):
    """The proof (token or renewal) does not show who the workload is."""


class BadRequest(CertifyError):
    """The CSR is not one the CA signs."""


@dataclass(frozen=True, slots=True)
class Renewal:
    certificate_pem: bytes
    signature: bytes


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID in a leaf's URI SAN; ``SpiffeError`` if there is not exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SpiffeError("the certificate has no subject alternative name") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SpiffeError(f"the certificate has {len(uris)} URI SANs, not one")
    return SpiffeId.parse(uris[0])


class Certifier:
    """Issues leaves of ``ttl`` from ``ca`` to workloads that prove who they are."""

    def __init__(self, ca: CA, ttl: dt.timedelta = LEAF_TTL) -> None:
        self.ca = ca
        self.ttl = ttl

    def certify(self, csr_pem: bytes, *, token: str = "", renewal: Renewal | None = None) -> Leaf:
        if bool(token) == (renewal is not None):
            raise NotProven("send either a join token or a renewal")
        who = self._by_renewal(csr_pem, renewal) if renewal else self._by_token(token)
        try:
            return self.ca.issue_for_csr(csr_pem, who, self.ttl)
        except CAError as exc:
            raise BadRequest(str(exc)) from None

    def _by_token(self, token: str) -> SpiffeId:
        try:
            return verify_token(self.ca, token).identity
        except TokenError as exc:
            raise NotProven(str(exc)) from None

    def _by_renewal(self, csr_pem: bytes, renewal: Renewal) -> SpiffeId:
        def refuse(why: str) -> NotProven:
            return NotProven(f"renewal refused: {why}")

        try:
            cert = x509.load_pem_x509_certificate(renewal.certificate_pem)
        except ValueError:
            raise refuse("not a PEM certificate") from None
        try:
            cert.verify_directly_issued_by(self.ca.issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise refuse("the certificate was not issued by this mesh's CA") from None
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise refuse(f"the certificate expired at {cert.not_valid_after_utc:%H:%M:%SZ}")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise refuse("the certificate's key is not ECDSA")
        try:
            key.verify(renewal.signature, csr_pem, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise refuse("the signature is not by the certificate's key") from None
        try:
            return spiffe_id_of(cert)
        except SpiffeError as exc:
            raise refuse(str(exc)) from None
