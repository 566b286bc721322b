"""Certificates for an etcd cluster and its clients: a CA of their own, members, clients.

etcd checks its peers and clients by X.509 with no notion of the mesh's SPIFFE ids, so
the registry's etcd gets a CA apart from the mesh's: a leak of one trusts nothing of the
other. What ``shoal etcd-cert`` writes, and what the HA compose mesh runs on; an
operator with a PKI of their own (cfssl, Vault) gives its files to the same flags.

- A member's certificate is for serving and for calling: etcd's gateway calls etcd's
  own gRPC with it, and members call each other with it. Its SANs are the member's
  DNS names and 127.0.0.1 (the health check's loopback).
- A client's certificate is for calling only, its common name the client's (etcd's
  auth, if turned on, maps it to a user).

Keys are P-256; files are written beside their target and renamed into place, keys
with ``key_mode`` (0600 by default; 0640 when another user of the group must read it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.ca import key_pem
from shoal_core.files import write_atomic

__all__ = ["EtcdCa", "IssuedPair", "load_or_init"]

CA_TTL = dt.timedelta(days=3650)
LEAF_TTL = dt.timedelta(days=365)
_SKEW = dt.timedelta(minutes=5)  # clocks of the containers may differ a little


@dataclass(frozen=True, slots=True)
class IssuedPair:
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


class EtcdCa:
    """A CA for one etcd cluster: its certificate and key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, common: str = "shoal etcd CA", ttl: dt.timedelta = CA_TTL) -> EtcdCa:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(_name(common))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "ca.pem", self.cert_pem, 0o644)
        write_atomic(directory / "ca-key.pem", key_pem(self.key), 0o600)

    def issue(
        self,
        common: str,
        *,
        server_names: tuple[str, ...] = (),
        ttl: dt.timedelta = LEAF_TTL,
    ) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM): a member's when ``server_names`` are given, else a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server_names:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
            sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(
            self.key, hashes.SHA256()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    def write_pair(
        self,
        directory: Path,
        common: str,
        *,
        server_names: tuple[str, ...] = (),
        key_mode: int = 0o600,
    ) -> IssuedPair:
        """Issue for ``common`` into ``directory``: ``ca.pem``, ``NAME.pem``, ``NAME-key.pem``."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = self.issue(common, server_names=server_names)
        pair = IssuedPair(directory / f"{common}.pem", directory / f"{common}-key.pem")
        write_atomic(directory / "ca.pem", self.cert_pem, 0o644)
        write_atomic(pair.key, key, key_mode)
        write_atomic(pair.cert, cert, 0o644)
        return pair


def load_or_init(directory: Path) -> EtcdCa:
    """The CA saved in ``directory``, made there first if it holds none."""
    cert_file, key_file = directory / "ca.pem", directory / "ca-key.pem"
    if not key_file.exists():
        ca = EtcdCa.create()
        ca.save(directory)
        return ca
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_file} holds no EC private key")
    return EtcdCa(x509.load_pem_x509_certificate(cert_file.read_bytes()), key)
