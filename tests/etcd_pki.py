"""Certificates for an etcd that serves TLS and asks clients for theirs (tests only).

``EtcdPki(dir)`` writes a CA, a server certificate for 127.0.0.1 signed by it, a client
pair signed by it, and a client pair from another CA that etcd must refuse.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry_service.etcd import EtcdTls

__all__ = ["EtcdPki"]

_DAY = datetime.timedelta(days=1)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class _Ca:
    def __init__(self, common: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(_name(common))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip

    def issue(self, common: str, *usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


class EtcdPki:
    """PEM files under ``root``: ``ca``, ``server``/``server_key`` for etcd, and the
    ``client`` and ``stranger`` (another CA's) settings for a registry."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ca, other = _Ca("shoal-test etcd CA"), _Ca("another CA")
        self.ca = root / "ca.pem"
        self.ca.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
        self.server, self.server_key = self._write(
            # etcd's gateway calls etcd's own gRPC with it: a client certificate too.
            root,
            "server",
            ca.issue("etcd", ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        )
        cert, key = self._write(
            root, "client", ca.issue("registry", ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        self.client = EtcdTls(self.ca, cert, key)
        cert, key = self._write(
            root, "stranger", other.issue("registry", ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        self.stranger = EtcdTls(self.ca, cert, key)

    @staticmethod
    def _write(root: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
        cert, key = root / f"{name}.pem", root / f"{name}-key.pem"
        cert.write_bytes(pair[0])
        key.write_bytes(pair[1])
        key.chmod(0o600)
        return cert, key
