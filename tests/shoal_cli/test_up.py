"""`shoal up` and the operator commands, driven as a user drives them: subprocesses."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
import pytest

from tests.shoal_cli.conftest import SHOAL, call_in_flight, wait_for_text


@dataclass
class Mesh:
    proc: subprocess.Popen[str]
    rows: dict[str, dict[str, str]]
    stderr_path: Path
    stderr_file: IO[str]
    intro: str  # the first line after the table
    pids: set[int] = field(default_factory=set)

    def address(self, name: str) -> str:
        return self.rows[name]["ADDRESS"].split()[0]

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def start_mesh(tmp_path: Path, *args: str) -> Mesh:
    err = tmp_path / "up.err"
    err_file = err.open("w")
    proc = subprocess.Popen(
        [*SHOAL, "up", "--base-port", "0", "--run-dir", str(tmp_path / "run"), *args],
        stdout=subprocess.PIPE,
        stderr=err_file,
        text=True,
        env={**os.environ, "SHOAL_LOG_LEVEL": "INFO"},
    )
    assert proc.stdout is not None
    header = proc.stdout.readline()
    if not header.startswith("ROLE\t"):
        # It never came up: reap it (a test that failed leaks no zombie) and say why.
        proc.kill()
        proc.wait()
        proc.stdout.close()
        err_file.close()
        raise AssertionError(f"shoal up did not start: {err.read_text()}")
    columns = header.rstrip("\n").split("\t")
    rows = {}
    while line := proc.stdout.readline().rstrip("\n"):
        row = dict(zip(columns, line.split("\t"), strict=True))
        rows[row["NAME"]] = row
    mesh = Mesh(proc, rows, err, err_file, proc.stdout.readline())
    mesh.pids = {int(r["PID"]) for r in rows.values()}
    return mesh


def stop_mesh(mesh: Mesh) -> None:
    if mesh.proc.poll() is None:
        mesh.proc.send_signal(signal.SIGINT)
    try:
        assert mesh.proc.wait(timeout=60) == 0, mesh.stderr()
    finally:
        if mesh.proc.poll() is None:
            mesh.proc.kill()
            mesh.proc.wait()
        if mesh.proc.stdout is not None:
            mesh.proc.stdout.close()
        mesh.stderr_file.close()


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"}


def shoal(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=60, input=stdin)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("mesh"), "--workers", "2")
    try:
        yield running
    finally:
        stop_mesh(running)
        assert not alive(running.pids)


def test_up_lists_every_part(mesh: Mesh) -> None:
    assert set(mesh.rows) == {
        "identity",
        "registry",
        "worker-1",
        "worker-2",
        "sidecar-1",
        "sidecar-2",
        "client-sidecar",
        "dashboard",
    }
    assert alive(mesh.pids) == mesh.pids


def test_the_mesh_runs_mtls_and_operators_find_their_certificate(mesh: Mesh) -> None:
    """No setting given: `shoal ls` finds this mesh's operator token by its registry's
    address; without that record it has no identity, and the registry refuses it."""
    registry = mesh.address("registry")
    assert "mTLS on every mesh hop" in mesh.intro
    ok = shoal("ls", "--registry", registry, "--json")
    assert ok.returncode == 0, ok.stderr
    stranger = subprocess.run(
        [*SHOAL, "ls", "--registry", registry],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(mesh.stderr_path.parent / "elsewhere")},
    )
    assert stranger.returncode == 2
    assert stranger.stderr.startswith(f"shoal: error: registry {registry} is unreachable")
    assert "if it runs mTLS, set SHOAL_IDENTITY_SERVER" in stranger.stderr
    assert stranger.stderr.count("\n") == 1


def test_up_prints_the_dashboard_whose_event_stream_shows_the_workers(mesh: Mesh) -> None:
    assert mesh.proc.stdout is not None
    said = [mesh.proc.stdout.readline() for _ in range(3)]
    url = mesh.address("dashboard")
    assert f"Dashboard: {url} " in "".join(said), said
    with urllib.request.urlopen(url, timeout=10) as page:
        assert page.headers["Content-Type"].startswith("text/html")
        assert b"<title>Shoal mesh</title>" in page.read()
    deadline = time.monotonic() + 30
    with urllib.request.urlopen(f"{url}events", timeout=10) as events:
        assert events.headers["Content-Type"].startswith("text/event-stream")
        while True:
            assert time.monotonic() < deadline, "no snapshot with both workers"
            line = events.readline()
            assert line, "the event stream ended"
            if line.startswith(b"data: "):
                snap = json.loads(line.removeprefix(b"data: "))
                workers = {s["name"]: s for s in snap["services"]}.get("worker")
                if workers is not None and workers["serving"] == 2:
                    break
    assert snap["registry"]["connected"] and len(workers["rows"]) == 2


def test_ls_shows_healthy_workers(mesh: Mesh) -> None:
    result = shoal("ls", "--registry", mesh.address("registry"), "--json")
    data = json.loads(result.stdout)
    workers = [i for i in data["instances"] if i["service"] == "worker"]
    assert len(workers) == 2 and all(i["healthy"] for i in workers)


def test_call_and_exec_through_the_client_sidecar(mesh: Mesh) -> None:
    via = mesh.address("client-sidecar")
    result = shoal("call", "upper", "--data", "hello mesh", "--via", via)
    assert (result.returncode, result.stdout) == (0, "HELLO MESH"), result.stderr
    assert "upper ran in" in result.stderr and "pid" in result.stderr
    result = shoal("call", "upper", "--via", via, stdin="from stdin")
    assert result.stdout == "FROM STDIN"
    result = shoal("exec", "--via", via, "--", "say", "hi", "there")
    assert (result.returncode, result.stdout) == (0, "hi there\n"), result.stderr
    assert result.stderr.startswith("shoal: exit 0 in ")
    result = shoal("exec", "--via", via, "--stdin", "-", "--", "wc", stdin="12345")
    assert result.stdout.strip() == "5"


def test_call_and_exec_json_say_what_the_text_shows(mesh: Mesh) -> None:
    via = mesh.address("client-sidecar")
    raw = b"\xff\x00bytes"  # not UTF-8: the exact bytes come back in base64
    called = subprocess.run(
        [*SHOAL, "call", "echo", "--via", via, "--json"], input=raw, capture_output=True, timeout=60
    )
    assert called.returncode == 0, called.stderr
    data = json.loads(called.stdout)
    assert base64.b64decode(data["result_base64"]) == raw
    assert data["result"] == raw.decode("utf-8", errors="replace")
    assert data["function"] == "echo" and type(data["pid"]) is int and data["pid"] > 0
    assert data["served_by"].startswith("worker@") and data["run_seconds"] >= 0
    assert data["cache"] is None  # echo is not cacheable: no cache trailer
    result = shoal("exec", "--via", via, "--json", "--", "say", "hi", "there")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["exit_code"], data["stdout"], data["stderr"]) == (0, "hi there\n", "")
    assert base64.b64decode(data["stdout_base64"]) == b"hi there\n"
    assert (data["command"], data["args"]) == ("say", ["hi", "there"])
    assert data["served_by"].startswith("worker@") and data["attempts"] == 1
    assert result.stderr == ""  # everything is in the object
    failed = shoal("exec", "--via", via, "--json", "--", "sleep", "x")
    assert failed.returncode == json.loads(failed.stdout)["exit_code"] != 0


def test_exec_env_sets_what_the_allowlist_allows(mesh: Mesh) -> None:
    via = mesh.address("client-sidecar")
    result = shoal("exec", "--via", via, "--env", "NAME=shoal mesh", "--", "env")
    assert result.returncode == 0, result.stderr
    # The mesh traces, so the worker hands every command its trace context too.
    lines = sorted(result.stdout.splitlines())
    assert [line for line in lines if not line.startswith("TRACEPARENT=")] == [
        "GREETING=hello",
        "NAME=shoal mesh",
    ]
    assert any(line.startswith("TRACEPARENT=00-") for line in lines)
    refused = shoal("exec", "--via", via, "--env", "NAME=a", "--env", "HOME=/", "--", "env")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "shoal: error: command 'env' does not let callers set HOME in env (PERMISSION_DENIED)"
    )


def test_work_failures_and_refusals(mesh: Mesh) -> None:
    via = mesh.address("client-sidecar")
    refused = shoal("exec", "--via", via, "--", "rm", "-rf", "/")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "shoal: error: command 'rm' is not in this worker's allowlist (NOT_FOUND)"
    )
    timed_out = shoal("call", "sleep", "--data", "5", "--timeout", "0.3", "--via", via)
    assert timed_out.returncode == 1 and "DEADLINE_EXCEEDED" in timed_out.stderr
    gone = shoal("call", "upper", "--data", "x", "--via", "127.0.0.1:1")
    assert gone.returncode == 2 and "unreachable" in gone.stderr


def test_an_operator_sets_policies_and_the_mesh_follows(mesh: Mesh, tmp_path: Path) -> None:
    """The example policy lets the client run work; one that denies it takes effect
    with no restart, and the caller gets one line naming itself and the rule."""
    registry, via = mesh.address("registry"), mesh.address("client-sidecar")
    example = Path(__file__).parents[2] / "examples" / "policy.yaml"
    deny = tmp_path / "deny.yaml"
    deny.write_text("default: deny\nrules: []\n")
    allow_all = tmp_path / "allow.yaml"
    allow_all.write_text("default: allow\nrules: []\n")
    try:
        assert shoal("policy", "set", str(example), "--registry", registry).returncode == 0
        time.sleep(1.0)
        called = shoal("call", "upper", "--data", "ok", "--via", via)
        assert (called.returncode, called.stdout) == (0, "OK"), called.stderr
        assert shoal("policy", "set", str(deny), "--registry", registry).returncode == 0
        time.sleep(1.0)
        refused = shoal("call", "upper", "--data", "no", "--via", via)
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr
        assert "spiffe://shoal.local/svc/client may not call" in refused.stderr
        assert "the mesh default (deny)" in refused.stderr
        # A registry that crashes comes back with the policy set, not "allow everything".
        os.kill(int(mesh.rows["registry"]["PID"]), signal.SIGKILL)
        wait_for_text(mesh.stderr_path, "registry restarted")
        deadline = time.monotonic() + 30
        while shoal("ls", "--registry", registry).stdout.count("healthy") < 2:
            assert time.monotonic() < deadline, "workers back in the restarted registry"
            time.sleep(0.5)
        time.sleep(1.0)
        again = shoal("call", "upper", "--data", "no", "--via", via)
        assert "the mesh default (deny)" in again.stderr, again.stderr
    finally:
        assert shoal("policy", "set", str(allow_all), "--registry", registry).returncode == 0
        time.sleep(1.0)


def test_stats_reports_workers_and_sidecars(mesh: Mesh) -> None:
    shoal("call", "upper", "--data", "count me", "--via", mesh.address("client-sidecar"))
    result = shoal("stats", "--registry", mesh.address("registry"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["workers"]) == 2 and all("uptime_seconds" in w for w in data["workers"])
    assert len(data["sidecars"]) == 2
    assert all("services" in s for s in data["sidecars"])
    # 64-bit counters are JSON numbers (the proto3 mapping would make them strings).
    assert all(type(w["echo_total"]) is int for w in data["workers"])
    assert all(type(w["cache"]["hits"]) is int for w in data["workers"])


def test_bench_measures_both_paths(mesh: Mesh) -> None:
    result = shoal(
        "bench",
        "--via",
        mesh.address("client-sidecar"),
        "--registry",
        mesh.address("registry"),
        "--seconds",
        "1",
        "--concurrency",
        "4",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"through sidecar", "direct to worker"}
    for figures in data.values():
        assert figures["requests"] > 0 and figures["errors"] == 0
        assert 0 < figures["p50_ms"] <= figures["p99_ms"]


def test_a_killed_worker_is_restarted_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path, "--workers", "1")
    try:
        worker = int(mesh.rows["worker-1"]["PID"])
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "worker-1 restarted" not in mesh.stderr():
            assert time.monotonic() < deadline, mesh.stderr()
            time.sleep(0.2)
        assert "worker-1 was killed by SIGKILL; restarting" in mesh.stderr()
        deadline = time.monotonic() + 30
        while (
            shoal("call", "upper", "--data", "back", "--via", mesh.address("client-sidecar")).stdout
            != "BACK"
        ):
            assert time.monotonic() < deadline, "the restarted worker never served"
            time.sleep(0.5)
        everything = {p.pid for p in psutil.Process(mesh.proc.pid).children(recursive=True)}
    finally:
        stop_mesh(mesh)
    assert not alive(everything | mesh.pids)
    assert "mesh stopped; no process left running" in mesh.stderr()


def test_demo_shows_traffic_spread_over_workers(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path, "--workers", "2", "--demo")
    try:
        deadline = time.monotonic() + 30
        while mesh.stderr().count("demo: ") < 2:
            assert time.monotonic() < deadline, mesh.stderr()
            time.sleep(0.3)
    finally:
        stop_mesh(mesh)
    line = [ln for ln in mesh.stderr().splitlines() if ln.startswith("demo: ")][-1]
    counts = dict(part.split("=") for part in line.split("spread ")[1].split())
    assert set(counts) == {"worker-1", "worker-2"}
    assert all(int(n) > 0 for n in counts.values()), line


@pytest.mark.parametrize(
    "args, message",
    [
        (["up", "--workers", "0"], "--workers"),
        (["up", "--restart", "sometimes"], "--restart"),
        (["up", "--config", "/nonexistent/mesh.yaml"], "cannot read file"),
        (["exec", "--via", "nowhere"], "--via"),
        (["exec", "--env", "NAME", "--", "env"], "expected KEY=VALUE, got 'NAME'"),
        (["exec", "--env", "=x", "--", "env"], "--env"),
        (["call"], "FUNCTION"),
        (["bench", "--seconds", "0"], "--seconds"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = shoal(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error:") and message in lines[0]


def test_insecure_runs_plaintext_with_no_identity_server_and_says_so(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path, "--workers", "1", "--insecure")
    try:
        assert "identity" not in mesh.rows and "registry" in mesh.rows
        assert mesh.intro.startswith("PLAINTEXT between mesh components (--insecure)")
        assert not (tmp_path / "run" / "ca").exists()
        listed = shoal("ls", "--registry", mesh.address("registry"), "--json")
        assert listed.returncode == 0, listed.stderr
        called = shoal("call", "upper", "--data", "hi", "--via", mesh.address("client-sidecar"))
        assert (called.returncode, called.stdout) == (0, "HI"), called.stderr
    finally:
        stop_mesh(mesh)
    assert not alive(mesh.pids)


def test_up_refuses_a_taken_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = shoal("up", "--base-port", str(port))
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr


def test_a_second_ctrl_c_kills_everything_at_once(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path, "--workers", "1")
    everything = {p.pid for p in psutil.Process(mesh.proc.pid).children(recursive=True)}
    logs = tmp_path / "run"
    with call_in_flight(mesh.address("client-sidecar"), mesh.address("worker-1")):
        mesh.proc.send_signal(signal.SIGINT)
        # The ordered stop has begun, and holds at the client sidecar draining the call.
        wait_for_text(logs / "client-sidecar.log", "SIGTERM: draining")
        mesh.proc.send_signal(signal.SIGINT)
        stop_mesh(mesh)
    assert not alive(everything | mesh.pids)
    # At once: the rest were killed where they stood, none was asked to drain first.
    for name in ("sidecar-1", "worker-1", "registry"):
        log = (logs / f"{name}.log").read_text()
        assert "draining" not in log and "stopped" not in log, (name, log)
    # Every child was collected by its own watcher, none reaped behind asyncio's back.
    assert "Unknown child process" not in mesh.stderr()


def test_a_mesh_that_traced_every_call_stops_at_once_with_no_child_killed(tmp_path: Path) -> None:
    # Spans are still queued in the workers when Ctrl-C comes: their last export must
    # find the dashboard still receiving, not hold the worker past its grace.
    mesh = start_mesh(tmp_path, "--workers", "1", "--insecure", "--trace-sample", "1")
    try:
        via = mesh.address("client-sidecar")
        for _ in range(3):
            result = shoal("call", "upper", "--data", "x", "--via", via)
            assert result.returncode == 0, result.stderr
    finally:
        stop_mesh(mesh)
    said = mesh.stderr()
    assert "did not stop" not in said and "killing it" not in said, said
    assert not alive(mesh.pids)
