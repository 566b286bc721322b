"""The mesh's certificate authority: a root, an issuing key under it, and leaf issuance.

``init_ca`` writes a directory an operator keeps: ``root.crt`` and ``root.key`` (the
root, ECDSA P-256, a year by default), ``issuer.crt`` and ``issuer.key`` (the key that
signs leaves and join tokens, so the root key can stay offline), and ``bundle.crt`` (the
trust bundle workloads verify against; a second root can be added to it for a
rotation). Private keys are written 0600 and never printed.

A leaf carries exactly one URI SAN, the workload's SPIFFE ID (and the same ID as a DNS
name, see ``SpiffeId.dns_name``), whatever the CSR asked for: the CA decides who a
workload is, the CSR only brings its public key. The one exception is the registry's:
it may also name the hosts clients dial it by (``HOST_NAMES_FOR``), because a plain gRPC
client (a proxyless xDS client reading its bootstrap) checks the server's name against
the host in its target and cannot be told to expect a SPIFFE ID instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.spiffe import SpiffeId

__all__ = ["CA", "CAError", "Leaf", "init_ca", "key_pem", "load_ca", "trust_domain_of"]

ROOT_TTL = dt.timedelta(days=365)
LEAF_TTL = dt.timedelta(hours=24)
# Leaves start a little in the past: a peer whose clock is behind still accepts them.
_SKEW = dt.timedelta(minutes=1)
_FILES = ("root.crt", "root.key", "issuer.crt", "issuer.key", "bundle.crt")
# Only these kinds may name hosts in their leaves: a service that could would pass a
# proxyless client's check of the registry's name and then hand it any endpoints.
HOST_NAMES_FOR = frozenset({"registry"})
MAX_HOST_NAMES = 16


class CAError(Exception):
    """The CA directory or a request to it is not usable; the message says why."""


@dataclass(frozen=True)
class Leaf:
    """An issued certificate and the chain up to (not including) the root, as PEM."""

    cert: x509.Certificate
    chain_pem: bytes

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CA:
    trust_domain: str
    root: x509.Certificate
    issuer: x509.Certificate
    issuer_key: ec.EllipticCurvePrivateKey
    bundle_pem: bytes
    # Issuers replaced by a rotation (``identity.rotation``) whose leaves may still renew.
    previous: tuple[x509.Certificate, ...] = ()

    @property
    def issuers(self) -> tuple[x509.Certificate, ...]:
        """Whose leaves and tokens this CA accepts: its issuer, then any a rotation retired."""
        return (self.issuer, *self.previous)

    @property
    def trusted_roots(self) -> int:
        """How many roots the bundle holds (two while a rotation runs)."""
        return self.bundle_pem.count(b"BEGIN CERTIFICATE")

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        who: SpiffeId,
        ttl: dt.timedelta = LEAF_TTL,
        hosts: Sequence[str] = (),
    ) -> Leaf:
        """A leaf for ``public_key`` (ECDSA P-256) naming ``who``, valid for ``ttl`` (within
        the issuer's), and ``hosts`` (DNS names or IP addresses: the registry's only)."""
        names = _host_names(who, hosts)
        if who.trust_domain != self.trust_domain:
            raise CAError(f"{who} is not in this mesh's trust domain {self.trust_domain}")
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise CAError("the key must be ECDSA P-256")
        if ttl <= dt.timedelta(0):
            raise CAError("a certificate's lifetime must be positive")
        now = dt.datetime.now(dt.UTC)
        not_after = min(now + ttl, self.issuer.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.issuer.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(not_after)
            # SPIFFE X.509-SVID: an empty subject makes the SAN critical. The DNS name is
            # for grpcio's server-name check only; the URI is who the workload is.
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(str(who)), x509.DNSName(who.dns_name), *names]
                ),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issuer_key.public_key()),
                critical=False,
            )
            .sign(self.issuer_key, hashes.SHA256())
        )
        return Leaf(cert, self.issuer.public_bytes(serialization.Encoding.PEM))

    def issue_for_csr(self, csr_pem: bytes, who: SpiffeId, ttl: dt.timedelta = LEAF_TTL) -> Leaf:
        """A leaf for the key in a PEM CSR, once the CSR's own signature checks out."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CAError(f"not a PEM certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise CAError("the CSR's signature does not match its key")
        return self.issue(csr.public_key(), who, ttl, hosts_of(csr))


def hosts_of(csr: x509.CertificateSigningRequest) -> list[str]:
    """The DNS names and IP addresses a CSR asks for (its URIs are ignored: the CA
    names the workload)."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [*san.get_values_for_type(x509.DNSName), *ips]


def _host_names(who: SpiffeId, hosts: Sequence[str]) -> list[x509.GeneralName]:
    if not hosts:
        return []
    if who.kind not in HOST_NAMES_FOR:
        raise CAError(f"{who} may not name hosts in its certificate (only the registry may)")
    if len(hosts) > MAX_HOST_NAMES:
        raise CAError(f"at most {MAX_HOST_NAMES} host names, not {len(hosts)}")
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(_dns_name(host)))
    return names


def _dns_name(host: str) -> str:
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(
        0 < len(label) <= 63
        and label.replace("-", "").isalnum()
        and label.isascii()
        and not label.startswith("-")
        for label in labels
    ):
        raise CAError(f"{host!r} is neither an IP address nor a DNS name")
    return host.rstrip(".").lower()


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _ca_cert(
    name: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None, path_length: int, now: dt.datetime, ttl: dt.timedelta,
    trust_domain: str,
) -> x509.Certificate:  # fmt: skip
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # Each CA named apart (by its key): while a rotation trusts two roots of one trust
    # domain, OpenSSL-based verifiers (grpcio's) pick a root by name and would try the
    # wrong one.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {key_id.digest.hex()[:8]}")]
    )
    # The trust domain as a URI SAN, as SPIFFE bundles name it: how load_ca learns it.
    domain = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
    )
    builder = x509.CertificateBuilder()
    if issuer is not None:
        # And the key that signed it, so a chain is built by key, not by name alone.
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    return (
        builder.add_extension(domain, critical=False)
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(key_id, False)
        .sign(signer, hashes.SHA256())
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its mode, never widened after the fact: no moment where others may read.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM of ``key``: what every key file of ours holds."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(directory: Path, trust_domain: str, ttl: dt.timedelta = ROOT_TTL) -> CA:
    """Make a new CA in ``directory`` (created 0700 if missing; refused if it holds one)."""
    SpiffeId(trust_domain, "registry")  # validates the trust domain
    if ttl <= dt.timedelta(0):
        raise CAError("the root's lifetime must be positive")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    taken = [name for name in _FILES if (directory / name).exists()]
    if taken:
        raise CAError(f"{directory} already holds a CA ({', '.join(taken)}): not overwritten")
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert(
        f"Shoal root CA ({trust_domain})", root_key, root_key, None, 1, now, ttl, trust_domain
    )
    issuer = _ca_cert(
        f"Shoal issuing CA ({trust_domain})",
        issuer_key,
        root_key,
        root.subject,
        0,
        now,
        ttl,
        trust_domain,
    )
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    _write(directory / "root.key", key_pem(root_key), 0o600)
    _write(directory / "issuer.key", key_pem(issuer_key), 0o600)
    _write(directory / "root.crt", root_pem, 0o644)
    _write(directory / "issuer.crt", issuer.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(directory / "bundle.crt", root_pem, 0o644)
    return CA(trust_domain, root, issuer, issuer_key, root_pem)


def load_ca(directory: Path) -> CA:
    """The CA in ``directory``, as ``init_ca`` wrote it."""
    try:
        root = x509.load_pem_x509_certificate((directory / "root.crt").read_bytes())
        issuer = x509.load_pem_x509_certificate((directory / "issuer.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "issuer.key").read_bytes(), None)
        bundle = (directory / "bundle.crt").read_bytes()
    except FileNotFoundError as exc:
        raise CAError(
            f"{directory} holds no CA: {Path(str(exc.filename)).name} is missing"
        ) from None
    except ValueError as exc:
        raise CAError(f"{directory}: a CA file is not valid PEM: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{directory}/issuer.key is not an ECDSA key")
    if key.public_key() != issuer.public_key():
        raise CAError(f"{directory}/issuer.key does not belong to issuer.crt")
    try:
        trust_domain = trust_domain_of(root.public_bytes(serialization.Encoding.PEM))
    except ValueError:
        raise CAError(f"{directory}/root.crt names no trust domain: not a Shoal root") from None
    previous = directory / "previous" / "issuer.crt"
    earlier: tuple[x509.Certificate, ...]
    try:
        earlier = (x509.load_pem_x509_certificate(previous.read_bytes()),)
    except FileNotFoundError:
        earlier = ()
    except ValueError as exc:
        raise CAError(f"{previous} is not valid PEM: {exc}") from None
    return CA(trust_domain, root, issuer, key, bundle, earlier)


def trust_domain_of(bundle_pem: bytes) -> str:
    """The trust domain the roots of a bundle name (``shoal ca init`` puts it in their URI
    SAN); ``ValueError`` if the bundle names none, or more than one."""
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        raise ValueError("not a PEM trust bundle") from None
    domains = set()
    for root in roots:
        try:
            san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://"):
                domains.add(uri[len("spiffe://") :].rstrip("/"))
    if len(domains) != 1:
        raise ValueError(f"the bundle's roots name {len(domains)} trust domains, not one")
    return domains.pop()
