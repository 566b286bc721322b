"""The mesh's CA: files and their modes, leaves that name only their SPIFFE ID, chains."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from identity.ca import CAError, init_ca, load_ca
from identity.spiffe import SpiffeError, SpiffeId
from identity.workload import new_request


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, uri: str = "") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asks for anything")])
    )
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_init_writes_keys_only_its_owner_can_read_and_refuses_to_overwrite(tmp_path):
    made = init_ca(tmp_path / "ca", "example.test")
    for name in ("root.key", "issuer.key"):
        assert stat.S_IMODE((tmp_path / "ca" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert made.root.not_valid_after_utc - made.root.not_valid_before_utc >= dt.timedelta(days=365)
    assert isinstance(made.root.public_key(), ec.EllipticCurvePublicKey)
    key_before = (tmp_path / "ca" / "issuer.key").read_bytes()
    with pytest.raises(CAError, match="already holds a CA"):
        init_ca(tmp_path / "ca", "example.test")
    assert (tmp_path / "ca" / "issuer.key").read_bytes() == key_before


def test_a_loaded_ca_knows_its_trust_domain_and_issues_like_the_new_one(tmp_path):
    init_ca(tmp_path, "example.test")
    loaded = load_ca(tmp_path)
    assert loaded.trust_domain == "example.test"
    leaf = loaded.issue(
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        SpiffeId.service("example.test", "worker"),
    )
    leaf.cert.verify_directly_issued_by(loaded.issuer)
    loaded.issuer.verify_directly_issued_by(loaded.root)


def test_a_leaf_names_only_the_identity_the_ca_gives_whatever_the_csr_asks(tmp_path):
    ca = init_ca(tmp_path, "shoal.local")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = _csr(key, uri="spiffe://shoal.local/svc/client")
    who = SpiffeId.service("shoal.local", "worker")
    leaf = ca.issue_for_csr(csr, who, dt.timedelta(seconds=30))
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://shoal.local/svc/worker"
    ]
    # The same identity, for grpcio's server-name check; nothing the CSR said.
    assert san.value.get_values_for_type(x509.DNSName) == ["worker.svc.shoal.local"]
    assert leaf.cert.subject == x509.Name([])
    assert leaf.cert.public_key() == key.public_key()
    basic = leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    life = leaf.cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(seconds=20) < life <= dt.timedelta(seconds=30)
    chain = x509.load_pem_x509_certificates(leaf.chain_pem)
    assert chain == [ca.issuer]


def test_the_registrys_leaf_also_names_the_hosts_its_csr_asks_for(tmp_path):
    ca = init_ca(tmp_path, "shoal.local")
    key, csr = new_request(("127.0.0.1", "registry.example", "::1"))
    leaf = ca.issue_for_csr(csr, SpiffeId("shoal.local", "registry"))
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://shoal.local/registry"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["registry.shoal.local", "registry.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert leaf.cert.public_key() == key.public_key()


def test_no_leaf_but_the_registrys_may_name_hosts(tmp_path):
    # A service that could would pass a proxyless client's check of the registry.
    ca = init_ca(tmp_path, "shoal.local")
    _, csr = new_request(("127.0.0.1",))
    for who in (SpiffeId.service("shoal.local", "worker"), SpiffeId("shoal.local", "identity")):
        with pytest.raises(CAError, match="may not name hosts"):
            ca.issue_for_csr(csr, who)
    registry = SpiffeId("shoal.local", "registry")
    _, bad = new_request(("not a host!",))
    with pytest.raises(CAError, match="neither an IP address nor a DNS name"):
        ca.issue_for_csr(bad, registry)
    _, many = new_request(tuple(f"10.0.0.{i}" for i in range(17)))
    with pytest.raises(CAError, match="at most 16 host names"):
        ca.issue_for_csr(many, registry)


def test_the_ca_refuses_bad_csrs_other_keys_and_other_trust_domains(tmp_path):
    ca = init_ca(tmp_path, "shoal.local")
    who = SpiffeId.service("shoal.local", "worker")
    with pytest.raises(CAError, match="not a PEM certificate signing request"):
        ca.issue_for_csr(b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n", who)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CAError, match="ECDSA P-256"):
        ca.issue_for_csr(_csr(rsa_key), who)
    with pytest.raises(CAError, match="ECDSA P-256"):
        ca.issue_for_csr(_csr(ec.generate_private_key(ec.SECP384R1())), who)
    with pytest.raises(CAError, match="trust domain"):
        ca.issue(
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            SpiffeId.service("other.test", "worker"),
        )


def test_a_leaf_never_outlives_its_issuer(tmp_path):
    ca = init_ca(tmp_path, "shoal.local", dt.timedelta(hours=1))
    leaf = ca.issue(
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        SpiffeId.service("shoal.local", "worker"),
        dt.timedelta(days=30),
    )
    assert leaf.cert.not_valid_after_utc == ca.issuer.not_valid_after_utc


def test_load_says_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(CAError, match="holds no CA: root.crt is missing"):
        load_ca(tmp_path)
    init_ca(tmp_path / "a", "shoal.local")
    init_ca(tmp_path / "b", "shoal.local")
    (tmp_path / "a" / "issuer.key").write_bytes((tmp_path / "b" / "issuer.key").read_bytes())
    with pytest.raises(CAError, match="does not belong to issuer.crt"):
        load_ca(tmp_path / "a")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://shoal.local/svc/worker", SpiffeId("shoal.local", "svc", "worker")),
        ("spiffe://shoal.local/registry", SpiffeId("shoal.local", "registry")),
        ("spiffe://shoal.local/identity", SpiffeId("shoal.local", "identity")),
        ("spiffe://td.test/operator/alice", SpiffeId("td.test", "operator", "alice")),
    ],
)
def test_spiffe_ids_round_trip(uri, expected):
    assert SpiffeId.parse(uri) == expected
    assert str(expected) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "https://shoal.local/svc/worker",
        "spiffe://Shoal.Local/svc/worker",
        "spiffe://shoal.local/svc/",
        "spiffe://shoal.local/svc/a/b",
        "spiffe://shoal.local/svc/..",
        "spiffe://shoal.local/registry/extra",
        "spiffe://shoal.local/pod/worker",
        "spiffe:///svc/worker",
    ],
)
def test_ids_the_mesh_does_not_issue_are_refused(uri):
    with pytest.raises(SpiffeError):
        SpiffeId.parse(uri)
