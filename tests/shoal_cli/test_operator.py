"""The records `shoal up` keeps for operator commands: written private, found by address,
ignored and pruned once their `shoal up` is gone. Pure files: no mesh runs here."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from identity.ca import init_ca
from shoal_cli.operator import forget_mesh, operator_identity, record_mesh


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    for name in ("SHOAL_IDENTITY_SERVER", "SHOAL_TRUST_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "run" / "shoal" / "meshes"


def test_a_record_is_found_by_the_registry_address_and_is_private(tmp_path, runtime):
    ca = init_ca(tmp_path / "ca", "shoal.local")
    token = tmp_path / "operator.token"
    token.write_text("a-token\n")
    path = record_mesh("127.0.0.1:9100", "127.0.0.1:9103", tmp_path / "ca" / "bundle.crt", token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    found = operator_identity("localhost:9100")  # the same mesh, however it is written
    assert found is not None
    assert (found.server, found.token, found.trust_domain) == (
        "127.0.0.1:9103",
        "a-token",
        "shoal.local",
    )
    assert found.bundle_pem == ca.bundle_pem
    assert operator_identity("127.0.0.1:9200") is None
    forget_mesh(path)
    assert operator_identity("127.0.0.1:9100") is None


def test_records_of_a_shoal_up_that_is_gone_are_ignored_then_pruned(tmp_path, runtime):
    init_ca(tmp_path / "ca", "shoal.local")
    token = tmp_path / "operator.token"
    token.write_text("t\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    runtime.mkdir(parents=True)
    stale = runtime / "127.0.0.1_9300.json"
    stale.write_text(
        json.dumps(
            {
                "registry": "127.0.0.1:9300",
                "identity_server": "127.0.0.1:9303",
                "trust_bundle": str(tmp_path / "ca" / "bundle.crt"),
                "token_file": str(token),
                "pid": dead.pid,
            }
        )
    )
    (runtime / "garbage.json").write_text("{not json")
    assert operator_identity("127.0.0.1:9300") is None  # its shoal up is gone
    record_mesh("127.0.0.1:9100", "127.0.0.1:9103", tmp_path / "ca" / "bundle.crt", token)
    assert sorted(p.name for p in runtime.iterdir()) == ["127.0.0.1_9100.json"]
    assert json.loads((runtime / "127.0.0.1_9100.json").read_text())["pid"] == os.getpid()
