"""`shoal ls` and `shoal watch` against a running registry."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from tests.shoal_cli.conftest import SHOAL

Registry = tuple[subprocess.Popen[str], str]


def populate(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        for n in range(2):
            reply = stub.Register(
                pb.RegisterRequest(
                    instance=pb.Instance(
                        instance_id=f"w{n}",
                        service="worker",
                        address=f"127.0.0.1:{8000 + n}",
                        grpc_services=["shoal.worker.v1.Worker"],
                        zone="a",
                    ),
                    ttl_ms=60_000,
                )
            )
        stub.Heartbeat(
            pb.HeartbeatRequest(
                lease_id=reply.lease_id,
                status=pb.DRAINING,
                load=pb.LoadReport(in_flight=3, cpu_percent=40),
            )
        )


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=30)


def test_ls_plain_text_when_piped(registry_process: Registry) -> None:
    _, address = registry_process
    populate(address)
    result = run("ls", "--registry", address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == [
        "SERVICE",
        "INSTANCE",
        "ADDRESS",
        "HEALTH",
        "LOAD",
        "ZONE",
        "WEIGHT",
        "LEASE AGE",
    ]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[:4] for r in rows] == [
        ["worker", "w0", "127.0.0.1:8000", "healthy/SERVING"],
        ["worker", "w1", "127.0.0.1:8001", "healthy/DRAINING"],
    ]
    assert rows[1][4] == "3 in flight, 0 queued, 40% cpu"


def test_ls_json(registry_process: Registry) -> None:
    _, address = registry_process
    populate(address)
    result = run("ls", "--registry", address, "--json")
    data = json.loads(result.stdout)
    assert [i["instance_id"] for i in data["instances"]] == ["w0", "w1"]
    assert data["services"][0]["name"] == "worker"
    assert data["state"]["instances_total"] == 2
    # 64-bit integers are JSON numbers, not the proto3 mapping's strings; zeros are there.
    assert type(data["revision"]) is int and data["revision"] > 0
    assert all(type(i["load"]["memory_bytes"]) is int for i in data["instances"])


def test_watch_prints_snapshot_then_changes(registry_process: Registry) -> None:
    _, address = registry_process
    populate(address)
    result = run("watch", "--registry", address, "--count", "2", "--seconds", "10", "--json")
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["type"] == "SNAPSHOT" and len(first["instances"]) == 2
    assert second["type"] == "PROGRESS"  # nothing changed meanwhile: the registry says so
    assert type(first["revision"]) is int and type(second["revision"]) is int
    assert second["revision"] >= first["revision"]


def test_unreachable_registry_is_one_line() -> None:
    for args in (["ls"], ["watch", "--count", "1"]):
        result = run(*args, "--registry", "127.0.0.1:1")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shoal: error: registry 127.0.0.1:1 is")


def test_health_json(registry_process: Registry) -> None:
    _, address = registry_process
    result = run("health", address, "--service", "shoal.registry.v1.Registry", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "address": address,
        "service": "shoal.registry.v1.Registry",
        "status": "SERVING",
    }


def in_a_terminal(columns: int, *args: str) -> str:
    """Run shoal with a terminal of ``columns`` columns as its output; what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    try:
        proc = subprocess.Popen([*SHOAL, *args], stdout=slave, stderr=slave, env=env)
    finally:
        os.close(slave)
    out = b""
    try:
        while chunk := _read(master):
            out += chunk
    finally:
        os.close(master)
        assert proc.wait(timeout=30) == 0, out
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode()).replace("\r", "")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child closed its end
        return b""


@pytest.mark.parametrize("columns", [80, 60])
def test_ls_on_a_narrow_terminal_keeps_instance_and_address_whole(
    registry_process: Registry, columns: int
) -> None:
    _, address = registry_process
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        for port in (47001, 47002):
            instance = pb.Instance(
                instance_id=f"worker@127.0.0.1:{port}",
                service="worker",
                address=f"127.0.0.1:{port}",
                zone="zone-a",
            )
            stub.Register(pb.RegisterRequest(instance=instance, ttl_ms=60_000))
    shown = in_a_terminal(columns, "ls", "--registry", address)
    lines = shown.splitlines()
    assert all(len(line) <= columns for line in lines), shown
    for port in (47001, 47002):
        # On one line, uncut: the two things an operator copies out of this table.
        assert any(
            f" worker@127.0.0.1:{port} " in line and f" 127.0.0.1:{port} " in line for line in lines
        ), shown
    assert "not shown, to fit: weight, zone, load" in " ".join(shown.split())  # the title
    wide = in_a_terminal(200, "ls", "--registry", address)
    assert "LEASE AGE" in wide and "WEIGHT" in wide and "not shown" not in wide


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_output_into_a_closed_pipe_is_not_an_error(
    registry_process: Registry, json_flag: list[str]
) -> None:
    # `shoal ls | head -0`: the reader is gone before the first line is written.
    _, address = registry_process
    populate(address)
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [*SHOAL, "ls", "--registry", address, *json_flag],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, "")
