"""`shoal worker` as a real process: starts, serves, drains on SIGTERM, leaves nothing."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import psutil

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc
from tests.worker_node.conftest import wait_until

SHOAL = [sys.executable, "-c", "import sys; from shoal_cli.main import main; sys.exit(main())"]


def test_shoal_worker_serves_and_exits_cleanly_on_sigterm():
    with subprocess.Popen(
        [*SHOAL, "worker", "--listen", "127.0.0.1:0", "--config", "examples/worker.yaml"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        _drive(proc)


def _drive(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("shoal worker serving on 127.0.0.1:"), line
        address = line.split()[-1]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            assert stub.Echo(pb.EchoRequest(payload=b"ping"), timeout=10).payload == b"ping"
            assert (
                stub.Call(pb.CallRequest(function="upper", payload=b"a"), timeout=10).result == b"A"
            )
            say = stub.Exec(pb.ExecRequest(command="say", args=["hi"]), timeout=10)
            assert say.stdout == b"hi\n"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(lambda: not any(c.is_running() and c.status() != "zombie" for c in children))


def test_a_bad_config_is_one_clear_line_and_exit_2(tmp_path):
    bad = tmp_path / "w.yaml"
    bad.write_text("pools:\n  default: {min: 3, max: 1}\n")
    done = subprocess.run(
        [*SHOAL, "worker", "--listen", "127.0.0.1:0", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert (
        done.stderr.startswith("shoal: error: ")
        and "min (3) must not exceed max (1)" in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_a_function_that_cannot_load_stops_start_up_clearly(tmp_path):
    bad = tmp_path / "w.yaml"
    bad.write_text("functions:\n  f: {target: 'no_such_module_xyz:f'}\n")
    done = subprocess.run(
        [*SHOAL, "worker", "--listen", "127.0.0.1:0", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot load 'no_such_module_xyz:f'" in done.stderr
    assert "Traceback" not in done.stderr
