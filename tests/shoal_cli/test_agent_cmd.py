"""``shoal identity-agent``, run as a user runs it: a real identity server, a real
token, the files it keeps, and one-line errors."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identity.cert_files import CertFiles
from identity.certify import spiffe_id_of

from .conftest import SHOAL, reap
from .test_identity_cmd import _serving, _shoal


def _agent(args: list[str], token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHOAL, "identity-agent", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SHOAL_TOKEN": token},
    )  # fmt: skip


def test_the_agent_keeps_the_workloads_certificate_in_files_until_sigterm(tmp_path: Path):
    ca_dir = tmp_path / "ca"
    assert _shoal("ca", "init", str(ca_dir)).returncode == 0
    token = _shoal("token", "create", "--ca", str(ca_dir), "--service", "app").stdout.strip()
    env = {**os.environ, "SHOAL_LOG_LEVEL": "INFO"}
    identity, identity_at = _serving(
        ["identity", "--ca", str(ca_dir), "--listen", "127.0.0.1:0"], env, "shoal identity"
    )
    agent = None
    try:
        agent, _ = _serving(
            ["identity-agent", "--identity-server", identity_at,
             "--trust-bundle", str(ca_dir / "bundle.crt"), "--service", "app",
             "--out", str(tmp_path / "certs")],
            {**env, "SHOAL_TOKEN": token}, "shoal identity-agent keeping spiffe://shoal.local/svc/app",
        )  # fmt: skip
        files = CertFiles(tmp_path / "certs")
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
        assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
        leaf = x509.load_pem_x509_certificate(files.chain.read_bytes())
        assert str(spiffe_id_of(leaf)) == "spiffe://shoal.local/svc/app"
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        assert key.public_key() == leaf.public_key()
        assert files.bundle.read_bytes() == (ca_dir / "bundle.crt").read_bytes()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
        logged = agent.communicate(timeout=5)[1]
        assert f"wrote {files.chain} for spiffe://shoal.local/svc/app" in logged
        assert token not in logged and "PRIVATE KEY" not in logged
    finally:
        identity.send_signal(signal.SIGTERM)
        reap(identity)
        if agent is not None:
            reap(agent)


def test_agent_user_errors_are_one_line_and_exit_2(tmp_path: Path):
    ca_dir = tmp_path / "ca"
    assert _shoal("ca", "init", str(ca_dir)).returncode == 0
    token = _shoal("token", "create", "--ca", str(ca_dir), "--service", "app").stdout.strip()
    bundle = str(ca_dir / "bundle.crt")
    identity, identity_at = _serving(
        ["identity", "--ca", str(ca_dir), "--listen", "127.0.0.1:0"], dict(os.environ),
        "shoal identity",
    )  # fmt: skip
    out = str(tmp_path / "certs")
    try:
        cases = [
            (["--out", out], token, "needs --identity-server"),
            (["--identity-server", identity_at, "--trust-bundle", bundle, "--out", out,
              "--service", "other"], token, "admits spiffe://shoal.local/svc/app, not"),
            (["--identity-server", identity_at, "--trust-bundle", bundle, "--out", out],
             "not-a-token", "cannot certify at"),
            (["--identity-server", identity_at, "--trust-bundle", bundle, "--out", out,
              "--service", "bad name"], token, "--service"),
            (["--identity-server", identity_at, "--trust-bundle", bundle,
              "--out", str(tmp_path / "ca" / "bundle.crt" / "certs")], token, "--out"),
        ]  # fmt: skip
        for args, given, says in cases:
            got = _agent(args, given)
            assert got.returncode == 2, (args, got.stderr)
            (line,) = got.stderr.strip().splitlines()
            assert line.startswith("shoal: error:") and says in line, (args, line)
            assert not (tmp_path / "certs" / "svid.pem").exists()
    finally:
        identity.send_signal(signal.SIGTERM)
        reap(identity)
