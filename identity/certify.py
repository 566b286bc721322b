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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from identity.ca import CA, LEAF_TTL, CAError, Leaf, load_ca
from identity.spiffe import SpiffeError, SpiffeId
from identity.tokens import TokenError, verify_token

__all__ = ["BadRequest", "CertifyError", "Certifier", "NotProven", "Renewal", "spiffe_id_of"]

logger = logging.getLogger(__name__)


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
    """Issues leaves of ``ttl`` from ``ca`` to workloads that prove who they are.

    Given the CA's ``directory``, it reloads the CA when its issuer or bundle changes
    there (a rotation's step, see ``identity.rotation``): two ``stat`` calls per check.
    """

    def __init__(
        self, ca: CA, ttl: dt.timedelta = LEAF_TTL, *, directory: Path | None = None
    ) -> None:
        self.ca = ca
        self.ttl = ttl
        self._directory = directory
        self._stamp = self._files_stamp()

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        if self._directory is None:
            return None
        try:
            found = (os.stat(self._directory / n) for n in ("issuer.crt", "bundle.crt"))
            return tuple((f.st_ino, f.st_mtime_ns, f.st_size) for f in found)
        except FileNotFoundError:
            return None  # mid-rotation: files are being moved; look again next time

    def refresh(self) -> CA:
        """The CA, reloaded first if its files changed."""
        stamp = self._files_stamp()
        if stamp is not None and stamp != self._stamp:
            assert self._directory is not None
            try:
                self.ca = load_ca(self._directory)
            except CAError as exc:
                logger.warning("keeping the CA loaded before: %s", exc)
                return self.ca
            self._stamp = stamp
            logger.info(
                "reloaded the CA from %s: issuer %s, %d roots trusted",
                self._directory,
                self.ca.issuer.subject.rfc4514_string(),
                self.ca.trusted_roots,
            )
        return self.ca

    def certify(self, csr_pem: bytes, *, token: str = "", renewal: Renewal | None = None) -> Leaf:
        self.refresh()
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
        # The issuer's leaves, or those of one a rotation retired: they renew into new ones.
        for issuer in self.ca.issuers:
            try:
                cert.verify_directly_issued_by(issuer)
                break
            except (ValueError, TypeError, InvalidSignature):
                continue
        else:
            raise refuse("the certificate was not issued by this mesh's CA")
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
