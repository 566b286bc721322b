"""`shoal ca init`, `shoal token create` and `shoal identity`, run as a user runs them."""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import subprocess

import grpc
import pytest

from identity.ca import load_ca
from identity.spiffe import SpiffeId
from identity.tokens import verify_token
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from shoal_core.certify_client import certify
from shoal_core.tls import channel_credentials, target_options
from tests.mesh_identity import credentials
from tests.registry_service.conftest import instance

from .conftest import SHOAL, reap


def _shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=60)


def test_ca_init_then_token_create_gives_a_token_for_that_service(tmp_path):
    ca_dir = tmp_path / "ca"
    made = _shoal("ca", "init", str(ca_dir), "--trust-domain", "example.test")
    assert made.returncode == 0, made.stderr
    assert "trust domain example.test" in made.stdout
    assert stat.S_IMODE((ca_dir / "issuer.key").stat().st_mode) == 0o600
    key = (ca_dir / "issuer.key").read_text()
    key_body = key.splitlines()[1]
    got = _shoal("token", "create", "--ca", str(ca_dir), "--service", "worker", "--ttl", "90s")
    assert got.returncode == 0, got.stderr
    # Only the token on stdout (for `$(...)`); what it admits on stderr.
    token = got.stdout.strip()
    assert "\n" not in token
    assert "spiffe://example.test/svc/worker" in got.stderr
    assert verify_token(load_ca(ca_dir), token).service == "worker"
    for out in (made.stdout, made.stderr, got.stdout, got.stderr):
        assert key_body not in out


def test_token_create_operator_admits_that_operator(tmp_path):
    ca_dir = tmp_path / "ca"
    assert _shoal("ca", "init", str(ca_dir)).returncode == 0
    got = _shoal("token", "create", "--ca", str(ca_dir), "--operator", "ops", "--ttl", "2h")
    assert got.returncode == 0, got.stderr
    assert "spiffe://shoal.local/operator/ops" in got.stderr
    claims = verify_token(load_ca(ca_dir), got.stdout.strip())
    assert claims.identity == SpiffeId("shoal.local", "operator", "ops")


def test_identity_user_errors_are_one_line_and_exit_2(tmp_path):
    ca_dir = tmp_path / "ca"
    assert _shoal("ca", "init", str(ca_dir)).returncode == 0
    cases = [
        (("ca", "init", str(ca_dir)), "already holds a CA"),
        (("ca", "init", str(tmp_path / "x"), "--trust-domain", "Bad Domain"), "trust domain"),
        (("token", "create", "--ca", str(tmp_path / "none"), "--service", "w"), "holds no CA"),
        (("token", "create", "--ca", str(ca_dir), "--service", "a/b"), "service name"),
        (("token", "create", "--ca", str(ca_dir), "--service", "w", "--ttl", "soon"), "duration"),
        (("token", "create", "--ca", str(ca_dir)), "exactly one of"),
        (("token", "create", "--ca", str(ca_dir), "--service", "w", "--registry"), "exactly one"),
        (("token", "create", "--ca", str(ca_dir), "--registry", "--operator", "o"), "exactly one"),
        (("token", "create", "--ca", str(ca_dir), "--service", "w", "--operator", "o"), "exactly"),
        (("token", "create", "--ca", str(ca_dir), "--operator", "a/b"), "operator"),
        (("ca", "rotate", str(ca_dir)), "say which step"),
        (("ca", "rotate", str(ca_dir), "--finish"), "not rotating"),
    ]
    for args, said in cases:
        got = _shoal(*args)
        assert got.returncode == 2, (args, got.stderr)
        assert got.stderr.count("\n") == 1 and said in got.stderr, (args, got.stderr)
        assert got.stdout == ""


async def test_shoal_identity_certifies_a_token_holder_and_stops_on_sigterm(tmp_path):
    ca_dir = tmp_path / "ca"
    assert _shoal("ca", "init", str(ca_dir)).returncode == 0
    token = _shoal("token", "create", "--ca", str(ca_dir), "--service", "worker").stdout.strip()
    proc = subprocess.Popen(
        [*SHOAL, "identity", "--ca", str(ca_dir), "--listen", "127.0.0.1:0", "--leaf-ttl", "90s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("shoal identity serving on "), line
        address = line.split()[4]
        bundle = (ca_dir / "bundle.crt").read_bytes()
        got = await certify(address, bundle_pem=bundle, trust_domain="shoal.local", token=token)
        assert str(got.identity) == "spiffe://shoal.local/svc/worker"
        assert got.leaf.not_valid_after_utc - got.leaf.not_valid_before_utc <= dt.timedelta(
            seconds=90 + 60
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        logged = proc.stderr.read()
        # The log says who was certified, never the token or a key.
        assert token not in logged and "PRIVATE KEY" not in logged
    finally:
        reap(proc)


async def test_a_running_identity_server_takes_each_rotation_step_up_with_no_restart(tmp_path):
    ca_dir = tmp_path / "ca"
    assert _shoal("ca", "init", str(ca_dir)).returncode == 0
    token = _shoal("token", "create", "--ca", str(ca_dir), "--service", "worker").stdout.strip()
    proc = subprocess.Popen(
        [*SHOAL, "identity", "--ca", str(ca_dir), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[4]
        held = await certify(
            address, bundle_pem=(ca_dir / "bundle.crt").read_bytes(), trust_domain="shoal.local",
            token=token,
        )  # fmt: skip
        first_issuer = held.leaf.issuer
        for step, roots in (("--begin", 2), ("--switch", 2), ("--finish", 1)):
            done = _shoal("ca", "rotate", str(ca_dir), step)
            assert done.returncode == 0 and done.stdout.count("\n") == 1, done.stderr
            held = await certify(
                address, bundle_pem=held.bundle_pem, trust_domain="shoal.local", current=held
            )
            assert held.bundle_pem.count(b"BEGIN CERTIFICATE") == roots, step
            assert (held.leaf.issuer == first_issuer) is (step == "--begin"), step
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        reap(proc)


def _serving(
    args: list[str], env: dict[str, str], prefix: str
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*SHOAL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        proc.kill()
        raise AssertionError((line, proc.communicate(timeout=10)))
    return proc, line.split()[4]


async def test_shoal_registry_certifies_with_its_token_and_serves_mtls_only(tmp_path):
    ca_dir = tmp_path / "ca"
    assert _shoal("ca", "init", str(ca_dir)).returncode == 0
    token = _shoal("token", "create", "--ca", str(ca_dir), "--registry").stdout.strip()
    env = {**os.environ, "SHOAL_LOG_LEVEL": "INFO"}
    procs = []
    try:
        identity, identity_at = _serving(
            ["identity", "--ca", str(ca_dir), "--listen", "127.0.0.1:0"], env, "shoal identity"
        )
        procs.append(identity)
        # The token travels in the environment, never in argv (which `ps` shows).
        registry, registry_at = _serving(
            ["registry", "--listen", "127.0.0.1:0", "--identity-server", identity_at,
             "--trust-bundle", str(ca_dir / "bundle.crt")],
            {**env, "SHOAL_TOKEN": token}, "shoal registry serving on",
        )  # fmt: skip
        procs.append(registry)
        ca = load_ca(ca_dir)
        options = target_options(SpiffeId(ca.trust_domain, "registry"))
        worker = credentials(ca, "worker")
        async with grpc.aio.secure_channel(
            registry_at, channel_credentials(worker), options=options
        ) as channel:
            reply = await pb_grpc.RegistryStub(channel).Register(
                pb.RegisterRequest(instance=instance(1, "worker")), timeout=5
            )
            assert reply.lease_id
        # Its certificate names the host it listens on too: a client that checks that
        # and not the SPIFFE ID (a proxyless xDS client's bootstrap) connects.
        async with grpc.aio.secure_channel(registry_at, channel_credentials(worker)) as channel:
            await pb_grpc.RegistryStub(channel).Discover(pb.DiscoverRequest(), timeout=5)
        async with grpc.aio.insecure_channel(registry_at) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.RegistryStub(channel).Discover(pb.DiscoverRequest(), timeout=3)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=15) == 0
        logged = "".join(proc.communicate(timeout=5)[1] for proc in procs)
        assert "mTLS as spiffe://shoal.local/registry" in logged
        assert token not in logged and "PRIVATE KEY" not in logged
    finally:
        for proc in procs:
            reap(proc)


def test_shoal_registry_with_half_the_mtls_settings_is_a_one_line_user_error(tmp_path):
    ca_dir = tmp_path / "ca"
    assert _shoal("ca", "init", str(ca_dir)).returncode == 0
    got = _shoal(
        "registry", "--listen", "127.0.0.1:0", "--trust-bundle", str(ca_dir / "bundle.crt")
    )
    assert got.returncode == 2
    assert got.stderr.strip().count("\n") == 0 and "--identity-server" in got.stderr


def test_shoal_registry_tls_name_without_mtls_is_a_one_line_user_error():
    got = _shoal("registry", "--listen", "127.0.0.1:0", "--tls-name", "registry.example")
    assert got.returncode == 2
    assert got.stderr.strip().count("\n") == 0 and "--identity-server" in got.stderr
