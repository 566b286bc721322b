"""The mesh file: validation with lines, and flag > env > file > default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc

SHOAL = [sys.executable, "-m", "shoal_cli.main"]


def granted_default_ttl(args: list[str], env: dict[str, str]) -> int:
    """Start `shoal registry`, register with no TTL, return the TTL it granted (ms)."""
    proc = subprocess.Popen(
        [*SHOAL, "registry", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "SHOAL_LOG_LEVEL": "WARNING", **env},
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().rsplit(" ", 1)[1].strip()
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.RegistryStub(channel).Register(
                pb.RegisterRequest(
                    instance=pb.Instance(instance_id="a", service="s", address="127.0.0.1:1")
                )
            )
        return reply.ttl_ms
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("registry:\n  listen: 127.0.0.1:0\n  ttl_default: 4\n")
    listen = ["--listen", "127.0.0.1:0"]
    env = {"SHOAL_REGISTRY_TTL_DEFAULT": "5"}
    assert granted_default_ttl(listen, {}) == 10_000
    assert granted_default_ttl(["--config", str(mesh)], {}) == 4000
    assert granted_default_ttl(["--config", str(mesh)], env) == 5000
    assert granted_default_ttl(["--config", str(mesh), "--ttl-default", "6"], env) == 6000
    # SHOAL_CONFIG names the file when --config is not given.
    assert granted_default_ttl([], {"SHOAL_CONFIG": str(mesh)}) == 4000


def test_check_points_at_each_error_line(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("registry:\n  listen: nowhere\n  ttl_default: -3\n  sweep_intreval: 1\n")
    result = subprocess.run(
        [*SHOAL, "config", "check", str(mesh)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{mesh}:2: registry.listen: Value error, address 'nowhere' must be host:port "
        "(got 'nowhere')",
        f"{mesh}:3: registry.ttl_default: Input should be greater than 0 (got -3)",
        f"{mesh}:4: registry.sweep_intreval: Extra inputs are not permitted (got 1)",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        (b"registry: [1, 2]\n", ":1: registry: Input should be a valid dictionary"),
        (b"registry:\n  ttl_default: [\n", ":3: not valid YAML"),
        (b"unknown_section: {}\n", ":1: unknown_section: Extra inputs are not permitted"),
        (b"up: &up\n  workers: *up\n", ":2: the alias *up refers to a value that contains it"),
        (b"registry:\n  ttl_default: 4  # caf\xe9\n", ":2: not UTF-8 text (byte 0xe9)"),
    ],
)
def test_check_rejects_malformed_files(tmp_path: Path, text: bytes, message: str) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_bytes(text)
    result = subprocess.run(
        [*SHOAL, "config", "check", str(mesh)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{mesh}{message}"), lines
    assert "Traceback" not in result.stderr


def test_check_takes_only_true_and_false_as_booleans(tmp_path: Path) -> None:
    (tmp_path / "worker.yaml").write_text(
        "commands:\n  say:\n    argv: [echo]\n    allow_args: y\n    inherit_env: on\n"
    )
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("worker:\n  config: worker.yaml\n")
    result = subprocess.run(
        [*SHOAL, "config", "check", str(mesh)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert sorted(result.stderr.splitlines()) == [
        f"{tmp_path / 'worker.yaml'}:4: commands.say.allow_args: must be true or false (got 'y')",
        f"{tmp_path / 'worker.yaml'}:5: commands.say.inherit_env: must be true or false (got 'on')",
    ]


def test_check_accepts_a_good_file_and_commands_refuse_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("registry:\n  ttl_default: 4\n")
    result = subprocess.run(
        [*SHOAL, "config", "check", str(good)], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout.strip()) == (0, f"{good}: ok (registry)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("registry:\n  ttl_default: no\n")
    result = subprocess.run(
        [*SHOAL, "registry", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"shoal: error: {bad}: line 2: registry.ttl_default: Input should be a valid number, "
        "unable to parse string as a number (got 'no')"
    ]
    missing = subprocess.run(
        [*SHOAL, "config", "check", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "cannot read file" in missing.stderr


def test_check_follows_the_worker_and_sidecar_files_it_names(tmp_path: Path) -> None:
    (tmp_path / "worker.yaml").write_text("functions:\n  up: {target: 42}\n")
    (tmp_path / "sidecar.yaml").write_text("lb: round_robin\n")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("worker:\n  config: worker.yaml\nsidecar:\n  config: sidecar.yaml\n")
    result = subprocess.run(
        [*SHOAL, "config", "check", str(mesh)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"{tmp_path / 'worker.yaml'}:2: functions.up.target:")
    (tmp_path / "worker.yaml").write_text(
        "functions:\n  up: {target: 'worker_node.demo_tasks:upper'}\n"
    )
    result = subprocess.run(
        [*SHOAL, "config", "check", str(mesh)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{mesh}: ok (worker, sidecar)"


def test_check_json_is_one_object_with_each_problem(tmp_path: Path) -> None:
    (tmp_path / "worker.yaml").write_text("functions:\n  up: {target: 42}\n")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("registry:\n  ttl_default: 4\nworker:\n  config: worker.yaml\n")
    result = subprocess.run(
        [*SHOAL, "config", "check", str(mesh), "--json"], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stderr) == (2, "")
    data = json.loads(result.stdout)
    assert (data["file"], data["ok"], data["sections"]) == (
        str(mesh),
        False,
        ["registry", "worker"],
    )
    [problem] = data["problems"]
    assert (problem["file"], problem["line"]) == (str(tmp_path / "worker.yaml"), 2)
    assert problem["message"].startswith("functions.up.target: ")
    (tmp_path / "worker.yaml").write_text("functions: {}\n")
    result = subprocess.run(
        [*SHOAL, "config", "check", str(mesh), "--json"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "file": str(mesh),
        "ok": True,
        "sections": ["registry", "worker"],
        "problems": [],
    }
