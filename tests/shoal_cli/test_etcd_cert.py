"""`shoal etcd-cert`: one CA kept across calls, member and client pairs from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.shoal_cli.conftest import SHOAL


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHOAL, "etcd-cert", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_members_and_clients_share_one_ca_and_get_the_usages_etcd_needs(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    done = shoal("--ca-dir", str(ca), "--out", str(tmp_path / "m1"), "--member", "etcd1",
                 "--dns", "etcd1.mesh", "--group-readable")  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = shoal("--ca-dir", str(ca), "--out", str(tmp_path / "reg"), "--client", "registry")
    assert done.returncode == 0, done.stderr
    root = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    member = x509.load_pem_x509_certificate((tmp_path / "m1" / "etcd1.pem").read_bytes())
    client = x509.load_pem_x509_certificate((tmp_path / "reg" / "registry.pem").read_bytes())
    for leaf in (member, client):
        leaf.verify_directly_issued_by(root)  # one CA, made once and kept
    assert (tmp_path / "m1" / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes()
    usages = member.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    sans = member.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["etcd1", "etcd1.mesh"]
    usages = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (tmp_path / "m1" / "etcd1-key.pem").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "reg" / "registry-key.pem").stat().st_mode & 0o777 == 0o600
    assert (ca / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE" not in done.stdout + done.stderr


def test_asking_for_both_or_neither_kind_is_a_user_error(tmp_path: Path) -> None:
    base = ["--ca-dir", str(tmp_path / "ca"), "--out", str(tmp_path / "o")]
    for extra in ([], ["--member", "a", "--client", "b"], ["--client", "b", "--dns", "x"]):
        done = shoal(*base, *extra)
        assert done.returncode == 2, (extra, done)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
