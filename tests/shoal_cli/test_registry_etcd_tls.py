"""`shoal registry --store etcd://... --etcd-ca ...` against a real etcd that serves TLS
and asks clients for a certificate of its CA (`--client-cert-auth`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service.etcd import EtcdTls
from tests.etcd_cluster import EtcdCluster, requires_etcd
from tests.etcd_pki import EtcdPki
from tests.shoal_cli.conftest import SHOAL
from tests.shoal_cli.test_registry_etcd import replica, spec

pytestmark = requires_etcd


def tls_flags(tls: EtcdTls) -> list[str]:
    assert tls.cert is not None and tls.key is not None
    return ["--etcd-ca", str(tls.ca), "--etcd-cert", str(tls.cert), "--etcd-key", str(tls.key)]


def run_registry(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHOAL, "registry", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SHOAL_LOG_LEVEL": "WARNING"},
        check=False,
    )


async def test_a_registry_over_tls_etcd_registers_renews_and_reads_with_its_certificate(
    tmp_path: Path,
) -> None:
    pki = EtcdPki(tmp_path / "pki")
    async with EtcdCluster(tmp_path / "etcd", pki=pki) as cluster:
        with replica(cluster.endpoints, *tls_flags(pki.client)) as (proc, at):
            async with grpc.aio.insecure_channel(at) as channel:
                stub = pb_grpc.RegistryStub(channel)
                reply = await stub.Register(pb.RegisterRequest(instance=spec(1), ttl_ms=3000))
                # A renewal goes over gRPC to etcd, a load change through the gateway.
                beat = await stub.Heartbeat(
                    pb.HeartbeatRequest(
                        lease_id=reply.lease_id,
                        status=pb.SERVING,
                        load=pb.LoadReport(in_flight=3),
                    )
                )
                found = await stub.Discover(pb.DiscoverRequest(service="echo"))
            proc.terminate()
            _, stderr = proc.communicate(timeout=10)
    assert beat.ttl_ms == 3000
    assert [(i.instance_id, i.load.in_flight) for i in found.instances] == [("echo-1", 3)]
    assert "without TLS" not in stderr
    assert "BEGIN" not in stderr  # no PEM, of the key above all, reaches the log


@pytest.mark.parametrize("who", ["stranger", "no certificate"])
async def test_etcd_refuses_a_registry_without_a_certificate_of_its_ca(
    tmp_path: Path, who: str
) -> None:
    pki = EtcdPki(tmp_path / "pki")
    flags = tls_flags(pki.stranger) if who == "stranger" else ["--etcd-ca", str(pki.ca)]
    async with EtcdCluster(tmp_path / "etcd", members=1, pki=pki) as cluster:
        done = run_registry("--store", f"etcd://{cluster.endpoints[0]}", *flags)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "etcd" in lines[0] and "Traceback" not in done.stderr, lines


def test_tls_flags_that_cannot_work_are_user_errors(tmp_path: Path) -> None:
    pki = EtcdPki(tmp_path / "pki")
    assert pki.client.cert is not None and pki.client.key is not None
    store = "etcd://127.0.0.1:2379"
    cases = {
        "--etcd-cert and --etcd-key need --etcd-ca": [
            "--store", store, "--etcd-cert", str(pki.client.cert), "--etcd-key", str(pki.client.key)
        ],
        "need --store etcd": ["--etcd-ca", str(pki.ca)],
        "needs both its cert and its key": [
            "--store", store, "--etcd-ca", str(pki.ca), "--etcd-cert", str(pki.client.cert)
        ],
        "etcd TLS files": ["--store", store, "--etcd-ca", str(pki.client.key)],
    }  # fmt: skip
    for message, args in cases.items():
        done = run_registry(*args)
        assert done.returncode == 2, (args, done)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
