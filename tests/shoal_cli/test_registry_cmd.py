"""`shoal registry` as a user runs it: a real process, real signals, one-line errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.registry_memory import start_registry
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc

SHOAL = [sys.executable, "-m", "shoal_cli.main"]


def test_serves_health_and_stops_cleanly_on_sigterm(
    registry_process: tuple[subprocess.Popen[str], str],
) -> None:
    proc, address = registry_process
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="shoal.registry.v1.Registry"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.RegistryStub(channel)
        stub.Register(
            pb.RegisterRequest(
                instance=pb.Instance(instance_id="a", service="svc", address="127.0.0.1:9")
            )
        )
        watch = stub.Watch(pb.WatchRequest())
        assert next(iter(watch)).type == pb.WatchEvent.SNAPSHOT
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = list(watch)  # the stream ends cleanly instead of being cut
        assert all(e.type in (pb.WatchEvent.PROGRESS, pb.WatchEvent.UPSERT) for e in rest)
        assert watch.code() == grpc.StatusCode.OK
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 3, "watch streams should not hold shutdown for the grace"
    assert not psutil.Process().children(recursive=True)


def test_second_signal_forces_exit(registry_process: tuple[subprocess.Popen[str], str]) -> None:
    proc, _ = registry_process
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["registry", "--listen", "nowhere"], "--listen"),
        (["registry", "--listen", "127.0.0.1:99999"], "outside"),
        (["registry", "--ttl-min", "5", "--ttl-default", "2"], "ttl_default"),
        (["registry", "--sweep-interval", "-1"], "--sweep-interval"),
        (["registry", "--preservation-share", "2"], "--preservation-share"),
        (["registry", "--max-instances", "0"], "--max-instances"),
        (["registry", "--history-bytes", "1000"], "--history-bytes"),
        (["registry", "--log-level", "LOUD"], "log level"),
        (["registry", "--bogus"], "--bogus"),
        (["registry", "--store", "redis://x:1"], "--store must be memory or etcd://"),
        (["registry", "--store", "etcd://a:1,,b:2"], "--store etcd://a:1,,b:2"),
        (["registry", "--store", "etcd://a:1", "--ttl-min", "0.5"], "whole seconds"),
        (["nonsense"], "nonsense"),
        (["health", "127.0.0.1:1", "--timeout", "0.5"], "unreachable"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_listen_address_in_use_is_a_clear_error(
    registry_process: tuple[subprocess.Popen[str], str],
) -> None:
    _, address = registry_process
    result = subprocess.run(
        [*SHOAL, "registry", "--listen", address], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    # Exactly one line: gRPC core's own copy of the error is silenced.
    assert result.stderr.strip().splitlines() == [
        f"shoal: error: cannot listen on {address}: address already in use"
    ]


def test_health_probe_reports_serving(registry_process: tuple[subprocess.Popen[str], str]) -> None:
    _, address = registry_process
    result = subprocess.run([*SHOAL, "health", address], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


def test_registry_demo_runs_to_the_end() -> None:
    result = subprocess.run([*SHOAL, "registry-demo"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "LAPSED" in out and "NOT_FOUND" in out and "remove" in out
    assert (
        "discover demo.Echo -> ['echo-1', 'echo-2']" in out
        or "discover demo.Echo -> ['echo-2', 'echo-1']" in out
    )


def test_instance_bounds_come_from_flags_and_the_mesh_file(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("registry:\n  max_instances_per_service: 1\n")
    with (
        start_registry(["--config", str(mesh), "--max-instances", "2"]) as registry,
        grpc.insecure_channel(registry.address) as channel,
    ):
        stub = pb_grpc.RegistryStub(channel)

        def register(n: int, service: str) -> None:
            inst = pb.Instance(instance_id=f"i{n}", service=service, address=f"127.0.0.1:{n + 1}")
            stub.Register(pb.RegisterRequest(instance=inst))

        register(0, "a")
        with pytest.raises(grpc.RpcError) as err:
            register(1, "a")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-instances-per-service" in (err.value.details() or "")
        register(1, "b")
        with pytest.raises(grpc.RpcError) as err:
            register(2, "c")
        details = err.value.details() or ""
        assert "2 instances" in details and "--max-instances" in details, details
