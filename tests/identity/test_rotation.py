"""The three steps of a root rotation on a real CA directory (no servers: see
tests/proxy_sidecar/test_rotation.py for one under load)."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509

from identity import rotation
from identity.ca import CAError, init_ca, load_ca
from identity.certify import Certifier, NotProven
from identity.tokens import create_token, verify_token
from identity.workload import new_request
from tests.mesh_identity import TD, credentials


def bundle_roots(directory: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((directory / "bundle.crt").read_bytes())


def test_each_step_trusts_what_it_must_and_keeps_keys_private(tmp_path: Path):
    directory = tmp_path / "ca"
    old = init_ca(directory, TD)
    rotation.begin(directory)
    next_root = load_ca(directory / "next").root
    assert bundle_roots(directory) == [old.root, next_root]
    assert load_ca(directory).issuer == old.issuer  # still signing with the old issuer
    assert next_root.subject != old.root.subject  # named apart (see identity.ca)

    rotation.switch(directory)
    switched = load_ca(directory)
    assert switched.root == next_root and switched.previous == (old.issuer,)
    assert bundle_roots(directory) == [old.root, next_root]
    assert not (directory / "next").exists()
    assert sorted(p.name for p in (directory / "previous").iterdir()) == [
        "issuer.crt",
        "root.crt",
    ]  # retired keys are deleted
    for key in ("root.key", "issuer.key"):
        assert stat.S_IMODE((directory / key).stat().st_mode) == 0o600

    rotation.finish(directory)
    done = load_ca(directory)
    assert bundle_roots(directory) == [next_root] and done.previous == ()
    assert not (directory / "previous").exists()


def test_steps_out_of_order_are_refused_and_change_nothing(tmp_path: Path):
    directory = tmp_path / "ca"
    init_ca(directory, TD)
    before = (directory / "bundle.crt").read_bytes()
    with pytest.raises(CAError, match="not rotating: begin first"):
        rotation.switch(directory)
    with pytest.raises(CAError, match="not rotating: nothing to finish"):
        rotation.finish(directory)
    assert (directory / "bundle.crt").read_bytes() == before
    rotation.begin(directory)
    with pytest.raises(CAError, match="rotating already"):
        rotation.begin(directory)
    with pytest.raises(CAError, match="has not switched"):
        rotation.finish(directory)
    rotation.switch(directory)
    with pytest.raises(CAError, match="has not finished its last rotation"):
        rotation.begin(directory)


def test_after_the_switch_old_leaves_renew_and_old_tokens_admit_until_the_finish(
    tmp_path: Path,
):
    directory = tmp_path / "ca"
    old = init_ca(directory, TD)
    held = credentials(old, "worker")
    token, _ = create_token(old, "worker", dt.timedelta(hours=1))
    certifier = Certifier(old, directory=directory)
    rotation.begin(directory)
    rotation.switch(directory)

    _, csr = new_request()
    renewed = certifier.certify(csr, renewal=held.renewal(csr))  # reloads the directory
    assert renewed.cert.issuer == load_ca(directory).issuer.subject
    assert verify_token(certifier.ca, token).service == "worker"

    rotation.finish(directory)
    certifier.refresh()
    with pytest.raises(NotProven, match="not issued by this mesh's CA"):
        _, csr = new_request()
        certifier.certify(csr, renewal=held.renewal(csr))
    with pytest.raises(NotProven, match="not issued by this mesh's CA"):
        certifier.certify(csr, token=token)
